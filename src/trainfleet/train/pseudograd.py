"""A replica's pseudo-gradient on the wire: one safetensors file, encoded and checked.

In DiLoCo (Douillard et al. 2023, arXiv 2311.08105) each replica returns its pseudo-gradient,
start weights minus end weights, once per round. This module turns it into one safetensors
byte string and back. The metadata names ``format`` (:data:`FORMAT`), ``codec``, ``density``
and ``bits`` (all strings) plus the caller's own keys. Tensor names are ``PREFIX/name``:

- ``none``: ``w/n`` the end weights in fp32; the receiver forms ``reference - end`` in float64,
  so nothing is lost (one replica, outer lr 1, no momentum reproduces plain training).
- ``fp16``: ``d/n`` the delta in fp16.
- ``int8``: ``q/n`` the delta in int8 (codes -127..127, shape of the tensor) and ``s/n`` one
  fp32 absmax scale per chunk of :data:`INT8_CHUNK` entries of the flattened tensor (per chunk
  rather than per tensor, so one large entry costs precision in 4096 entries only, for 0.1 %
  more bytes); entry = code * scale / 127.
- ``topk``: per tensor the k = ceil(density * numel) entries of largest ``|delta + residual|``:
  ``i/n`` their flat indices (int32, ascending) and ``v/n`` their values, fp32 at 32 bits, fp16
  at 16, and below that uniform symmetric codes -L..L (L = 2**(bits-1) - 1) stored as code + L,
  packed little-end first into uint8 (1, 2 or 4 per byte), with ``s/n`` the fp32 absmax scale;
  value = code * scale / L. Error feedback (SparseLoCo): the returned residual is exactly what
  the receiver will not see, ``x - decode(x)``, added to the next round's delta.

A residual passed to :func:`encode` is added to the delta for every codec (for ``none`` the
sent end weights become ``start - (delta + residual)``, rounded to fp32); only topk with
error feedback returns a new one. :func:`decode` treats the bytes as untrusted: its size is
bounded before parsing, and names, dtypes, shapes, index ranges, uniqueness, entry counts and
scales are checked against the reference weights, never against sizes the file claims.

Byte model (:func:`num_bytes_for`, used to fit a codec to a link): payload only, no header.
none 4N, fp16 2N, int8 N + 4 ceil(N/4096), topk k(4 + bits/8) (+4 for the scale below 16
bits) with k = ceil(density N).
"""

from __future__ import annotations

import json
import logging
import math
import struct
from dataclasses import dataclass
from typing import Any

import safetensors.torch
import torch
from torch import Tensor

from trainfleet.manifest.runs import CompressionSpec

log = logging.getLogger(__name__)

FORMAT = "trainfleet.pseudograd/1"
INT8_CHUNK = 4096
_RESERVED = ("format", "codec", "density", "bits")
_HEADER_SLACK = 1 << 16  # bytes allowed beyond the payload: JSON header and alignment
_LADDER = (
    CompressionSpec(kind="none"),
    CompressionSpec(kind="fp16"),
    CompressionSpec(kind="int8"),
    CompressionSpec(kind="topk", density=0.1, bits=8),
    CompressionSpec(kind="topk", density=0.01, bits=4),
    CompressionSpec(kind="topk", density=0.01, bits=2),
)


class PseudoGradError(ValueError):
    """A pseudo-gradient file that is malformed or does not match the reference weights."""


@dataclass(frozen=True)
class Encoded:
    data: bytes
    residual: dict[str, Tensor] | None
    num_bytes: int
    codec: str


@dataclass(frozen=True)
class Decoded:
    delta: dict[str, Tensor]
    codec: str
    meta: dict[str, str]


def topk_count(density: float, numel: int) -> int:
    """Entries topk keeps of a tensor of ``numel`` entries (at least one unless empty)."""
    return min(numel, math.ceil(density * numel))


def _levels(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def _scaled(codes: Tensor, scale: Tensor, levels: int) -> Tensor:
    return codes.double() * scale.double() / levels


def _quantize(x: Tensor, scale32: Tensor, levels: int) -> Tensor:
    """Codes in -levels..levels of float64 ``x`` for fp32 scale(s) broadcast against it."""
    s = scale32.double()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return torch.round(x / safe * levels).clamp_(-levels, levels)


def _pack(codes: Tensor, bits: int) -> Tensor:
    per = 8 // bits
    u = codes.to(torch.int64) + _levels(bits)
    u = torch.nn.functional.pad(u, (0, (-u.numel()) % per)).reshape(-1, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    return (u << shifts).sum(dim=1).to(torch.uint8)


def _unpack(packed: Tensor, bits: int, count: int) -> Tensor:
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    u = (packed.to(torch.int64).unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return u.reshape(-1)[:count]


def encode(
    start: dict[str, Tensor],
    end: dict[str, Tensor],
    spec: CompressionSpec,
    residual: dict[str, Tensor] | None = None,
    meta: dict[str, str] | None = None,
) -> Encoded:
    """Encode ``start - end`` (+ ``residual``) with ``spec``'s codec; see the module doc."""
    if set(start) != set(end):
        raise ValueError("start and end weights name different tensors")
    clash = [k for k in meta or {} if k in _RESERVED]
    if clash:
        raise ValueError(f"reserved metadata keys: {clash}")
    tensors: dict[str, Tensor] = {}
    new_residual: dict[str, Tensor] | None = (
        {} if spec.kind == "topk" and spec.error_feedback else None
    )
    for name in sorted(start):
        s64 = start[name].detach().cpu().double()
        x = s64 - end[name].detach().cpu().double()
        if residual is not None:
            x = x + residual[name].detach().cpu().double()
        if spec.kind == "none":
            sent = end[name] if residual is None else s64 - x
            tensors[f"w/{name}"] = sent.detach().cpu().to(torch.float32, copy=True).contiguous()
        elif spec.kind == "fp16":
            tensors[f"d/{name}"] = x.half()
        elif spec.kind == "int8":
            flat = x.reshape(-1)
            chunks = torch.nn.functional.pad(flat, (0, (-flat.numel()) % INT8_CHUNK))
            chunks = chunks.reshape(-1, INT8_CHUNK)
            scale = chunks.abs().amax(dim=1).float() if chunks.numel() else torch.zeros(0)
            codes = _quantize(chunks, scale.unsqueeze(1), 127).reshape(-1)[: flat.numel()]
            tensors[f"q/{name}"] = codes.to(torch.int8).reshape(x.shape)
            tensors[f"s/{name}"] = scale
        else:
            flat = x.reshape(-1)
            k = topk_count(spec.density, flat.numel())
            idx = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
            vals = flat[idx]
            if spec.bits == 32:
                v, got = vals.float(), vals.float().double()
            elif spec.bits == 16:
                v, got = vals.half(), vals.half().double()
            else:
                levels = _levels(spec.bits)
                scale = vals.abs().amax().float().reshape(1) if k else torch.zeros(1)
                codes = _quantize(vals, scale, levels)
                v, got = _pack(codes, spec.bits), _scaled(codes, scale, levels)
                tensors[f"s/{name}"] = scale
            tensors[f"i/{name}"] = idx.to(torch.int32)
            tensors[f"v/{name}"] = v
            if new_residual is not None:
                rest = flat.clone()
                rest[idx] -= got
                new_residual[name] = rest.reshape(x.shape).float()
    header = {
        "format": FORMAT,
        "codec": spec.kind,
        "density": repr(spec.density),
        "bits": str(spec.bits),
        **(meta or {}),
    }
    data = safetensors.torch.save(tensors, metadata=header)
    return Encoded(data=data, residual=new_residual, num_bytes=len(data), codec=spec.kind)


def default_max_bytes(reference: dict[str, Tensor]) -> int:
    """The largest file any codec makes for ``reference``: topk at density 1 and 32 bits."""
    numel = sum(t.numel() for t in reference.values())
    return 8 * numel + _HEADER_SLACK + 512 * len(reference)


def _header(data: bytes, max_bytes: int) -> dict[str, Any]:
    if len(data) > max_bytes:
        raise PseudoGradError(f"file of {len(data)} bytes exceeds the limit of {max_bytes}")
    if len(data) < 8:
        raise PseudoGradError("truncated: no header length")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise PseudoGradError("truncated: header longer than the file")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise PseudoGradError("duplicate names in the header")
        return dict(pairs)

    try:
        header = json.loads(data[8 : 8 + size], object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError) as e:  # also a 5000-digit number, deep nesting
        raise PseudoGradError(f"header is not JSON: {str(e)[:200]}") from None
    if not isinstance(header, dict):
        raise PseudoGradError("header is not a JSON object")
    return header


def _spec_of(meta: Any) -> CompressionSpec:
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise PseudoGradError("metadata missing or not all strings")
    if meta.get("format") != FORMAT:
        raise PseudoGradError(f"format {meta.get('format')!r} is not {FORMAT!r}")
    try:
        density = float(meta["density"])
        spec = CompressionSpec(kind=meta["codec"], density=density, bits=int(meta["bits"]))
    except (KeyError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        raise PseudoGradError(f"bad codec metadata: {str(e).splitlines()[0]}") from None
    if not math.isfinite(density):
        raise PseudoGradError("bad codec metadata: density not finite")
    return spec


def _expected(
    spec: CompressionSpec, reference: dict[str, Tensor]
) -> dict[str, tuple[str, list[int]]]:
    """Tensor name -> (safetensors dtype, shape) the file must hold, from the reference only."""
    out: dict[str, tuple[str, list[int]]] = {}
    for name, ref in reference.items():
        shape, n = list(ref.shape), ref.numel()
        if spec.kind == "none":
            out[f"w/{name}"] = ("F32", shape)
        elif spec.kind == "fp16":
            out[f"d/{name}"] = ("F16", shape)
        elif spec.kind == "int8":
            out[f"q/{name}"] = ("I8", shape)
            out[f"s/{name}"] = ("F32", [math.ceil(n / INT8_CHUNK)])
        else:
            k = topk_count(spec.density, n)
            out[f"i/{name}"] = ("I32", [k])
            if spec.bits == 32:
                out[f"v/{name}"] = ("F32", [k])
            elif spec.bits == 16:
                out[f"v/{name}"] = ("F16", [k])
            else:
                out[f"v/{name}"] = ("U8", [math.ceil(k * spec.bits / 8)])
                out[f"s/{name}"] = ("F32", [1])
    return out


def _check_scale(name: str, scale: Tensor) -> None:
    if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise PseudoGradError(f"scale of {name} not finite and >= 0")


def decode(data: bytes, reference: dict[str, Tensor], max_bytes: int | None = None) -> Decoded:
    """The float64 pseudo-gradient in ``data``, checked against ``reference`` (start weights)."""
    header = _header(data, default_max_bytes(reference) if max_bytes is None else max_bytes)
    meta = header.pop("__metadata__", None)
    spec = _spec_of(meta)
    expected = _expected(spec, reference)
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    if missing or extra:
        raise PseudoGradError(f"tensor names differ: missing {missing[:3]}, extra {extra[:3]}")
    for key, (dtype, shape) in expected.items():
        entry = header[key]
        if not isinstance(entry, dict) or entry.get("dtype") != dtype:
            raise PseudoGradError(f"{key}: dtype is not {dtype}")
        if entry.get("shape") != shape:
            raise PseudoGradError(f"{key}: shape {entry.get('shape')} is not {shape}")
    try:
        t = safetensors.torch.load(data)
    except Exception as e:  # the Rust parser's own error type is not importable stably
        raise PseudoGradError(f"unreadable safetensors: {e}") from None
    delta: dict[str, Tensor] = {}
    for name, ref in reference.items():
        if spec.kind == "none":
            delta[name] = ref.detach().cpu().double() - t[f"w/{name}"].double()
        elif spec.kind == "fp16":
            delta[name] = t[f"d/{name}"].double()
        elif spec.kind == "int8":
            delta[name] = _decode_int8(name, t[f"q/{name}"], t[f"s/{name}"])
        else:
            delta[name] = _decode_topk(name, ref, spec, t)
    return Decoded(delta=delta, codec=spec.kind, meta=dict(meta))


def _decode_int8(name: str, q: Tensor, scale: Tensor) -> Tensor:
    _check_scale(name, scale)
    if bool((q == -128).any()):
        raise PseudoGradError(f"{name}: int8 code -128 out of range")
    flat = q.reshape(-1)
    rows = torch.arange(flat.numel()) // INT8_CHUNK
    return _scaled(flat, scale[rows], 127).reshape(q.shape)


def _decode_topk(name: str, ref: Tensor, spec: CompressionSpec, t: dict[str, Tensor]) -> Tensor:
    idx = t[f"i/{name}"].to(torch.int64)
    n, k = ref.numel(), idx.numel()
    if k and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise PseudoGradError(f"{name}: index out of range")
    if torch.unique(idx).numel() != k:
        raise PseudoGradError(f"{name}: duplicate indices")
    v = t[f"v/{name}"]
    if spec.bits >= 16:
        vals = v.double()
    else:
        scale = t[f"s/{name}"]
        _check_scale(name, scale)
        levels = _levels(spec.bits)
        u = _unpack(v, spec.bits, k)
        if bool((u > 2 * levels).any()):
            raise PseudoGradError(f"{name}: quantized code out of range")
        vals = _scaled(u - levels, scale, levels)
    out = torch.zeros(n, dtype=torch.float64)
    out[idx] = vals
    return out.reshape(ref.shape)


def global_norm(delta: dict[str, Tensor]) -> float:
    """L2 norm of all tensors together, in float64."""
    return math.sqrt(sum(float(t.double().square().sum()) for t in delta.values()))


def all_finite(delta: dict[str, Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in delta.values())


def num_bytes_for(spec: CompressionSpec, num_params: int) -> int:
    """Payload bytes of ``num_params`` entries under ``spec`` (the module doc's byte model)."""
    if spec.kind == "none":
        return 4 * num_params
    if spec.kind == "fp16":
        return 2 * num_params
    if spec.kind == "int8":
        return num_params + 4 * math.ceil(num_params / INT8_CHUNK)
    k = topk_count(spec.density, num_params)
    return 4 * k + math.ceil(k * spec.bits / 8) + (4 if spec.bits < 16 else 0)


def codec_for_link(
    spec: CompressionSpec,
    num_params: int,
    max_mbps: float,
    compute_s: float,
    budget_fraction: float = 0.1,
) -> CompressionSpec:
    """The densest codec whose bytes cross ``max_mbps`` in ``budget_fraction * compute_s``.

    Candidates: the run's own ``spec``, then the ladder none > fp16 > int8 > topk(10%, 8b) >
    topk(1%, 4b) > topk(1%, 2b) restricted to rungs smaller than ``spec`` under
    :func:`num_bytes_for` (never denser than the run asks). Megabits are 10**6 bits. When
    none fits, the sparsest candidate. Ladder rungs keep ``spec.error_feedback``.
    """
    budget_bytes = max(0.0, max_mbps) * 1e6 / 8 * budget_fraction * max(0.0, compute_s)
    own = num_bytes_for(spec, num_params)
    candidates = [spec] + [
        r.model_copy(update={"error_feedback": spec.error_feedback})
        for r in _LADDER
        if num_bytes_for(r, num_params) < own
    ]
    for c in candidates:
        if num_bytes_for(c, num_params) <= budget_bytes:
            if c is not spec:
                log.info("link %.3g Mbit/s: pseudo-gradient codec %s", max_mbps, _label(c))
            return c
    return candidates[-1]


def _label(spec: CompressionSpec) -> str:
    if spec.kind != "topk":
        return spec.kind
    return f"topk(density={spec.density:g}, bits={spec.bits})"
