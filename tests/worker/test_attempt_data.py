"""How a worker hands a dataset job its data: the spec and path on the command line, the
volunteer's cache bounds in the environment, the coordinator's router in a file; and how the
built-in trainer refuses a spec it cannot read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter

from fleetkit import manifest_of
from trainfleet import env
from trainfleet.data.prepare import CacheSettings
from trainfleet.data.spec import DatasetSpec
from trainfleet.data.verify import router_fit_id
from trainfleet.errors import CoordinatorUnavailable, Unauthorized
from trainfleet.worker.attempt import Attempt, build_argv, build_env

MANIFEST = """
[datasets.dialects]
source = "synthetic"
num_dialects = 3
num_documents = 300
shard_tokens = 8192
[datasets.dialects.router]
num_paths = 3

[datasets.plain]
source = "synthetic"
seed = 4

[[jobs]]
name = "routed"
dataset = "dialects"
path = 2
hyper = { steps = 5 }

[[jobs]]
name = "unrouted"
dataset = "plain"

[[jobs]]
name = "no-data"
hyper = { steps = 5 }

[[jobs]]
name = "cmd"
kind = "command"
command = ["python", "t.py"]
"""
SETTINGS = CacheSettings(
    directory=Path("/var/cache/tf"), max_bytes=3 << 30, max_shards=2, verify_routing=True
)
DATASET_SPEC: TypeAdapter[Any] = TypeAdapter(DatasetSpec)


def job_dicts() -> dict[str, dict[str, Any]]:
    """The manifest's jobs as a claim carries them (JSON)."""
    return {j.name: j.model_dump(mode="json") for j in manifest_of(MANIFEST).jobs}


def claim_of(spec: dict[str, Any], attempt: int = 1) -> dict[str, Any]:
    return {"attempt": attempt, "epoch": 4, "job": {"id": "ab" * 32, "name": "j", "spec": spec}}


class RouterClient:
    """Answers ``get_router`` with a fixed router, None or an error; records what was asked."""

    def __init__(self, router: dict[str, Any] | Exception | None):
        self.router = router
        self.asked: list[str] = []

    def get_router(self, fit_id: str) -> dict[str, Any] | None:
        self.asked.append(fit_id)
        if isinstance(self.router, Exception):
            raise self.router
        return self.router


def make_attempt(client: Any, spec: dict[str, Any], workdir: Path, **kw: Any) -> Attempt:
    return Attempt(
        client,
        claim_of(spec),
        workdir,
        heartbeat_interval_s=1.0,
        num_threads=1,
        stop=threading.Event(),
        **kw,
    )


def flag_value(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, argv
    return argv[argv.index(flag) + 1]


# --- argv ---------------------------------------------------------------------------------


def test_a_routed_dataset_job_gets_its_spec_and_path(tmp_path: Path) -> None:
    spec = job_dicts()["routed"]
    argv = build_argv(spec, tmp_path)
    assert argv[:4] == [sys.executable, "-u", "-m", "trainfleet.train"]
    handed = DATASET_SPEC.validate_json(flag_value(argv, "--dataset"))
    assert handed == manifest_of(MANIFEST).datasets["dialects"]
    assert flag_value(argv, "--path") == "2"
    assert flag_value(argv, "--output") == str(tmp_path)


def test_an_unrouted_dataset_job_gets_its_spec_but_no_path(tmp_path: Path) -> None:
    argv = build_argv(job_dicts()["unrouted"], tmp_path)
    assert json.loads(flag_value(argv, "--dataset"))["seed"] == 4
    assert "--path" not in argv


@pytest.mark.parametrize("name", ["no-data", "cmd"])
def test_jobs_without_a_dataset_get_no_data_flags(tmp_path: Path, name: str) -> None:
    argv = build_argv(job_dicts()[name], tmp_path)
    assert "--dataset" not in argv and "--path" not in argv


# --- environment --------------------------------------------------------------------------


def test_the_job_environment_carries_the_cache_settings(tmp_path: Path) -> None:
    spec = job_dicts()["routed"]
    job_env = build_env(claim_of(spec), tmp_path, num_threads=2, data_env=SETTINGS.to_env())
    assert job_env[env.CACHE_DIR] == "/var/cache/tf"
    assert job_env[env.CACHE_BYTES] == str(3 << 30)
    assert job_env[env.MAX_SHARDS] == "2"
    assert job_env[env.VERIFY_ROUTING] == "1"
    assert job_env[env.OUTPUT_DIR] == str(tmp_path)
    assert CacheSettings.from_env(job_env) == SETTINGS  # what the trainer will read


def test_an_attempt_passes_its_worker_cache_settings(tmp_path: Path) -> None:
    spec = job_dicts()["unrouted"]
    attempt = make_attempt(None, spec, tmp_path, data=SETTINGS)
    assert attempt.data_env == SETTINGS.to_env()
    # Without join flags the cache lives in the worker's workdir, with the default bounds.
    default = make_attempt(None, spec, tmp_path)
    assert default.data_env[env.CACHE_DIR] == str(tmp_path / "cache")
    assert default.data_env[env.MAX_SHARDS] == str(env.DEFAULT_MAX_SHARDS)
    assert default.data_env[env.VERIFY_ROUTING] == "0"


def test_no_cache_dir_means_none_in_the_environment() -> None:
    values = CacheSettings(directory=None).to_env()
    assert env.CACHE_DIR not in values
    assert CacheSettings.from_env(values).directory is None


DIRECTORIES = st.from_regex(r"/[a-z0-9_]{1,12}(/[a-z0-9 ._-]{1,12}){0,3}", fullmatch=True)


@given(
    directory=st.none() | DIRECTORIES,
    max_bytes=st.integers(0, 1 << 50),
    max_shards=st.integers(0, 10_000),
    verify_routing=st.booleans(),
)
def test_cache_settings_round_trip_through_the_environment(
    directory: str | None, max_bytes: int, max_shards: int, verify_routing: bool
) -> None:
    settings = CacheSettings(
        directory=Path(directory) if directory else None,
        max_bytes=max_bytes,
        max_shards=max_shards,
        verify_routing=verify_routing,
    )
    values = settings.to_env()
    assert all(key.startswith("TRAINFLEET_") and isinstance(v, str) for key, v in values.items())
    assert CacheSettings.from_env(values) == settings


# --- the router the coordinator published -------------------------------------------------


def test_a_published_router_is_handed_to_the_job_in_a_file(tmp_path: Path) -> None:
    spec = job_dicts()["routed"]
    client = RouterClient({"digest": "x" * 64})
    attempt = make_attempt(client, spec, tmp_path)
    attempt.dir.mkdir(parents=True)
    attempt._fetch_router()
    assert client.asked == [router_fit_id(manifest_of(MANIFEST).datasets["dialects"])]
    router_file = Path(attempt.data_env[env.ROUTER_FILE])
    assert router_file.parent == attempt.dir
    assert json.loads(router_file.read_text()) == {"digest": "x" * 64}


@pytest.mark.parametrize(
    "answer",
    [None, CoordinatorUnavailable("connection refused"), Unauthorized("wrong worker token")],
    ids=["unpublished", "unreachable", "refused"],
)
def test_no_router_file_when_none_can_be_had(tmp_path: Path, answer: Any) -> None:
    client = RouterClient(answer)
    routed = make_attempt(client, job_dicts()["routed"], tmp_path)
    routed._fetch_router()
    assert len(client.asked) == 1
    assert env.ROUTER_FILE not in routed.data_env  # the job fits its own
    assert not routed.dir.exists() or not any(routed.dir.iterdir())


def test_no_router_is_asked_for_a_job_without_a_router(tmp_path: Path) -> None:
    for name in ("unrouted", "no-data"):
        client = RouterClient({"digest": "x"})
        attempt = make_attempt(client, job_dicts()[name], tmp_path)
        attempt._fetch_router()
        assert client.asked == [] and env.ROUTER_FILE not in attempt.data_env


# --- the trainer refuses a bad spec -------------------------------------------------------


@pytest.mark.parametrize(
    ("dataset", "detail"),
    [("{bad json}", "json"), ('{"source": "s3", "name": "x"}', "s3")],
    ids=["not-json", "unknown-source"],
)
def test_the_trainer_exits_2_on_an_invalid_dataset(
    tmp_path: Path, dataset: str, detail: str
) -> None:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINFLEET_")}
    output = tmp_path / "out"
    argv = ["-m", "trainfleet.train", "--dataset", dataset, "--output", str(output)]
    proc = subprocess.run(
        [sys.executable, *argv, "--params", '{"steps": 1}'],
        capture_output=True,
        text=True,
        env=child_env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "trainfleet.train: error: invalid --dataset: " in proc.stderr
    assert detail in proc.stderr.lower()
    assert "Traceback" not in proc.stderr
    assert not output.exists() or not any(output.iterdir())  # refused before any training
