"""Knowledge distillation on a disaggregated pipeline, walked through on live processes.

    python examples/pipeline_demo.py     (what `make pipeline-demo` runs)

1. starts a coordinator (`trainfleet serve`, SQLite + artifacts in .pipeline-demo/), enrolls
   three hosts (`trainfleet hosts enroll NAME --token-file F`) and starts a worker on each
   (`trainfleet join`);
2. loads examples/distill.toml (`trainfleet reload`): a teacher `train` job and the pipeline
   `distill`. One worker trains the teacher; when it completes, the coordinator starts the
   pipeline: a producer job (the teacher's top-k logits of 128 batches, kept in a feature
   store the producer serves over HTTP) and two student consumer jobs (each leases refs from
   the coordinator, fetches the tensors from the producer, acks, trains one step per batch);
3. shows progress with `trainfleet pipelines` (produced, in flight, consumed, released,
   backlog) until the pipeline completes, then `trainfleet pipeline show distill`;
4. prints the outcome: the batches each student trained on (every batch in exactly one
   student), and each student's held-out loss beside the same student trained here, on the
   same batches in the same order, with hard labels alone (alpha = 1): the CE-only baseline
   at equal steps.

The demo exits 0 only when the pipeline completed, every batch was consumed exactly once and
each student beat its baseline; otherwise it exits 1 and says what differed. Ctrl-C stops the
workers (each hands back its running job) and then the coordinator, as `examples/demo.py`
does.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.text import Text

from trainfleet.client import Client
from trainfleet.manifest.pipelines import PipelineSpec, sample_id
from trainfleet.pipeline import distill

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import (  # the sibling example's helpers
    Check,
    Children,
    StepFailed,
    free_port,
    say_interrupted,
    summarize,
    trainfleet,
)

REPO = Path(__file__).resolve().parents[1]
HOSTS = ("host-a", "host-b", "host-c")
PIPELINE = "distill"
DONE = {"completed", "failed", "superseded"}
console = Console(width=None if sys.stdout.isatty() else 160, highlight=False)


def run_cli(shown: str, argv: list[str], env: dict[str, str], *, quiet: bool = False) -> str:
    """Print ``$ trainfleet ...``, run it, print its output (unless ``quiet``); the output."""
    console.print(Text(f"\n$ {shown}", style="bold"), soft_wrap=True)
    proc = subprocess.run(
        argv, env=env, cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    if not quiet:
        console.print(Text(proc.stdout.rstrip("\n")))
    if proc.returncode != 0:
        raise StepFailed(f"`{shown}` exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def progress(client: Client, env: dict[str, str], timeout_s: float) -> dict[str, Any]:
    """`trainfleet pipelines` each time the counts change, until the pipeline is done."""
    started = shown_at = time.monotonic()
    last: tuple[Any, ...] = ()
    while True:
        entries = client.pipelines()
        mine = [e for e in entries if e["pipeline"]["name"] == PIPELINE]
        teacher = client.job("teacher")["job"]["state"]
        if mine:
            record, counts = mine[-1]["pipeline"], mine[-1]["counts"]
            seen = (record["state"], teacher, *sorted(counts.items()))
            elapsed = time.monotonic() - started
            # Each change of state at once; changed counts at most every few seconds.
            if seen[:2] != last[:2] or (seen != last and time.monotonic() - shown_at >= 3):
                last, shown_at = seen, time.monotonic()
                run_cli(
                    f"trainfleet pipelines    # {elapsed:.0f}s; teacher job {teacher}",
                    trainfleet("pipelines"),
                    env,
                )
            if record["state"] in DONE:
                detail: dict[str, Any] = client.pipeline(PIPELINE)
                return detail
        if time.monotonic() - started > timeout_s:
            raise StepFailed(f"the pipeline did not finish in {timeout_s:.0f}s")
        time.sleep(1.0)


def baseline_losses(detail: dict[str, Any], students: dict[str, list[str]]) -> dict[str, float]:
    """Each student trained here on the same batches in the same order, hard labels only."""
    spec = PipelineSpec.model_validate(detail["pipeline"]["spec"])
    params = distill.student_params(spec)
    windows = distill.SampleWindows(
        distill.prepare(spec.dataset, log=lambda _: None),
        params.batch_size,
        params.seq_len,
        spec.seed,
    )
    heldout = distill.heldout_for(windows, params)
    hard = spec.model_copy(update={"alpha": 1.0})
    shape = (params.batch_size, params.seq_len, spec.top_k)
    # At alpha = 1 the teacher's term weighs nothing: placeholders of the right shape stand in.
    no_teacher = {
        "topk_values": torch.zeros(shape, dtype=torch.float32),
        "topk_indices": torch.zeros(shape, dtype=torch.int64),
    }
    out = {}
    for name, ids in students.items():
        batches = [(sid, {"tokens": windows.tokens(int(sid)), **no_teacher}) for sid in ids]
        result = distill.train_student(
            batches, params, hard, num_threads=1, heldout=heldout, log=lambda _: None
        )
        assert result.heldout_loss is not None
        out[name] = result.heldout_loss
    return out


def outcome(detail: dict[str, Any]) -> list[Check]:
    """What was checked, whether it held, and what was seen."""
    checks: list[Check] = []
    record, counts = detail["pipeline"], detail["counts"]
    samples = int(record["spec"]["samples"])
    checks.append(
        (
            "pipeline completed",
            record["state"] == "completed",
            f"{record['state']}" + (f": {record['detail']}" if record.get("detail") else ""),
        )
    )
    consumers = [
        j for j in detail["jobs"] if j["spec"]["kind"] == "consumer" and j["state"] == "completed"
    ]
    students = {j["name"]: (j["result"] or {}).get("metrics", {}) for j in consumers}
    ids = {name: list(m.get("samples", [])) for name, m in students.items()}
    every = sorted(sid for batch in ids.values() for sid in batch)
    checks.append(
        (
            "every batch trained exactly one student, once",
            every == [sample_id(i) for i in range(samples)],
            ", ".join(f"{name} {len(batch)}" for name, batch in ids.items())
            + f" = {len(every)} of {samples} batches; counts: produced {counts['produced']},"
            f" consumed {counts['consumed']}, released {counts['released']},"
            f" backlog {counts['backlog']}",
        )
    )
    if not ids:
        return checks
    console.print("\ntraining the same students here on the same batches, hard labels only ...")
    baselines = baseline_losses(detail, ids)
    for name, metrics in students.items():
        kd, ce = metrics.get("heldout_loss"), baselines[name]
        checks.append(
            (
                f"{name} beats its CE-only baseline at {len(ids[name])} steps",
                isinstance(kd, float) and kd < ce,
                f"held-out {kd:.3f} nats/byte with the teacher vs {ce:.3f} without"
                if isinstance(kd, float)
                else "no held-out loss reported",
            )
        )
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--manifest", default=str(REPO / "examples" / "distill.toml"))
    parser.add_argument(
        "--dir", default=str(REPO / ".pipeline-demo"), help="state and logs (recreated)"
    )
    parser.add_argument("--timeout-s", type=float, default=600)
    args = parser.parse_args()

    started = time.monotonic()
    root = Path(args.dir).resolve()
    shutil.rmtree(root, ignore_errors=True)
    (root / "logs").mkdir(parents=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    state = root / "state"
    env = {
        **os.environ,
        "TRAINFLEET_URL": url,
        "TRAINFLEET_STATE_DIR": str(state),
        "TRAINFLEET_CACHE_DIR": str(root / "cache"),  # the baselines' copy of the dataset
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("TRAINFLEET_TOKEN", None)
    os.environ["TRAINFLEET_CACHE_DIR"] = env["TRAINFLEET_CACHE_DIR"]
    children = Children(root / "logs", env)
    manifest = os.path.relpath(args.manifest, REPO)

    console.rule("trainfleet pipeline demo")
    console.print(f"coordinator  {url}  (state and logs in {os.path.relpath(root)})")
    serve = (
        "serve", "--port", str(port), "--state-dir", str(state),
        "--heartbeat-interval-s", "1", "--heartbeat-timeout-s", "10",
    )  # fmt: skip
    console.print(Text(f"$ trainfleet {shlex.join(serve)} &", style="bold"), soft_wrap=True)
    children.spawn("coordinator", trainfleet(*serve))
    checks: list[Check] = []
    failure = ""
    interrupted = False
    try:
        client = Client(url, None)
        client.wait_healthy(60)
        client.token = (state / "operator.token").read_text().strip()

        console.rule("1. the fleet")
        for host in HOSTS:
            token_file = root / f"{host}.token"
            run_cli(
                f"trainfleet hosts enroll {host} --token-file {token_file.name}",
                trainfleet("hosts", "enroll", host, "--token-file", str(token_file)),
                env,
                quiet=True,
            )
            join = (
                "join", url, "--token-file", str(token_file), "--host", host,
                "--threads", "1", "--poll-interval-s", "0.3",
                "--workdir", str(root / f"work-{host}"),
            )  # fmt: skip
            console.print(Text(f"$ trainfleet {shlex.join(join)} &", style="bold"))
            children.spawn(f"worker-{host}", trainfleet(*join))

        console.rule("2. the manifest: a teacher job and a pipeline")
        run_cli(f"trainfleet reload {manifest}", trainfleet("reload", args.manifest), env)

        console.rule("3. progress")
        detail = progress(client, env, args.timeout_s)
        run_cli(
            f"trainfleet pipeline show {PIPELINE}", trainfleet("pipeline", "show", PIPELINE), env
        )

        console.rule("4. the outcome")
        checks = outcome(detail)
        client.close()
    except StepFailed as err:
        failure = str(err)
    except KeyboardInterrupt:
        interrupted = True
        say_interrupted(console)
    finally:
        children.stop()
    if interrupted:
        console.print(f"stopped; the state is kept in {os.path.relpath(root)}.")
        return 130

    return summarize(
        console,
        checks,
        failure,
        root,
        expected=3,
        good="the students learned more from the teacher",
        bad="it did not",
        started=started,
    )


if __name__ == "__main__":
    sys.exit(main())
