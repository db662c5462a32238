"""A tiny distillation pipeline for the pipeline tests: a ~20 kB synthetic dataset, a tiny
student and the params of an (untrained) tiny teacher."""

from __future__ import annotations

from typing import Any

from trainfleet.data.builtin import builtin_dataset
from trainfleet.manifest.pipelines import PipelineSpec
from trainfleet.train.recipes import GPTParams

TINY_STUDENT: dict[str, Any] = {
    "n_layers": 1,
    "d_model": 16,
    "n_heads": 2,
    "seq_len": 16,
    "batch_size": 4,
    "eval_batches": 2,
    "lr": 3e-3,
    "warmup_steps": 2,
}
TINY_TEACHER = GPTParams(n_layers=1, d_model=16, n_heads=2, seq_len=24, seed=7)


def tiny_spec(samples: int = 12, **overrides: Any) -> PipelineSpec:
    """A pipeline over a ~20 kB synthetic dataset with a tiny student."""
    dataset = builtin_dataset(GPTParams(corpus="synthetic", corpus_bytes=20_000, seed=3))
    fields: dict[str, Any] = {
        "name": "kd",
        "teacher": "teacher",
        "dataset": dataset,
        "student": TINY_STUDENT,
        "samples": samples,
        "top_k": 4,
        "temperature": 2.0,
        "alpha": 0.5,
        "seed": 5,
        **overrides,
    }
    return PipelineSpec.model_validate(fields)
