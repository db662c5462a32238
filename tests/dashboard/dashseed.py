"""A live fleet with something on every page of the dashboard, for its browser tests.

- jobs: pending ones no worker can run (so their explain text shows), one waiting on
  another (``after``), a command job that fails with log lines (one of them HTML a worker
  made up), one that completes, one that keeps running and logging, all run by a real
  ``trainfleet join`` worker;
- a collaborative run of 3 rounds, driven through the real coordinator (its round driver
  applies the outer steps and evaluates the held-out loss) by two scripted replica workers
  over HTTP: real pseudo-gradient uploads, one of them non-finite and refused. A real replica
  trains in a torch subprocess per task, too slow for a ~40 s test module on 2 cores;
- a market: a competition and two accepted, paid submissions written into the live
  coordinator's queue as its market driver would (``marketkit``); their referee jobs are then
  cancelled unrun (a real panel evaluates real models: far past the module's budget).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from fleetkit import make_cap
from marketkit import accepted, panel, sha, terms
from trainfleet.client import Client
from trainfleet.manifest.runs import CompressionSpec
from trainfleet.testing import LiveFleet, wait_until
from trainfleet.train import pseudograd
from trainfleet.verify.market import payment

SLOW_JOB = Path(__file__).parents[1] / "e2e" / "scripts" / "slow_job.py"
XSS = '<img src=x onerror="window.__pwned=1">'
FAIL_SCRIPT = (
    "import sys\n"
    "print('loading the data', flush=True)\n"
    "print('step 1 loss 3.2', flush=True)\n"
    f"print({XSS!r}, flush=True)\n"
    "print('out of patience', flush=True)\n"
    "sys.exit(3)\n"
)
RUN = "collab"
NUM_ROUNDS = 3
REPLICA_HOSTS = ("replica-a", "replica-b")
REFUSED_SLOT = (1, 1)  # (round, replica) whose pseudo-gradient is non-finite


def _job(name: str, **fields: Any) -> str:
    lines = ["[[jobs]]", f'name = "{name}"', *(f"{k} = {_toml(v)}" for k, v in fields.items())]
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def run_manifest() -> str:
    return f"""
[datasets.tiny]
source = "synthetic"
num_documents = 20
doc_tokens = 64
shard_tokens = 256

[[runs]]
name = "{RUN}"
dataset = "tiny"
replicas = 2
inner_steps = 4
rounds = {NUM_ROUNDS}
min_quorum = 1
hyper = {{ n_layers = 1, d_model = 8, n_heads = 1, seq_len = 8, batch_size = 1, seed = 3 }}
"""


def jobs_manifest() -> str:
    slow = [sys.executable, str(SLOW_JOB)]
    policy = '[hosts.cpu-a]\ndescription = "the lab box"\nram_gib = 8\ncores = 1024\n\n'
    return policy + "".join(
        [
            _job("gpu-train", require_cuda=True, min_vram_gib=24, submitter="alice"),
            _job("cancel-me", require_cuda=True, submitter="bob", hyper={"steps": 5}),
            _job("huge-ram", min_ram_gib=4096, submitter="bob", hyper={"steps": 5}),
            _job("after-gpu", after=["gpu-train"], submitter="alice", hyper={"steps": 5}),
            _job(
                "bad-job",
                kind="command",
                command=[sys.executable, "-c", FAIL_SCRIPT],
                max_failures=1,
                priority=3,
                submitter="alice",
            ),
            _job("ok-job", kind="command", command=slow, hyper={"seconds": 0.3}, priority=2),
            _job("long-job", kind="command", command=slow, hyper={"seconds": 600}, priority=1),
        ]
    )


def seed(fleet: LiveFleet) -> None:
    """Everything above, then wait until the fleet is in its steady state: the run complete,
    bad-job failed, ok-job completed, long-job running with log lines."""
    fleet.reload(run_manifest())
    drive_run(fleet)
    fleet.reload(run_manifest() + jobs_manifest())
    seed_market(fleet)
    fleet.start_worker("cpu-a")
    fleet.wait_state("bad-job", {"failed"}, 60)
    fleet.wait_state("ok-job", {"completed"}, 60)
    fleet.wait_state("long-job", {"running"}, 60)
    wait_until(lambda: fleet.operator.logs("long-job")["lines"], 30, "long-job to log")


# the run ---------------------------------------------------------------------------------------
def _replica_worker(fleet: LiveFleet, host: str) -> Client:
    """A scripted replica worker registered on ``host``; its hostname is HTML, shown as text."""
    cap = make_cap(host).model_copy(update={"hostname": f"{host} {XSS}"})
    with Client(fleet.url, fleet.worker_token(host)) as c:
        token = c.register(cap.model_dump(mode="json"))["token"]
    return Client(fleet.url, token)


def drive_run(fleet: LiveFleet) -> None:
    workers = [_replica_worker(fleet, host) for host in REPLICA_HOSTS]
    try:
        for rnd in range(NUM_ROUNDS):
            for worker in workers:
                _contribute(fleet, worker)
            wait_until(
                lambda rnd=rnd: fleet.operator.run(RUN)["run"]["round"] > rnd,
                60,
                f"run round {rnd} to close",
                interval_s=0.1,
            )
    finally:
        for worker in workers:
            worker.close()
    assert fleet.operator.run(RUN)["run"]["state"] == "completed"


def _contribute(fleet: LiveFleet, worker: Client) -> None:
    """Claim a replica task, fetch its weights, upload a small pseudo-gradient, complete."""
    claim: dict[str, Any] = wait_until(worker.claim, 30, "a replica task", interval_s=0.1)
    job, epoch = claim["job"], claim["epoch"]
    task = job["spec"]["task"]
    work = fleet.tmp / f"replica-{job['id'][:12]}-{epoch}"
    work.mkdir()
    worker.get_weights(task["weights"], work / "start.safetensors")
    start = load_file(str(work / "start.safetensors"))
    g = torch.Generator().manual_seed(100 * task["round"] + task["replica"])
    end = {k: start[k] - 1e-3 * torch.randn(start[k].shape, generator=g) for k in sorted(start)}
    if (task["round"], task["replica"]) == REFUSED_SLOT:
        first = sorted(end)[0]
        end[first].view(-1)[0] = float("nan")
    data = pseudograd.encode(start, end, CompressionSpec()).data
    path = work / "pseudograd.safetensors"
    path.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    worker.upload(job["id"], epoch, path, digest, "pseudograd.safetensors")
    result = {
        "metrics": {"inner_steps_done": task["inner_steps"], "compute_s": 0.5},
        "artifact": digest,
        "artifact_size": len(data),
        "contribution": {"round": task["round"], "replica": task["replica"]},
    }
    worker.complete(job["id"], epoch, result)


# the market ------------------------------------------------------------------------------------
def seed_market(fleet: LiveFleet) -> None:
    """A competition and two paid submissions, decided as the market driver decides; their
    panels' referee jobs are cancelled before any worker runs one."""
    queue = fleet.coord.queue
    competition = queue.create_competition(terms(), sha("baseline"), 3.0)
    for producer, improvement in (("cpu-a", 0.4), ("replica-a", 0.1)):
        competition = queue.get_competition(competition.id)
        frontier = competition.frontier_score
        sid, model = sha(("submission", producer)), sha(("model", producer))
        tasks = panel(competition, sid, model, producer)
        queue.submit(
            competition.id, model, 1000, producer, frontier - improvement, tasks, submission_id=sid
        )
        verdict = accepted(improvement, frontier)
        queue.decide(sid, verdict, payment(competition.spec, frontier, verdict))
        for job in queue.panel_jobs(sid):
            queue.cancel(job.id, "seeded submission: decided without its panel")
