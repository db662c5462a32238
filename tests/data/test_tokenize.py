"""The byte tokenizer round-trips, dtypes follow the vocabulary, and the registry finds names."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trainfleet.data.tokenize import (
    SEPARATOR,
    ByteTokenizer,
    Tokenizer,
    get_tokenizer,
    register_tokenizer,
    token_dtype,
)


@given(st.binary(max_size=2000))
def test_bytes_round_trip_one_token_per_byte(text: bytes) -> None:
    tokenizer = ByteTokenizer()
    tokens = tokenizer.encode(text)
    assert tokens.dtype == np.uint8
    assert tokens.shape == (len(text),)
    assert tokens.tolist() == list(text)
    assert tokenizer.decode(tokens) == text


def test_encode_is_a_view_of_the_bytes() -> None:
    text = b"hello world"
    tokens = ByteTokenizer().encode(text)
    assert not tokens.flags.owndata
    assert not tokens.flags.writeable


def test_decode_accepts_wider_ids_below_256_and_refuses_larger() -> None:
    tokenizer = ByteTokenizer()
    assert tokenizer.decode(np.array([104, 105], dtype=np.uint16)) == b"hi"
    with pytest.raises(ValueError, match="256"):
        tokenizer.decode(np.array([104, 300], dtype=np.uint16))


@given(st.integers(min_value=1, max_value=2**32))
def test_token_dtype_is_the_narrowest_that_holds_every_id(vocab_size: int) -> None:
    dtype = token_dtype(vocab_size)
    assert np.iinfo(dtype).max >= vocab_size - 1
    narrower = {np.dtype(np.uint16): np.uint8, np.dtype(np.uint32): np.uint16}.get(dtype)
    if narrower is not None:
        assert np.iinfo(narrower).max < vocab_size - 1


def test_token_dtype_boundaries() -> None:
    assert token_dtype(256) == np.uint8
    assert token_dtype(257) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_bytes_is_registered_and_shared() -> None:
    tokenizer = get_tokenizer("bytes")
    assert isinstance(tokenizer, ByteTokenizer)
    assert (tokenizer.name, tokenizer.vocab_size) == ("bytes", 256)
    assert get_tokenizer("bytes") is tokenizer
    assert tokenizer.decode(tokenizer.encode(SEPARATOR)) == b"\n\n"


class _PairTokenizer:
    """A toy 'BPE': two bytes per token, vocabulary 65536."""

    name = "pairs"
    vocab_size = 65536

    def encode(self, text: bytes) -> np.ndarray:
        padded = text + b"\0" * (len(text) % 2)
        return np.frombuffer(padded, dtype="<u2").astype(token_dtype(self.vocab_size))

    def decode(self, tokens: np.ndarray) -> bytes:
        return tokens.astype("<u2").tobytes()


def test_a_registered_factory_is_found_by_name_and_made_once() -> None:
    made: list[Tokenizer] = []

    def factory() -> Tokenizer:
        made.append(_PairTokenizer())
        return made[-1]

    register_tokenizer("test-pairs", factory)
    tokenizer = get_tokenizer("test-pairs")
    assert get_tokenizer("test-pairs") is tokenizer
    assert made == [tokenizer]
    tokens = tokenizer.encode(b"abcd")
    assert tokens.dtype == np.uint16
    assert tokenizer.decode(tokens) == b"abcd"


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"'nope'.*bytes"):
        get_tokenizer("nope")
