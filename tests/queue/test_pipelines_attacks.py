"""Attacks on the durable ref queue by an enrolled producer that holds the pipeline secret: it
may produce data but must not point consumers at a store other than the pipeline's own (a
local directory via ``dir:``, another process's ``mem:`` store, or a non-HTTP scheme)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetkit import FakeClock
from pipelinekit import ids_of, start
from trainfleet.errors import BadRequest
from trainfleet.queue import JobQueue


@pytest.mark.parametrize(
    "store", ["dir:/etc", "mem:abc", "file:///etc/passwd", "gopher://127.0.0.1:9", "http:/x"]
)
def test_an_http_pipeline_refuses_a_ref_naming_another_kind_of_store(
    queue: JobQueue, clock: FakeClock, store: str
) -> None:
    kit = start(queue, clock)
    producer = kit.claim("prod")
    with pytest.raises(BadRequest, match="store"):
        kit.publish(producer, [0], store=store)
    assert kit.states() == {}
    assert kit.publish(producer, [0], store="https://10.0.0.5:8443") == ids_of(kit, [0])


def test_a_dir_pipeline_refuses_a_ref_naming_any_other_store(
    queue: JobQueue, clock: FakeClock
) -> None:
    kit = start(queue, clock, store="dir:/srv/shared/kd")
    producer = kit.claim("prod")
    for store in ["dir:/etc", "dir:/srv/shared/kd/../../../etc", "http://169.254.169.254"]:
        with pytest.raises(BadRequest, match="store"):
            kit.publish(producer, [0], store=store)
    assert kit.states() == {}
    assert kit.publish(producer, [0], store="dir:/srv/shared/kd") == ids_of(kit, [0])


def test_a_dir_pipeline_takes_its_directory_as_the_producers_store_resolves_it(
    queue: JobQueue, clock: FakeClock, tmp_path: Path
) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    kit = start(queue, clock, store=f"dir:{tmp_path}/link/")
    producer = kit.claim("prod")
    assert kit.publish(producer, [0], store=f"dir:{real}") == ids_of(kit, [0])  # resolved
    assert kit.publish(producer, [1], store=f"dir:{tmp_path}/link") == ids_of(kit, [1])
    with pytest.raises(BadRequest, match="store"):
        kit.publish(producer, [2], store=f"dir:{tmp_path}")
