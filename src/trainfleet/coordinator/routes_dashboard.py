"""The operator's web dashboard: a static page shipped in the package, and one summary call.

- ``GET /dashboard`` (no auth): the page shell (``dashboard/index.html``). It holds no data:
  the page asks for the operator token, keeps it in ``sessionStorage`` and reads everything
  with ``Authorization: Bearer``, so serving the shell to anyone reveals nothing.
- ``GET /dashboard/static/{name}``: the page's own files, and only those: the names are the
  files of ``dashboard/`` read at import, so no path (``..``, an encoded ``%2F``) can reach
  anything else (404 JSON).
- ``GET /v1/dashboard`` (operator): what one refresh of the page shows, in one call
  (``Dashboard``). Every list is bounded, so a poll every 2 s costs the same on a queue of a
  million jobs: pending jobs in queue order, the first ``MAX_EXPLAINED`` with their explain
  text (each explain scans the fleet's workers), and the newest ``MAX_LISTED`` of each finished
  state. Counts are exact (``queue.counts``).

Every page is served with a strict Content-Security-Policy (``CSP``): scripts and styles from
this origin only, none inline, so a job name or a log line that a worker made up cannot run
in the operator's browser even if some code inserted it as HTML (the page inserts every
server string as text). Files are revalidated on each load (``no-cache`` with an ETag): an
upgraded coordinator never serves a stale script to a page.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field
from starlette.responses import Response

from trainfleet import __version__
from trainfleet.coordinator.endpoints import Ctx, Param, RouteTable
from trainfleet.coordinator.schemas import Body
from trainfleet.errors import NotFound
from trainfleet.queue.base import HostRecord, JobRecord, LogLine, WorkerRecord
from trainfleet.queue.fairshare import FairShareReport
from trainfleet.queue.market_base import CompetitionRecord, LedgerEntry, SubmissionRecord
from trainfleet.queue.runs_base import ContributionRecord, RoundRecord, RunRecord

routes = RouteTable()

DASHBOARD_DIR = Path(__file__).with_name("dashboard")
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none';"
    " frame-ancestors 'none'"
)
MAX_EXPLAINED = 50  # pending jobs shown with their explain text
MAX_LISTED = 50  # jobs shown per state (pending, waiting, finished)
MAX_ACTIVE = 200  # claimed or running jobs shown (each with its log tail)
LOG_TAIL_LINES = 20
MAX_RUNS = 10  # newest runs
MAX_LEDGER = 100  # newest ledger entries
STATIC = Param("name", "a file of the dashboard (app.js, style.css, ...)")


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    media_type: str
    etag: str


def _load(directory: Path) -> dict[str, StaticFile]:
    """The dashboard's files by name, read once: what the static route may ever serve."""
    files = {}
    for path in sorted(directory.iterdir()):
        media_type = MEDIA_TYPES.get(path.suffix)
        if media_type is not None and path.is_file():
            body = path.read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
            files[path.name] = StaticFile(body, media_type, etag)
    return files


FILES = _load(DASHBOARD_DIR)


def _serve(ctx: Ctx, name: str) -> Response:
    file = FILES.get(name)
    if file is None:
        raise NotFound(f"no dashboard file {name[:80]!r}")
    headers = {
        "cache-control": "no-cache",
        "etag": file.etag,
        "content-security-policy": CSP,
        "x-content-type-options": "nosniff",
        "referrer-policy": "no-referrer",
        "x-frame-options": "DENY",
    }
    if ctx.request.headers.get("if-none-match") == file.etag:
        return Response(status_code=304, headers=headers)
    return Response(file.body, media_type=file.media_type, headers=headers)


@routes.route(
    "GET",
    "/dashboard",
    auth="none",
    summary="The operator dashboard (a static page; it asks for the operator token)",
    media_type="text/html",
)
async def dashboard_page(ctx: Ctx) -> Response:
    return _serve(ctx, "index.html")


@routes.route(
    "GET",
    "/dashboard/static/{name}",
    auth="none",
    summary="A file of the dashboard page (script, style sheet)",
    path_params=(STATIC,),
    media_type="text/javascript",
    errors=(404,),
)
async def dashboard_static(ctx: Ctx) -> Response:
    return _serve(ctx, ctx.path("name"))


# the summary ---------------------------------------------------------------------------------
class DashJob(Body):
    job: JobRecord
    explain: str | None = Field(None, description="why it waits (pending and waiting jobs)")
    log_tail: list[LogLine] = Field(
        default_factory=list, description="its last lines (claimed, running and failed jobs)"
    )


class JobGroup(Body):
    total: int = Field(description="jobs in these states (exact)")
    jobs: list[DashJob] = Field(description="the first or newest of them (bounded)")


class DashRun(Body):
    run: RunRecord
    rounds: list[RoundRecord] = Field(description="every round, oldest first: loss and bytes")
    participants: list[list[str]] = Field(
        description="per round (same order): the workers whose contribution it accepted"
    )
    refused: list[ContributionRecord] = Field(description="refused contributions with reasons")


class DashCompetition(Body):
    competition: CompetitionRecord
    leaderboard: list[SubmissionRecord] = Field(description="accepted, by trusted score")
    refereeing: int = Field(description="submissions still being refereed")


class Market(Body):
    competitions: list[DashCompetition]
    balances: dict[str, float]
    ledger: list[LedgerEntry] = Field(description="the newest entries, newest first")
    total_paid: float


class Dashboard(Body):
    generated_at: float
    version: str
    manifest_hash: str | None
    counts: dict[str, int]
    workers: list[WorkerRecord]
    hosts: list[HostRecord]
    jobs: dict[str, JobGroup] = Field(
        description="waiting, pending, running (claimed or running), failed, completed, cancelled"
    )
    runs: list[DashRun]
    market: Market
    fair_share: FairShareReport | None


@routes.route(
    "GET",
    "/v1/dashboard",
    auth="operator",
    summary="Everything the dashboard shows, in one bounded call",
    response=Dashboard,
)
async def dashboard(ctx: Ctx) -> Dashboard:
    queue = ctx.coord.queue
    counts = await ctx.run(queue.counts)
    return Dashboard(
        generated_at=time.time(),
        version=__version__,
        manifest_hash=await ctx.run(queue.current_manifest_hash),
        counts=counts,
        workers=await ctx.run(queue.list_workers),
        hosts=await ctx.run(queue.list_hosts),
        jobs=await _jobs(ctx, counts),
        runs=await _runs(ctx),
        market=await _market(ctx),
        fair_share=await ctx.run(queue.fair_share),
    )


async def _jobs(ctx: Ctx, counts: dict[str, int]) -> dict[str, JobGroup]:
    queue = ctx.coord.queue
    groups: dict[str, JobGroup] = {}
    for state in ("waiting", "pending"):
        page = await ctx.run(queue.jobs_page, state, MAX_LISTED)
        jobs = []
        for i, job in enumerate(page):
            text = None
            if i < MAX_EXPLAINED:
                text = (await ctx.run(queue.explain, job.id))["message"]
            jobs.append(DashJob(job=job, explain=text))
        groups[state] = JobGroup(total=counts.get(state, 0), jobs=jobs)
    active = [
        *await ctx.run(queue.jobs_page, "claimed", MAX_ACTIVE),
        *await ctx.run(queue.jobs_page, "running", MAX_ACTIVE),
    ]
    groups["running"] = JobGroup(
        total=counts.get("claimed", 0) + counts.get("running", 0),
        jobs=[await _with_tail(ctx, job) for job in active[:MAX_ACTIVE]],
    )
    for state in ("failed", "completed", "cancelled"):
        page = await ctx.run(queue.jobs_page, state, MAX_LISTED, newest_first=True)
        jobs = [await _with_tail(ctx, j) if state == "failed" else DashJob(job=j) for j in page]
        groups[state] = JobGroup(total=counts.get(state, 0), jobs=jobs)
    return groups


async def _with_tail(ctx: Ctx, job: JobRecord) -> DashJob:
    return DashJob(
        job=job, log_tail=await ctx.run(ctx.coord.queue.log_tail, job.id, LOG_TAIL_LINES)
    )


async def _runs(ctx: Ctx) -> list[DashRun]:
    queue = ctx.coord.queue
    out = []
    for run in reversed((await ctx.run(queue.list_runs))[-MAX_RUNS:]):
        rounds = await ctx.run(queue.run_rounds, run.id)
        contributions = await ctx.run(queue.run_contributions, run.id)
        accepted: dict[int, set[str]] = {}
        for c in contributions:
            if c.status in ("accepted", "applied"):
                accepted.setdefault(c.round, set()).add(c.worker_id)
        out.append(
            DashRun(
                run=run,
                rounds=rounds,
                participants=[sorted(accepted.get(r.round, ())) for r in rounds],
                refused=[c for c in contributions if c.status == "refused"],
            )
        )
    return out


async def _market(ctx: Ctx) -> Market:
    queue = ctx.coord.queue
    competitions = []
    for competition in await ctx.run(queue.list_competitions):
        submissions = await ctx.run(queue.list_submissions, competition.id)
        board = [s for s in submissions if s.state == "accepted" and s.trusted_score is not None]
        board.sort(key=lambda s: (s.trusted_score, s.seq))
        refereeing = sum(s.state == "refereeing" for s in submissions)
        competitions.append(
            DashCompetition(competition=competition, leaderboard=board, refereeing=refereeing)
        )
    balances = await ctx.run(queue.balances)
    ledger = await ctx.run(queue.ledger)
    return Market(
        competitions=competitions,
        balances=balances,
        ledger=list(reversed(ledger[-MAX_LEDGER:])),
        total_paid=sum(balances.values()),
    )


__all__ = ["CSP", "FILES", "Dashboard", "routes"]
