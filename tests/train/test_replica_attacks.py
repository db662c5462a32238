"""The replica program given a crafted task or weights file: exit 2 with one line on stderr,
before any training starts (``run_replica`` is replaced by a tripwire), never a traceback or
a hang."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import save_file

from trainfleet.data.spec import SyntheticDataset
from trainfleet.manifest.runs import CompressionSpec, ReplicaTask
from trainfleet.train import replica
from trainfleet.train.inner import init_weights
from trainfleet.train.recipes import GPTParams

SPEC = SyntheticDataset(
    name="attack", source="synthetic", num_dialects=2, num_documents=20, doc_tokens=64,
    shard_tokens=256,
)  # fmt: skip
PARAMS = GPTParams(n_layers=1, d_model=8, n_heads=1, seq_len=8, batch_size=1, steps=10)


def _good() -> dict[str, Any]:
    task = ReplicaTask(
        run="r",
        run_id="a" * 64,
        round=1,
        replica=0,
        num_replicas=2,
        weights="0" * 64,
        weights_size=0,
        inner_steps=3,
        global_step=3,
        total_steps=30,
        params=PARAMS.model_dump(),
        dataset=SPEC,
        compression=CompressionSpec(),
    )
    loaded: dict[str, Any] = json.loads(task.model_dump_json())
    return loaded


@pytest.fixture
def tripwire(monkeypatch: pytest.MonkeyPatch) -> list[ReplicaTask]:
    """``run_replica`` records its task instead of training."""
    ran: list[ReplicaTask] = []

    def fake(task: ReplicaTask, *_a: Any, **_k: Any) -> dict[str, Any]:
        ran.append(task)
        return {}

    monkeypatch.setattr(replica, "run_replica", fake)
    return ran


def _main(tmp_path: Path, task: dict[str, Any] | bytes, weights: Path | None = None) -> int:
    file = tmp_path / "task.json"
    file.write_bytes(task if isinstance(task, bytes) else json.dumps(task).encode())
    if weights is None:
        weights = tmp_path / "w.safetensors"
        save_file(init_weights(PARAMS), str(weights))
    args = ["--task", str(file), "--weights", str(weights)]
    args += ["--state-dir", str(tmp_path / "state"), "--output", str(tmp_path / "out")]
    return replica.main(args)


def test_a_good_task_reaches_training(tmp_path: Path, tripwire: list[ReplicaTask]) -> None:
    assert _main(tmp_path, _good()) == 0
    assert len(tripwire) == 1  # the tripwire can fire: the refusals below mean something


@pytest.mark.parametrize(
    "change",
    [
        {"replica": 2},
        {"replica": 10**12, "num_replicas": 2},
        {"gang_size": 10**6},
        {"inner_steps": 10**12, "total_steps": 10**13},
        {"total_steps": 2},  # < global_step + inner_steps
        {"global_step": 10**15},  # past total_steps: a feed fast-forward that never ends
        {"target_s": -1.0},
        {"run_id": "../../../../../tmp/escape"},  # names the state directory
        {"run_id": "a" * 16 + "/../../x"},
        {"target_s": float("nan")},
        {"target_s": float("inf")},
    ],
)
def test_a_crafted_task_exits_2_before_training(
    tmp_path: Path,
    tripwire: list[ReplicaTask],
    capsys: pytest.CaptureFixture[str],
    change: dict[str, Any],
) -> None:
    assert _main(tmp_path, {**_good(), **change}) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{replica.PROG}: error: invalid --task") and "Traceback" not in err
    assert tripwire == []


@pytest.mark.parametrize(
    "text",
    [b"\xff\xfe\x00garbage", b"[]", b"null", b"[" * 100_000, b'{"run": "' + b"x" * 10**6],
)
def test_a_task_file_that_is_not_a_task_exits_2(
    tmp_path: Path, tripwire: list[ReplicaTask], text: bytes
) -> None:
    assert _main(tmp_path, text) == 2
    assert tripwire == []


def _header_file(path: Path, header: bytes, size: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if size is None else size) + header)
    return path


@pytest.mark.parametrize(
    "make",
    [
        lambda p: _header_file(p / "w1", b"{}", size=2**63),
        lambda p: _header_file(
            p / "w2",
            b'{"a": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 0]}}',
        ),
        lambda p: _header_file(p / "w3", b"[" * 10_000),
        lambda p: _header_file(p / "w4", b"\xff\xfe"),
        lambda p: (p / "w5").mkdir() or p / "w5",
        lambda p: p / "missing",
    ],
)
def test_a_weights_file_that_is_not_safetensors_exits_2(
    tmp_path: Path,
    tripwire: list[ReplicaTask],
    capsys: pytest.CaptureFixture[str],
    make: Any,
) -> None:
    assert _main(tmp_path, _good(), weights=make(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "--weights" in err and "Traceback" not in err
    assert tripwire == []
