"""Submit one job into the live queue (operator token): ``POST /v1/jobs``.

The body's text is manifest syntax holding exactly one ``[[jobs]]`` table, plus the
``[datasets.*]`` and ``[defaults]`` it uses, parsed by the manifest loader (the same keys and
the same errors as a reload); ``[hosts]``, ``[[runs]]``, ``[[pipelines]]`` and a
``[fair_share]`` that says anything are the manifest's, refused rather than dropped. Its
``after`` may name jobs of the manifest or submitted ones; the queue checks those names, the
job's name and its identity in the transaction that inserts it (``queue.sqlite_submit``). A
reload keeps the job (it is not the manifest's).
"""

from __future__ import annotations

from pydantic import Field

from trainfleet.coordinator.bodies import check_toml_depth
from trainfleet.coordinator.endpoints import Ctx, RouteTable
from trainfleet.coordinator.schemas import Body
from trainfleet.errors import BadRequest, ManifestError, ManifestTooDeep
from trainfleet.manifest import parse_manifest
from trainfleet.manifest.load import MAX_DEPTH
from trainfleet.manifest.spec import FairShareSpec, JobSpec
from trainfleet.queue.base import JobRecord

routes = RouteTable()

MAX_TEXT_CHARS = 256 * 1024  # one job and its datasets; a manifest-sized text is a mistake


class SubmitBody(Body):
    text: str = Field(
        max_length=MAX_TEXT_CHARS,
        description="TOML in manifest syntax: exactly one [[jobs]] table, and the"
        " [datasets.NAME] and [defaults] tables it uses",
    )
    path: str = Field(
        "<submitted>", max_length=1024, description="file name used in error messages"
    )


@routes.route(
    "POST",
    "/v1/jobs",
    auth="operator",
    summary="Submit one job into the live queue (kept across reloads); it waits for its"
    " `after` jobs",
    body=SubmitBody,
    response=JobRecord,
    status=201,
)
async def add_job(ctx: Ctx) -> JobRecord:
    body: SubmitBody = ctx.body
    spec = await ctx.run(parse_job, body.text, body.path)
    job = await ctx.run(ctx.coord.queue.add_job, spec)
    if job.state == "pending":
        ctx.coord.work.notify()  # wake long-poll claims (coordinator.longpoll)
    return job


def parse_job(text: str, path: str) -> JobSpec:
    """The one job of a submitted text; ``BadRequest`` (with the loader's problems) if the
    text is not valid manifest syntax or does not hold exactly one job and nothing else a
    job cannot use."""
    check_toml_depth(text, f"job file {path}", MAX_DEPTH)
    try:
        manifest = parse_manifest(text, path, external_after=True)
    except ManifestTooDeep:
        raise BadRequest(f"job file {path} nests deeper than {MAX_DEPTH} levels") from None
    except ManifestError as err:
        raise BadRequest(f"invalid job file {path}", problems=err.problems) from None
    extra = [
        key
        for key, present in (
            ("hosts", manifest.hosts),
            ("runs", manifest.runs),
            ("pipelines", manifest.pipelines),
            ("fair_share", manifest.fair_share != FairShareSpec()),
        )
        if present
    ]
    if extra:
        raise BadRequest(
            f"job file {path}: only [[jobs]], [datasets.NAME] and [defaults] may be"
            f" submitted, not {', '.join(extra)} (reload the manifest for those)"
        )
    if len(manifest.jobs) != 1:
        raise BadRequest(
            f"job file {path}: holds {len(manifest.jobs)} [[jobs]] tables; submit exactly one"
        )
    return manifest.jobs[0]
