"""``trainfleet market ...``: the training market, for operators and submitters.

A competition pays for verified held-out loss reductions of one model family (issue 10): a
submitted model is re-measured by a panel of referee workers on distinct enrolled hosts; the
submitter's claim is accepted only inside the intervals of at least ``quorum`` of them, and an
accepted, certified improvement pays ``rate`` credits per nat of improvement over the frontier,
once. The self-reported loss is never used for ranking or payment.

- ``market create FILE --baseline MODEL``: a competition from a TOML file (``[competition]``
  with ``[competition.hyper]`` and ``[competition.dataset]``) and a baseline model;
- ``market submit (MODEL | --job JOB | --run RUN --round R) --claim LOSS --competition NAME
  [--wait]``: upload and submit a model file, or (operator) a completed job's model or a run
  round's global weights, already on the coordinator; with ``--wait``, follow the referees
  and print the verdict. Exit 0: accepted; 1: rejected (or a
  duplicate, or refused before refereeing); 2: usage; 3: still refereeing at ``--timeout-s``;
- ``market list``, ``market leaderboard NAME``, ``market ledger [NAME]``, ``market show ID``.

Submitting as a host: ``--token`` (or ``TRAINFLEET_TOKEN``) may be that host's join token
(``trainfleet hosts enroll NAME``); the submission's producer is then that host, and the claim
rules keep its referees off it. Every string that reaches the terminal goes through
:mod:`trainfleet.cli.render`.
"""

from __future__ import annotations

import math
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError
from rich.table import Table

from trainfleet import env
from trainfleet.cli import render
from trainfleet.cli.common import (
    DEFAULT_STATE,
    CaCertOpt,
    JsonOpt,
    StateOpt,
    TokenOpt,
    UrlOpt,
    client,
    console,
    err_console,
    errors,
    fail,
    print_json,
)

if TYPE_CHECKING:  # loaded on use: the verify package loads the manifest's models and numpy
    from trainfleet.verify.market import CompetitionSpec

ACCEPTED, REJECTED, USAGE, UNDECIDED = 0, 1, 2, 3
POLL_S = 0.5

app = typer.Typer(
    name="market",
    help="The training market: competitions that pay for verified held-out improvements.",
    no_args_is_help=True,
)

NameArg = Annotated[str, typer.Argument(help="Competition name or id.")]
ModelArg = Annotated[
    Path,
    typer.Argument(help="Model file (safetensors).", exists=True, dir_okay=False, readable=True),
]


class CompetitionFileError(ValueError):
    """A competition file that cannot be read or does not hold valid terms."""


def load_competition(path: Path) -> CompetitionSpec:
    """The ``[competition]`` table of a TOML file as a spec; ``CompetitionFileError`` naming
    the file and every offending field otherwise."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise CompetitionFileError(f"cannot read {path}: {err}") from None
    table = data.get("competition")
    if not isinstance(table, dict):
        raise CompetitionFileError(f"{path} has no [competition] table")
    from trainfleet.verify.market import CompetitionSpec

    try:
        return CompetitionSpec.model_validate(table)
    except ValidationError as err:
        problems = "; ".join(
            f"competition.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
        )
        raise CompetitionFileError(f"invalid competition in {path}: {problems}") from None


# -- formatting (everything from the API may be anything JSON allows) ----------------------
def _fmt(value: Any, spec: str = ".4f") -> str:
    return render._fmt(value, spec)


def competitions_table(competitions: list[dict[str, Any]]) -> Table:
    table = Table(title="competitions", title_justify="left")
    for col in ("name", "baseline", "frontier", "rate", "panel", "id"):
        table.add_column(
            col, justify="right" if col in ("baseline", "frontier", "rate") else "left"
        )
    for c in competitions:
        spec = c.get("spec") or {}
        table.add_row(
            render.plain(c.get("name")),
            _fmt(c.get("baseline_score")),
            _fmt(c.get("frontier_score")),
            _fmt(spec.get("rate"), "g"),
            render.plain(f"{spec.get('quorum')} of {spec.get('referees')}"),
            render.plain(str(c.get("id", ""))[:12]),
        )
    return table


def leaderboard_table(board: dict[str, Any]) -> Table:
    name = (board.get("competition") or {}).get("name")
    table = Table(title=render.plain(f"leaderboard {name}"), title_justify="left")
    for col in ("rank", "submission", "producer", "trusted score", "improvement", "paid", "claim"):
        table.add_column(col, justify="left" if col in ("submission", "producer") else "right")
    for rank, s in enumerate(board.get("entries") or [], 1):
        table.add_row(
            str(rank),
            render.plain(str(s.get("id", ""))[:12]),
            render.plain(s.get("producer")),
            _fmt(s.get("trusted_score")),
            _fmt(s.get("improvement")),
            _fmt(s.get("paid"), ".2f"),
            _fmt(s.get("claim")),
        )
    return table


def submissions_table(submissions: list[dict[str, Any]]) -> Table:
    table = Table(title="submissions", title_justify="left")
    for col in ("#", "submission", "producer", "state", "claim", "trusted", "paid", "verdict"):
        table.add_column(
            col, justify="right" if col in ("#", "claim", "trusted", "paid") else "left"
        )
    for s in submissions:
        table.add_row(
            render.plain(s.get("seq")),
            render.plain(str(s.get("id", ""))[:12]),
            render.plain(s.get("producer")),
            render.state(s.get("state")),
            _fmt(s.get("claim")),
            _fmt(s.get("trusted_score")),
            _fmt(s.get("paid"), ".2f"),
            render.plain(s.get("verdict") or ""),
        )
    return table


def ledger_tables(ledger: dict[str, Any]) -> tuple[Table, Table]:
    entries = Table(title="ledger", title_justify="left")
    for col in ("#", "account", "amount", "frontier before", "frontier after", "submission"):
        entries.add_column(col, justify="left" if col in ("account", "submission") else "right")
    for e in ledger.get("entries") or []:
        entries.add_row(
            render.plain(e.get("seq")),
            render.plain(e.get("account")),
            _fmt(e.get("amount"), ".2f"),
            _fmt(e.get("frontier_before")),
            _fmt(e.get("frontier_after")),
            render.plain(str(e.get("submission_id", ""))[:12]),
        )
    balances = Table(title="balances", title_justify="left")
    balances.add_column("account")
    balances.add_column("balance", justify="right")
    for account, amount in sorted((ledger.get("balances") or {}).items()):
        balances.add_row(render.plain(account), _fmt(amount, ".2f"))
    return entries, balances


def reports_table(detail: dict[str, Any]) -> Table:
    table = Table(title="referees", title_justify="left")
    for col in ("slot", "host", "ok", "mean", "interval", "improvement", "certified", "reason"):
        table.add_column(col, justify="right" if col in ("slot", "mean", "improvement") else "left")
    reports = (detail.get("submission") or {}).get("reports") or []
    for r in sorted(reports, key=lambda r: r["index"] if isinstance(r.get("index"), int) else -1):
        table.add_row(
            render.plain(r.get("index")),
            render.plain(r.get("host")),
            render.plain("yes" if r.get("ok") else "no"),
            _fmt(r.get("mean")),
            render.plain(f"[{_fmt(r.get('lo'))}, {_fmt(r.get('hi'))}]"),
            _fmt(r.get("improvement")),
            render.plain("yes" if r.get("certified") else "no"),
            render.plain(r.get("reason") or ""),
        )
    return table


def verdict_line(submission: dict[str, Any]) -> str:
    """The one line that says how a submission ended (or that it is still refereed)."""
    state = submission.get("state")
    sid = str(submission.get("id", ""))[:12]
    if state == "refereeing":
        return f"submission {sid}: refereeing"
    if state == "accepted":
        return (
            f"submission {sid}: accepted, paid {_fmt(submission.get('paid'), '.4f')} credits;"
            f" trusted score {_fmt(submission.get('trusted_score'))}:"
            f" {submission.get('verdict') or ''}"
        )
    return f"submission {sid}: {state}: {submission.get('verdict') or ''}"


def exit_code(submission: dict[str, Any]) -> int:
    state = submission.get("state")
    if state == "accepted":
        return ACCEPTED
    return UNDECIDED if state == "refereeing" else REJECTED


def wait_for_verdict(
    fetch: Callable[[], dict[str, Any]],
    timeout_s: float,
    progress: Callable[[str], None],
    *,
    poll_s: float = POLL_S,
) -> dict[str, Any]:
    """Poll ``fetch()`` (a submission detail) until it is decided or ``timeout_s`` passes,
    telling ``progress`` about each referee report as it arrives; the last detail."""
    deadline = time.monotonic() + timeout_s
    told: set[Any] = set()
    while True:
        detail = fetch()
        submission = detail.get("submission") or {}
        referees = submission_referees(detail)
        for report in submission.get("reports") or []:
            slot = report.get("index")
            if slot in told:
                continue
            told.add(slot)
            progress(
                f"referee {len(told)}/{referees} ({render.clean(report.get('host'))}):"
                f" {render.clean(report.get('reason') or '')}"
            )
        if submission.get("state") != "refereeing" or time.monotonic() >= deadline:
            return detail
        time.sleep(poll_s)


def submission_referees(detail: dict[str, Any]) -> int:
    return len(detail.get("referees") or [])


# -- commands -------------------------------------------------------------------------------
@app.command("create")
def create(
    file: Annotated[
        Path, typer.Argument(help="Competition TOML ([competition] + .hyper + .dataset).")
    ],
    baseline: Annotated[
        Path,
        typer.Option(
            "--baseline", help="Baseline model (safetensors).", exists=True, dir_okay=False
        ),
    ],
    url: UrlOpt = env.DEFAULT_URL,
    token: TokenOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
    ca_cert: CaCertOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a competition: the coordinator scores the baseline on the held-out data itself,
    and that score is the first frontier."""
    try:
        spec = load_competition(file)
    except CompetitionFileError as err:
        fail(str(err), USAGE)
    with errors(), client(url, token, state_dir, ca_cert) as c:
        uploaded = c.upload_model(baseline)
        record = c.create_competition(spec.model_dump(mode="json"), uploaded["sha256"])
    if as_json:
        print_json(record)
        return
    console.print(
        render.plain(
            f"competition {record.get('name')} ({str(record.get('id'))[:12]}): baseline"
            f" {str(record.get('baseline'))[:12]} scores {_fmt(record.get('baseline_score'))};"
            f" {spec.rate:g} credits per nat, {spec.quorum} of {spec.referees} referees"
        ),
        highlight=False,
    )


@app.command("submit")
def submit(
    claim: Annotated[
        float, typer.Option("--claim", help="Your held-out loss (nats/token) for the model.")
    ],
    competition: Annotated[str, typer.Option("--competition", help="Competition name or id.")],
    model: Annotated[
        Path | None,
        typer.Argument(
            help="Model file (safetensors); or give --job, or --run and --round.",
            exists=True,
            dir_okay=False,
            readable=True,
        ),
    ] = None,
    job: Annotated[
        str | None,
        typer.Option(
            "--job",
            help="Operator: a completed gpt train job (name or id) whose model.safetensors"
            " to submit; its host is the producer.",
        ),
    ] = None,
    run: Annotated[
        str | None,
        typer.Option("--run", help="Operator, with --round: a run whose global weights to submit."),
    ] = None,
    round: Annotated[
        int | None,
        typer.Option(
            "--round",
            min=0,
            help="With --run: the round whose starting weights to submit (one past the last"
            " round: the run's final weights).",
        ),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the referees and print the verdict.")
    ] = False,
    timeout_s: Annotated[
        float, typer.Option("--timeout-s", min=0, help="With --wait: give up after this long.")
    ] = 1800.0,
    url: UrlOpt = env.DEFAULT_URL,
    token: TokenOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
    ca_cert: CaCertOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Submit a model with its claimed held-out loss: a file (uploaded), a completed job's
    model (--job) or a run round's global weights (--run, --round); the operator's token
    only for the last two. Referees on other hosts re-measure it; only their numbers rank
    and pay it. Exit 0 accepted, 1 rejected, 3 still refereeing."""
    if not competition.strip():
        fail("--competition: empty competition name", USAGE)
    if not math.isfinite(claim) or claim < 0:
        fail(f"--claim must be a finite loss >= 0, not {claim}", USAGE)
    if (run is None) != (round is None):
        fail("--run and --round go together", USAGE)
    if sum(source is not None for source in (model, job, run)) != 1:
        fail("give exactly one of MODEL, --job JOB, and --run RUN --round R", USAGE)
    with errors(), client(url, token, state_dir, ca_cert) as c:
        if model is not None:
            uploaded = c.upload_model(model)
            submission = c.submit(competition, uploaded["sha256"], claim)
        elif job is not None:
            submission = c.submit_job(competition, job, claim)
        else:
            assert run is not None and round is not None
            submission = c.submit_run(competition, run, round, claim)
        sid = str(submission["id"])
        if not as_json:
            console.print(
                render.plain(
                    f"submission {sid} ({submission.get('state')}) by"
                    f" {submission.get('producer')}: model {str(submission.get('sha256'))[:12]},"
                    f" claim {claim:.4f}"
                ),
                highlight=False,
            )
        detail: dict[str, Any] = {"submission": submission}
        if wait and submission.get("state") == "refereeing":
            detail = wait_for_verdict(
                lambda: c.submission(sid),
                timeout_s,
                lambda line: err_console.print(render.plain(line), highlight=False),
            )
    final = detail.get("submission") or submission
    if as_json:
        print_json(detail)
    elif wait or final.get("state") != "refereeing":
        console.print(render.plain(verdict_line(final)), highlight=False)
    if wait or final.get("state") != "refereeing":
        raise typer.Exit(exit_code(final))


@app.command("score")
def score(
    model: ModelArg,
    competition: Annotated[
        str | None,
        typer.Option("--competition", help="Competition name or id (its terms are fetched)."),
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option("--file", help="Or a competition TOML file: no coordinator needed."),
    ] = None,
    cache_dir: Annotated[
        Path, typer.Option("--cache-dir", help="Where the held-out shards are cached here.")
    ] = Path(".trainfleet-data"),
    url: UrlOpt = env.DEFAULT_URL,
    token: TokenOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
    ca_cert: CaCertOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure MODEL's held-out loss here, as the competition defines it (2048 windows uniform
    over its held-out pool, the quantity referees estimate): the honest --claim for submit."""
    from trainfleet.data.prepare import CacheSettings
    from trainfleet.errors import CorpusTooSmall, DataError
    from trainfleet.verify.market import CompetitionSpec
    from trainfleet.verify.referee import SCORE_WINDOWS, ModelRefused, heldout_score, load_model

    if (competition is None) == (file is None):
        fail("give exactly one of --competition NAME and --file FILE", USAGE)
    if file is not None:
        try:
            spec = load_competition(file)
        except CompetitionFileError as err:
            fail(str(err), USAGE)
    else:
        with errors(), client(url, token, state_dir, ca_cert) as c:
            record = c.competition(str(competition))
        found = record.get("competition")
        try:
            spec = CompetitionSpec.model_validate(
                found.get("spec") if isinstance(found, dict) else None
            )
        except ValidationError as err:
            fail(f"the coordinator sent unusable competition terms: {err.errors()[0]['msg']}")
    params = spec.params()
    try:
        weights = load_model(model, params, "model")
        loss = heldout_score(
            params,
            spec.dataset,
            weights,
            CacheSettings(directory=cache_dir),
            log=lambda line: err_console.print(render.plain(line), highlight=False),
        )
    except ModelRefused as err:
        fail(str(err))
    except (DataError, CorpusTooSmall) as err:
        fail(f"cannot materialize the held-out data: {err}")
    if as_json:
        print_json({"competition": spec.name, "heldout_loss": loss, "windows": SCORE_WINDOWS})
        return
    console.print(
        render.plain(
            f"{model.name}: held-out loss {loss:.4f} nats/token on competition {spec.name}'s"
            f" pool ({SCORE_WINDOWS} windows); submit it with --claim {loss:.4f}"
        ),
        highlight=False,
    )


@app.command("list")
def list_competitions(
    url: UrlOpt = env.DEFAULT_URL,
    token: TokenOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
    ca_cert: CaCertOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Competitions: baseline and frontier scores, rate, panel."""
    with errors(), client(url, token, state_dir, ca_cert) as c:
        found = c.competitions()
    if as_json:
        print_json(found)
    else:
        console.print(competitions_table(found))


@app.command("leaderboard")
def leaderboard(
    name: NameArg,
    url: UrlOpt = env.DEFAULT_URL,
    token: TokenOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
    ca_cert: CaCertOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Accepted submissions by trusted score (the referees', never the claim)."""
    with errors(), client(url, token, state_dir, ca_cert) as c:
        board = c.leaderboard(name)
    if as_json:
        print_json(board)
        return
    comp = board.get("competition") or {}
    console.print(
        render.plain(
            f"competition {comp.get('name')}: baseline {_fmt(comp.get('baseline_score'))},"
            f" frontier {_fmt(comp.get('frontier_score'))}, paid"
            f" {_fmt(board.get('total_paid'), '.2f')} credits"
        ),
        highlight=False,
    )
    console.print(leaderboard_table(board))


@app.command("ledger")
def ledger(
    name: Annotated[str | None, typer.Argument(help="Only this competition (name or id).")] = None,
    url: UrlOpt = env.DEFAULT_URL,
    token: TokenOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
    ca_cert: CaCertOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Every payment (append-only) and the balances derived from them."""
    with errors(), client(url, token, state_dir, ca_cert) as c:
        book = c.market_ledger(name)
    if as_json:
        print_json(book)
        return
    entries, balances = ledger_tables(book)
    console.print(entries)
    console.print(balances)
    console.print(
        render.plain(f"total paid: {_fmt(book.get('total_paid'), '.4f')} credits"),
        highlight=False,
    )


@app.command("show")
def show(
    submission: Annotated[str, typer.Argument(help="Submission id.")],
    url: UrlOpt = env.DEFAULT_URL,
    token: TokenOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
    ca_cert: CaCertOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One submission: its verdict and each referee's report."""
    if not submission.strip():
        fail("empty submission id", USAGE)
    with errors(), client(url, token, state_dir, ca_cert) as c:
        detail = c.submission(submission)
    if as_json:
        print_json(detail)
        return
    s = detail.get("submission") or {}
    console.print(
        render.plain(
            f"submission {s.get('id')} to {str(s.get('competition_id'))[:12]} by"
            f" {s.get('producer')}: model {str(s.get('sha256'))[:12]},"
            f" claim {_fmt(s.get('claim'))}, judged against frontier"
            f" {_fmt(s.get('frontier_score'))}"
        ),
        highlight=False,
    )
    console.print(render.plain(verdict_line(s)), highlight=False)
    console.print(reports_table(detail))
    referees = [j for j in detail.get("referees") or [] if j.get("state") != "completed"]
    for job in referees:
        console.print(
            render.plain(
                f"referee job {job.get('name')}: {job.get('state')}"
                + (f" ({job.get('error')})" if job.get("error") else "")
            ),
            highlight=False,
        )


__all__ = ["CompetitionFileError", "app", "load_competition", "verdict_line", "wait_for_verdict"]
