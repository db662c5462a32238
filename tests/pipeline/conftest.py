"""Fixtures of the pipeline tests: a tiny synthetic dataset, student and (untrained) teacher."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import save_file

from trainfleet.data.builtin import builtin_dataset
from trainfleet.manifest.pipelines import PipelineSpec
from trainfleet.train.model import GPT
from trainfleet.train.recipes import GPTParams
from trainfleet.train.trainer import deterministic_torch

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


@pytest.fixture
def secret() -> bytes:
    return os.urandom(32)


@pytest.fixture
def teacher_file(tmp_path: Path) -> Path:
    """An untrained teacher's weights (any fixed model will do to move tensors around)."""
    with deterministic_torch(TINY_TEACHER.seed):
        model = GPT(
            TINY_TEACHER.n_layers, TINY_TEACHER.d_model, TINY_TEACHER.n_heads, TINY_TEACHER.seq_len
        )
    path = tmp_path / "teacher.safetensors"
    save_file(model.state_dict(), str(path))
    return path
