"""InProcessStore specifics: the process-local registry behind ``open_store("mem:...")``."""

from __future__ import annotations

import pytest
from featurekit import SECRET, same, sample

from trainfleet.errors import BadRef, StoreUnavailable
from trainfleet.features import InProcessStore, open_store


def test_open_store_finds_a_registered_store_until_it_is_closed() -> None:
    store = InProcessStore(secret=SECRET)
    assert store.address.startswith("mem:")
    assert open_store(store.address, SECRET) is store
    store.close()
    with pytest.raises(StoreUnavailable):
        open_store(store.address, SECRET)


def test_unknown_addresses_are_unavailable() -> None:
    with pytest.raises(StoreUnavailable):
        open_store("mem:nonesuch", SECRET)
    with pytest.raises(StoreUnavailable):
        open_store("ftp://x", SECRET)


def test_a_served_store_names_its_server_in_refs() -> None:
    store = InProcessStore(secret=SECRET, address="http://127.0.0.1:9")
    ref = store.put("a", sample())
    assert ref.store == "http://127.0.0.1:9"
    assert open_store(store.mem_address, SECRET) is store
    assert same(store.get(ref), sample())
    store.address = "http://elsewhere:9"  # re-advertised: old refs now name another store
    with pytest.raises(BadRef):
        store.get(ref)
    store.close()
