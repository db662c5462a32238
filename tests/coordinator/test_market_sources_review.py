"""Attacks on a job's packed artifact as a market model source (``market_sources._extract``):
the worker that wrote the archive is untrusted, so a link, a directory or a path trick named
``model.safetensors``, a sparse member that claims to be huge, and a zstd bomb are refused
with a clear 400 and never read from outside the archive."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest
import test_market_api as market
import zstandard
from runkit import fake_eval, tick
from test_api import OP, Api, Worker, assert_error
from test_market_api import HONEST_STEPS, create, host_token
from test_market_sources import JOBS, RUN, TRAINER, URL, outputs

from tinymarket import HYPER, trained
from trainfleet.artifacts.store import IngestBuffer
from trainfleet.coordinator.market_sources import SLACK_BYTES, _extract
from trainfleet.errors import BadRequest

api, fixed_ids, referees = market.api, market.fixed_ids, market.referees
LIMIT = 4096
MODEL = b"M" * 100


def archive(*members: tuple[tarfile.TarInfo, bytes | None], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, None if data is None else io.BytesIO(data))
    return zstandard.ZstdCompressor().compress(raw.getvalue())


def regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def special(name: str, kind: bytes, target: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def extract(tmp_path: Path, packed: bytes) -> bytes:
    with IngestBuffer(tmp_path / "staging", max_bytes=LIMIT) as buf:
        _extract(io.BytesIO(packed), "job x's artifact", buf, LIMIT)
        buf.close()
        return buf.path.read_bytes()


@pytest.mark.parametrize(
    ("kind", "target"),
    [
        (tarfile.SYMTYPE, "/etc/passwd"),
        (tarfile.LNKTYPE, "config.json"),
        (tarfile.DIRTYPE, ""),
        (tarfile.FIFOTYPE, ""),
        (tarfile.CHRTYPE, ""),
    ],
)
def test_a_member_named_model_that_is_not_a_regular_file_is_refused(
    tmp_path: Path, kind: bytes, target: str
) -> None:
    packed = archive(regular("config.json", b"{}"), special("model.safetensors", kind, target))
    with pytest.raises(BadRequest, match="is not a regular file"):
        extract(tmp_path, packed)


def test_a_directory_spelled_with_a_slash_is_not_the_model(tmp_path: Path) -> None:
    packed = archive(special("model.safetensors/", tarfile.DIRTYPE))
    with pytest.raises(BadRequest, match="is not a regular file"):
        extract(tmp_path, packed)


@pytest.mark.parametrize(
    "name",
    ["../model.safetensors", "/model.safetensors", "sub/model.safetensors", "MODEL.safetensors"],
)
def test_path_tricks_are_not_the_model(tmp_path: Path, name: str) -> None:
    with pytest.raises(BadRequest, match=r"holds no model\.safetensors"):
        extract(tmp_path, archive(regular(name, MODEL)))


def test_the_first_regular_model_member_is_read_and_nothing_else(tmp_path: Path) -> None:
    packed = archive(regular("./model.safetensors", MODEL), regular("model.safetensors", b"X"))
    assert extract(tmp_path, packed) == MODEL


def test_a_member_that_claims_to_be_huge_is_refused_before_it_is_read(tmp_path: Path) -> None:
    info = tarfile.TarInfo("model.safetensors")
    info.size = LIMIT + 1
    packed = archive((info, bytes(LIMIT + 1)))
    with pytest.raises(BadRequest, match="does not fit"):
        extract(tmp_path, packed)


def test_a_gnu_sparse_model_that_expands_past_the_limit_is_refused(tmp_path: Path) -> None:
    # A GNU sparse header: a few stored bytes that expand to a huge "real" size.
    info = tarfile.TarInfo("model.safetensors")
    info.size = 512
    info.type = tarfile.GNUTYPE_SPARSE
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    header[483:495] = b"%011o\0" % (1 << 33)  # realsize in the GNU sparse header
    header[386:398] = b"%011o\0" % 0  # one sparse chunk at offset 0
    header[398:410] = b"%011o\0" % 512  # of 512 bytes
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header[:512])
    raw = bytes(header[:512]) + bytes(512) + bytes(1024)
    packed = zstandard.ZstdCompressor().compress(raw)
    with pytest.raises(BadRequest, match="8589934592 bytes: it does not fit"):
        extract(tmp_path, packed)


def test_an_extended_header_claiming_a_terabyte_is_refused(tmp_path: Path) -> None:
    # tarfile reads a pax header's data whole: the stream's cap bounds what it can gather
    info = tarfile.TarInfo("pax")
    info.type, info.size = tarfile.XHDTYPE, 10**12
    raw = info.tobuf(format=tarfile.GNU_FORMAT) + b"0" * 1024
    with pytest.raises(BadRequest, match="not a packed output directory"):
        extract(tmp_path, zstandard.ZstdCompressor().compress(raw))


def test_a_zstd_bomb_before_the_model_stops_at_the_slack(tmp_path: Path) -> None:
    packed = archive(
        regular("pad.bin", bytes(SLACK_BYTES + LIMIT + 1)), regular("model.safetensors", MODEL)
    )
    assert len(packed) < 100_000  # a small archive that decompresses to past the cap
    with pytest.raises(BadRequest, match="holds more than"):
        extract(tmp_path, packed)


@pytest.mark.parametrize(
    "packed",
    [
        b"",
        zstandard.ZstdCompressor().compress(b"\0" * 1024),  # an empty tar
        zstandard.ZstdCompressor().compress(b"x" * 700),  # not a tar
        zstandard.ZstdCompressor().compress(b"\xff" * 512),  # a bad header
    ],
)
def test_junk_is_a_400(tmp_path: Path, packed: bytes) -> None:
    with pytest.raises(BadRequest):
        extract(tmp_path, packed)


# A private job's or run's model submitted to the market: its referees are public jobs, and
# an accepted model becomes the frontier every later (public) panel downloads, so it would
# reach unattested workers. Refused before anything is stored or queued.


def attest_directly(api: Api, worker: Worker) -> None:
    queue = api.coord.queue
    nonce = queue.attest_nonce(worker.id, 60.0)
    queue.attest_worker(worker.id, nonce, "ab" * 32, queue.clock() + 600.0)


def test_a_private_jobs_model_is_not_submitted_to_public_referees(
    api: Api, referees: list[Worker], tmp_path: Path
) -> None:
    create(api)
    trainer = api.register(TRAINER)
    attest_directly(api, trainer)
    api.reload(
        JOBS.format(name="secret").replace('name = "secret"', 'name = "secret"\ntier = "private"')
    )
    got = api.claim(trainer)
    assert got["job"]["name"] == "secret" and got["job"]["spec"]["tier"] == "private"
    artifact = outputs(tmp_path, trained(HONEST_STEPS))
    assert api.upload(trainer, got["job"]["id"], got["epoch"], artifact).status_code == 200
    result = {"metrics": {"loss": 2.0}, "artifact": hashlib.sha256(artifact).hexdigest()}
    r = api.http.post(
        f"/v1/jobs/{got['job']['id']}/complete",
        json={"epoch": got["epoch"], "result": result},
        headers=trainer.auth,
    )
    assert r.status_code == 200 and r.json()["state"] == "completed", r.text
    before = len(api.coord.queue.list_jobs())

    r = api.http.post(URL, json={"job": "secret", "claim": 2.0}, headers=OP)
    assert "private" in assert_error(r, 400, "bad_request")["message"]
    assert len(api.coord.queue.list_jobs()) == before  # no referee job queued


def test_a_private_runs_weights_are_not_submitted_to_public_referees(
    api: Api, referees: list[Worker]
) -> None:
    create(api)
    api.coord.rounds.evaluate = fake_eval
    hyper = "{ " + ", ".join(f"{k} = {v!r}" for k, v in {**HYPER, "seed": 7}.items()) + " }"
    api.reload(RUN.format(hyper=hyper) + 'tier = "private"\n')
    tick(api)
    before = len(api.coord.queue.list_jobs())
    r = api.http.post(URL, json={"run": "dl", "round": 0, "claim": 2.5}, headers=OP)
    assert "private" in assert_error(r, 400, "bad_request")["message"]
    assert len(api.coord.queue.list_jobs()) == before


def test_a_host_cannot_submit_a_runs_global_weights_as_its_own(
    api: Api, referees: list[Worker]
) -> None:
    """A replica worker learns each round's weights digest from its task: submitting that
    digest as an uploaded model would pay it for the whole fleet's (the operator's) work."""
    create(api)
    api.coord.rounds.evaluate = fake_eval
    hyper = "{ " + ", ".join(f"{k} = {v!r}" for k, v in {**HYPER, "seed": 7}.items()) + " }"
    api.reload(RUN.format(hyper=hyper))
    (start,) = tick(api)["rounds"]
    r = api.http.post(
        URL, json={"sha256": start["weights"], "claim": 2.5}, headers=host_token(api, "cpu-a")
    )
    assert "global weights" in assert_error(r, 403, "forbidden")["message"]
    r = api.http.post(URL, json={"run": "dl", "round": 0, "claim": 2.5}, headers=OP)
    assert r.status_code == 200 and r.json()["producer"] == "operator", r.text
