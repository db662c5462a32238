"""``trainfleet data``: inspect a spec, fit a router to a file and verify it, refuse an edited
one; every user mistake is one message and a non-zero exit. Everything is written under
``tmp_path`` (``--cache-dir``), never into the repository."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fleetkit import manifest_of, routed_dataset_toml
from trainfleet.cli.main import app
from trainfleet.data.router import Router
from trainfleet.data.shards import plan_shards
from trainfleet.data.verify import fit_router_for

runner = CliRunner()

DATASET = routed_dataset_toml()
UNROUTED = '[datasets.flat]\nsource = "synthetic"\nnum_documents = 40\ndoc_tokens = 64\n'


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    path = tmp_path / "data.toml"
    path.write_text(DATASET)
    return path


def invoke(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, ["data", *map(str, args)])
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def test_inspect_prints_totals_loss_floor_and_shards(manifest: Path, tmp_path: Path) -> None:
    spec = manifest_of(DATASET).datasets["tiny"]
    plan = plan_shards(spec, fit_router_for(spec))
    code, out = invoke("inspect", manifest, "--cache-dir", tmp_path / "cache", "--max-rows", "0")
    assert code == 0, out
    assert f"{plan.num_documents:,} documents" in out
    assert f"{plan.num_tokens:,} tokens" in out
    assert f"{len(plan.shards)} shards, 3 path(s)" in out
    assert "loss_floor_nats: " in out
    assert "router: kmeans" in out
    for shard in plan.shards:
        assert f"{shard.key} " in out and shard.sha256[:16] in out
    assert (tmp_path / "cache" / "plans").is_dir()  # the cache went where it was told


def test_inspect_json_hashes_are_the_plans(manifest: Path, tmp_path: Path) -> None:
    code, out = invoke("inspect", manifest, "tiny", "--json", "--cache-dir", tmp_path / "c")
    assert code == 0, out
    report = json.loads(out)
    spec = manifest_of(DATASET).datasets["tiny"]
    plan = plan_shards(spec, fit_router_for(spec))
    assert report["digest"] == plan.digest
    assert [(s["key"], s["sha256"]) for s in report["shards"]] == [
        (s.key, s.sha256) for s in plan.shards
    ]
    assert report["num_tokens"] == plan.num_tokens == sum(s["tokens"] for s in report["shards"])
    assert report["facts"]["loss_floor_nats"] > 0
    assert "consumers" not in report


def test_inspect_consumers_split_the_training_shards(manifest: Path, tmp_path: Path) -> None:
    code, out = invoke(
        "inspect", manifest, "--json", "--consumers", "3", "--cache-dir", tmp_path / "c"
    )
    assert code == 0, out
    report = json.loads(out)
    shares = report["consumers"]
    assert len(shares) == 3
    held = [key for share in shares for key in share]
    train = [s["key"] for s in report["shards"] if s["key"].startswith("train/")]
    assert sorted(held) == sorted(train)  # every training shard exactly once...
    assert len(set(held)) == len(held)
    assert not any(key.startswith("heldout/") for key in held)  # ...and nothing else


def test_two_datasets_and_no_name_lists_both(tmp_path: Path) -> None:
    path = tmp_path / "two.toml"
    path.write_text(DATASET + UNROUTED)
    code, out = invoke("inspect", path, "--cache-dir", tmp_path / "c")
    assert code == 1
    assert "declares 2 datasets; name one" in out
    assert "'flat'" in out and "'tiny'" in out
    code, out = invoke("inspect", path, "nope", "--cache-dir", tmp_path / "c")
    assert code == 1 and "has no dataset 'nope'" in out
    code, out = invoke("inspect", path, "flat", "--json", "--cache-dir", tmp_path / "c")
    assert code == 0 and json.loads(out)["dataset"] == "flat"


def test_a_manifest_without_datasets_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    path.write_text('[[jobs]]\nname = "a"\n')
    code, out = invoke("inspect", path, "--cache-dir", tmp_path / "c")
    assert code == 1
    assert f"{path} declares no " in out


@pytest.mark.parametrize(
    ("command", "text", "expected"),
    [
        ("inspect", '[[jobs]]\nname = "a"\n', "declares no [datasets.NAME] table"),
        ("fit-router", UNROUTED, "has no [datasets.flat.router] table"),
        (
            "inspect",
            '[[jobs]]\nname = "a"\ndataset = { source = "synthetic" }\n',
            "must be the name of a [datasets.NAME] table",
        ),
    ],
    ids=["no-datasets", "no-router", "manifest-problem"],
)
def test_messages_keep_their_square_brackets(
    tmp_path: Path, command: str, text: str, expected: str
) -> None:
    path = tmp_path / "m.toml"
    path.write_text(text)
    extra = ["--cache-dir", tmp_path / "c"] if command == "inspect" else ["-o", tmp_path / "r"]
    code, out = invoke(command, path, *extra)
    assert code in (1, 2) and "No such option" not in out
    assert expected in out


def test_an_invalid_manifest_lists_its_problems(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(DATASET.replace("num_paths = 3", "num_paths = 0"))
    code, out = invoke("fit-router", path, "-o", tmp_path / "r.json")
    assert code == 2
    assert "num_paths" in out
    assert not (tmp_path / "r.json").exists()


def test_fit_router_writes_a_router_that_verifies(manifest: Path, tmp_path: Path) -> None:
    router_file = tmp_path / "r.json"
    code, out = invoke("fit-router", manifest, "-o", router_file)
    assert code == 0, out
    written = json.loads(router_file.read_text())
    assert written == fit_router_for(manifest_of(DATASET).datasets["tiny"]).to_json()
    assert written["digest"] in out

    code, out = invoke("verify", manifest, "--router", router_file, "--cache-dir", tmp_path / "c")
    assert code == 0, out
    assert "router of 'tiny': verified" in out


def test_an_edited_router_fails_verification(manifest: Path, tmp_path: Path) -> None:
    router_file = tmp_path / "r.json"
    assert invoke("fit-router", manifest, "-o", router_file)[0] == 0
    honest = Router.from_json(json.loads(router_file.read_text()))
    centroids = np.array(honest.centroids)
    centroids[[0, 1]] = centroids[[1, 0]]
    edited = dataclasses.replace(honest, centroids=centroids)
    assert edited.digest != honest.digest  # self-consistent, but not what the spec fits
    router_file.write_text(json.dumps(edited.to_json()))

    code, out = invoke("verify", manifest, "--router", router_file, "--cache-dir", tmp_path / "c")
    assert code == 1
    assert "routing verification failed" in out
    assert "verified" not in out.replace("verification failed", "")


def test_fit_router_needs_a_router_table(tmp_path: Path) -> None:
    path = tmp_path / "flat.toml"
    path.write_text(UNROUTED)
    code, out = invoke("fit-router", path, "-o", tmp_path / "r.json")
    assert code == 1 and "dataset 'flat' has no " in out
    assert not (tmp_path / "r.json").exists()


def test_verify_with_nothing_to_verify_is_an_error(manifest: Path, tmp_path: Path) -> None:
    code, out = invoke("verify", manifest, "--cache-dir", tmp_path / "c")
    assert code == 1
    assert "say what to verify" in out and "--router" in out and "--job" in out


def test_join_help_shows_the_data_flags() -> None:
    result = runner.invoke(app, ["join", "--help"])
    assert result.exit_code == 0
    for flag in ("--verify-routing", "--max-shards", "--cache-gib", "--cache-dir"):
        assert flag in result.output
