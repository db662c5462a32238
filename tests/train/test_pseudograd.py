"""Pseudo-gradient codecs: round trips, error bounds, error feedback, and refusal of bad files."""

from __future__ import annotations

import json
import math
import struct

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from trainfleet.manifest.runs import CompressionSpec
from trainfleet.train.pseudograd import (
    FORMAT,
    INT8_CHUNK,
    PseudoGradError,
    all_finite,
    codec_for_link,
    decode,
    encode,
    global_norm,
    num_bytes_for,
    topk_count,
)

Weights = dict[str, Tensor]


def weights(seed: int = 0) -> tuple[Weights, Weights]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"emb": (3 * INT8_CHUNK + 17,), "w": (40, 30), "b": (7,), "s": (), "e": (0, 4)}
    start = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    end = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in start.items()}
    return start, end


def true_delta(start: Weights, end: Weights) -> Weights:
    return {k: start[k].double() - end[k].double() for k in start}


def spec(kind: str, density: float = 0.01, bits: int = 8, ef: bool = True) -> CompressionSpec:
    return CompressionSpec.model_validate(
        {"kind": kind, "density": density, "bits": bits, "error_feedback": ef}
    )


def test_none_is_exact_and_carries_meta() -> None:
    start, end = weights()
    enc = encode(start, end, spec("none"), meta={"replica": "3"})
    dec = decode(enc.data, start)
    assert dec.codec == enc.codec == "none" and enc.residual is None
    assert dec.meta["replica"] == "3" and dec.meta["format"] == FORMAT
    assert enc.num_bytes == len(enc.data)
    for k, want in true_delta(start, end).items():
        assert dec.delta[k].dtype == torch.float64
        assert torch.equal(dec.delta[k], want), k


def test_reserved_meta_key_refused() -> None:
    start, end = weights()
    with pytest.raises(ValueError, match="reserved"):
        encode(start, end, spec("none"), meta={"codec": "x"})


def test_fp16_error_bound() -> None:
    start, end = weights()
    dec = decode(encode(start, end, spec("fp16")).data, start)
    for k, x in true_delta(start, end).items():
        assert bool(((dec.delta[k] - x).abs() <= x.abs() * 2**-11 + 2**-25).all()), k


def test_int8_error_bound_per_chunk() -> None:
    start, end = weights()
    end["emb"][5] -= 100.0  # one huge entry: only its own chunk loses precision
    dec = decode(encode(start, end, spec("int8")).data, start)
    for k, x in true_delta(start, end).items():
        flat, got = x.reshape(-1), dec.delta[k].reshape(-1)
        for c in range(0, flat.numel(), INT8_CHUNK):
            part = flat[c : c + INT8_CHUNK]
            bound = float(part.abs().max()) / 254 * (1 + 1e-6)
            assert float((got[c : c + INT8_CHUNK] - part).abs().max()) <= bound, (k, c)
    tail = true_delta(start, end)["emb"][INT8_CHUNK:]
    assert float((dec.delta["emb"][INT8_CHUNK:] - tail).abs().max()) < 1e-3


def test_topk_keeps_exactly_k_largest() -> None:
    start, end = weights()
    enc = encode(start, end, spec("topk", density=0.05, bits=32))
    dec = decode(enc.data, start)
    for k, x in true_delta(start, end).items():
        n = x.numel()
        kept = dec.delta[k].reshape(-1).nonzero().reshape(-1)
        assert kept.numel() == topk_count(0.05, n) == math.ceil(0.05 * n)
        want = torch.topk(x.reshape(-1).abs(), kept.numel()).indices.sort().values
        assert torch.equal(kept, want), k
        assert torch.equal(dec.delta[k].reshape(-1)[kept], x.reshape(-1)[kept].float().double())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_topk_quantized_error_bounded(bits: int) -> None:
    start, end = weights()
    enc = encode(start, end, spec("topk", density=0.2, bits=bits))
    raw = safetensors.torch.load(enc.data)
    dec = decode(enc.data, start)
    levels = 2 ** (bits - 1) - 1
    for k, x in true_delta(start, end).items():
        n = x.numel()
        count = topk_count(0.2, n)
        assert raw[f"v/{k}"].dtype == torch.uint8
        assert raw[f"v/{k}"].numel() == math.ceil(count * bits / 8)
        idx = raw[f"i/{k}"].long()
        scale = float(raw[f"s/{k}"])
        err = (dec.delta[k].reshape(-1)[idx] - x.reshape(-1)[idx]).abs()
        assert count == 0 or float(err.max()) <= scale / levels / 2 * (1 + 1e-6) + 1e-12
        outside = torch.ones(n, dtype=torch.bool)
        outside[idx] = False
        assert bool((dec.delta[k].reshape(-1)[outside] == 0).all())


def test_error_feedback_conserves_the_sum() -> None:
    start, _ = weights()
    residual = None
    sent = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in start.items()}
    truth = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in start.items()}
    for r in range(5):
        other_start, other_end = weights(seed=r + 1)
        end = {k: start[k] + (other_end[k] - other_start[k]) for k in start}
        enc = encode(start, end, spec("topk", density=0.05, bits=4), residual=residual)
        assert enc.residual is not None
        residual = enc.residual
        for k, d in decode(enc.data, start).delta.items():
            sent[k] += d
            truth[k] += start[k].double() - end[k].double()
    assert residual is not None
    for k in start:
        assert torch.allclose(sent[k] + residual[k].double(), truth[k], atol=1e-5), k


def test_residual_only_for_topk_with_error_feedback() -> None:
    start, end = weights()
    assert encode(start, end, spec("topk", ef=False)).residual is None
    assert encode(start, end, spec("int8")).residual is None


def _save(tensors: dict[str, Tensor], meta: dict[str, str]) -> bytes:
    return safetensors.torch.save(tensors, metadata=meta)


def _tampered(case: str) -> tuple[bytes, Weights, int | None, str]:
    """A bad file for ``case``, the reference to decode it against, max_bytes, the reason."""
    start, end = weights()
    good = encode(start, end, spec("topk", density=0.1, bits=4)).data
    t = dict(safetensors.torch.load(good))
    meta = dict(json.loads(good[8 : 8 + struct.unpack("<Q", good[:8])[0]])["__metadata__"])
    if case == "truncated":
        return good[:-10], start, None, "unreadable"
    if case == "truncated header":
        return good[:20], start, None, "truncated"
    if case == "not json":
        n = struct.unpack("<Q", good[:8])[0]
        return good[:8] + b"\xff" * n + good[8 + n :], start, None, "not JSON"
    if case == "oversize":
        return good, start, len(good) - 1, "exceeds"
    if case == "wrong names":
        return good, {("x" + k): v for k, v in start.items()}, None, "names differ"
    if case == "extra tensor":
        return _save({**t, "x/extra": torch.zeros(2)}, meta), start, None, "names differ"
    if case == "missing tensor":
        del t["s/w"]
        return _save(t, meta), start, None, "names differ"
    if case == "wrong shape":
        none = dict(safetensors.torch.load(encode(start, end, spec("none")).data))
        none["w/w"] = none["w/w"].reshape(30, 40).contiguous()
        return _save(none, {**meta, "codec": "none"}), start, None, "shape"
    if case == "wrong dtype":
        t["i/w"] = t["i/w"].long()
        return _save(t, meta), start, None, "dtype"
    if case == "too many entries":  # the header claims density 0.2: counts disagree
        return _save(t, {**meta, "density": "0.2"}), start, None, "shape"
    if case == "out-of-range index":
        t["i/w"] = t["i/w"].clone()
        t["i/w"][0] = 1200
        return _save(t, meta), start, None, "out of range"
    if case == "negative index":
        t["i/w"] = t["i/w"].clone()
        t["i/w"][0] = -1
        return _save(t, meta), start, None, "out of range"
    if case == "duplicate index":
        t["i/w"] = t["i/w"].clone()
        t["i/w"][1] = t["i/w"][0]
        return _save(t, meta), start, None, "duplicate"
    if case == "NaN scale":
        t["s/w"] = torch.tensor([float("nan")])
        return _save(t, meta), start, None, "scale"
    if case == "negative scale":
        t["s/w"] = torch.tensor([-1.0])
        return _save(t, meta), start, None, "scale"
    if case == "bad code":
        t["v/w"] = torch.full_like(t["v/w"], 0xFF)
        return _save(t, meta), start, None, "code out of range"
    if case == "bad format":
        return _save(t, {**meta, "format": "other/1"}), start, None, "format"
    if case == "bad codec":
        return _save(t, {**meta, "codec": "zip"}), start, None, "codec metadata"
    raise AssertionError(case)


CASES = [
    "truncated",
    "truncated header",
    "not json",
    "oversize",
    "wrong names",
    "extra tensor",
    "missing tensor",
    "wrong shape",
    "wrong dtype",
    "too many entries",
    "out-of-range index",
    "negative index",
    "duplicate index",
    "NaN scale",
    "negative scale",
    "bad code",
    "bad format",
    "bad codec",
]


@pytest.mark.parametrize("case", CASES)
def test_decode_refuses(case: str) -> None:
    data, reference, max_bytes, reason = _tampered(case)
    with pytest.raises(PseudoGradError, match=reason):
        decode(data, reference, max_bytes=max_bytes)


def test_decode_refuses_duplicate_header_names() -> None:
    start, end = weights()
    good = encode(start, end, spec("none")).data
    n = struct.unpack("<Q", good[:8])[0]
    header = good[8 : 8 + n].decode()
    entry = header[header.index('"w/b"') : header.index("}", header.index('"w/b"')) + 1]
    bad = header.replace(entry, entry + "," + entry, 1).encode()
    data = struct.pack("<Q", len(bad)) + bad + good[8 + n :]
    with pytest.raises(PseudoGradError, match="duplicate"):
        decode(data, start)


@settings(max_examples=30, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 9), max_size=3), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(["int8", "topk"]),
    density=st.floats(0.01, 1.0),
    bits=st.sampled_from([2, 4, 8, 16, 32]),
)
def test_round_trip_property(
    shapes: list[list[int]], seed: int, kind: str, density: float, bits: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    start = {f"t{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    end = {k: v + torch.randn(v.shape, generator=g) for k, v in start.items()}
    enc = encode(start, end, spec(kind, density=density, bits=bits))
    dec = decode(enc.data, start)
    for k, x in true_delta(start, end).items():
        got = dec.delta[k]
        assert got.shape == x.shape and got.dtype == torch.float64
        if kind == "int8":
            bound = float(x.abs().max()) / 254 * (1 + 1e-6) if x.numel() else 0.0
            assert x.numel() == 0 or float((got - x).abs().max()) <= bound
        else:
            assert enc.residual is not None
            assert int((got != 0).sum()) <= topk_count(density, x.numel())
            assert torch.allclose(got + enc.residual[k].double(), x, atol=1e-6)


def test_global_norm_and_all_finite() -> None:
    d = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}
    assert global_norm(d) == 5.0
    assert all_finite(d)
    assert not all_finite({**d, "c": torch.tensor([float("inf")])})
    assert not all_finite({**d, "c": torch.tensor([float("nan")])})


def test_byte_model_matches_files() -> None:
    start, end = weights()
    n = sum(v.numel() for v in start.values())
    for s in [spec("none"), spec("fp16"), spec("int8"), spec("topk", 0.1, 8), spec("topk")]:
        size = len(encode(start, end, s).data)
        model = num_bytes_for(s, n)
        assert abs(size - model) <= 2048, (s, size, model)  # header and per-tensor scales


def test_codec_for_link() -> None:
    n = 100_000_000
    # 100 Mbit/s, 60 s compute, 10 %: 75 MB; int8 is 100 MB, topk(10%, 8b) 50 MB
    assert codec_for_link(spec("none"), n, 100, 60) == spec("topk", 0.1, 8)
    assert codec_for_link(spec("none"), n, 10_000, 60) == spec("none")
    assert codec_for_link(spec("none"), n, 500, 60) == spec("fp16")  # 375 MB
    assert codec_for_link(spec("none"), n, 0.001, 60) == spec("topk", 0.01, 2)
    own = spec("topk", density=0.001, bits=4, ef=False)
    assert codec_for_link(own, n, 10_000, 60) == own  # never denser than the run asks
    assert codec_for_link(spec("fp16"), n, 10_000, 60) == spec("fp16")
    slow = codec_for_link(spec("int8", ef=False), n, 100, 60)
    assert slow == spec("topk", 0.1, 8, ef=False)


@pytest.mark.parametrize("kind", ["none", "fp16", "int8", "topk"])
def test_tied_tensors_encode(kind: str) -> None:
    start, end = weights()
    start["tied"], end["tied"] = start["w"], end["w"]  # shared storage, as tied embeddings
    dec = decode(encode(start, end, spec(kind)).data, start)
    assert torch.equal(dec.delta["tied"], dec.delta["w"])
