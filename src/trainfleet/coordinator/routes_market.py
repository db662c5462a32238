"""Training-market endpoints: models, competitions, submissions, the leaderboard, the ledger.

The rules are ``coordinator.market``'s (and ``verify``'s); here is who may call what, and the
shapes. Everything a submitter sends is untrusted: a model upload is streamed, bounded
(``market.MAX_MODEL_BYTES``) and checked against its sha256; a submission's model must fit the
competition's family before any referee runs (400 with the reason otherwise).

API (JSON shapes are the pydantic models named):

- ``PUT /v1/market/models/{sha256}?size=N`` (auth ``submitter``: the operator token, or an
  enrolled host's join token): store a model file (safetensors bytes), content addressed;
  ``ModelStored``. The same bytes again store nothing new. A host's model is at most the
  largest family of any competition (``MarketDriver.submitter_upload_limit``; 413 beyond).
- ``GET /v1/market/models/{sha256}`` (auth ``worker``): the bytes, only to a worker holding an
  active referee job that names that model (candidate or frontier); 403 for any other
  digest, so a worker credential cannot read other artifacts through it.
- ``POST /v1/market/competitions`` (auth ``operator``): ``{"spec": CompetitionSpec,
  "baseline": sha256}`` -> ``CompetitionRecord``; the coordinator scores the baseline on the
  held-out data itself (409 if the name is taken).
- ``GET /v1/market/competitions`` (auth ``market``): ``CompetitionList``.
- ``GET /v1/market/competitions/{competition}`` (auth ``market``; a name or id):
  ``CompetitionDetail`` (its submissions, newest last, and the balances it paid).
- ``POST /v1/market/competitions/{competition}/submissions`` (auth ``submitter``; the producer
  is "operator" or the host the join token is enrolled for): ``{"sha256", "claim"}`` ->
  ``SubmissionRecord`` (state ``refereeing``, or ``duplicate`` for a model submitted before).
  Instead of ``sha256``, the operator (only: 403 for a host) may name ``"job"`` (a completed
  gpt train job: its ``model.safetensors``, produced by the job's host) or ``"run"`` and
  ``"round"`` (a run round's global weights, produced by "operator");
  ``coordinator.market_sources``.
- ``GET /v1/market/competitions/{competition}/leaderboard`` (auth ``market``): ``Leaderboard``:
  accepted submissions by trusted score (the panel's, never the claim).
- ``GET /v1/market/submissions/{submission}`` (auth ``submitter``, so a host that submitted
  follows its verdict with its own token): ``SubmissionDetail`` (its referees' reports and
  jobs).
- ``GET /v1/market/ledger[?competition=NAME]`` (auth ``market``): ``Ledger``: every payment,
  oldest first, and the balances derived from them.
"""

from __future__ import annotations

from pydantic import Field, model_validator
from starlette.responses import StreamingResponse

from trainfleet.coordinator.endpoints import HEX64, INT64_MAX, Ctx, Param, RouteTable
from trainfleet.coordinator.market import MAX_MODEL_BYTES
from trainfleet.coordinator.routes_read import stream_blob
from trainfleet.coordinator.routes_worker import _stream_and_store
from trainfleet.coordinator.schemas import Body
from trainfleet.errors import Forbidden, IntegrityError, NotFound, PayloadTooLarge
from trainfleet.queue.base import JobState
from trainfleet.queue.market_base import (
    CompetitionRecord,
    LedgerEntry,
    SubmissionRecord,
)
from trainfleet.verify.market import OPERATOR, CompetitionSpec
from trainfleet.verify.panel import MAX_LOSS

routes = RouteTable()

REF_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
COMPETITION = Param(
    "competition", "a competition's name or id", pattern=REF_PATTERN, max_length=128
)
SUBMISSION = Param("submission", "a submission's id", pattern=REF_PATTERN, max_length=128)
COMPETITION_QUERY = Param(
    "competition", "only this competition (a name or id)", pattern=REF_PATTERN, max_length=128
)
MODEL_SIZE = Param(
    "size", "the model file's length in bytes", "integer", 0, INT64_MAX, required=True
)


class ModelStored(Body):
    sha256: str
    size: int
    stored: bool = Field(description="false when the coordinator had these bytes already")


class NewCompetition(Body):
    spec: CompetitionSpec
    baseline: str = Field(pattern=HEX64, description="sha256 of the uploaded baseline model")


class NewSubmission(Body):
    """Exactly one source: ``sha256`` (an uploaded model), ``job`` (a completed gpt train
    job's ``model.safetensors``), or ``run`` with ``round`` (a run round's global weights)."""

    sha256: str | None = Field(None, pattern=HEX64, description="sha256 of the uploaded model")
    job: str | None = Field(
        None,
        pattern=REF_PATTERN,
        max_length=128,
        description="operator only: a completed train job of the gpt recipe (name, id or id"
        " prefix); its model.safetensors is submitted, produced by the job's host",
    )
    run: str | None = Field(
        None,
        pattern=REF_PATTERN,
        max_length=128,
        description="operator only, with round: a run (name or id) whose global weights at"
        " the start of that round are submitted, produced by the operator",
    )
    round: int | None = Field(
        None,
        ge=0,
        le=INT64_MAX,
        description="with run: the round whose starting weights are submitted (one past the"
        " run's last round: its final weights)",
    )
    claim: float = Field(
        ge=0,
        le=MAX_LOSS,
        allow_inf_nan=False,
        description="the submitter's own held-out loss (nats/token): checked by the"
        " referees, never used for ranking or payment",
    )

    @model_validator(mode="after")
    def _one_source(self) -> NewSubmission:
        if (self.run is None) != (self.round is None):
            raise ValueError("run and round go together: a run round's weights need both")
        given = [k for k in ("sha256", "job", "run") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one model source: sha256 (an uploaded model), job, or run and"
                f" round (got {', '.join(given) or 'none'})"
            )
        return self


class CompetitionList(Body):
    competitions: list[CompetitionRecord]


class CompetitionDetail(Body):
    competition: CompetitionRecord
    submissions: list[SubmissionRecord] = Field(description="oldest first")
    balances: dict[str, float] = Field(description="account -> credits paid by this competition")


class Leaderboard(Body):
    competition: CompetitionRecord
    entries: list[SubmissionRecord] = Field(
        description="accepted submissions, best (lowest) trusted score first"
    )
    total_paid: float


class RefereeJob(Body):
    id: str
    name: str
    state: JobState
    host: str | None = Field(description="the host of its current (or last) attempt")
    attempt: int
    error: str | None


class SubmissionDetail(Body):
    submission: SubmissionRecord = Field(description="with its referees' reports")
    referees: list[RefereeJob] = Field(description="the submission's referee jobs")


class Ledger(Body):
    entries: list[LedgerEntry] = Field(description="every payment, oldest first")
    balances: dict[str, float] = Field(description="account -> sum of its entries")
    total_paid: float


# models -------------------------------------------------------------------------------------
@routes.route(
    "PUT",
    "/v1/market/models/{sha256}",
    auth="submitter",
    summary="Upload a model file (safetensors) for the market; verified against its sha256",
    response=ModelStored,
    raw_body="application/octet-stream",
    query=(MODEL_SIZE,),
)
async def upload_model(ctx: Ctx) -> ModelStored:
    coord, sha256 = ctx.coord, ctx.path("sha256")
    size = ctx.query_int("size")
    limit = min(MAX_MODEL_BYTES, coord.max_upload_bytes)
    if size > limit:
        raise PayloadTooLarge(
            f"model of {size} bytes exceeds the market's {limit}-byte limit", limit_bytes=limit
        )
    if ctx.worker_id != OPERATOR:  # a host: no larger than some competition's family
        family = await ctx.run_io(coord.market.submitter_upload_limit)
        if size > family:
            raise PayloadTooLarge(
                f"model of {size} bytes is larger than any competition's model family allows"
                f" ({family} bytes)",
                limit_bytes=family,
            )
    declared = ctx.request.headers.get("content-length")
    if declared is not None and declared.strip() != str(size):
        raise IntegrityError(
            f"the body's Content-Length {declared[:40]!r} is not the declared size {size}",
            expected_size=size,
        )
    with coord.store.pinned(sha256):  # no GC pass deletes it while it is stored
        stored = await _stream_and_store(ctx, sha256, size)
    return ModelStored(sha256=sha256, size=size, stored=stored)


@routes.route(
    "GET",
    "/v1/market/models/{sha256}",
    auth="worker",
    summary="Download a market model by sha256; only to a worker holding a referee job that"
    " names it",
    media_type="application/octet-stream",
    errors=(403,),
)
async def model(ctx: Ctx) -> StreamingResponse:
    coord, sha = ctx.coord, ctx.path("sha256")
    # Asked first: a worker credential learns nothing of other digests (always 403).
    if not await _holds_model(ctx, sha):
        raise Forbidden("this worker holds no referee job that names this model")
    if not await ctx.run(coord.store.exists, sha):
        raise NotFound(f"market model {sha} is not stored")
    return await stream_blob(ctx, sha)


async def _holds_model(ctx: Ctx, sha: str) -> bool:
    """Whether the caller holds an active referee job whose task names ``sha`` (candidate or
    frontier): a read of the caller's own active jobs only, so a worker asking again and
    again costs the queue a handful of rows, never a scan of every active job."""
    return await ctx.run(ctx.coord.queue.holds_model, ctx.worker, sha)


# competitions -------------------------------------------------------------------------------
@routes.route(
    "POST",
    "/v1/market/competitions",
    auth="operator",
    summary="Create a competition from its spec and an uploaded baseline model (scored by"
    " the coordinator on the held-out data)",
    body=NewCompetition,
    response=CompetitionRecord,
    errors=(404,),
)
async def create_competition(ctx: Ctx) -> CompetitionRecord:
    body: NewCompetition = ctx.body
    return await ctx.run_io(ctx.coord.market.create, body.spec, body.baseline)


@routes.route(
    "GET",
    "/v1/market/competitions",
    auth="market",
    summary="List competitions",
    response=CompetitionList,
)
async def list_competitions(ctx: Ctx) -> CompetitionList:
    return CompetitionList(competitions=await ctx.run(ctx.coord.queue.list_competitions))


@routes.route(
    "GET",
    "/v1/market/competitions/{competition}",
    auth="market",
    summary="One competition (by name or id) with its submissions and balances",
    response=CompetitionDetail,
    path_params=(COMPETITION,),
)
async def competition_detail(ctx: Ctx) -> CompetitionDetail:
    queue = ctx.coord.queue
    competition = await ctx.run(queue.get_competition, ctx.path("competition"))
    return CompetitionDetail(
        competition=competition,
        submissions=await ctx.run(queue.list_submissions, competition.id),
        balances=await ctx.run(queue.balances, competition.id),
    )


@routes.route(
    "POST",
    "/v1/market/competitions/{competition}/submissions",
    auth="submitter",
    summary="Submit a model (uploaded, a job's, or a run round's) with its claimed held-out"
    " loss; referees re-measure it",
    body=NewSubmission,
    response=SubmissionRecord,
    path_params=(COMPETITION,),
    # 403: a host naming a job or a run; 409: the frontier moved while the submission was
    # made (submit again)
    errors=(403, 409),
)
async def submit(ctx: Ctx) -> SubmissionRecord:
    body: NewSubmission = ctx.body
    producer = ctx.worker_id  # for auth "submitter": "operator" or the enrolled host
    assert producer is not None
    market, competition = ctx.coord.market, ctx.path("competition")
    if body.sha256 is not None:
        round_of = ctx.coord.queue.weights_round
        if producer != OPERATOR and await ctx.run(round_of, body.sha256) is not None:
            # A replica worker knows each round's digest from its task: those weights are
            # the fleet's work, submitted by the operator (run and round), never by a host.
            raise Forbidden(
                "this model is a run's global weights: only the operator submits them"
                " (run and round)"
            )
        return await ctx.run_io(market.submit, competition, body.sha256, body.claim, producer)
    if producer != OPERATOR:  # a host vouches only for bytes it uploads itself
        raise Forbidden(
            "only the operator may submit a job's or a run's model; a host submits a model"
            " it uploads (sha256)"
        )
    if body.job is not None:
        return await ctx.run_io(market.submit_job, competition, body.job, body.claim)
    assert body.run is not None and body.round is not None
    return await ctx.run_io(market.submit_run, competition, body.run, body.round, body.claim)


@routes.route(
    "GET",
    "/v1/market/competitions/{competition}/leaderboard",
    auth="market",
    summary="Accepted submissions by trusted score (the referees', never the claim)",
    response=Leaderboard,
    path_params=(COMPETITION,),
)
async def leaderboard(ctx: Ctx) -> Leaderboard:
    queue = ctx.coord.queue
    competition = await ctx.run(queue.get_competition, ctx.path("competition"))
    submissions = await ctx.run(queue.list_submissions, competition.id)
    accepted = [s for s in submissions if s.state == "accepted" and s.trusted_score is not None]
    accepted.sort(key=lambda s: (s.trusted_score, s.seq))
    paid = await ctx.run(queue.balances, competition.id)  # the ledger's sums, never a list's
    return Leaderboard(competition=competition, entries=accepted, total_paid=sum(paid.values()))


@routes.route(
    "GET",
    "/v1/market/submissions/{submission}",
    auth="submitter",  # a host that submitted follows its verdict with its own token
    summary="One submission with its referees' reports and jobs",
    response=SubmissionDetail,
    path_params=(SUBMISSION,),
)
async def submission_detail(ctx: Ctx) -> SubmissionDetail:
    queue = ctx.coord.queue
    submission = await ctx.run(queue.get_submission, ctx.path("submission"))
    jobs = await ctx.run(queue.panel_jobs, submission.id)
    return SubmissionDetail(
        submission=submission,
        referees=[
            RefereeJob(
                id=j.id, name=j.name, state=j.state, host=j.host, attempt=j.attempt, error=j.error
            )
            for j in jobs
        ],
    )


@routes.route(
    "GET",
    "/v1/market/ledger",
    auth="market",
    summary="The market ledger (append-only) and the balances derived from it",
    response=Ledger,
    query=(COMPETITION_QUERY,),
    errors=(404,),
)
async def ledger(ctx: Ctx) -> Ledger:
    queue = ctx.coord.queue
    ref = ctx.query_str("competition")
    competition_id = None
    if ref is not None:
        competition_id = (await ctx.run(queue.get_competition, ref)).id
    entries = await ctx.run(queue.ledger, competition_id)
    balances = await ctx.run(queue.balances, competition_id)
    return Ledger(entries=entries, balances=balances, total_paid=sum(balances.values()))


__all__ = ["routes"]
