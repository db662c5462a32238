"""Built-in training recipes and their parameters.

A recipe is a name, a frozen parameter model (the ``hyper.*`` keys a manifest may set) and the
modes it supports. This module imports no torch: the manifest loader validates ``hyper``
against these models at load time, long before any training starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class GPTParams(BaseModel):
    """Hyperparameters of the ``gpt`` recipe: a byte-level GPT language model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_layers: int = Field(2, ge=1, le=48, description="transformer blocks")
    d_model: int = Field(64, ge=8, le=8192, description="residual width")
    n_heads: int = Field(4, ge=1, le=128, description="attention heads; must divide d_model")
    seq_len: int = Field(64, ge=8, le=8192, description="context length in bytes")
    batch_size: int = Field(16, ge=1, le=4096, description="sequences per optimizer step")
    lr: float = Field(3e-3, gt=0, le=1.0, description="peak AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, le=1.0, description="AdamW weight decay")
    warmup_steps: int = Field(10, ge=0, description="linear warmup steps, then cosine decay")
    steps: int = Field(200, ge=1, le=10_000_000, description="optimizer steps")
    eval_batches: int = Field(8, ge=1, le=10_000, description="held-out batches per evaluation")
    seed: int = Field(
        0, ge=0, description="seed for init and batch order (and of the synthetic built-in data)"
    )
    corpus: Literal["stdlib", "synthetic"] = Field(
        "stdlib",
        description=(
            "built-in dataset when the job names none: stdlib = this Python's own Lib/*.py "
            "files; synthetic = the seeded Markov-dialect mixture (data.builtin)"
        ),
    )
    corpus_bytes: int = Field(
        2_000_000,
        ge=10_000,
        le=10_000_000_000,
        description=(
            "size of the built-in dataset: stdlib, a cap on its whole files' bytes; "
            "synthetic, its expected bytes"
        ),
    )
    heldout_fraction: float = Field(
        0.1,
        gt=0,
        lt=0.5,
        description="the built-in dataset's share of documents held out (by stable id hash)",
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> GPTParams:
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})")
        return self


@dataclass(frozen=True)
class Recipe:
    name: str
    params: type[BaseModel]
    modes: tuple[str, ...]
    description: str


# A trained recipe's weights, in its output directory and in its artifact: named here, where
# no torch is imported, so that the coordinator reads it without loading torch (about 2 s of
# CPU at every start).
WEIGHTS_FILE = "model.safetensors"

RECIPES: dict[str, Recipe] = {
    "gpt": Recipe(
        name="gpt",
        params=GPTParams,
        modes=("full", "smoke"),
        description="byte-level GPT; 'smoke' caps steps at 5 for a quick end-to-end check",
    ),
}
