"""The runs part of a reload on the queue itself: a new run waits for its first round, its
replica tasks are never part of the jobs' diff, round weights are bound for the GC."""

from __future__ import annotations

from fleetkit import manifest_of
from trainfleet.coordinator.round_plan import replica_tasks
from trainfleet.queue import JobQueue

RUN = """
[datasets.tiny]
source = "synthetic"
num_documents = 20

[[jobs]]
name = "solo"
hyper = { steps = 5 }

[[runs]]
name = "dl"
dataset = "tiny"
replicas = 2
rounds = 2
hyper = { n_layers = 1, d_model = 8, n_heads = 1, seq_len = 8, batch_size = 1 }
"""
SHA = "ab" * 32


def test_a_new_run_is_opened_once_and_its_tasks_survive_reloads(queue: JobQueue) -> None:
    dry = queue.apply_manifest(manifest_of(RUN), dry_run=True)
    assert [(e.name, e.state) for e in dry.runs] == [("dl", "added")]
    assert queue.list_runs() == []
    plan = queue.apply_manifest(manifest_of(RUN))
    assert [(e.name, e.state) for e in plan.runs] == [("dl", "added")]
    (run,) = queue.runs_to_open()
    assert run.num_rounds == 2 and run.state == "active" and run.weights is None
    tasks = replica_tasks(run, 0, SHA, 10, None)
    assert [t.name for t in tasks] == ["dl.r0.k0", "dl.r0.k1"]
    assert queue.open_first_round(run.id, SHA, 10, tasks)
    assert not queue.open_first_round(run.id, SHA, 10, tasks)  # idempotent
    assert queue.runs_to_open() == []
    again = queue.apply_manifest(manifest_of(RUN))
    assert [e.name for e in again.removed] == []  # replica jobs are not the manifest's jobs
    assert [(e.name, e.state) for e in again.runs] == [("dl", "kept")]
    pending = [j.name for j in queue.list_jobs("pending")]
    assert pending == ["solo", "dl.r0.k0", "dl.r0.k1"]
    assert queue.is_bound(SHA)
    assert not queue.is_bound("cd" * 32)
    assert queue.weights_round(SHA) == (run.id, 0)
