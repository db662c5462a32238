"""Training on a dataset spec: shards materialized locally, schedule fixed, results exact."""

from __future__ import annotations

from collections import Counter

from trainfleet.data.prepare import CacheSettings
from trainfleet.data.shards import plan_shards
from trainfleet.data.spec import RouterSpec, SyntheticDataset
from trainfleet.data.verify import fit_router_for
from trainfleet.train.feed import schedule_visits
from trainfleet.train.recipes import GPTParams
from trainfleet.train.trainer import DataSource, train

SPEC = SyntheticDataset(
    name="d",
    source="synthetic",
    num_dialects=2,
    num_documents=120,
    doc_tokens=128,
    shard_tokens=1024,
    router=RouterSpec(num_paths=2, num_features=64, sample_documents=60),
)
PARAMS = GPTParams(
    n_layers=1, d_model=16, n_heads=2, seq_len=32, batch_size=8, steps=90, eval_batches=2
)


def _train(tmp_path, name: str, settings: CacheSettings) -> dict:  # type: ignore[type-arg]
    return train(
        PARAMS,
        "full",
        tmp_path / name,
        num_threads=1,
        log=lambda _: None,
        data=DataSource(SPEC, 1, settings),
    )


def test_training_is_exact_whatever_the_cache_bounds(tmp_path) -> None:
    roomy = _train(tmp_path, "a", CacheSettings(tmp_path / "cache-a", max_shards=64))
    again = _train(tmp_path, "b", CacheSettings(tmp_path / "cache-a", max_shards=64))
    # One shard in memory, no disk: every revisit is a rebuild, and the numbers do not move.
    starved = _train(tmp_path, "c", CacheSettings(None, max_bytes=0, max_shards=1))
    for other in (again, starved):
        assert other["heldout_loss"] == roomy["heldout_loss"]
        assert other["train_loss"] == roomy["train_loss"]
    assert starved["data"]["cache"]["builds"] > roomy["data"]["cache"]["builds"]
    assert again["data"]["cache"]["builds"] == 0  # the second job found every shard on disk

    data = roomy["data"]
    assert data["routing"] == "fit-here" and data["path"] == 1
    assert data["shards"] and all(s["key"].split("/")[1] == "1" for s in data["shards"])
    assert data["loss_floor_nats"] > 0
    plan = plan_shards(SPEC, fit_router_for(SPEC))
    hashes = {s.key: s.sha256 for s in plan.shards}
    assert all(hashes[s["key"]] == s["sha256"] for s in data["shards"])


def test_the_schedule_visits_every_shard_once_per_epoch() -> None:
    plan = plan_shards(SPEC, fit_router_for(SPEC))
    shards = plan.select("train", 0)
    tokens_per_step = 64
    epoch_steps = sum(max(1, round(s.num_tokens / tokens_per_step)) for s in shards)
    visits = schedule_visits(shards, 3 * epoch_steps, tokens_per_step, seed=5)
    assert sum(v.num_steps for v in visits) == 3 * epoch_steps
    assert Counter(v.shard.key for v in visits) == {s.key: 3 for s in shards}
    first_epoch = [v.shard.key for v in visits[: len(shards)]]
    second_epoch = [v.shard.key for v in visits[len(shards) : 2 * len(shards)]]
    assert first_epoch != second_epoch  # reshuffled each epoch...
    assert visits == schedule_visits(shards, 3 * epoch_steps, tokens_per_step, seed=5)  # ...fixed
    assert sum(v.num_steps for v in schedule_visits(shards, 7, tokens_per_step, 0)) == 7
