"""SampleRef signing and the safetensors encoding of samples."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest
import safetensors.torch
import torch
from featurekit import SECRET, resign, same, sample

from trainfleet.errors import BadRef
from trainfleet.features import SampleRef, decode_tensors, encode_tensors, sign_ref, verify_ref

FIELDS: dict[str, Any] = {
    "store": "dir:/dev/shm/x",
    "pipeline": "p" * 64,
    "sample_id": "00000007",
    "key": "00000007",
    "generation": 3,
    "digest": "a" * 64,
    "size": 123,
}


def many_dtypes() -> dict[str, torch.Tensor]:
    out = sample()
    for dtype in (torch.float16, torch.int8, torch.int16, torch.uint8, torch.float64):
        out[str(dtype)] = torch.arange(-3, 9).to(dtype).reshape(3, 4)
    out["scalar_bool"] = torch.tensor(True)
    out["empty3"] = torch.zeros(2, 0, 3)
    return out


def test_sign_and_verify() -> None:
    ref = sign_ref(**FIELDS, secret=SECRET)
    verify_ref(ref, SECRET)
    with pytest.raises(BadRef):
        verify_ref(ref, b"another secret")
    for field, value in [("generation", 4), ("size", 124), ("store", "dir:/y"), ("key", "k")]:
        with pytest.raises(BadRef):
            verify_ref(ref.model_copy(update={field: value}), SECRET)
    again = SampleRef.model_validate_json(ref.model_dump_json())
    verify_ref(again, SECRET)
    assert resign(ref) == ref  # signing is deterministic


def test_refs_are_validated() -> None:
    good = sign_ref(**FIELDS, secret=SECRET).model_dump()
    for field, value in [
        ("sample_id", "a/b"),
        ("key", ""),
        ("key", "x" * 201),
        ("generation", 0),
        ("digest", "A" * 64),
        ("size", -1),
        ("mac", "00"),
    ]:
        with pytest.raises(pydantic.ValidationError):
            SampleRef.model_validate({**good, field: value})
    with pytest.raises(pydantic.ValidationError):
        SampleRef.model_validate({**good, "tensor_bytes": "..."})


def test_encoding_is_safetensors_and_round_trips_exactly() -> None:
    tensors = many_dtypes()
    data = encode_tensors(tensors)
    assert data == safetensors.torch.save(tensors)
    assert same(decode_tensors(data), tensors)
    assert same(decode_tensors(bytearray(data)), tensors)
    assert same(safetensors.torch.load(data), decode_tensors(bytearray(data)))


def test_decoding_a_bytearray_makes_views_of_it() -> None:
    buf = bytearray(encode_tensors({"x": torch.arange(16, dtype=torch.float32)}))
    x = decode_tensors(buf)["x"]
    x[0] = 42.0  # writable, and the buffer is its memory: no copy was made
    assert decode_tensors(buf)["x"][0] == 42.0


def test_encoding_accepts_non_contiguous_tensors() -> None:
    t = torch.arange(12.0).reshape(3, 4).t()
    assert torch.equal(decode_tensors(encode_tensors({"t": t}))["t"], t)


def test_decoding_refuses_garbage() -> None:
    with pytest.raises(ValueError):
        decode_tensors(bytearray(b"\x05"))
    with pytest.raises(ValueError):
        decode_tensors(bytearray((10**9).to_bytes(8, "little") + b"{}"))
    lying = b'{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,64]}}'
    with pytest.raises(ValueError):
        decode_tensors(bytearray(len(lying).to_bytes(8, "little") + lying + bytes(16)))


def test_rarer_dtypes_go_through_safetensors() -> None:
    tensors = {
        "f8": torch.arange(6.0).to(torch.float8_e4m3fn),
        "u16": torch.arange(5).to(torch.uint16),
        "f32": torch.ones(2),
    }
    data = encode_tensors(tensors)
    assert data == safetensors.torch.save(tensors)
    back = decode_tensors(bytearray(data))
    assert {k: t.dtype for k, t in back.items()} == {k: t.dtype for k, t in tensors.items()}
    assert all(torch.equal(back[k].view(torch.uint8), tensors[k].view(torch.uint8)) for k in back)
