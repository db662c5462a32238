"""Where a market submission's model comes from, besides bytes a submitter uploads.

Issue 10 point 2: any model artifact is re-scored by a referee panel, whether uploaded from
outside (``trainfleet market submit MODEL.safetensors``), produced by a job, or a run
round's global weights. This module turns the last two into what a submission needs, a
stored safetensors file and the producer whose hosts the referees must avoid:

- **A job** (``job_model``): a completed ``train`` job of the ``gpt`` recipe. Its artifact is
  the packed output directory (``artifacts.pack``: tar + zstandard), written by a worker and
  so untrusted. Only the ``model.safetensors`` member is read, streamed and bounded: at most
  the competition family's file size for the member and that plus ``SLACK_BYTES`` for the
  stream before it ends, so a crafted archive cannot make the coordinator decompress more than
  a model's worth of bytes. The member is stored content addressed like an uploaded model.
  The producer is the host of the job's accepted attempt (``JobRecord.host``).
- **A run round** (``run_weights``): the global weights round R started from, which the
  coordinator's outer step produced (round R-1's), already safetensors in the store; round R
  one past the run's last round is the run's final weights. The producer is ``"operator"``:
  the coordinator computed them, from the contributions of many hosts.

Neither source may be private (``tier = "private"``): referee jobs are public, and an
accepted model becomes the frontier that every later panel downloads.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import zstandard

from trainfleet.artifacts.store import IngestBuffer
from trainfleet.errors import BadRequest, NotFound
from trainfleet.train.recipes import WEIGHTS_FILE

if TYPE_CHECKING:
    from pathlib import Path

    from trainfleet.artifacts import ArtifactStore
    from trainfleet.queue.base import JobQueue, JobRecord

SLACK_BYTES = 16 << 20  # tar headers, config.json and metrics.json before the model
MAX_MEMBERS = 64  # a gpt train job's outputs: three files
# A private job's or run's model stays on attested workers; a market's referees are public
# jobs, and an accepted model becomes the frontier every later panel downloads.
PRIVATE_REFUSED = "its model would reach unattested referees, so it cannot be submitted"


class _Capped:
    """A decompressed stream that refuses to grow past ``max_bytes``."""

    def __init__(self, reader: Any, what: str, max_bytes: int) -> None:
        self.reader, self.what, self.max_bytes = reader, what, max_bytes
        self.total = 0

    def read(self, size: int = -1) -> bytes:
        data: bytes = self.reader.read(size)
        self.total += len(data)
        if self.total > self.max_bytes:
            raise BadRequest(
                f"{self.what} holds more than {self.max_bytes} bytes before its"
                f" {WEIGHTS_FILE} ends: not a model of this competition's family"
            )
        return data


def completed_train_job(queue: JobQueue, ref: str) -> JobRecord:
    """The job ``ref`` (name, id or id prefix), which must be a completed train job of the
    gpt recipe: ``NotFound``, or ``BadRequest`` saying which it is not."""
    job = queue.get_job(ref)
    label = f"job {job.name} ({job.id[:12]})"
    spec = job.spec
    if spec.kind != "train" or spec.recipe not in (None, "gpt"):
        what = spec.kind if spec.kind != "train" else f"train job of recipe {spec.recipe!r}"
        raise BadRequest(
            f"{label} is a {what}: only a train job of the gpt recipe makes a market model"
        )
    if spec.tier == "private":
        raise BadRequest(f"{label} is private: {PRIVATE_REFUSED}")
    if job.state != "completed":
        raise BadRequest(f"{label} is {job.state}: only a completed job's model can be submitted")
    return job


@contextmanager
def job_model(
    store: ArtifactStore, staging_dir: Path, job: JobRecord, max_bytes: int
) -> Iterator[str]:
    """Extract ``model.safetensors`` from a completed job's packed artifact into the store
    and yield its sha256, pinned (no GC pass deletes it) until the submission names it.
    ``max_bytes`` is the competition family's file size."""
    label = f"job {job.name} ({job.id[:12]})"
    artifact = (job.result or {}).get("artifact")
    if not isinstance(artifact, str) or not store.exists(artifact):
        raise NotFound(f"{label} has no stored artifact to take a model from")
    with IngestBuffer(staging_dir, max_bytes=max_bytes) as buf:
        with store.open(artifact) as raw:
            _extract(raw, f"{label}'s artifact", buf, max_bytes)
        sha256 = buf.digest
        with store.pinned(sha256):
            store.commit_ingested(buf, sha256, buf.size)
            yield sha256


def _extract(raw: BinaryIO, what: str, out: IngestBuffer, max_bytes: int) -> None:
    """Stream the ``model.safetensors`` member of a packed archive into ``out``."""
    try:
        with (
            zstandard.ZstdDecompressor().stream_reader(raw) as reader,
            tarfile.open(
                fileobj=cast(BinaryIO, _Capped(reader, what, max_bytes + SLACK_BYTES)),
                mode="r|",
            ) as tar,
        ):
            for count, member in enumerate(tar, start=1):
                if count > MAX_MEMBERS:
                    break
                if PurePosixPath(member.name).as_posix() != WEIGHTS_FILE:
                    continue
                if not member.isfile():
                    raise BadRequest(f"{what}'s {WEIGHTS_FILE} is not a regular file")
                if member.size > max_bytes:
                    raise BadRequest(
                        f"{what}'s {WEIGHTS_FILE} is {member.size} bytes: it does not fit the"
                        f" competition's family (its safetensors file is at most {max_bytes}"
                        " bytes)"
                    )
                source = tar.extractfile(member)
                assert source is not None  # a regular file
                while chunk := source.read(1 << 20):
                    out.write(chunk)
                return
    except (tarfile.TarError, zstandard.ZstdError) as err:
        raise BadRequest(f"{what} is not a packed output directory: {err}") from None
    raise BadRequest(f"{what} holds no {WEIGHTS_FILE}: the job wrote no model")


def run_weights(queue: JobQueue, ref: str, round: int) -> str:
    """The sha256 of run ``ref``'s global weights at the start of ``round`` (for the round
    after its last, the final weights): ``NotFound`` for a run or round that has none."""
    run = queue.get_run(ref)
    if run.spec.tier == "private":
        raise BadRequest(f"run {run.name} is private: {PRIVATE_REFUSED}")
    rounds = {r.round: r for r in queue.run_rounds(run.id)}
    if round in rounds:
        return rounds[round].weights
    previous = rounds.get(round - 1)
    if previous is not None and previous.next_weights is not None:
        return previous.next_weights
    last = max(rounds, default=None)
    opened = "no round opened yet" if last is None else f"rounds 0..{last} opened"
    raise NotFound(f"run {run.name} has no global weights for round {round} ({opened})")


__all__ = ["completed_train_job", "job_model", "run_weights"]
