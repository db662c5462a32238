"""The worker's pipeline branch: attach through the reporter, ``attach.json`` (mode 0600, the
coordinator's URL and CA), the teacher model fetched for producers only, the program's
command line, and the output directory uploaded and completed like a train job's."""

from __future__ import annotations

import hashlib
import json
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
from fakecoord import JOB_ID, FakeClient, make_attempt

from trainfleet.errors import StaleEpoch
from trainfleet.worker import attempt as attempt_module
from trainfleet.worker.launch import PipelineFiles, RefereeFiles, build_argv
from trainfleet.worker.pipeline_task import ATTACH_FILE, prepare, write_attach
from trainfleet.worker.replica_task import WeightsCache

TEACHER = b"teacher model bytes"
TEACHER_SHA = hashlib.sha256(TEACHER).hexdigest()
URL = "http://coord-a:8000,http://coord-b:8000"


def pipeline_spec(kind: str) -> dict[str, Any]:
    task = {"pipeline": "distill", "pipeline_id": "ab" * 32, "role": kind, "index": 1}
    return {"kind": kind, "hyper": {}, "mode": "full", "timeout_s": 60.0, "task": task}


class PipelineClient(FakeClient):
    """Attaches (or refuses, as told) and serves the teacher model."""

    url = URL
    ca_cert = Path("/etc/ca.pem")

    def __init__(self, error: Exception | None = None) -> None:
        super().__init__()
        self.error = error

    def attach_pipeline(self, job_id: str, epoch: int) -> dict[str, Any]:
        self.record("attach", (job_id, epoch))
        if self.error is not None:
            raise self.error
        return {
            "pipeline_id": "ab" * 32,
            "name": "distill",
            "role": "producer",
            "index": 1,
            "secret": "5e" * 32,
            "attempt_token": f"{job_id}.{epoch}.{'0f' * 32}",
            "spec": {"name": "distill", "samples": 8},
            "teacher_model": TEACHER_SHA,
            "teacher_params": {"n_layers": 1},
        }

    def get_model(
        self, sha256: str, dest: Path, max_bytes: int | None = None, give_up: Any = None
    ) -> int:
        self.record("get_model", sha256)
        dest.write_bytes(TEACHER)
        return len(TEACHER)


def test_prepare_writes_attach_json_0600_and_fetches_the_teacher_for_producers(
    tmp_path: Path,
) -> None:
    cache = WeightsCache(tmp_path / "cache" / "models")
    client = PipelineClient()
    files = prepare(JOB_ID, 3, "producer", tmp_path, cache, client, URL, "/etc/ca.pem")
    assert files.attach == tmp_path / ATTACH_FILE
    assert stat.S_IMODE(files.attach.stat().st_mode) == 0o600
    attach = json.loads(files.attach.read_text())
    assert attach["coordinator"] == URL and attach["ca"] == "/etc/ca.pem"
    assert attach["attempt_token"].startswith(f"{JOB_ID}.3.")
    assert attach["secret"] == "5e" * 32
    assert files.teacher is not None and files.teacher.read_bytes() == TEACHER
    # A consumer fetches no teacher.
    (tmp_path / "c").mkdir()
    consumer = prepare(JOB_ID, 3, "consumer", tmp_path / "c", cache, client, URL, None)
    assert consumer.teacher is None
    assert json.loads(consumer.attach.read_text())["ca"] is None
    assert [k for k in client.kinds() if k == "get_model"] == ["get_model"]


def test_an_older_attach_file_is_replaced_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / ATTACH_FILE
    path.write_text("{}")
    path.chmod(0o644)
    write_attach(path, {"secret": "00"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"secret": "00"}
    assert not path.with_name(ATTACH_FILE + ".tmp").exists()


def test_pipeline_argv_runs_the_producer_or_consumer_program(tmp_path: Path) -> None:
    files = PipelineFiles(tmp_path / "attach.json", tmp_path / "teacher.safetensors")
    argv = build_argv(pipeline_spec("producer"), tmp_path / "out", files)
    assert argv == [
        sys.executable, "-u", "-m", "trainfleet.pipeline.producer",
        "--attach", str(tmp_path / "attach.json"),
        "--teacher", str(tmp_path / "teacher.safetensors"),
        "--output", str(tmp_path / "out"),
    ]  # fmt: skip
    argv = build_argv(
        pipeline_spec("consumer"), tmp_path / "out", PipelineFiles(files.attach, None)
    )
    assert argv == [
        sys.executable, "-u", "-m", "trainfleet.pipeline.consumer",
        "--attach", str(tmp_path / "attach.json"), "--output", str(tmp_path / "out"),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="prepared files"):
        build_argv(pipeline_spec("consumer"), tmp_path, RefereeFiles(tmp_path, tmp_path, tmp_path))
    with pytest.raises(ValueError, match="teacher"):
        build_argv(pipeline_spec("producer"), tmp_path, PipelineFiles(files.attach, None))


# A stand-in for the producer program: checks its files, writes an output and metrics.json.
FAKE_PROGRAM = """
import json, os, stat, sys
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
attach = json.load(open(args["--attach"]))
assert stat.S_IMODE(os.stat(args["--attach"]).st_mode) == 0o600
assert open(args["--teacher"], "rb").read() == {teacher!r}
out = args["--output"]
open(os.path.join(out, "metrics.json"), "w").write(json.dumps({{"produced": 8,
    "pipeline": attach["name"], "coordinator": attach["coordinator"]}}))
"""


def test_a_producer_attempt_attaches_runs_uploads_and_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[str]] = []

    def argv_of(spec: dict[str, Any], output_dir: Path, files: Any = None) -> list[str]:
        argv = build_argv(spec, output_dir, files)
        seen.append(argv)
        return [sys.executable, "-c", FAKE_PROGRAM.format(teacher=TEACHER), *argv[4:]]

    monkeypatch.setattr(attempt_module, "build_argv", argv_of)
    client = PipelineClient()
    attempt = make_attempt(
        client,
        tmp_path,
        "distill.producer1",
        pipeline_spec("producer"),
        weights=WeightsCache(tmp_path / "cache" / "weights"),
    )
    outcome = attempt.run()
    assert outcome.status == "completed", outcome.detail
    assert seen and seen[0][3] == "trainfleet.pipeline.producer"
    assert client.kinds() == ["attach", "get_model", "upload", "complete"]
    assert outcome.result["metrics"] == {"produced": 8, "pipeline": "distill", "coordinator": URL}
    assert isinstance(outcome.result["artifact"], str)
    assert (tmp_path / "cache" / "models" / f"{TEACHER_SHA}.safetensors").is_file()


def test_a_fenced_attach_stops_the_attempt_quietly(tmp_path: Path) -> None:
    client = PipelineClient(StaleEpoch("epoch 3 of job distill.consumer0 is stale"))
    outcome = make_attempt(client, tmp_path, "distill.consumer0", pipeline_spec("consumer")).run()
    assert outcome.status == "fenced", outcome.detail
    assert client.kinds() == ["attach"]  # nothing run, nothing reported
