"""The ``trainfleet`` command. It parses arguments and calls the library; nothing more.

Connection options of every operator command come from flags, then environment variables
(``TRAINFLEET_URL``, ``TRAINFLEET_TOKEN``), then the local coordinator's state directory
(``.trainfleet/operator.token``), so on the coordinator's own machine no flag is needed.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from trainfleet import __version__, env
from trainfleet.cli import render
from trainfleet.cli.common import (
    DEFAULT_STATE,
    JobArg,
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
from trainfleet.cli.common import setup_logging as _setup_logging
from trainfleet.cli.data import app as data_app
from trainfleet.client import Client

app = typer.Typer(
    name="trainfleet",
    help=(
        "Train models across a fleet of machines.\n\n"
        "Start a coordinator with `trainfleet serve`, load a manifest with `trainfleet reload"
        " fleet.toml`, and join workers from any machine with `trainfleet join URL --token T`."
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
        str | None, typer.Option(help="Queue URL. Default: sqlite:///STATE_DIR/queue.db.")
    ] = None,
    artifacts: Annotated[
        str | None,
        typer.Option(
            help="Artifact store: a directory or any fsspec URL. Default: STATE_DIR/artifacts."
        ),
    ] = None,
    operator_token: Annotated[
        str | None,
        typer.Option(
            envvar=env.TOKEN, help="Operator token. Default: generated once, kept in STATE_DIR."
        ),
    ] = None,
    join_token: Annotated[
        str | None,
        typer.Option(
            envvar=env.JOIN_TOKEN,
            help="Worker join token. Default: generated once, kept in STATE_DIR.",
        ),
    ] = None,
    heartbeat_interval_s: Annotated[
        float, typer.Option(help="Seconds between worker heartbeats.")
    ] = 2.0,
    heartbeat_timeout_s: Annotated[
        float,
        typer.Option(help="A job silent this long is requeued (within one more reap interval)."),
    ] = 30.0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run the coordinator (HTTP API on HOST:PORT; state in STATE_DIR)."""
    from trainfleet.coordinator.server import ServeConfig, build_coordinator
    from trainfleet.coordinator.server import serve as run_server
    from trainfleet.manifest import load_manifest

    _setup_logging(log_level, "[coordinator] ")
    if heartbeat_timeout_s <= heartbeat_interval_s:
        _fail("--heartbeat-timeout-s must exceed --heartbeat-interval-s")
    cfg = ServeConfig(
        state_dir=state_dir,
        queue_url=queue_url,
        artifacts=artifacts,
        operator_token=operator_token,
        join_token=join_token,
        heartbeat_interval_s=heartbeat_interval_s,
        heartbeat_timeout_s=heartbeat_timeout_s,
    )
    _check_port_free(host, port)
    with _errors():
        coord = build_coordinator(cfg)
        if manifest is not None:
            plan = coord.queue.apply_manifest(load_manifest(manifest))
            err_console.print(
                f"loaded {manifest}: {len(plan.added)} added, {len(plan.changed)} changed,"
                f" {len(plan.kept)} kept, {len(plan.removed)} removed"
            )
        base = f"http://{host}:{port}"
        err_console.print(
            f"coordinator on {base}  (state: {state_dir})\n"
            f"join workers with:  trainfleet join {base} --token {coord.join_token}",
            highlight=False,
        )
        run_server(coord, host, port)


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
    url: Annotated[str, typer.Argument(help="Coordinator URL, e.g. http://10.0.0.5:8470.")],
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar=env.JOIN_TOKEN,
            help="Join token (the coordinator's STATE_DIR/join.token).",
        ),
    ] = None,
    host: Annotated[
        str | None,
        typer.Option(
            envvar=env.HOST, help="Host name for policy (default: this machine's hostname)."
        ),
    ] = None,
    workdir: Annotated[
        Path, typer.Option(help="Where job outputs and logs are kept locally.")
    ] = Path(".trainfleet-worker"),
    threads: Annotated[
        int | None, typer.Option(help="CPU threads per job (default: the host's effective cores).")
    ] = None,
    poll_interval_s: Annotated[float, typer.Option(help="Seconds between claims when idle.")] = 1.0,
    max_jobs: Annotated[int | None, typer.Option(help="Exit after this many attempts.")] = None,
    exit_when_idle_s: Annotated[
        float | None, typer.Option(help="Exit after this many seconds without work.")
    ] = None,
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
    state_dir: StateOpt = DEFAULT_STATE,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Join the fleet as a worker: claim, run, heartbeat and report until stopped (Ctrl-C)."""
    from trainfleet.data.prepare import GIB, CacheSettings
    from trainfleet.worker.daemon import Worker, WorkerConfig

    if token is None:
        local = state_dir / "join.token"
        if not local.exists():
            _fail(f"no join token: pass --token or set {env.JOIN_TOKEN}")
        token = local.read_text().strip()
    _setup_logging(log_level, f"[worker {host or os.uname().nodename}] ")
    worker = Worker(
        WorkerConfig(
            url=url,
            join_token=token,
            host=host,
            workdir=workdir,
            poll_interval_s=poll_interval_s,
            num_threads=threads,
            max_jobs=max_jobs,
            exit_when_idle_s=exit_when_idle_s,
            data=CacheSettings(
                directory=cache_dir or workdir / "cache",
                max_bytes=int(cache_gib * GIB),
                max_shards=max_shards,
                verify_routing=verify_routing,
            ),
        )
    )
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
        parse_manifest(text, str(manifest))  # the same checks the coordinator runs, first here
        with _client(url, token, state_dir) as client:
            plan = client.reload(text, str(manifest), dry_run=dry_run)
    if as_json:
        _print_json(plan)
        return
    console.print(render.plan_table(plan))
    console.print(
        f"{len(plan['added'])} added, {len(plan['changed'])} changed, {len(plan['kept'])} kept,"
        f" {len(plan['removed'])} removed"
    )


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
    counts = (
        ", ".join(f"{render.state(k)} {v}" for k, v in sorted(data["counts"].items())) or "no jobs"
    )
    console.print(f"jobs: {counts}\nworkers online: {data['workers_online']}")
    if data["manifest_hash"]:
        console.print(f"manifest: {data['manifest_hash'][:12]}")


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
    console.print_json(
        json.dumps(
            {
                "spec": rec["spec"],
                "result": rec["result"],
                "error": rec["error"],
                "flags": rec["flags"],
            }
        )
    )
    console.print(render.events_table(data["events"]))
    if data["artifacts"]:
        console.print(render.artifacts_table(data["artifacts"]))


@app.command()
def logs(
    job: JobArg,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")
    ] = False,
    url: UrlOpt = env.DEFAULT_URL,
    token: TokenOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
) -> None:
    """Print a job's output (every attempt), optionally following it live."""
    terminal = {"completed", "failed", "cancelled"}
    with _errors(), _client(url, token, state_dir) as client:
        after, attempt = 0, None
        while True:
            page = client.logs(job, after)
            for line in page["lines"]:
                if line["attempt"] != attempt:
                    attempt = line["attempt"]
                    err_console.print(f"[dim]--- attempt {attempt} (epoch {line['epoch']}) ---[/]")
                sys.stdout.write(line["line"] + "\n")
            sys.stdout.flush()
            after = page["next_after"]
            if not follow or (page["state"] in terminal and not page["lines"]):
                break
            if not page["lines"]:
                time.sleep(0.5)


@app.command()
def cancel(
    jobs: Annotated[list[str], typer.Argument(help="Jobs to cancel (names, ids or id prefixes).")],
    url: UrlOpt = env.DEFAULT_URL,
    token: TokenOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
) -> None:
    """Cancel jobs; a running one is stopped at its worker's next heartbeat."""
    with _errors(), _client(url, token, state_dir) as client:
        for ref in jobs:
            rec = client.cancel(ref)
            console.print(f"cancelled {rec['name']} ({rec['id'][:12]})")


@app.command()
def requeue(
    jobs: Annotated[list[str], typer.Argument(help="Jobs to requeue (names, ids or id prefixes).")],
    url: UrlOpt = env.DEFAULT_URL,
    token: TokenOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
) -> None:
    """Put jobs back to pending (a worker still running one is fenced off)."""
    with _errors(), _client(url, token, state_dir) as client:
        for ref in jobs:
            rec = client.requeue(ref)
            console.print(f"requeued {rec['name']} ({rec['id'][:12]})")


@app.command()
def workers(
    url: UrlOpt = env.DEFAULT_URL,
    token: TokenOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
    as_json: JsonOpt = False,
) -> None:
    """Workers with their effective capability and the corrections made to it."""
    data = _read(lambda c: c.workers(), url, token, state_dir)
    if as_json:
        _print_json(data)
    else:
        console.print(render.workers_table(data))


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
            f"[bold]{data['name']}[/] ({data['id'][:12]}): {data['message']}", highlight=False
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
    console.print(f"{len(files)} files from artifact {sha[:12]} in {dest}")


app.add_typer(data_app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
