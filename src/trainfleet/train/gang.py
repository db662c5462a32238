"""The training backend seam of a DiLoCo replica: its inner steps in this process, or in a gang.

``InProcess`` and ``Gang`` have one method, ``run(job, batches, log)``: take up to
``job.num_steps`` AdamW steps from ``job.weights`` (and the optimizer state, if resumed) on
``batches`` and return an ``InnerResult`` (end weights, optimizer state, losses). Both run the
same per-step code as plain training (``trainer.run_steps`` / ``train_step``).

A ``Gang`` of size g is one data-parallel task (DiLoCo's hierarchical setting, Douillard et al.
2023, arXiv 2311.08105: each replica may itself be data-parallel). It spawns g rank processes
(spawn context, daemonic, and ``PR_SET_PDEATHSIG`` so that they die with the replica program,
which itself runs in its job's process group). The parent hosts the rendezvous (a
``TCPStore`` on a free localhost port, so there is no port race) and feeds the data: each
global batch of ``batch_size * g`` rows is cut into g contiguous blocks, rank i taking rows
``[i * batch_size, (i + 1) * batch_size)``, through one bounded queue per rank. Each rank wraps
the model in ``DistributedDataParallel``, which all-reduces (averages) the gradients inside
``backward``, so every rank clips and steps on the same gradients and stays in lockstep; after
each step the ranks all-reduce ``[loss, stop]`` to agree on the mean loss and on stopping
early (adaptive H: rank 0's clock decides). Rank 0 sends back the end weights, the optimizer
state and the losses.

On a multi-GPU host a gang maps one rank to one GPU: with CUDA and ``g <= device_count`` the
backend is NCCL and rank i uses ``cuda:i`` (model, batches and collectives on that device);
otherwise gloo on CPU, each rank with ``num_threads // g`` threads. The result equals one
process training on the same global batch up to floating-point summation order (the tests use
``rtol 1e-5``), not bit for bit.
"""

from __future__ import annotations

import io
import logging
import os
import queue
import signal
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from trainfleet.train.recipes import GPTParams
from trainfleet.train.trainer import (
    StepHook,
    deterministic_torch,
    make_optimizer,
    model_from_weights,
    run_steps,
)
from trainfleet.worker.shepherd import set_parent_death_signal

logger = logging.getLogger(__name__)

Batches = Iterator[tuple[Tensor, Tensor]]
PREFETCH = 4  # batches queued ahead per rank
COLLECTIVE_TIMEOUT_S = 600.0
POLL_S = 0.05
RANK_EXIT_S = 30.0  # ranks that finished get this long to exit


class GangError(RuntimeError):
    """A rank failed or died; the message carries its traceback or exit code."""


@dataclass(frozen=True)
class InnerJob:
    """One replica's inner steps: where they start and how many (see the module doc)."""

    params: GPTParams
    weights: dict[str, Tensor]
    optimizer_state: dict[str, Any] | None
    start_step: int
    num_steps: int
    total_steps: int
    target_s: float | None = None  # adaptive H: stop after the step that reaches it
    num_threads: int | None = None
    capture_grads: bool = False  # return the first step's (clipped) gradients, for tests


@dataclass
class InnerResult:
    weights: dict[str, Tensor]
    optimizer_state: dict[str, Any]
    losses: list[float]
    compute_s: float
    grads: dict[str, Tensor] | None = None


def _adaptive(target_s: float | None) -> StepHook:
    def hook(loss: float, compute_s: float) -> tuple[float, bool]:
        return loss, target_s is not None and compute_s >= target_s

    return hook


def _train(
    model: torch.nn.Module,
    module: torch.nn.Module,
    job: InnerJob,
    batches: Batches,
    log: Callable[[str], None],
    hook: StepHook,
    tokens_per_step: int | None = None,
) -> InnerResult:
    """The inner loop shared by both backends; ``module`` is the model under any wrapper."""
    optimizer = make_optimizer(module, job.params)
    if job.optimizer_state is not None:
        optimizer.load_state_dict(job.optimizer_state)
    grads: dict[str, Tensor] = {}

    def capture(loss: float, compute_s: float) -> tuple[float, bool]:
        if job.capture_grads and not grads:  # the first step's, left in .grad after step()
            grads.update(
                {
                    n: p.grad.detach().cpu().clone()
                    for n, p in module.named_parameters()
                    if p.grad is not None
                }
            )
        return hook(loss, compute_s)

    losses, compute_s = run_steps(
        model,
        optimizer,
        batches,
        job.params,
        job.num_steps,
        log,
        start_step=job.start_step,
        total_steps=job.total_steps,
        tokens_per_step=tokens_per_step,
        hook=capture,
    )
    weights = {n: t.detach().cpu().clone() for n, t in module.state_dict().items()}
    return InnerResult(weights, optimizer.state_dict(), losses, compute_s, grads or None)


class InProcess:
    """Inner steps in this process, on CPU (the default backend)."""

    def run(self, job: InnerJob, batches: Batches, log: Callable[[str], None]) -> InnerResult:
        with deterministic_torch(job.params.seed, job.num_threads):
            model = model_from_weights(job.params, job.weights)
            return _train(model, model, job, batches, log=log, hook=_adaptive(job.target_s))


def _to_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True)


def _on_cpu(value: Any) -> Any:
    """``value`` (an optimizer state: dicts, lists, tensors) with every tensor on the CPU."""
    if isinstance(value, Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_on_cpu(v) for v in value]
    return value


def _rank_main(
    rank: int,
    size: int,
    port: int,
    backend: str,
    job: InnerJob,
    weights: bytes,
    optimizer_state: bytes | None,
    inbox: Any,
    outbox: Any,
    stopped: Any,
) -> None:
    set_parent_death_signal(signal.SIGKILL)
    try:
        job = replace(
            job,
            weights=safetensors.torch.load(weights),
            optimizer_state=None if optimizer_state is None else _from_bytes(optimizer_state),
        )
        device = torch.device(f"cuda:{rank}" if backend == "nccl" else "cpu")
        if device.type == "cuda":
            # cuBLAS refuses deterministic mode without a fixed workspace (torch's own advice).
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.cuda.set_device(device)
        store = dist.TCPStore(
            "127.0.0.1",
            port,
            size,
            is_master=False,
            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        timeout = timedelta(seconds=COLLECTIVE_TIMEOUT_S)
        dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
        threads = max(1, (job.num_threads or torch.get_num_threads()) // size)
        with deterministic_torch(job.params.seed, threads):
            module = model_from_weights(job.params, job.weights).to(device)
            model = DistributedDataParallel(
                module, device_ids=[rank] if device.type == "cuda" else None
            )

            def batches() -> Batches:
                while True:
                    inputs, targets = inbox.get()
                    yield torch.from_numpy(inputs).to(device), torch.from_numpy(targets).to(device)

            def hook(loss: float, compute_s: float) -> tuple[float, bool]:
                late = rank == 0 and job.target_s is not None and compute_s >= job.target_s
                agreed = torch.tensor([loss, float(late)], dtype=torch.float64, device=device)
                dist.all_reduce(agreed)
                return float(agreed[0]) / size, bool(agreed[1] > 0)

            def log(line: str) -> None:
                if rank == 0:
                    outbox.put(("log", line))

            params = job.params
            tokens = params.batch_size * params.seq_len * size
            result = _train(
                model, module, job, batches(), log=log, hook=hook, tokens_per_step=tokens
            )
        if rank == 0:
            stopped.set()
            outbox.put(
                (
                    "done",
                    safetensors.torch.save(result.weights),
                    _to_bytes(_on_cpu(result.optimizer_state)),
                    result.losses,
                    result.compute_s,
                    None if result.grads is None else _to_bytes(result.grads),
                )
            )
        dist.destroy_process_group()
    except BaseException:
        outbox.put(("error", rank, traceback.format_exc()))
        raise


def default_backend(size: int) -> str:
    """NCCL when every rank can have its own GPU, else gloo."""
    cuda = torch.cuda.is_available() and size <= torch.cuda.device_count()
    return "nccl" if cuda else "gloo"


class Gang:
    """Inner steps by ``size`` data-parallel ranks (see the module doc)."""

    def __init__(self, size: int, backend: str | None = None):
        if size < 1:
            raise ValueError(f"a gang needs at least one rank, got {size}")
        self.size = size
        self.backend = backend or default_backend(size)

    def run(self, job: InnerJob, batches: Batches, log: Callable[[str], None]) -> InnerResult:
        """``batches`` yields global batches of ``batch_size * size`` rows."""
        context = mp.get_context("spawn")
        store = dist.TCPStore("127.0.0.1", 0, self.size + 1, is_master=True, wait_for_workers=False)
        inboxes = [context.Queue(maxsize=PREFETCH) for _ in range(self.size)]
        outbox = context.Queue()
        stopped = context.Event()
        bare = replace(job, weights={}, optimizer_state=None)
        weights = safetensors.torch.save({n: t.contiguous() for n, t in job.weights.items()})
        state = None if job.optimizer_state is None else _to_bytes(job.optimizer_state)
        ranks = [
            context.Process(
                target=_rank_main,
                args=(
                    rank,
                    self.size,
                    store.port,
                    self.backend,
                    bare,
                    weights,
                    state,
                    inboxes[rank],
                    outbox,
                    stopped,
                ),
                daemon=True,
                name=f"trainfleet-gang-rank-{rank}",
            )
            for rank in range(self.size)
        ]
        failed = True
        try:
            for process in ranks:
                process.start()
            result = self._drive(job, batches, log, ranks, inboxes, outbox, stopped)
            failed = False
            return result
        finally:
            for inbox in inboxes:
                inbox.cancel_join_thread()
            for process in ranks:
                if process.pid is None:  # never started
                    continue
                process.join(timeout=0 if failed else RANK_EXIT_S)
                if process.is_alive():  # a failed gang's survivors wait in a collective
                    process.kill()
                    process.join()
            del store

    def _drive(
        self,
        job: InnerJob,
        batches: Batches,
        log: Callable[[str], None],
        ranks: list[Any],
        inboxes: list[Any],
        outbox: Any,
        stopped: Any,
    ) -> InnerResult:
        """Feed the ranks their blocks of each batch while relaying rank 0's messages."""
        rows = job.params.batch_size
        pending: deque[tuple[int, tuple[Any, Any]]] = deque()
        produced = 0
        while True:
            if not pending and produced < job.num_steps and not stopped.is_set():
                inputs, targets = next(batches)
                assert len(inputs) == rows * self.size, "a gang's batch is batch_size * size"
                for rank in range(self.size):
                    block = slice(rank * rows, (rank + 1) * rows)
                    pending.append((rank, (inputs[block].numpy(), targets[block].numpy())))
                produced += 1
            progressed = False
            while pending:
                rank, payload = pending[0]
                try:
                    inboxes[rank].put_nowait(payload)
                except queue.Full:
                    break
                pending.popleft()
                progressed = True
            try:
                message = outbox.get(timeout=0.001 if progressed else POLL_S)
            except queue.Empty:
                self._check_alive(ranks)
                continue
            if message[0] == "log":
                log(message[1])
            elif message[0] == "error":
                raise GangError(f"gang rank {message[1]} failed:\n{message[2]}")
            else:
                _, weights, state, losses, compute_s, grads = message
                return InnerResult(
                    weights=safetensors.torch.load(weights),
                    optimizer_state=_from_bytes(state),
                    losses=list(losses),
                    compute_s=float(compute_s),
                    grads=None if grads is None else _from_bytes(grads),
                )

    @staticmethod
    def _check_alive(ranks: list[Any]) -> None:
        for rank, process in enumerate(ranks):
            if process.exitcode not in (None, 0):
                raise GangError(f"gang rank {rank} died with exit code {process.exitcode}")


def backend_for(gang_size: int) -> InProcess | Gang:
    """The backend a replica task of ``gang_size`` ranks uses."""
    return Gang(gang_size) if gang_size > 1 else InProcess()
