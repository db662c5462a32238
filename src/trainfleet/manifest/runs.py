"""Collaborative runs in the manifest (``[[runs]]``), and the task a run hands a replica.

A run trains one model with the whole fleet by DiLoCo (Douillard et al. 2023, arXiv
2311.08105): every round, each of ``replicas`` tasks starts from the same global weights,
takes ``inner_steps`` AdamW steps on its share of the dataset and returns its pseudo-gradient
(start weights minus end weights); the coordinator averages the accepted ones and applies an
outer Nesterov step. ``RunSpec`` is the manifest's declaration; ``ReplicaTask`` is the part of
one round a worker claims (it rides in a queue job's spec, ``kind = "replica"``), complete
enough that the replica program needs nothing else but the global weights' bytes.

Compression of pseudo-gradients (``compression``): ``none`` sends the replica's end weights in
fp32, losslessly, and the coordinator forms the pseudo-gradient in float64 (so one replica
with outer lr 1 and no momentum reproduces plain training bit for bit); ``fp16`` and ``int8``
quantize the pseudo-gradient; ``topk`` keeps the ``density`` fraction of largest-magnitude
entries per tensor at ``bits`` bits each, with error feedback (what was not sent is added to
the next round's pseudo-gradient; SparseLoCo).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, model_validator

from trainfleet.data.spec import DatasetSpec, content_fields
from trainfleet.manifest.names import INT64_MAX, HostName, Int64, Name, _Spec

# Up to 100 characters: a task's job name, f"{run}.r{round}.k{replica}", must stay a valid Name.
RunName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")]
MAX_ROUNDS = 1_000_000
CodecKind = Literal["none", "fp16", "int8", "topk"]


class CompressionSpec(_Spec):
    """How a replica's pseudo-gradient travels. A string in the manifest is the ``kind``."""

    kind: CodecKind = Field("none", description="none (fp32, lossless), fp16, int8 or topk")
    density: float = Field(
        0.01, gt=0, le=1, description="topk: fraction of each tensor's entries sent"
    )
    bits: Literal[2, 4, 8, 16, 32] = Field(
        8, description="topk: bits per sent value (uniform quantization below 16)"
    )
    error_feedback: bool = Field(
        True, description="topk: keep what was not sent and add it to the next round's"
    )

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        return {"kind": data} if isinstance(data, str) else data


class RunSpec(_Spec):
    """One collaborative DiLoCo run: one model, trained by ``replicas`` tasks per round."""

    name: RunName = Field(description="unique run name (letters, digits, . _ -; at most 100)")
    recipe: Literal["gpt"] = Field("gpt", description="built-in model recipe")
    model: str = Field("", description="label for what is trained (shown in tables)")
    hyper: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="the recipe's params (model size, batch_size, seq_len, inner lr,"
        " warmup_steps, weight_decay, seed, eval_batches); 'steps' and 'corpus' do not apply",
    )
    dataset: DatasetSpec = Field(description="the [datasets.NAME] spec the run trains on")
    replicas: int = Field(4, ge=1, le=1024, description="tasks (pseudo-gradients) per round")
    inner_steps: int = Field(50, ge=1, le=1_000_000, description="H: inner AdamW steps a round")
    outer_lr: float = Field(0.7, gt=0, le=10, description="outer Nesterov learning rate")
    outer_momentum: float = Field(0.9, ge=0, lt=1, description="outer Nesterov momentum")
    rounds: int | None = Field(None, ge=1, le=MAX_ROUNDS, description="budget in rounds")
    tokens: int | None = Field(
        None, ge=1, le=10**15, description="budget in training tokens (all replicas); sets rounds"
    )
    warmup_rounds: int = Field(
        0,
        ge=0,
        description="first rounds run synchronously: one inner step each, updates averaged"
        " (outer lr 1, no momentum)",
    )
    compression: CompressionSpec = Field(
        default_factory=CompressionSpec, description="pseudo-gradient codec"
    )
    min_quorum: int | None = Field(
        None, ge=1, description="contributions a round needs to close; default half the replicas"
    )
    round_timeout_s: float = Field(
        600.0, gt=0, description="a round with min_quorum contributions closes by then"
    )
    straggler_wait: float = Field(
        0.25,
        ge=0,
        le=10,
        description="once min_quorum are in, wait this fraction of the time quorum took for"
        " the rest; later ones apply next round as stale",
    )
    max_staleness: int = Field(
        1, ge=0, le=16, description="rounds late a contribution may be and still apply, damped"
    )
    outlier_factor: float = Field(
        5.0, gt=1, description="refuse a pseudo-gradient whose norm exceeds this x the median"
    )
    adaptive_inner_steps: bool = Field(
        False,
        description="a slow replica stops at the round's time target (fewer inner steps)"
        " so that all finish together",
    )
    eval_every: int = Field(1, ge=1, description="held-out evaluation every N rounds")
    gang_size: int = Field(
        1, ge=1, le=64, description="ranks of a data-parallel gang (torch.distributed) per task"
    )
    priority: Int64 = Field(0, description="higher runs first; FIFO within a priority")
    require_cuda: bool = Field(False, description="only CUDA hosts may claim its tasks")
    min_vram_gib: float = Field(0, ge=0, description="minimum VRAM of one GPU")
    min_ram_gib: float = Field(0, ge=0, description="minimum host RAM")
    min_cores: int = Field(1, ge=1, le=INT64_MAX, description="minimum CPU cores")
    allowed_hosts: list[HostName] = Field(
        default_factory=list, description="host names that may run its tasks; empty = any"
    )
    max_failures: int = Field(3, ge=1, le=100, description="failed attempts of one task")
    timeout_s: float = Field(3600, gt=0, description="wall-clock limit of one task attempt")
    tier: Literal["public", "private"] = Field(
        "public", description="'private': only attested workers may claim its replica tasks"
    )

    @model_validator(mode="after")
    def _check(self) -> RunSpec:
        if (self.rounds is None) == (self.tokens is None):
            raise ValueError("set exactly one budget: rounds or tokens")
        if self.min_quorum is not None and self.min_quorum > self.replicas:
            raise ValueError(f"min_quorum {self.min_quorum} > replicas {self.replicas}")
        return self

    @property
    def quorum(self) -> int:
        return self.min_quorum or max(1, self.replicas // 2)

    def tokens_per_round(self, batch_size: int, seq_len: int) -> int:
        return self.replicas * self.inner_steps * batch_size * seq_len * self.gang_size

    def num_rounds(self, batch_size: int, seq_len: int) -> int:
        """The budget in rounds (a token budget rounds up, capped like ``rounds``)."""
        if self.rounds is not None:
            return self.rounds
        assert self.tokens is not None
        needed = math.ceil(self.tokens / self.tokens_per_round(batch_size, seq_len))
        return max(1, min(MAX_ROUNDS, needed))

    def identity(self) -> dict[str, Any]:
        """What makes it the same run (a change starts a new run; scheduling may change)."""
        return {
            "name": self.name,
            "recipe": self.recipe,
            "hyper": self.hyper,
            "dataset": content_fields(self.dataset),
            "replicas": self.replicas,
            "inner_steps": self.inner_steps,
            "outer_lr": self.outer_lr,
            "outer_momentum": self.outer_momentum,
            "warmup_rounds": self.warmup_rounds,
            "compression": self.compression.model_dump(),
            "gang_size": self.gang_size,
        }


class ReplicaTask(_Spec):
    """One replica's share of one round: what the worker's replica program is given."""

    run: Name = Field(description="the run's name")
    run_id: str = Field(
        pattern=r"^[0-9a-f]{64}$",
        description="the run's id (sha256 of its identity; it names the replica's state dir)",
    )
    round: int = Field(ge=0, description="the round this task belongs to")
    replica: int = Field(ge=0, description="the replica slot, 0 <= replica < num_replicas")
    num_replicas: int = Field(ge=1)
    weights: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the global weights")
    weights_size: int = Field(ge=0, description="their size in bytes")
    inner_steps: int = Field(ge=1, description="H for this round")
    global_step: int = Field(ge=0, description="inner steps each replica took before this round")
    total_steps: int = Field(ge=1, description="inner steps of the whole run (lr schedule)")
    params: dict[str, Any] = Field(description="the recipe's params (GPTParams as JSON)")
    dataset: DatasetSpec
    compression: CompressionSpec
    gang_size: int = Field(1, ge=1)
    warmup: bool = Field(False, description="a synchronous warm-up round")
    target_s: float | None = Field(
        None, description="adaptive H: stop inner steps after this many seconds (at least 1)"
    )
