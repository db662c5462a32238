"""``trainfleet runs`` / ``run show`` / ``run export``: tables, the loss curve, the checkpoint.

Most tests serve the coordinator's JSON from an in-process fake (``httpx.MockTransport``
behind the CLI's own client), so hostile strings and odd numbers can be put anywhere; the
last one runs against a live coordinator with a real run loaded from a manifest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import trainfleet.cli.runs as runs_cli
from trainfleet.cli.main import app
from trainfleet.client import Client
from trainfleet.testing import LiveFleet, wait_until
from trainfleet.train.model import GPT
from trainfleet.train.recipes import GPTParams
from trainfleet.train.trainer import load_checkpoint

runner = CliRunner()
HYPER = {"n_layers": 1, "d_model": 16, "n_heads": 2, "seq_len": 16, "batch_size": 4}
HOSTILE = "\x1b[31mred\x1b]8;;http://x\x07[bold]link[/]"


def checkpoint_bytes(tmp: Path) -> bytes:
    """The bytes of a GPT's state dict of HYPER's shapes, as a run's weights would be."""
    torch.manual_seed(0)
    p = GPTParams(**HYPER)
    model = GPT(p.n_layers, p.d_model, p.n_heads, p.seq_len)
    save_file(model.state_dict(), str(tmp / "ckpt.safetensors"))
    return (tmp / "ckpt.safetensors").read_bytes()


def round_rec(r: int, loss: float | None, **kw: Any) -> dict[str, Any]:
    return {
        "run_id": "ab" * 32,
        "round": r,
        "state": "closed" if loss is not None else "open",
        "weights": "cd" * 32,
        "weights_size": 1000,
        "accepted": 2,
        "refused": 0,
        "late_applied": 0,
        "dropped": 0,
        "heldout_loss": loss,
        "bytes_up": 2_000_000,
        "bytes_down": 500_000,
        "wall_s": 3.25 if loss is not None else None,
        "detail": "",
        **kw,
    }


def detail(weights: bytes = b"", **run: Any) -> dict[str, Any]:
    record = {
        "id": "ab" * 32,
        "name": "collab",
        "state": "active",
        "spec": {
            "name": "collab",
            "recipe": "gpt",
            "hyper": HYPER,
            "replicas": 2,
            "inner_steps": 5,
            "outer_lr": 0.7,
            "outer_momentum": 0.9,
            "compression": {"kind": "int8"},
        },
        "round": 2,
        "num_rounds": 3,
        "weights": hashlib.sha256(weights).hexdigest(),
        "weights_size": len(weights),
        "in_manifest": True,
        **run,
    }
    return {
        "run": record,
        "rounds": [
            round_rec(0, 5.5),
            round_rec(1, 4.25, refused=1, late_applied=1, detail=HOSTILE),
            round_rec(2, None),
        ],
        "contributions": [
            {"round": 0, "replica": 1, "staleness": 1, "applied_in_round": 1, "reason": HOSTILE},
            {"round": 1, "replica": 0, "staleness": 0, "applied_in_round": 1, "reason": ""},
        ],
        "same_name": [],
    }


@pytest.fixture
def coordinator(monkeypatch) -> dict[str, Any]:
    """A fake coordinator behind the CLI's client: set ``served["detail"]`` / ``["bytes"]``."""
    served: dict[str, Any] = {"detail": detail(), "bytes": b"", "paths": []}

    def handle(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        served["paths"].append(path)
        if path == "/v1/runs":
            return httpx.Response(200, json={"runs": [served["detail"]["run"]]})
        if path.startswith("/v1/runs/"):
            if path.rsplit("/", 1)[1] not in ("collab", "ab" * 32):
                return httpx.Response(404, json={"error": "not_found", "message": "no run 'x'"})
            return httpx.Response(200, json=served["detail"])
        if path.startswith("/v1/artifacts/"):
            return httpx.Response(200, content=served["bytes"])
        return httpx.Response(404, json={"error": "not_found", "message": "no such path"})

    def fake_client(url: str, token: str | None, state_dir: Path, ca_cert: Any = None) -> Client:
        return Client("http://coord", "t", transport=httpx.MockTransport(handle))

    monkeypatch.setattr(runs_cli, "client", fake_client)
    return served


@pytest.mark.parametrize("args", [["runs"], ["run", "show"], ["run", "export"], ["join"]])
def test_run_commands_explain_themselves(args: list[str]) -> None:
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_join_says_the_link_cap_is_the_volunteers_not_the_runs() -> None:
    text = " ".join(runner.invoke(app, ["join", "--help"]).output.split())
    assert "--max-mbps" in text and "never part of a run's spec" in text.replace("│ ", "")


def test_runs_lists_round_loss_and_bytes(coordinator: dict[str, Any]) -> None:
    result = runner.invoke(app, ["runs"])
    assert result.exit_code == 0, result.output
    line = next(ln for ln in result.output.splitlines() if "collab" in ln)
    assert "active" in line and "2/3" in line and "4.2500" in line
    assert "6.0 MB" in line and "1.5 MB" in line  # 3 rounds x 2 MB up, 3 x 0.5 MB down


def test_run_show_prints_each_round_and_neutralizes_worker_strings(
    coordinator: dict[str, Any],
) -> None:
    result = runner.invoke(app, ["run", "show", "collab"])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "\\x1b[31mred" in result.output  # shown, visibly escaped
    rows = [ln for ln in result.output.splitlines() if ln.strip().startswith("│")]
    round1 = next(r for r in rows if r.split("│")[1].strip() == "1")
    cells = [c.strip() for c in round1.split("│")[1:-1]]
    assert cells[:5] == ["1", "closed", "2/1/1", "0", "4.2500"]
    assert cells[7] == "1"  # a contribution one round late was applied at its close
    assert "int8" in result.output and "2 replicas x 5 inner steps" in result.output


def test_run_show_lists_refused_contributions_with_their_reasons(
    coordinator: dict[str, Any],
) -> None:
    refused = {"round": 1, "replica": 1, "status": "refused", "worker_id": "w-1"}
    coordinator["detail"]["contributions"].append(
        {**refused, "reason": "non-finite values in tok_emb.weight"}
    )
    coordinator["detail"]["contributions"].append(
        {**refused, "replica": 0, "status": "dropped", "reason": HOSTILE}
    )
    result = runner.invoke(app, ["run", "show", "collab"])
    assert result.exit_code == 0, result.output
    assert "refused or dropped contributions" in result.output
    assert "non-finite values in tok_emb.weight" in result.output and "w-1" in result.output
    assert "\x1b" not in result.output and "\x07" not in result.output  # no raw escapes
    assert "\\x1b[31mred" in result.output.split("refused or dropped")[1]  # escaped


def test_run_show_has_no_refusals_table_when_all_were_accepted(
    coordinator: dict[str, Any],
) -> None:
    result = runner.invoke(app, ["run", "show", "collab"])
    assert result.exit_code == 0 and "refused or dropped" not in result.output


def test_run_show_json_is_the_api_reply(coordinator: dict[str, Any]) -> None:
    result = runner.invoke(app, ["run", "show", "collab", "--json"])
    assert json.loads(result.output)["rounds"][1]["detail"] == HOSTILE


def test_run_show_draws_the_heldout_loss_curve(coordinator: dict[str, Any], tmp_path: Path) -> None:
    png = tmp_path / "loss.png"
    result = runner.invoke(app, ["run", "show", "collab", "--png", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(2 rounds)" in result.output


def test_no_loss_yet_is_a_clean_error(coordinator: dict[str, Any], tmp_path: Path) -> None:
    coordinator["detail"]["rounds"] = [round_rec(0, None)]
    result = runner.invoke(app, ["run", "show", "collab", "--png", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and "no held-out loss recorded yet" in result.output
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("ref", ["nope", "../v1/jobs", ""])
def test_unknown_or_malformed_runs_are_clean_errors(coordinator: dict[str, Any], ref: str) -> None:
    result = runner.invoke(app, ["run", "show", ref])
    assert result.exit_code in (1, 2) and "Traceback" not in result.output
    if ref == "nope":
        assert result.exit_code == 1 and "no run" in result.output
    else:  # refused before any request
        assert result.exit_code == 2 and all("/v1/runs/" not in p for p in coordinator["paths"])


def test_export_writes_a_checkpoint_that_load_checkpoint_loads(
    coordinator: dict[str, Any], tmp_path: Path
) -> None:
    weights = checkpoint_bytes(tmp_path)
    coordinator["detail"] = detail(weights)
    coordinator["bytes"] = weights
    result = runner.invoke(app, ["run", "export", "collab", "--output", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    _model, params = load_checkpoint(tmp_path / "m")
    assert params == GPTParams(**HYPER)
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == weights
    assert json.loads((tmp_path / "m" / "config.json").read_text())["recipe"] == "gpt"


def test_export_refuses_bytes_that_are_not_the_runs_weights(
    coordinator: dict[str, Any], tmp_path: Path
) -> None:
    coordinator["detail"] = detail(b"the real weights")
    coordinator["bytes"] = b"something else"
    result = runner.invoke(app, ["run", "export", "collab", "--output", str(tmp_path / "m")])
    assert result.exit_code == 1 and "refused" in result.output
    assert not (tmp_path / "m" / "model.safetensors").exists()


def test_against_a_live_coordinator_a_new_run_lists_and_exports_its_start(
    tmp_path: Path,
) -> None:
    manifest = (
        '[datasets.syn]\nsource = "synthetic"\nnum_documents = 50\n\n[[runs]]\nname = "collab"\n'
        'dataset = "syn"\nreplicas = 2\ninner_steps = 5\nrounds = 3\n'
        "hyper = { n_layers = 1, d_model = 16, n_heads = 2, seq_len = 16, batch_size = 4 }\n"
    )
    with LiveFleet(tmp_path) as fleet:
        fleet.reload(manifest)
        detail = wait_until(
            lambda: (d := fleet.operator.run("collab"))["run"]["weights"] and d,
            60,
            "round 0 to open",
        )
        listed = fleet.cli("runs", check=True).stdout
        line = next(ln for ln in listed.splitlines() if "collab" in ln)
        assert "active" in line and "0/3" in line
        shown = fleet.cli("run", "show", "collab", check=True).stdout
        assert "round 0/3, 2 replicas x 5 inner steps" in shown
        fleet.cli("run", "export", "collab", "-o", str(tmp_path / "m"), check=True)
    _model, params = load_checkpoint(tmp_path / "m")
    assert params == GPTParams(**HYPER)
    exported = hashlib.sha256((tmp_path / "m" / "model.safetensors").read_bytes()).hexdigest()
    assert exported == detail["run"]["weights"]


def test_odd_numbers_show_as_dashes_not_tracebacks(coordinator: dict[str, Any]) -> None:
    coordinator["detail"]["rounds"] = [
        round_rec(0, 10**400, bytes_up="many", wall_s=None),
        round_rec(1, 3.5, accepted=True),
    ]
    result = runner.invoke(app, ["run", "show", "collab"])
    assert result.exit_code == 0, result.output
    rows = [[c.strip() for c in ln.split("│")[1:-1]] for ln in result.output.splitlines()]
    cells = next(r for r in rows if r and r[0] == "0")
    assert (cells[4], cells[5], cells[8]) == ("-", "-", "-")
    assert "3.5000" in runner.invoke(app, ["runs"]).output
