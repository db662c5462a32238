"""The ``trainfleet`` command. It parses arguments and calls the library; nothing more.

Connection options of every operator command come from flags, then environment variables
(``TRAINFLEET_URL``, ``TRAINFLEET_TOKEN``), then the local coordinator's state directory
(``.trainfleet/operator.token``), so on the coordinator's own machine no flag is needed.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.text import Text

from trainfleet import __version__, env
from trainfleet.cli import render
from trainfleet.cli.attest import attest_app
from trainfleet.cli.common import (
    DEFAULT_STATE,
    CaCertOpt,
    JobArg,
    JobsArg,
    JsonOpt,
    StateOpt,
    TokenOpt,
    UrlOpt,
    console,
    err_console,
)
from trainfleet.cli.common import client as _client
from trainfleet.cli.common import errors as _errors
from trainfleet.cli.common import fail as _fail
from trainfleet.cli.common import print_json as _print_json
from trainfleet.cli.common import safe_stdio as _safe_stdio
from trainfleet.cli.common import setup_logging as _setup_logging
from trainfleet.cli.data import app as data_app
from trainfleet.cli.db import app as db_app
from trainfleet.cli.fairshare import list_shares
from trainfleet.cli.fleet import hosts_app, workers_app
from trainfleet.cli.hints import WorkerTag, serve_hints
from trainfleet.cli.market import app as market_app
from trainfleet.cli.pipelines import list_pipelines, pipeline_app
from trainfleet.cli.runs import list_runs, run_app
from trainfleet.cli.service import ForceOpt as _ForceOpt
from trainfleet.cli.service import InstallServiceOpt as _InstallServiceOpt
from trainfleet.cli.service import PrintServiceOpt as _PrintServiceOpt
from trainfleet.cli.service import ServiceAction
from trainfleet.cli.service import ServiceNameOpt as _ServiceNameOpt
from trainfleet.cli.service import ServiceUserOpt as _ServiceUserOpt
from trainfleet.cli.service import UninstallServiceOpt as _UninstallServiceOpt
from trainfleet.cli.submit import submit as submit_job
from trainfleet.client import Client

if TYPE_CHECKING:
    from trainfleet.verify.attest import AttestationPolicy

app = typer.Typer(
    name="trainfleet",
    help=(
        "Train models across a fleet of machines.\n\n"
        "Start a coordinator with `trainfleet serve`, load a manifest with `trainfleet reload"
        " fleet.toml`, enroll a host with `trainfleet hosts enroll NAME --token-file F`, and join"
        " it as a worker with `trainfleet join URL --token-file F`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def _version(value: bool) -> None:
    if value:
        print(f"trainfleet {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    pass


# ---------------------------------------------------------------------------------------
@app.command()
def serve(
    manifest: Annotated[
        Path | None, typer.Argument(help="Manifest to load at start (optional; see `reload`).")
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = env.DEFAULT_PORT,
    state_dir: StateOpt = DEFAULT_STATE,
    queue_url: Annotated[
        str | None,
        typer.Option(
            "--db",
            "--queue-url",
            help="Queue database: sqlite:///PATH, a PATH ending in .db, or postgresql://..."
            " (several coordinators may share one PostgreSQL database)."
            " Default: sqlite:///STATE_DIR/queue.db.",
        ),
    ] = None,
    artifacts: Annotated[
        str | None,
        typer.Option(
            help="Artifact store: a directory or any fsspec URL, e.g. s3://BUCKET/PREFIX"
            " (needs the s3 extra; endpoint and credentials from the standard AWS variables:"
            " AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE ...)."
            " Default: STATE_DIR/artifacts."
        ),
    ] = None,
    artifact_part_mib: Annotated[
        int,
        typer.Option(
            min=5,
            help="S3 artifacts: uploads up to this many MiB are one PUT, larger ones multipart"
            " in parts of this size; downloads read blocks of this size.",
        ),
    ] = 16,
    operator_token_file: Annotated[
        Path | None,
        typer.Option(
            help=f"Read the operator token from this file (or set {env.TOKEN})."
            " Default: generated once, kept in STATE_DIR/operator.token."
        ),
    ] = None,
    join_token_file: Annotated[
        Path | None,
        typer.Option(
            help=f"Read the shared join token (open mode) from this file (or set"
            f" {env.JOIN_TOKEN}). Default: generated once, kept in STATE_DIR/join.token."
        ),
    ] = None,
    open_join: Annotated[
        bool,
        typer.Option(
            "--open-join",
            help="Open mode: anyone with the shared join token may join, as a new host named"
            " open:NAME that no host policy applies to. Default: enrolled hosts only.",
        ),
    ] = False,
    public_reads: Annotated[
        bool,
        typer.Option(
            "--public-reads",
            help="Serve the read endpoints and /metrics without a token. Default: operator token.",
        ),
    ] = False,
    tls_cert: Annotated[
        Path | None,
        typer.Option(help="Serve https with this certificate chain (PEM); needs --tls-key."),
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option(help="The private key (PEM) of --tls-cert.")
    ] = None,
    heartbeat_interval_s: Annotated[
        float,
        typer.Option(
            help="Seconds between worker heartbeats (the least: it grows with the fleet"
            " past ~1,000 workers)."
        ),
    ] = 2.0,
    heartbeat_timeout_s: Annotated[
        float,
        typer.Option(
            help="A job silent this long is requeued (within one more reap interval); at"
            " least 3 heartbeat intervals + 1 s."
        ),
    ] = 8.0,
    attestation_key: Annotated[
        list[Path] | None,
        typer.Option(
            "--attestation-key",
            help="Pin this Ed25519 attestation public key (PEM; repeatable): workers whose"
            " quote it signs may claim private jobs (`trainfleet attest keygen` makes a"
            " SIMULATED one). Default: none, private work is off.",
        ),
    ] = None,
    measurements: Annotated[
        Path | None,
        typer.Option(
            help="The allowlist of attested measurements: one sha256 per line"
            " (`trainfleet attest measure` prints this install's)."
        ),
    ] = None,
    attest_ttl_s: Annotated[
        float,
        typer.Option(
            min=60,
            help="An accepted attestation lasts this many seconds (workers attest again"
            " before it ends; at least 60: longer than a worker's long-poll claim).",
        ),
    ] = 3600.0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run the coordinator (HTTP API on HOST:PORT; state in STATE_DIR)."""
    from trainfleet.coordinator.server import ServeConfig, TlsFiles, build_coordinator, tune_gc
    from trainfleet.coordinator.server import serve as run_server
    from trainfleet.manifest import load_manifest

    _setup_logging(log_level, "[coordinator] ")
    tune_gc()
    if heartbeat_timeout_s <= heartbeat_interval_s:
        _fail("--heartbeat-timeout-s must exceed --heartbeat-interval-s")
    if (tls_cert is None) != (tls_key is None):
        _fail("--tls-cert and --tls-key go together")
    tls = TlsFiles(tls_cert, tls_key) if tls_cert and tls_key else None
    for path in (tls_cert, tls_key):
        if path is not None and not path.is_file():
            _fail(f"cannot read {path}", 2)
    cfg = ServeConfig(
        state_dir=state_dir,
        queue_url=queue_url,
        artifacts=artifacts,
        artifact_part_bytes=artifact_part_mib * 1024 * 1024,
        operator_token=_secret(operator_token_file, env.TOKEN),
        join_token=_secret(join_token_file, env.JOIN_TOKEN),
        open_join=open_join,
        public_reads=public_reads,
        heartbeat_interval_s=heartbeat_interval_s,
        heartbeat_timeout_s=heartbeat_timeout_s,
    )
    attestation = _attestation(attestation_key or [], measurements, attest_ttl_s)
    _check_port_free(host, port)
    with _errors():
        coord = build_coordinator(cfg)
        coord.attestation = attestation
        if manifest is not None:
            # ``after`` may name submitted jobs; the queue checks them (queue.deps).
            plan = coord.queue.apply_manifest(load_manifest(manifest, external_after=True))
            err_console.print(
                f"loaded {manifest}: {render.plan_summary(plan.model_dump())}",
                markup=False,
                highlight=False,
            )
            for warning in plan.warnings:
                err_console.print(f"warning: {warning}", markup=False, highlight=False)
        lines = serve_hints(
            host=host,
            port=port,
            tls=tls is not None,
            state_dir=state_dir,
            default_state_dir=DEFAULT_STATE,
            open_join=open_join,
        )
        err_console.print("\n".join(lines), highlight=False, markup=False, soft_wrap=True)
        run_server(coord, host, port, tls)


def _attestation(
    keys: list[Path], measurements: Path | None, ttl_s: float
) -> AttestationPolicy | None:
    """The private tier's verifier from the serve flags (None: private work is off)."""
    from trainfleet.verify.attest import (
        AttestationPolicy,
        PinnedKeyVerifier,
        load_measurements,
        load_public_key,
    )

    if not keys:
        if measurements is not None:
            _fail("--measurements needs --attestation-key", 2)
        return None
    if measurements is None:
        _fail("--attestation-key needs --measurements FILE (the allowed measurements)", 2)
    try:
        verifier = PinnedKeyVerifier(
            [load_public_key(k) for k in keys], load_measurements(measurements)
        )
    except (OSError, ValueError) as err:
        _fail(str(err), 2)
    if not math.isfinite(ttl_s):
        _fail(f"--attest-ttl-s must be a finite number of seconds, not {ttl_s}", 2)
    return AttestationPolicy(verifier, ttl_s=ttl_s)


def _secret(path: Path | None, var: str) -> str | None:
    """A token from ``path``, else from the environment variable ``var``, else None."""
    if path is not None:
        try:
            value = path.read_text().strip()
        except OSError as err:
            _fail(f"cannot read {path}: {err.strerror}", 2)
        if not value:
            _fail(f"{path} is empty", 2)
        if path.stat().st_mode & 0o077:  # like ssh with a key: say so (a warning, not a refusal)
            err_console.print(
                f"warning: {path} holds a token and other users can read it; chmod 600 {path}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
        return value
    return os.environ.get(var) or None


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # As uvicorn binds: a port in TIME_WAIT after a restart is free to reuse.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            _fail(
                f"cannot listen on {host}:{port}: {err.strerror} (another coordinator? try --port)"
            )


@app.command()
def join(
    ctx: typer.Context,
    url: Annotated[
        str | None,
        typer.Argument(
            help="Coordinator URL, e.g. http://10.0.0.5:8470; or several coordinators of one"
            " database, comma-separated (URL1,URL2): requests go round-robin over them and"
            " fail over to the next when one refuses the connection.",
            show_default=False,
        ),
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(
            help=f"File holding this host's join token (`trainfleet hosts enroll NAME"
            f" --token-file F`); or set {env.JOIN_TOKEN}. Never pass a token as an argument.",
        ),
    ] = None,
    token: Annotated[
        str | None, typer.Option("--token", hidden=True, help="Refused: visible in `ps`.")
    ] = None,
    host: Annotated[
        str | None,
        typer.Option(
            envvar=env.HOST,
            help="Host name (default: the name the join token is enrolled for; in open mode,"
            " this machine's hostname).",
        ),
    ] = None,
    ca_cert: CaCertOpt = None,
    workdir: Annotated[
        Path, typer.Option(help="Where job outputs and logs are kept locally.")
    ] = Path(".trainfleet-worker"),
    threads: Annotated[
        int | None, typer.Option(help="CPU threads per job (default: the host's effective cores).")
    ] = None,
    poll_interval_s: Annotated[
        float, typer.Option(help="The least pause between two claims that found nothing.")
    ] = 1.0,
    claim_wait_s: Annotated[
        float,
        typer.Option(
            min=0,
            max=30,
            help="An idle worker's claim waits up to this long for work (long poll; the"
            " coordinator answers as soon as work arrives); 0: poll every --poll-interval-s.",
        ),
    ] = 20.0,
    max_jobs: Annotated[int | None, typer.Option(help="Exit after this many attempts.")] = None,
    exit_when_idle_s: Annotated[
        float | None, typer.Option(help="Exit after this many seconds without work.")
    ] = None,
    keep_failed_attempts: Annotated[
        int,
        typer.Option(
            min=0, help="Directories of failed attempts kept in WORKDIR/jobs for debugging."
        ),
    ] = 5,
    cache_dir: Annotated[
        Path | None,
        typer.Option(help="Shard cache, plans and routers (default: WORKDIR/cache)."),
    ] = None,
    cache_gib: Annotated[
        float, typer.Option(min=0, help="Disk bound of the shard cache, in GiB.")
    ] = env.DEFAULT_CACHE_GIB,
    max_shards: Annotated[
        int, typer.Option(min=0, help="Memory bound of the shard cache, in shards.")
    ] = env.DEFAULT_MAX_SHARDS,
    verify_routing: Annotated[
        bool,
        typer.Option(
            "--verify-routing",
            help="Re-fit every handed router from its spec (once per spec) and refuse the job"
            " if the digests differ.",
        ),
    ] = False,
    max_mbps: Annotated[
        float | None,
        typer.Option(
            "--max-mbps",
            min=0.001,
            help="Cap this worker's uploads and downloads at N Mbit/s (a real cap: a token"
            " bucket), and tell replica programs of collaborative runs, which pick their"
            " pseudo-gradient codec to fit it. This machine's own setting (the volunteer's),"
            " never part of a run's spec. Default: no cap.",
        ),
    ] = None,
    enclave: Annotated[
        str | None,
        typer.Option(
            help="Attest for private jobs with this enclave: simulated:KEYFILE (a SIMULATED"
            " attestation key from `trainfleet attest keygen`). Default: public work only.",
        ),
    ] = None,
    state_dir: StateOpt = DEFAULT_STATE,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    install_service: _InstallServiceOpt = False,
    uninstall_service: _UninstallServiceOpt = False,
    print_service: _PrintServiceOpt = False,
    service_name: _ServiceNameOpt = None,
    service_user: _ServiceUserOpt = None,
    force: _ForceOpt = False,
) -> None:
    """Join the fleet as a worker: claim, run, heartbeat and report until stopped (Ctrl-C)."""
    from trainfleet.data.prepare import GIB, CacheSettings
    from trainfleet.worker.daemon import Worker, WorkerConfig

    service = ServiceAction.parse(
        install_service, uninstall_service, print_service, service_name, service_user, force
    )
    if service is not None and service.uninstall:
        service.uninstall_now()
        return
    if url is None:
        _fail("missing argument URL (the coordinator's, e.g. http://10.0.0.5:8470)", 2)

    if token is not None:
        _fail(
            "--token is not accepted: a token on the command line is visible to every user"
            f" in `ps`; use --token-file PATH or set {env.JOIN_TOKEN}",
            2,
        )
    join_token = _secret(token_file, env.JOIN_TOKEN)
    shared = state_dir / "join.token"  # on the coordinator's machine, in open mode
    if join_token is None and shared.exists():
        join_token = _secret(shared, env.JOIN_TOKEN)
        # Said, not silent: outside open mode the coordinator refuses it, and the refusal
        # must not be about a token the user never gave.
        err_console.print(
            f"no --token-file or {env.JOIN_TOKEN}: trying the shared open-mode join token"
            f" in {shared}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    if join_token is None:
        _fail(
            f"no join token: pass --token-file PATH or set {env.JOIN_TOKEN} (the operator"
            " issues one with `trainfleet hosts enroll NAME --token-file PATH`)"
        )
    if ca_cert is not None and not ca_cert.is_file():
        _fail(f"cannot read {ca_cert}", 2)
    for one in url.split(","):
        if not one.strip().startswith(("http://", "https://")):
            _fail(f"not a coordinator URL: {one.strip()!r} (want http://HOST:PORT)", 2)
    if enclave is not None:
        from trainfleet.worker.attest import enclave_from_spec

        try:
            enclave_from_spec(enclave)  # a bad spec or key file: a message, not a traceback
        except ValueError as err:
            _fail(str(err), 2)
    if service is not None:  # --install-service / --print-service: the unit, not the worker
        service.install_or_print(ctx, url, join_token)
        return
    # Each line names the host the worker registered as (the token decides it), not this
    # machine's hostname.
    _setup_logging(log_level, "[%(worker_tag)s] ")
    tag = WorkerTag(host)
    tag.install()
    worker = Worker(
        WorkerConfig(
            url=url,
            join_token=join_token,
            host=host,
            workdir=workdir,
            poll_interval_s=poll_interval_s,
            claim_wait_s=claim_wait_s,
            num_threads=threads,
            max_jobs=max_jobs,
            exit_when_idle_s=exit_when_idle_s,
            keep_failed_attempts=keep_failed_attempts,
            data=CacheSettings(
                directory=cache_dir or workdir / "cache",
                max_bytes=int(cache_gib * GIB),
                max_shards=max_shards,
                verify_routing=verify_routing,
            ),
            max_mbps=max_mbps,
            enclave=enclave,
        ),
        client_factory=lambda tok: Client(url, tok, ca_cert=ca_cert, max_mbps=max_mbps),
    )
    tag.registration = lambda: worker.registration
    worker.install_signal_handlers()
    with _errors():
        worker.run()


@app.command()
def reload(
    manifest: Annotated[Path, typer.Argument(help="The TOML manifest.")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show the plan; change nothing.")
    ] = False,
    url: UrlOpt = env.DEFAULT_URL,
    token: TokenOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
    as_json: JsonOpt = False,
) -> None:
    """Load a manifest: add new jobs, keep existing ones, update scheduling, mark removed."""
    from trainfleet.manifest import parse_manifest

    with _errors():
        try:
            text = manifest.read_text(encoding="utf-8")
        except OSError as err:
            _fail(f"cannot read {manifest}: {err.strerror}", 2)
        # The same checks the coordinator runs, first here (it alone knows submitted jobs).
        parse_manifest(text, str(manifest), external_after=True)
        with _client(url, token, state_dir) as client:
            plan = client.reload(text, str(manifest), dry_run=dry_run)
    if as_json:
        _print_json(plan)
        return
    console.print(render.plan_table(plan))
    console.print(render.plan_summary(plan), markup=False, highlight=False)
    for warning in plan.get("warnings", []):
        console.print(f"warning: {warning}", markup=False, highlight=False)


def _read(fn: Callable[[Client], Any], url: str, token: str | None, state_dir: Path) -> Any:
    with _errors(), _client(url, token, state_dir) as client:
        return fn(client)


@app.command()
def status(
    url: UrlOpt = env.DEFAULT_URL,
    token: TokenOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
    as_json: JsonOpt = False,
) -> None:
    """Job counts by state and workers online."""
    data = _read(lambda c: c.status(), url, token, state_dir)
    if as_json:
        _print_json(data)
        return
    counts = Text(", ").join(
        render.state(k) + render.plain(f" {v}") for k, v in sorted(data["counts"].items())
    )
    console.print(Text("jobs: ") + (counts or Text("no jobs")))
    console.print(render.plain(f"workers online: {data['workers_online']}"))
    if data["manifest_hash"]:
        console.print(render.plain(f"manifest: {data['manifest_hash'][:12]}"))


@app.command("list")
def list_jobs(
    state: Annotated[str | None, typer.Option(help="Only jobs in this state.")] = None,
    url: UrlOpt = env.DEFAULT_URL,
    token: TokenOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
    as_json: JsonOpt = False,
) -> None:
    """List jobs with their host, attempts, held-out loss, tokens/s and artifact."""
    jobs = _read(lambda c: c.jobs(state), url, token, state_dir)
    if as_json:
        _print_json(jobs)
    else:
        console.print(render.jobs_table(jobs))


@app.command()
def show(
    job: JobArg,
    url: UrlOpt = env.DEFAULT_URL,
    token: TokenOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
    as_json: JsonOpt = False,
) -> None:
    """One job: its spec, result, events and artifacts."""
    data = _read(lambda c: c.job(job), url, token, state_dir)
    if as_json:
        _print_json(data)
        return
    rec = data["job"]
    console.print(render.jobs_table([rec], title=f"job {rec['name']} ({rec['id']})"))
    detail = {k: rec[k] for k in ("spec", "result", "error", "flags")}
    console.print_json(json.dumps(render.clean_data(detail)))
    console.print(render.events_table(data["events"]))
    if data["artifacts"]:
        console.print(render.artifacts_table(data["artifacts"]))
    for other in data.get("same_name", []):
        where = (
            "submitted"
            if other.get("submitted")
            else "in the manifest"
            if other["in_manifest"]
            else "removed from the manifest"
        )
        console.print(
            f"also named {other['name']}: {other['id'][:12]} ({other['state']}, {where})",
            markup=False,
            highlight=False,
        )


@app.command()
def logs(
    job: JobArg,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")
    ] = False,
    raw: Annotated[
        bool,
        typer.Option(
            "--raw", help="Print the job's output as-is, terminal control sequences included."
        ),
    ] = False,
    url: UrlOpt = env.DEFAULT_URL,
    token: TokenOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
) -> None:
    """Print a job's output (every attempt), optionally following it live.

    Control characters a job printed (colours, cursor moves, hyperlinks, carriage returns)
    are shown as visible escapes such as \\x1b, unless --raw."""
    terminal = {"completed", "failed", "cancelled"}
    with _errors(), _client(url, token, state_dir) as client:
        after, attempt = 0, None
        while True:
            page = client.logs(job, after)
            for line in page["lines"]:
                if line["attempt"] != attempt:
                    attempt = line["attempt"]
                    header = f"--- attempt {attempt} (epoch {line['epoch']}) ---"
                    err_console.print(render.plain(header, "dim"))
                text = str(line["line"])
                sys.stdout.write((text if raw else render.clean(text)) + "\n")
            sys.stdout.flush()
            after = page["next_after"]
            if not follow or (page["state"] in terminal and not page["lines"]):
                break
            if not page["lines"]:
                time.sleep(0.5)


@app.command()
def cancel(
    jobs: JobsArg,
    url: UrlOpt = env.DEFAULT_URL,
    token: TokenOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
) -> None:
    """Cancel jobs; a running one is stopped at its worker's next heartbeat."""
    with _errors(), _client(url, token, state_dir) as client:
        for ref in jobs:
            rec = client.cancel(ref)
            console.print(render.plain(f"cancelled {rec['name']} ({rec['id'][:12]})"))


@app.command()
def requeue(
    jobs: JobsArg,
    url: UrlOpt = env.DEFAULT_URL,
    token: TokenOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
) -> None:
    """Put jobs back to pending (a worker still running one is fenced off)."""
    with _errors(), _client(url, token, state_dir) as client:
        for ref in jobs:
            rec = client.requeue(ref)
            pinned = " (removed from the manifest: pinned)" if rec.get("pinned") else ""
            console.print(render.plain(f"requeued {rec['name']} ({rec['id'][:12]}){pinned}"))


@app.command()
def explain(
    job: JobArg,
    url: UrlOpt = env.DEFAULT_URL,
    token: TokenOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
    as_json: JsonOpt = False,
) -> None:
    """Say why a job is or is not running (requirements, eligible hosts, per-host reasons)."""
    data = _read(lambda c: c.explain(job), url, token, state_dir)
    if as_json:
        _print_json(data)
    else:
        console.print(
            render.plain(data["name"], "bold")
            + render.plain(f" ({data['id'][:12]}): {data['message']}")
        )


@app.command()
def download(
    job: JobArg,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Directory to unpack into.")
    ] = Path("."),
    url: UrlOpt = env.DEFAULT_URL,
    token: TokenOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
) -> None:
    """Download a completed job's artifact and unpack it into OUTPUT/JOB_NAME."""
    from trainfleet.artifacts import sha256_file, unpack

    with _errors(), _client(url, token, state_dir) as client:
        rec = client.job(job)["job"]
        sha = (rec.get("result") or {}).get("artifact")
        if not sha:
            _fail(f"job {rec['name']} has no artifact (state: {rec['state']})")
        dest = output / rec["name"]
        dest.mkdir(parents=True, exist_ok=True)
        archive = output / f"{rec['name']}.tar.zst"
        client.download(sha, archive)
        got, _ = sha256_file(archive)
        if got != sha:
            _fail(f"downloaded bytes hash to {got}, expected {sha}")
        files = unpack(archive, dest)
        archive.unlink()
    console.print(render.plain(f"{len(files)} files from artifact {sha[:12]} in {dest}"))


app.add_typer(data_app)
app.add_typer(attest_app)
app.add_typer(db_app)
app.add_typer(hosts_app)
app.add_typer(market_app)
app.add_typer(workers_app)
app.command("runs")(list_runs)
app.add_typer(run_app)
app.command("pipelines")(list_pipelines)
app.command("shares")(list_shares)
app.add_typer(pipeline_app)
app.command("submit")(submit_job)


def main() -> None:
    _safe_stdio()
    app()


if __name__ == "__main__":
    main()
