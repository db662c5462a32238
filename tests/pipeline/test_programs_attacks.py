"""A consumer program facing a malicious producer that holds the pipeline secret: a validly
signed ref naming a local directory or a made-up address is never opened (it is returned, not
trained on); only the pipeline's own kind of store is."""

from __future__ import annotations

from typing import Any

import pytest
from kdkit import tiny_spec

from trainfleet.features.ref import SampleRef, sign_ref
from trainfleet.pipeline.consumer import consume
from trainfleet.pipeline.control import AckResult, Lease

# the ref's content-hash field (named "sha256" in the design, "digest" in newer code)
DIGEST_FIELD = "digest" if "digest" in SampleRef.model_fields else "sha256"


class OneLease:
    """Leases ``refs`` once, then says done; records returns and acks."""

    def __init__(self, refs: list[SampleRef]):
        self.refs, self.returned, self.acked = refs, list[str](), list[str]()

    def lease(self, max_samples: int) -> Lease:
        refs, self.refs = self.refs, []
        return Lease(samples=refs, retire=False, done=not refs, num_consumers=1)

    def ack(self, acks: list[tuple[str, int]]) -> list[AckResult]:
        self.acked += [sid for sid, _ in acks]
        return [AckResult(sample_id=sid, accepted=True) for sid, _ in acks]

    def return_samples(self, sample_ids: list[str]) -> int:
        self.returned += sample_ids
        return len(sample_ids)

    def publish(self, refs: Any) -> Any:
        raise AssertionError("a consumer never publishes")

    def sync(self, released: Any) -> Any:
        raise AssertionError("a consumer never syncs")


@pytest.mark.parametrize(
    "store", ["dir:/etc", "mem:other", "file:///etc/passwd", "http://u:p@169.254.169.254/x"]
)
def test_the_worker_consumer_never_opens_a_store_other_than_the_pipelines_own(
    secret: bytes, store: str
) -> None:
    spec = tiny_spec(samples=1)
    assert spec.store == "http"
    ref = sign_ref(
        store=store,
        pipeline="p" * 64,
        sample_id="00000000",
        key="00000000",
        generation=1,
        **{DIGEST_FIELD: "0" * 64},
        size=10,
        secret=secret,
    )
    opened: list[str] = []

    def opener(address: str, _secret: bytes) -> Any:
        opened.append(address)
        raise AssertionError(f"opened {address}")

    control = OneLease([ref])
    result = consume(
        control,  # type: ignore[arg-type]
        spec,
        secret,
        evaluate=False,
        num_threads=1,
        poll_s=0.01,
        opener=opener,
        check_store=True,
        log=lambda _: None,
    )
    assert opened == [] and control.acked == []
    assert control.returned == ["00000000"] == result.returned
    assert result.student.steps == 0
