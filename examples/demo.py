"""The main job: a sweep and a collaborative DiLoCo run on a three-host fleet, in real processes.

    python examples/demo.py            (what `make demo` runs)

1. starts a coordinator (`trainfleet serve`, SQLite + local artifact directory in .demo/);
2. loads examples/fleet.toml with `trainfleet reload` (a sweep of built-in `train` jobs, one
   `command` job, two jobs on the routed paths of a synthetic dataset spec, and one
   collaborative run: a GPT trained by all three workers with DiLoCo);
3. enrolls three hosts (`trainfleet hosts enroll NAME --token-file F`: a join token bound to
   each name) and starts a worker on each (`trainfleet join URL --token-file F`): `gpu-box`
   declares a GPU that detection does not find (so it is corrected to CPU-only), `cpu-a` and
   `cpu-b` take different slices of the sweep through their allow lists; then shows progress
   until every job and run is done and prints the results, the run's rounds among them;
4. stops the workers with SIGTERM (they deregister) and then the coordinator. Ctrl-C at
   any point stops them the same way: each worker hands back its running job.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from trainfleet.cli import render
from trainfleet.cli.runs import last_heldout_loss, rounds_table, runs_table
from trainfleet.client import Client
from trainfleet.worker.shepherd import set_parent_death_signal

REPO = Path(__file__).resolve().parents[1]
HOSTS = ("gpu-box", "cpu-a", "cpu-b")
TERMINAL = {"completed", "failed", "cancelled"}
RUN_DONE = {"completed", "superseded", "paused"}
console = Console(width=None if sys.stdout.isatty() else 140)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def trainfleet(*args: str) -> list[str]:
    return [sys.executable, "-m", "trainfleet.cli.main", *args]


def detach() -> None:
    """In a child, before exec: SIGTERM me if the demo dies (Linux). The child also runs in
    its own session, so a Ctrl-C reaches the demo alone, which stops the fleet in order."""
    set_parent_death_signal(signal.SIGTERM)


def stop(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Wait for ``proc`` to exit; SIGKILL it after ``timeout_s``."""
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def shutdown(workers: list[subprocess.Popen[bytes]], server: subprocess.Popen[bytes]) -> None:
    """SIGTERM the workers (each hands back its running job and deregisters), then the
    coordinator. Another Ctrl-C meanwhile sends the workers a second SIGTERM: they exit now."""

    def hurry(signum: int, frame: object) -> None:
        console.print("interrupted again: the workers exit now")
        for proc in workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, hurry)
    for proc in workers:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in workers:
        stop(proc, timeout_s=60)
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
    stop(server, timeout_s=30)


class Children:
    """A demo's processes: each started detached (``detach``) with its output in
    ``LOGS/NAME.log``; the first one started is the coordinator, the others its workers."""

    def __init__(self, logs: Path, env: dict[str, str]):
        self.logs = logs
        self.env = env
        self.procs: list[subprocess.Popen[bytes]] = []
        self._files: list[IO[bytes]] = []

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        self._files.append(log)
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=detach,
        )
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        """Stop the workers, then the coordinator (``shutdown``); close the logs."""
        if self.procs:
            shutdown(self.procs[1:], self.procs[0])
        for log in self._files:
            log.close()


class StepFailed(RuntimeError):
    """A walkthrough step did not do what the walkthrough expects; the message says what."""


Check = tuple[str, bool, str]  # what was checked, whether it held, what was seen


def say_interrupted(console: Console) -> None:
    console.print(
        "\n[yellow]interrupted[/]: stopping the workers (each hands back its running job),"
        " then the coordinator"
    )


def summarize(
    console: Console,
    checks: list[Check],
    failure: str | None,
    root: Path,
    *,
    expected: int,
    good: str,
    bad: str,
    started: float,
) -> int:
    """Print a walkthrough's checks and its verdict; its exit status (0: every one of at least
    ``expected`` checks held and no step failed)."""
    console.rule("summary")
    for what, ok, seen in checks:
        mark = "[green]ok[/]     " if ok else "[red]DIFFERS[/]"
        console.print(f"{mark} {what}: ", Text(seen), sep="")
    if failure:
        console.print(f"[red]DIFFERS[/] {failure} (logs in {root / 'logs'})")
    ok = not failure and len(checks) >= expected and all(ok for _, ok, _ in checks)
    console.print(
        (f"[green]{good}[/]" if ok else f"[red]{bad}[/]")
        + f" in {time.monotonic() - started:.0f}s; workers stopped, coordinator stopped."
    )
    return 0 if ok else 1


def progress_line(jobs: list[dict], started: float) -> str:
    done = sum(j["state"] in TERMINAL for j in jobs)
    states = ", ".join(
        f"{s} {sum(j['state'] == s for j in jobs)}"
        for s in ("pending", "claimed", "running", "completed", "failed")
        if any(j["state"] == s for j in jobs)
    )
    return f"{done}/{len(jobs)} jobs done ({states}); {time.monotonic() - started:.0f}s elapsed"


def sweep_jobs(client: Client) -> list[dict]:
    """The manifest's own jobs: a run's replica tasks are shown as the run's rounds."""
    return [j for j in client.jobs() if j["spec"]["kind"] != "replica"]


def run_line(details: list[dict]) -> str:
    return "; ".join(
        f"run {d['run']['name']} round {d['run']['round']}/{d['run']['num_rounds']}"
        f" ({d['run']['state']})"
        for d in details
    )


def watch(client: Client, timeout_s: float) -> float:
    """Show progress until every job and run is done: a live table on a terminal, lines
    otherwise."""
    started = time.monotonic()
    last = ""
    with Live(console=console, refresh_per_second=4, transient=True) as live:
        while True:
            jobs = sweep_jobs(client)
            details = [client.run(r["id"]) for r in client.runs()]
            line = progress_line(jobs, started) + "; " + run_line(details)
            if console.is_terminal:
                live.update(
                    Group(
                        Text(line),
                        render.jobs_table(jobs, title="sweep"),
                        runs_table(details),
                    )
                )
            elif line.split("elapsed")[-1] != last.split("elapsed")[-1] or (
                line.split(";")[0] != last.split(";")[0]
            ):
                console.print(line)
            last = line
            runs_done = all(d["run"]["state"] in RUN_DONE for d in details)
            if runs_done and all(j["state"] in TERMINAL for j in jobs):
                return time.monotonic() - started
            if time.monotonic() - started > timeout_s:
                console.print("[red]timed out; see the logs[/]")
                return time.monotonic() - started
            time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", default=str(REPO / "examples" / "fleet.toml"))
    parser.add_argument("--dir", default=str(REPO / ".demo"), help="state and logs (recreated)")
    parser.add_argument("--timeout-s", type=float, default=300)
    args = parser.parse_args()

    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    (root / "logs").mkdir(parents=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    state = root / "state"
    env = {**os.environ, "TRAINFLEET_URL": url, "TRAINFLEET_STATE_DIR": str(state)}
    children = Children(root / "logs", env)
    spawn = children.spawn

    console.rule("trainfleet demo")
    console.print(f"coordinator  {url}  (state and logs in {root})")
    console.print(
        f"dashboard    {url}/dashboard  (operator token: {state / 'operator.token'})",
        markup=False,
    )
    spawn(
        "coordinator",
        trainfleet(
            "serve",
            "--port",
            str(port),
            "--state-dir",
            str(state),
            "--heartbeat-interval-s",
            "1",
            "--heartbeat-timeout-s",
            "10",
        ),
    )
    ok = interrupted = False
    try:
        client = Client(url, None)
        client.wait_healthy()
        client.token = (state / "operator.token").read_text().strip()

        console.print(f"\n$ trainfleet reload {os.path.relpath(args.manifest, REPO)}")
        subprocess.run(trainfleet("reload", args.manifest), env=env, cwd=REPO, check=True)

        for host in HOSTS:
            # Each host is enrolled: its join token is bound to its name, kept in a 0600
            # file and read by `join` from there (never on a command line).
            token_file = root / f"{host}.token"
            console.print(f"$ trainfleet hosts enroll {host} --token-file {token_file.name}")
            subprocess.run(
                trainfleet("hosts", "enroll", host, "--token-file", str(token_file)),
                env=env,
                cwd=REPO,
                check=True,
                stderr=subprocess.DEVNULL,
            )
            spawn(
                f"worker-{host}",
                trainfleet(
                    "join",
                    url,
                    "--token-file",
                    str(token_file),
                    "--host",
                    host,
                    "--threads",
                    "1",
                    "--poll-interval-s",
                    "0.5",
                    "--workdir",
                    str(root / f"work-{host}"),
                ),
            )
        deadline = time.monotonic() + 60
        while len(client.workers()) < len(HOSTS):
            if time.monotonic() > deadline:
                raise SystemExit(f"workers did not register; see {root / 'logs'}")
            time.sleep(0.3)
        console.print(
            "\n3 workers joined; the declared GPU of gpu-box is checked against detection:"
        )
        console.print(render.workers_table(client.workers()))
        elapsed = watch(client, args.timeout_s)

        console.rule("results")
        jobs = sweep_jobs(client)
        console.print(render.jobs_table(jobs, title="results"))
        for job in jobs:
            data = ((job.get("result") or {}).get("metrics") or {}).get("data")
            if data:
                floor = data.get("loss_floor_nats")
                console.print(
                    f"{job['name']}: dataset {data['dataset']} path {data['path']},"
                    f" {len(data['shards'])} shards built on {job['host']} and hash-reported;"
                    f" held-out {job['result']['metrics']['heldout_loss']:.3f} nats/token"
                    + (f" vs the exact floor {floor:.3f}" if floor is not None else ""),
                    highlight=False,
                )
        ok = all(j["state"] == "completed" for j in jobs)
        for run in client.runs():
            detail = client.run(run["id"])
            console.rule(f"collaborative run {run['name']}")
            console.print(rounds_table(detail))
            losses = [r["heldout_loss"] for r in detail["rounds"] if r["heldout_loss"]]
            last_loss = last_heldout_loss(detail["rounds"])
            better = bool(losses) and last_loss is not None and last_loss < losses[0]
            ok = ok and run["state"] == "completed" and better
            console.print(
                f"{run['name']}: {run['state']} after {run['num_rounds']} rounds of"
                f" {run['spec']['replicas']} replicas; held-out loss {losses[0]:.3f} after"
                f" round 0 -> {last_loss:.3f} (measured by the coordinator, not the workers)"
                if losses and last_loss is not None
                else f"{run['name']}: {run['state']}, no held-out loss measured",
                highlight=False,
            )
        verdict = (
            "[green]all jobs and runs completed[/]"
            if ok
            else "[red]some jobs or runs did not complete[/]"
        )
        console.print(f"{verdict} in {elapsed:.0f}s. Logs: {root / 'logs'}")
        tf = os.path.relpath(Path(sys.executable).parent / "trainfleet")
        rel = os.path.relpath(state)
        console.print(
            f"Everything is kept in {rel}. To look around, `{tf} serve --state-dir {rel}`"
            f" reopens it; then, in another shell: `{tf} show gpt-lr3e-3 --state-dir {rel}`"
            f" or `{tf} logs gpt-lr3e-3 --state-dir {rel}`"
            f" or `{tf} run show collab-gpt --state-dir {rel}`, or open"
            f" http://127.0.0.1:8470/dashboard with the token in {rel}/operator.token."
        )
        client.close()
    except KeyboardInterrupt:
        interrupted = True
        console.print(
            "\n[yellow]interrupted[/]: stopping the workers (each hands back its running job),"
            " then the coordinator"
        )
    finally:
        children.stop()
    if interrupted:
        console.print(f"stopped; the state is kept in {os.path.relpath(state)}.")
        return 130
    console.print("workers stopped and left the fleet; coordinator stopped.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
