"""The producer and consumer programs: ``attach.json`` parsing (a malformed one fails with a
one-line message and exit 2, never a traceback) and the producer's backpressure loop."""

from __future__ import annotations

import json
import threading
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from kdkit import TINY_TEACHER, tiny_spec

from trainfleet import env
from trainfleet.features import InProcessStore
from trainfleet.pipeline import consumer, producer
from trainfleet.pipeline.attach import AttachError, load_attach
from trainfleet.pipeline.consumer import consume
from trainfleet.pipeline.control import LocalControl
from trainfleet.pipeline.distill import load_teacher
from trainfleet.pipeline.producer import make_store, produce


def attach_json(role: str = "consumer", **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "pipeline_id": "a" * 64,
        "name": "kd",
        "role": role,
        "index": 0,
        "secret": "ab" * 32,
        "attempt_token": "job.1.mac",
        "spec": json.loads(tiny_spec().model_dump_json()),
        "teacher_model": "b" * 64 if role == "producer" else None,
        "teacher_params": TINY_TEACHER.model_dump() if role == "producer" else None,
        "coordinator": "http://127.0.0.1:1",
        "ca": None,
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not ...}


def write(tmp_path: Path, body: Any) -> Path:
    path = tmp_path / "attach.json"
    path.write_text(body if isinstance(body, str) else json.dumps(body))
    return path


def test_a_well_formed_attach_file_parses(tmp_path: Path) -> None:
    attach = load_attach(write(tmp_path, attach_json("producer")), "producer")
    assert attach.spec == tiny_spec() and attach.teacher_params == TINY_TEACHER
    assert attach.secret_bytes == bytes.fromhex("ab" * 32)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("{not json", "is not JSON"),
        ("[1, 2]", "want a JSON object"),
        (attach_json(secret=...), "secret: Field required"),
        (attach_json(secret="xyz"), "secret: String should match"),
        (attach_json(index=-1), "index: Input should be greater than or equal to 0"),
        (attach_json(spec={"name": "kd"}), "spec.teacher: Field required"),
        (attach_json(role="producer"), "is for a producer"),
        (attach_json(spec={**attach_json()["spec"], "student": {"steps": 3}}), "steps"),
    ],
)
def test_consumer_fails_clearly_on_a_malformed_attach_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: Any, message: str
) -> None:
    code = consumer.main(["--attach", str(write(tmp_path, body)), "--output", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("trainfleet.pipeline.consumer: error: ") and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_producer_fails_clearly_on_a_bad_attach_or_teacher(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], teacher_file: Path
) -> None:
    def run(body: Any, teacher: Path) -> tuple[int, str]:
        argv = ["--attach", str(write(tmp_path, body)), "--teacher", str(teacher)]
        code = producer.main([*argv, "--output", str(tmp_path / "out")])
        return code, capsys.readouterr().err

    assert run(attach_json("producer", teacher_params=None), teacher_file) == (
        2,
        f"trainfleet.pipeline.producer: error: invalid --attach {tmp_path / 'attach.json'}: "
        "teacher_params: a producer needs them\n",
    )
    code, err = run(attach_json("producer"), tmp_path / "missing.safetensors")
    assert code == 2 and "cannot load --teacher" in err
    small = {**TINY_TEACHER.model_dump(), "seq_len": 8}  # shorter than the student's 16
    code, err = run(attach_json("producer", teacher_params=small), teacher_file)
    assert code == 2 and "exceeds the teacher's 8" in err
    assert run(attach_json("consumer"), teacher_file)[0] == 2
    assert not (tmp_path / "out").exists()
    with pytest.raises(AttachError, match="cannot read"):
        load_attach(tmp_path / "nope.json", "producer")


def test_backpressure_sends_the_producer_back_to_sync_and_bounds_what_it_holds(
    secret: bytes, teacher_file: Path
) -> None:
    spec = tiny_spec(samples=8)
    control = LocalControl(spec.samples, 1, 1, secret)
    teacher = load_teacher(teacher_file, TINY_TEACHER)
    quiet: dict[str, Any] = {"num_threads": 1, "poll_s": 0.01, "log": lambda _: None}
    held: list[int] = []
    stop = threading.Event()
    with InProcessStore(
        secret=secret, high_watermark_bytes=8000, low_watermark_bytes=4000
    ) as store:

        class Watching:  # records what the store holds at every publish
            def __getattr__(self, name: str) -> Any:
                return getattr(attempt, name)

            def publish(self, refs: Any) -> Any:
                held.append(store.stats().held_bytes)
                return attempt.publish(refs)

        attempt = control.producer(0)
        result: list[Any] = []
        thread = threading.Thread(
            target=lambda: result.append(
                produce(Watching(), store, teacher, spec, put_wait_s=0.05, stop=stop, **quiet)
            )
        )
        thread.start()
        try:
            reader = control.consumer(0)
            trained = consume(reader, spec, secret, evaluate=False, **quiet)
            control.end(reader, completed=True)
            thread.join(timeout=60)
        finally:
            stop.set()
            thread.join(timeout=60)
    assert trained.student.steps == spec.samples
    assert result and result[0].backpressure >= 1 and result[0].produced == spec.samples
    assert max(held) <= 8000


def test_an_http_store_serves_the_consumer_at_the_advertised_host(
    monkeypatch: pytest.MonkeyPatch, secret: bytes, teacher_file: Path
) -> None:
    monkeypatch.setenv(env.FEATURE_HOST, "127.0.0.1")
    monkeypatch.setenv(env.FEATURE_ADVERTISE, "localhost")
    spec = tiny_spec(samples=4)
    assert spec.store == "http"
    control = LocalControl(spec.samples, 1, 1, secret, store="http")
    teacher = load_teacher(teacher_file, TINY_TEACHER)
    quiet: dict[str, Any] = {"num_threads": 1, "poll_s": 0.01, "log": lambda _: None}
    stop = threading.Event()
    result: list[Any] = []
    with ExitStack() as stack:
        store = make_store(spec, secret, "a" * 64, stack)
        assert store.address.startswith("http://localhost:")
        attempt = control.producer(0)
        thread = threading.Thread(
            target=lambda: result.append(produce(attempt, store, teacher, spec, stop=stop, **quiet))
        )
        thread.start()
        try:
            reader = control.consumer(0)
            trained = consume(reader, spec, secret, evaluate=False, **quiet)
            control.end(reader, completed=True)
            thread.join(timeout=60)
        finally:
            stop.set()
            thread.join(timeout=60)
    assert trained.student.steps == spec.samples and trained.returned == []
    assert result and result[0].released == spec.samples
