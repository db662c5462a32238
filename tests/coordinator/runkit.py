"""Helpers of the collaborative-run API tests: a tiny run manifest and a scripted fake
replica worker that claims, downloads the global weights, uploads real pseudo-gradient bytes
(``train.pseudograd.encode``) and completes, all through the in-process HTTP API."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import safetensors.torch
import torch
from test_api import OP, Api, Worker

from trainfleet.manifest.runs import CompressionSpec
from trainfleet.train import outer, pseudograd

DATASET = """
[datasets.tiny]
source = "synthetic"
num_documents = 20
doc_tokens = 64
shard_tokens = 256
"""
HYPER = "{ n_layers = 1, d_model = 8, n_heads = 1, seq_len = 8, batch_size = 1, seed = 3 }"


def run_toml(name: str = "dl", **fields: Any) -> str:
    """A run on the tiny dataset; ``fields`` override the defaults below."""
    values: dict[str, Any] = {
        "replicas": 3,
        "inner_steps": 4,
        "rounds": 2,
        "min_quorum": 3,
        "outer_lr": 0.7,
        "outer_momentum": 0.9,
        **fields,
    }
    lines = [f'name = "{name}"', 'dataset = "tiny"', f"hyper = {HYPER}"]
    lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
    return DATASET + "\n[[runs]]\n" + "\n".join(lines) + "\n"


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return repr(v)


def fake_eval(_spec: Any, weights: dict[str, torch.Tensor]) -> float:
    """A deterministic stand-in for the held-out loss (the real one materializes data)."""
    return float(sum(float(t.double().abs().sum()) for t in weights.values()))


def delta_for(start: dict[str, torch.Tensor], round: int, replica: int) -> dict[str, torch.Tensor]:
    """The scripted pseudo-gradient of (round, replica): small, seeded, deterministic."""
    g = torch.Generator().manual_seed(1000 * round + replica)
    # sorted: safetensors loads tensors in no fixed order
    return {
        k: torch.randn(start[k].shape, generator=g, dtype=torch.float32) * 1e-3
        for k in sorted(start)
    }


def decoded(start: dict[str, torch.Tensor], round: int, replica: int) -> dict[str, torch.Tensor]:
    """The float64 pseudo-gradient the coordinator decodes from the scripted upload."""
    delta = delta_for(start, round, replica)
    return {k: start[k].double() - (start[k] - delta[k]).double() for k in start}


@dataclass
class Task:
    """A claimed replica task."""

    worker: Worker
    job_id: str
    epoch: int
    task: dict[str, Any]

    @property
    def slot(self) -> tuple[int, int]:
        return self.task["round"], self.task["replica"]


def claim(api: Api, worker: Worker) -> Task | None:
    r = api.http.post("/v1/workers/claim", headers=worker.auth)
    assert r.status_code == 200, r.text
    got = r.json()["claim"]
    if got is None:
        return None
    job = got["job"]
    assert job["spec"]["kind"] == "replica"
    return Task(worker, job["id"], got["epoch"], job["spec"]["task"])


def weights(api: Api, worker: Worker, sha: str) -> tuple[bytes, dict[str, torch.Tensor]]:
    r = api.http.get(f"/v1/weights/{sha}", headers=worker.auth)
    assert r.status_code == 200, r.text
    assert hashlib.sha256(r.content).hexdigest() == sha
    return r.content, safetensors.torch.load(r.content)


def pseudo_gradient(api: Api, t: Task, scale: float = 1.0, nan: bool = False) -> bytes:
    """Download the task's weights and encode its scripted end weights (codec none)."""
    _, start = weights(api, t.worker, t.task["weights"])
    delta = delta_for(start, *t.slot)
    end = {k: start[k] - scale * delta[k] for k in start}
    if nan:
        first = sorted(end)[0]
        end[first] = end[first].clone()
        end[first].view(-1)[0] = float("nan")
    return pseudograd.encode(start, end, CompressionSpec()).data


def finish(
    api: Api,
    t: Task,
    data: bytes | None = None,
    said: dict[str, Any] | None = None,
    data_report: dict[str, Any] | None = None,
    **metrics: Any,
) -> dict[str, Any]:
    """Upload ``data`` (default: the scripted pseudo-gradient) and complete; the job record.
    ``metrics`` go to ``result.metrics`` (``data_report`` as its ``data``: shard hashes),
    ``said`` to ``result.contribution``."""
    said = said or {}
    data = pseudo_gradient(api, t) if data is None else data
    sha = hashlib.sha256(data).hexdigest()
    r = api.upload(t.worker, t.job_id, t.epoch, data, name="pseudograd.safetensors")
    assert r.status_code == 200, r.text
    result = {
        "metrics": {
            "inner_steps_done": t.task["inner_steps"],
            "compute_s": 1.0,
            **({"data": data_report} if data_report is not None else {}),
            **metrics,
        },
        "artifact": sha,
        "artifact_size": len(data),
        "contribution": {"round": t.task["round"], "replica": t.task["replica"], **said},
    }
    r = api.http.post(
        f"/v1/jobs/{t.job_id}/complete",
        json={"epoch": t.epoch, "result": result},
        headers=t.worker.auth,
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def run_detail(api: Api, name: str = "dl") -> dict[str, Any]:
    r = api.http.get(f"/v1/runs/{name}", headers=OP)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def tick(api: Api) -> dict[str, Any]:
    """One round-driver pass (the app's ticker may also run one: the outcome is the same)."""
    api.coord.rounds.tick()
    return run_detail(api)


def expected_weights(
    start: dict[str, torch.Tensor],
    deltas: list[tuple[dict[str, torch.Tensor], int, float]],
    momentum: dict[str, torch.Tensor] | None,
    lr: float,
    mu: float,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """The outer step the coordinator should take: (delta, staleness, weight) each."""
    contribs = [outer.Contribution(i, d, s, w) for i, (d, s, w) in enumerate(deltas)]
    return outer.outer_step(start, outer.average(contribs), momentum, lr, mu)


def sha_of(tensors: dict[str, torch.Tensor]) -> str:
    data = safetensors.torch.save({k: tensors[k].contiguous() for k in sorted(tensors)})
    return hashlib.sha256(data).hexdigest()
