"""Fixtures of the pipeline tests: a pipeline secret and a tiny teacher's weights file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from kdkit import TINY_TEACHER
from safetensors.torch import save_file

from trainfleet.train.model import GPT
from trainfleet.train.trainer import deterministic_torch


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
