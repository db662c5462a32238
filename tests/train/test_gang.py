"""A data-parallel gang (torch.distributed ranks in spawned processes) trains like one process
on the same global batch, up to floating-point summation order.

Tolerances (measured: loss 1e-7, first-step gradients 3e-7, weights after 3 steps 4e-5):
losses rtol 1e-6; each first-step gradient tensor within 1e-5 of its norm; after 3 AdamW steps
each weight tensor's difference within 1e-3 of the tensor's change (Adam divides by the
gradient's running RMS, which magnifies the last bits of tiny gradient entries).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from trainfleet.data.prepare import CacheSettings
from trainfleet.data.spec import SyntheticDataset
from trainfleet.manifest.runs import CompressionSpec, ReplicaTask
from trainfleet.train import pseudograd
from trainfleet.train.gang import Gang, GangError, InnerJob, InProcess, default_backend
from trainfleet.train.inner import init_weights, run_replica
from trainfleet.train.recipes import GPTParams

PARAMS = GPTParams(
    n_layers=1, d_model=16, n_heads=2, seq_len=16, batch_size=4, steps=10, warmup_steps=1
)  # fmt: skip
SIZE = 4


def _batches(rows: int, count: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    for _ in range(count):
        chunk = torch.randint(0, 256, (rows, PARAMS.seq_len + 1), generator=generator)
        yield chunk[:, :-1], chunk[:, 1:]


def _job(steps: int, **overrides: object) -> InnerJob:
    job = InnerJob(
        params=PARAMS,
        weights=init_weights(PARAMS),
        optimizer_state=None,
        start_step=0,
        num_steps=steps,
        total_steps=PARAMS.steps,
        num_threads=2,
        capture_grads=True,
    )
    return dataclasses.replace(job, **overrides)  # type: ignore[arg-type]


def _relative(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> float:
    return float((a - b).norm() / scale.norm())


def _compare_with_one_process(
    size: int, backend: str, grads_tolerance: float, weights_tolerance: float
) -> None:
    steps = 3
    job = _job(steps)
    whole = dataclasses.replace(job, params=PARAMS.model_copy(update={"batch_size": 4 * size}))
    one = InProcess().run(whole, _batches(4 * size, steps), lambda _: None)
    lines: list[str] = []
    gang = Gang(size, backend).run(job, _batches(4 * size, steps), lines.append)

    assert gang.losses == pytest.approx(one.losses, rel=1e-6)
    assert one.grads is not None and gang.grads is not None
    for name, grad in one.grads.items():
        assert _relative(gang.grads[name], grad, grad) <= grads_tolerance, name
    start = job.weights
    for name, weight in one.weights.items():
        moved = weight - start[name]
        assert _relative(gang.weights[name], weight, moved) <= weights_tolerance, name
    assert one.optimizer_state["state"][0]["step"] == gang.optimizer_state["state"][0]["step"]
    assert [line.split()[1] for line in lines] == ["1/10", "2/10", "3/10"]  # rank 0 only


@pytest.mark.slow
def test_a_gloo_gang_of_four_matches_one_process_on_the_global_batch() -> None:
    _compare_with_one_process(SIZE, "gloo", grads_tolerance=1e-5, weights_tolerance=1e-3)


@pytest.mark.slow
def test_a_gang_agrees_to_stop_at_the_time_target_and_reports_a_failing_rank() -> None:
    result = Gang(2, "gloo").run(_job(20, target_s=0.0), _batches(8, 20), lambda _: None)
    assert len(result.losses) == 1
    broken = _job(2, optimizer_state={"state": {}, "param_groups": []})  # loads nowhere
    with pytest.raises(GangError, match=r"gang rank \d failed"):
        Gang(2, "gloo").run(broken, _batches(8, 2), lambda _: None)


def test_the_backend_is_gloo_without_cuda() -> None:
    assert default_backend(2) == ("nccl" if torch.cuda.device_count() >= 2 else "gloo")
    with pytest.raises(ValueError, match="at least one rank"):
        Gang(0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_nccl_gang_matches_one_cpu_process() -> None:
    # One rank per GPU; a single GPU still runs a (one-rank) NCCL group. GPU kernels sum in
    # another order than the CPU's, hence the looser bound.
    size = min(2, torch.cuda.device_count())
    _compare_with_one_process(size, "nccl", grads_tolerance=1e-4, weights_tolerance=1e-2)


@pytest.mark.slow
def test_a_replica_task_with_a_gang_feeds_it_the_global_batch(tmp_path: Path) -> None:
    spec = SyntheticDataset(
        name="g", source="synthetic", num_dialects=2, num_documents=40, doc_tokens=128,
        shard_tokens=512,
    )  # fmt: skip
    fields = {
        "run": "g", "run_id": "c" * 64, "replica": 0, "num_replicas": 1, "weights": "0" * 64,
        "weights_size": 0, "inner_steps": 2, "total_steps": 10, "params": PARAMS.model_dump(),
        "dataset": spec, "compression": CompressionSpec(),
    }  # fmt: skip
    weights = init_weights(PARAMS)
    settings = CacheSettings(None)
    gang = ReplicaTask.model_validate({**fields, "round": 0, "global_step": 0, "gang_size": 2})
    metrics = run_replica(
        gang, weights, tmp_path / "state", tmp_path / "r0", lambda _: None, settings=settings
    )
    assert metrics["gang_size"] == 2 and metrics["inner_steps_done"] == 2
    assert metrics["tokens"] == 2 * 2 * PARAMS.batch_size * PARAMS.seq_len
    data = (tmp_path / "r0/pseudograd.safetensors").read_bytes()
    assert pseudograd.global_norm(pseudograd.decode(data, weights).delta) > 0
    # The gang's AdamW state carries over to a one-process round (CPU tensors, same layout).
    alone = ReplicaTask.model_validate({**fields, "round": 1, "global_step": 2})
    again = run_replica(
        alone, weights, tmp_path / "state", tmp_path / "r1", lambda _: None, settings=settings
    )
    assert again["resumed_optimizer"] is True and again["gang_size"] == 1
