"""Feature-store fixtures: one parametrized factory per backend, for the contract tests.

``BACKENDS`` maps a backend name to a builder ``(tmp_path, stack) -> factory``; the factory
takes the store constructor's guard knobs (``secret``, ``pipeline``, ``clock``,
``max_age_s``, ``high_watermark_bytes``, ``low_watermark_bytes``) and returns a store.
Builders register their teardown (servers, threads) on ``stack``. To run every contract
test against another backend, add it here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from featurekit import SECRET, StoreFactory

from trainfleet.features import FeatureStore, InProcessStore, SharedDirStore

Builder = Callable[[Path, contextlib.ExitStack], StoreFactory]


def _memory(tmp_path: Path, stack: contextlib.ExitStack) -> StoreFactory:
    return lambda **kw: InProcessStore(**kw)


def _shared_dir(tmp_path: Path, stack: contextlib.ExitStack) -> StoreFactory:
    return lambda **kw: SharedDirStore(tmp_path / "features", **kw)


def _http(tmp_path: Path, stack: contextlib.ExitStack) -> StoreFactory:
    from httpkit import ServedPair  # put in a served InProcessStore, get over HTTP (H2)

    return lambda **kw: ServedPair(**kw)


BACKENDS: dict[str, Builder] = {"memory": _memory, "shared_dir": _shared_dir, "http": _http}


@pytest.fixture(params=sorted(BACKENDS))
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Makes stores of the parametrized backend (``secret`` defaults to ``SECRET``); every
    store made is closed at teardown."""
    with contextlib.ExitStack() as stack:
        build = BACKENDS[request.param](tmp_path, stack)
        made: list[FeatureStore] = []

        def factory(**kw: Any) -> FeatureStore:
            kw.setdefault("secret", SECRET)
            store = build(**kw)
            made.append(store)
            return store

        try:
            yield factory
        finally:
            for store in made:
                store.close()
