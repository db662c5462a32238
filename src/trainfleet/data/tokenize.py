"""The tokenizer seam: bytes by default, any other tokenizer (BPE) by registering a factory.

A dataset spec names its tokenizer (``tokenizer = "bytes"``); shard materialization looks it
up here with ``get_tokenizer`` and calls ``encode`` once per document, then appends the
encoded ``SEPARATOR``. The default, ``ByteTokenizer``, is one token per byte: vocabulary 256,
``uint8`` tokens, and ``encode`` is a zero-copy view of the document's bytes.

Plugging in a BPE tokenizer (e.g. a trained ``tiktoken`` or ``tokenizers`` model):

1. Wrap it in a class with ``name``, ``vocab_size``, ``encode`` and ``decode`` as in
   ``Tokenizer``. ``encode`` must return a 1-D array of ``token_dtype(vocab_size)`` and must
   be a pure function of the bytes (same bytes, same tokens, on every worker), so pin the
   library version and the merges file.
2. Call ``register_tokenizer("my-bpe", factory)`` at import time of the module that defines
   it; the factory runs once, on first use, so loading the merges file is lazy.
3. Name it in the spec, ``tokenizer = "my-bpe"``. Its ``vocab_size`` sizes the model's
   embedding and output layers, and ``token_dtype`` the shards' token arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

SEPARATOR = b"\n\n"  # placed after every document in a shard


class Tokenizer(Protocol):
    """Turns a document's bytes into token ids and back."""

    name: str
    vocab_size: int

    def encode(self, text: bytes) -> np.ndarray:
        """The tokens of ``text``: 1-D, dtype ``token_dtype(vocab_size)``."""
        ...

    def decode(self, tokens: np.ndarray) -> bytes:
        """The bytes that ``tokens`` encode; ``decode(encode(b)) == b``."""
        ...


def token_dtype(vocab_size: int) -> np.dtype[np.unsignedinteger]:
    """The narrowest unsigned dtype holding ids below ``vocab_size``: uint8, uint16 or uint32."""
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


class ByteTokenizer:
    """One token per byte: vocabulary 256, ``uint8`` tokens."""

    name: str = "bytes"
    vocab_size: int = 256

    def encode(self, text: bytes) -> np.ndarray:
        """A read-only ``uint8`` view of ``text`` (no copy)."""
        return np.frombuffer(text, dtype=np.uint8)

    def decode(self, tokens: np.ndarray) -> bytes:
        """The bytes of ``tokens``; ids of a wider dtype must still be below 256."""
        if tokens.dtype != np.uint8 and tokens.size and int(tokens.max()) > 255:
            raise ValueError(f"byte tokens must be < 256, got {int(tokens.max())}")
        return tokens.astype(np.uint8, copy=False).tobytes()


_FACTORIES: dict[str, Callable[[], Tokenizer]] = {"bytes": ByteTokenizer}
_INSTANCES: dict[str, Tokenizer] = {}


def register_tokenizer(name: str, factory: Callable[[], Tokenizer]) -> None:
    """Make ``factory`` the maker of tokenizer ``name`` (replacing any earlier one)."""
    _FACTORIES[name] = factory
    _INSTANCES.pop(name, None)


def get_tokenizer(name: str) -> Tokenizer:
    """The tokenizer registered as ``name``, made on first use and then shared."""
    if name not in _INSTANCES:
        if name not in _FACTORIES:
            known = ", ".join(sorted(_FACTORIES))
            raise ValueError(f"unknown tokenizer {name!r}; known tokenizers: {known}")
        _INSTANCES[name] = _FACTORIES[name]()
    return _INSTANCES[name]
