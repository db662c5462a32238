"""Torch's RNG is one per process: seeded initialisations on several threads at once (two
round drivers of one process opening round 0) must each get the seed's weights, not an
interleaving of their draws (``trainer.deterministic_torch`` holds a process-wide lock)."""

from __future__ import annotations

import threading

import torch

from trainfleet.train.inner import init_weights
from trainfleet.train.recipes import GPTParams

PARAMS = GPTParams(n_layers=1, d_model=8, n_heads=1, seq_len=8, batch_size=1, seed=3)


def test_concurrent_seeded_inits_each_get_the_seeds_weights() -> None:
    alone = init_weights(PARAMS)
    got: list[dict[str, torch.Tensor]] = []
    lock = threading.Lock()

    def init() -> None:
        weights = init_weights(PARAMS)
        with lock:
            got.append(weights)

    for _ in range(10):  # without the lock, about a third of these inits came out wrong
        threads = [threading.Thread(target=init) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert len(got) == 40
    wrong = [i for i, w in enumerate(got) if any(not torch.equal(w[k], alone[k]) for k in alone)]
    assert wrong == []
