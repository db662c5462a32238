"""Knowledge distillation of a built-in GPT: sample windows, teacher top-k, the KD loss, the
student's training loop and its held-out evaluation.

One *sample* is one student batch: sample ``idx`` holds ``batch_size`` windows of
``seq_len + 1`` tokens of the dataset's train split, a pure function of (the dataset,
``seed``, ``idx``) (``SampleWindows``), plus the teacher's top-``k`` logits at every input
position (``teacher_topk``). A producer computes samples, a consumer trains on them; the
tensors of one sample (``SAMPLE_TENSORS``) are:

- ``tokens``: int64 ``[B, T + 1]``; inputs are ``tokens[:, :-1]``, targets ``tokens[:, 1:]``;
- ``topk_values``: float32 ``[B, T, k]``: the teacher's largest ``k`` logits **divided by the
  temperature** (tempered logits, not log-probs), in descending order;
- ``topk_indices``: int64 ``[B, T, k]``: the byte tokens those logits belong to.

The loss (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network",
arXiv:1503.02531) is::

    alpha * CE(student logits, hard targets)
      + (1 - alpha) * T^2 * KL( softmax(teacher top-k / T) || softmax(student at top-k / T) )

where both distributions are renormalised over the same ``k`` tokens (the teacher's top-k):
the student's logits are gathered at ``topk_indices``, divided by ``T`` and log-softmaxed over
those ``k``. The ``T^2`` factor keeps the soft term's gradients on the scale of the hard term's
as ``T`` changes (Hinton et al., section 2). ``alpha = 1`` is plain language-model training.

Determinism: the student is initialised under ``trainer.deterministic_torch(params.seed)``
and every step runs with deterministic algorithms at a fixed thread count, so the same samples
in the same order give bit-identical losses, in whichever process or store they were
computed. Steps take torch's global lock one at a time, never across the wait for the next
sample, so a producer thread of the same process can run in between (colocated mode).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from trainfleet.data.prepare import CacheSettings, PreparedDataset, prepare_dataset
from trainfleet.data.shards import ShardInfo
from trainfleet.data.spec import DatasetSpec
from trainfleet.errors import CorpusTooSmall
from trainfleet.train.feed import heldout_tokens, shard_tensor
from trainfleet.train.model import GPT
from trainfleet.train.recipes import GPTParams
from trainfleet.train.trainer import (
    GRAD_CLIP,
    deterministic_torch,
    evaluate,
    lr_at,
    make_optimizer,
)

SAMPLE_TENSORS = ("tokens", "topk_values", "topk_indices")
# GPTParams keys a pipeline's ``student`` table may not set: the pipeline decides them.
STUDENT_FORBIDDEN = ("steps", "corpus", "corpus_bytes", "heldout_fraction")


class DistillSpec(Protocol):
    """The fields of a ``PipelineSpec`` (manifest/pipelines.py) that distillation reads."""

    @property
    def dataset(self) -> DatasetSpec: ...
    @property
    def student(self) -> Mapping[str, Any]: ...
    @property
    def samples(self) -> int: ...
    @property
    def top_k(self) -> int: ...
    @property
    def temperature(self) -> float: ...
    @property
    def alpha(self) -> float: ...
    @property
    def seed(self) -> int: ...


def student_params(spec: DistillSpec) -> GPTParams:
    """The student's recipe params: the ``student`` table, ``steps = samples`` (one sample per
    step) and, unless the table sets one, ``seed = spec.seed``."""
    clash = sorted(set(spec.student) & set(STUDENT_FORBIDDEN))
    if clash:
        raise ValueError(f"student may not set {', '.join(clash)}")
    return GPTParams.model_validate({"seed": spec.seed, **spec.student, "steps": spec.samples})


def prepare(spec: DatasetSpec, log: Callable[[str], None] = print) -> PreparedDataset:
    """The dataset ready on this host, under the worker's ``TRAINFLEET_CACHE_*`` settings."""
    return prepare_dataset(spec, CacheSettings.from_env(), log=log)


def _sample_seed(seed: int, idx: int) -> int:
    """A 60-bit generator seed for sample ``idx``: independent of every other sample's."""
    return int(hashlib.sha256(f"kd-sample:{seed}:{idx}".encode()).hexdigest()[:15], 16)


class SampleWindows:
    """Sample ``idx`` -> ``[batch_size, seq_len + 1]`` int64 tokens of the train split.

    The sample's generator (seeded by ``(seed, idx)``) picks one training shard, weighted by
    the windows it holds, then ``batch_size`` window starts inside it (a window never crosses
    a shard, as in ``train.feed``). Random access: no sample depends on another."""

    def __init__(self, prepared: PreparedDataset, batch_size: int, seq_len: int, seed: int):
        self.prepared = prepared
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.shards: list[ShardInfo] = [
            s for s in prepared.plan.select("train") if s.num_tokens > seq_len
        ]
        if not self.shards:
            raise CorpusTooSmall(
                f"dataset {prepared.spec.name!r} has no training shard longer than "
                f"seq_len = {seq_len} tokens"
            )
        self._num_windows = torch.tensor([s.num_tokens - seq_len for s in self.shards])
        self._cumulative = torch.cumsum(self._num_windows, 0)

    def tokens(self, idx: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(_sample_seed(self.seed, idx))
        total = int(self._cumulative[-1])
        pick = torch.randint(0, total, (1,), generator=generator)
        shard_index = int(torch.searchsorted(self._cumulative, pick, right=True)[0])
        high = int(self._num_windows[shard_index])
        starts = torch.randint(0, high, (self.batch_size,), generator=generator)
        data = shard_tensor(self.prepared, self.shards[shard_index])
        return data[starts[:, None] + torch.arange(self.seq_len + 1)].long()

    def heldout(self, num_windows: int) -> torch.Tensor:
        """Held-out tokens for ``num_windows`` evaluation windows (as the trainer's)."""
        tokens, _ = heldout_tokens(
            self.prepared, self.prepared.plan.select("heldout"), num_windows, self.seq_len, ""
        )
        return tokens


def load_teacher(weights_file: Path, params: GPTParams) -> GPT:
    """The teacher model in eval mode (it only ever runs forward, under ``no_grad``)."""
    model = GPT(params.n_layers, params.d_model, params.n_heads, params.seq_len)
    model.load_state_dict(load_file(str(weights_file)))
    return model.eval()


@torch.no_grad()
def teacher_topk(
    teacher: GPT, tokens: torch.Tensor, top_k: int, temperature: float
) -> dict[str, torch.Tensor]:
    """One sample's tensors (module doc): ``tokens`` and the teacher's top-k tempered logits
    at every input position."""
    was_training = teacher.training
    teacher.eval()
    logits, _ = teacher(tokens[:, :-1])
    teacher.train(was_training)
    values, indices = torch.topk(logits.float() / temperature, top_k, dim=-1)
    return {
        "tokens": tokens.contiguous(),
        "topk_values": values.contiguous(),
        "topk_indices": indices.contiguous(),
    }


@dataclass(frozen=True)
class KDLoss:
    loss: torch.Tensor  # what is minimised
    ce: torch.Tensor  # hard-label cross-entropy, nats per token
    kl: torch.Tensor  # KL(teacher top-k || student top-k) at temperature T, per position


def kd_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    topk_values: torch.Tensor,
    topk_indices: torch.Tensor,
    alpha: float,
    temperature: float,
) -> KDLoss:
    """The distillation loss of the module doc. ``student_logits``: ``[B, T, V]``;
    ``targets``: ``[B, T]``; ``topk_values`` (tempered teacher logits) and ``topk_indices``:
    ``[B, T, k]``."""
    vocab = student_logits.shape[-1]
    ce = F.cross_entropy(student_logits.reshape(-1, vocab), targets.reshape(-1))
    student_log_q = F.log_softmax(student_logits.gather(-1, topk_indices) / temperature, -1)
    teacher_log_p = F.log_softmax(topk_values, -1)
    kl = (teacher_log_p.exp() * (teacher_log_p - student_log_q)).sum(-1).mean()
    loss = alpha * ce + (1 - alpha) * temperature**2 * kl
    return KDLoss(loss=loss, ce=ce, kl=kl)


def kd_step(
    model: GPT,
    optimizer: torch.optim.Optimizer,
    tensors: Mapping[str, torch.Tensor],
    lr: float,
    alpha: float,
    temperature: float,
) -> KDLoss:
    """One optimizer step on one sample, as ``trainer.train_step`` but with the KD loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    tokens = tensors["tokens"]
    logits, _ = model(tokens[:, :-1])
    parts = kd_loss(
        logits,
        tokens[:, 1:],
        tensors["topk_values"],
        tensors["topk_indices"],
        alpha,
        temperature,
    )
    optimizer.zero_grad(set_to_none=True)
    parts.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()
    return parts


@dataclass
class StudentResult:
    """What training a student gave: per-step losses (the KD loss that was minimised and its
    hard-label CE part), the sample ids in step order, the model and its held-out loss."""

    model: GPT
    params: GPTParams
    losses: list[float] = field(default_factory=list)
    ce_losses: list[float] = field(default_factory=list)
    sample_ids: list[str] = field(default_factory=list)
    heldout_loss: float | None = None
    train_s: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.losses)

    @property
    def train_loss(self) -> float | None:
        """Mean loss of the last (up to) 10 steps, as the trainer reports it."""
        last = self.losses[-10:]
        return sum(last) / len(last) if last else None


def check_sample(tensors: Mapping[str, torch.Tensor], params: GPTParams, top_k: int) -> None:
    """Raise ValueError unless ``tensors`` are a sample of this student's shape."""
    expected = {
        "tokens": ((params.batch_size, params.seq_len + 1), torch.int64),
        "topk_values": ((params.batch_size, params.seq_len, top_k), torch.float32),
        "topk_indices": ((params.batch_size, params.seq_len, top_k), torch.int64),
    }
    if set(tensors) != set(expected):
        raise ValueError(f"sample tensors {sorted(tensors)}, expected {sorted(expected)}")
    for name, (shape, dtype) in expected.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(
                f"sample tensor {name}: {tuple(tensor.shape)} {tensor.dtype}, "
                f"expected {shape} {dtype}"
            )


def train_student(
    samples: Iterable[tuple[str, Mapping[str, torch.Tensor]]],
    params: GPTParams,
    spec: DistillSpec,
    *,
    total_steps: int | None = None,
    num_threads: int | None = None,
    heldout: torch.Tensor | None = None,
    log: Callable[[str], None] = print,
) -> StudentResult:
    """Train a fresh student (``params``, initialised from ``params.seed``) on ``samples`` in
    the order given, one optimizer step per sample, with ``spec``'s alpha and temperature.

    The learning rate follows the trainer's schedule over ``total_steps`` (default
    ``spec.samples``: the whole pipeline's samples). ``samples`` may be a generator that
    waits for the next sample (a consumer's lease loop): no lock is held meanwhile. With
    ``heldout`` tokens the result carries the held-out CE loss (``evaluate_student``)."""
    total = total_steps or spec.samples
    with deterministic_torch(params.seed, num_threads):
        model = GPT(params.n_layers, params.d_model, params.n_heads, params.seq_len)
        optimizer = make_optimizer(model, params)
    result = StudentResult(model=model, params=params)
    log_every = max(1, total // 10)
    started = time.perf_counter()
    for step, (sid, tensors) in enumerate(samples):
        check_sample(tensors, params, spec.top_k)
        lr = lr_at(step, params.lr, params.warmup_steps, total)
        # Seeding again is harmless (a step draws no random numbers) and keeps the lock
        # to one step at a time.
        with deterministic_torch(params.seed, num_threads):
            parts = kd_step(model, optimizer, tensors, lr, spec.alpha, spec.temperature)
        result.losses.append(float(parts.loss.item()))
        result.ce_losses.append(float(parts.ce.item()))
        result.sample_ids.append(sid)
        if (step + 1) % log_every == 0:
            log(
                f"step {step + 1}/{total} sample {sid} loss {result.losses[-1]:.4f} "
                f"ce {result.ce_losses[-1]:.4f} kl {float(parts.kl.item()):.4f} lr {lr:.1e}"
            )
    result.train_s = time.perf_counter() - started
    if heldout is not None:
        result.heldout_loss = evaluate_student(model, params, heldout, num_threads)
    return result


def evaluate_student(
    model: GPT, params: GPTParams, heldout: torch.Tensor, num_threads: int | None = None
) -> float:
    """Mean held-out cross-entropy (nats per token), exactly as the trainer evaluates."""
    with deterministic_torch(params.seed, num_threads):
        return evaluate(model, heldout, params.batch_size, params.eval_batches)


def heldout_for(windows: SampleWindows, params: GPTParams) -> torch.Tensor:
    """The held-out tokens the student's evaluation uses."""
    return windows.heldout(params.eval_batches * params.batch_size)
