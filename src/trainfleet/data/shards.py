"""Shard plans: which documents form which shard, and each shard's content hash.

A dataset's documents (corpus order, see ``sources``) are split by a stable document hash into
``train`` and ``heldout``, routed (when the spec has a router) to a path, and grouped, in
corpus order, into the shards of their (split, path): a shard closes at the first document
that brings it to ``shard_tokens`` tokens or more, so a shard always ends at a document and
every document is in exactly one shard.

A shard's content is its documents' tokens, each document followed by the tokenized
``SEPARATOR``, as little-endian integers of the tokenizer's dtype; its ``sha256`` is taken over
exactly those bytes. Planning streams: it holds one running hash per open shard, never shard
contents, so its memory does not grow with the corpus. Rebuilding a shard
(``materialize_shard``) reads only its own documents and checks the hash, so an evicted shard
comes back byte-identical or not at all.

Determinism contract: the plan and every shard are a pure function of the dataset spec (and
of the router, itself a pure function of the spec). What each source needs pinned for that to
hold is written in ``sources`` and in the README.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from trainfleet.data.corpus import is_heldout
from trainfleet.data.router import Router
from trainfleet.data.sources import documents_at, iter_documents
from trainfleet.data.spec import DatasetSpec, dataset_digest
from trainfleet.data.tokenize import SEPARATOR, Tokenizer, get_tokenizer, token_dtype
from trainfleet.errors import ShardMismatch

Split = Literal["train", "heldout"]
SPLITS: tuple[Split, ...] = ("train", "heldout")


@dataclass(frozen=True)
class ShardInfo:
    """One shard: where its documents are in the corpus, its size and its content hash."""

    split: Split
    path: int
    index: int  # position among the shards of (split, path)
    doc_ranges: tuple[tuple[int, int], ...]  # [start, end) runs of corpus positions
    num_documents: int
    num_tokens: int
    sha256: str

    @property
    def key(self) -> str:
        """``split/path/index``: names the shard within its dataset."""
        return f"{self.split}/{self.path}/{self.index}"

    def doc_indices(self) -> list[int]:
        return [i for start, end in self.doc_ranges for i in range(start, end)]


@dataclass(frozen=True)
class TokenizedDocument:
    index: int
    doc_id: str
    split: Split
    tokens: np.ndarray


@dataclass(frozen=True)
class ShardPlan:
    """Every shard of a dataset under one router, and the totals."""

    dataset: str
    digest: str
    router_digest: str | None
    num_paths: int
    num_documents: int
    num_tokens: int
    shards: tuple[ShardInfo, ...]

    def select(self, split: Split, path: int | None = None) -> list[ShardInfo]:
        """The shards of ``split`` (and of ``path``, when given), in index order."""
        return [s for s in self.shards if s.split == split and (path is None or s.path == path)]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardPlan:
        shards = tuple(
            ShardInfo(**{**s, "doc_ranges": tuple(tuple(r) for r in s["doc_ranges"])})
            for s in data["shards"]
        )
        return cls(**{**data, "shards": shards})


def tokenized_documents(spec: DatasetSpec) -> Iterator[TokenizedDocument]:
    """Every document, tokenized and assigned to its split, in corpus order (streaming)."""
    tokenizer = get_tokenizer(spec.tokenizer)
    for doc in iter_documents(spec):
        split: Split = "heldout" if is_heldout(doc.doc_id, spec.heldout_fraction) else "train"
        yield TokenizedDocument(doc.index, doc.doc_id, split, tokenizer.encode(doc.text))


def training_tokens(spec: DatasetSpec) -> Iterator[np.ndarray]:
    """The training documents' tokens in corpus order: what a router is fit on."""
    return (doc.tokens for doc in tokenized_documents(spec) if doc.split == "train")


def _separator(tokenizer: Tokenizer) -> bytes:
    return _le(tokenizer.encode(SEPARATOR))


def _le(tokens: np.ndarray) -> bytes:
    return tokens.astype(tokens.dtype.newbyteorder("<"), copy=False).tobytes()


class _OpenShard:
    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.ranges: list[list[int]] = []
        self.num_documents = 0
        self.num_tokens = 0

    def add(self, index: int, content: bytes, separator: bytes, num_tokens: int) -> None:
        self.hash.update(content)
        self.hash.update(separator)
        if self.ranges and self.ranges[-1][1] == index:
            self.ranges[-1][1] = index + 1
        else:
            self.ranges.append([index, index + 1])
        self.num_documents += 1
        self.num_tokens += num_tokens

    def close(self, split: Split, path: int, index: int) -> ShardInfo:
        return ShardInfo(
            split=split,
            path=path,
            index=index,
            doc_ranges=tuple((start, end) for start, end in self.ranges),
            num_documents=self.num_documents,
            num_tokens=self.num_tokens,
            sha256=self.hash.hexdigest(),
        )


def plan_shards(
    spec: DatasetSpec, router: Router | None = None, *, deadline: float | None = None
) -> ShardPlan:
    """Stream the dataset once and plan its shards (per split and path), hashing each.

    ``deadline`` (a ``time.monotonic()`` value) bounds the pass: past it, ``TimeoutError``.
    """
    if (spec.router is None) != (router is None):
        raise ValueError("a routed dataset needs its router, and an unrouted one takes none")
    tokenizer = get_tokenizer(spec.tokenizer)
    separator = _separator(tokenizer)
    num_separator_tokens = len(tokenizer.encode(SEPARATOR))
    num_paths = spec.router.num_paths if spec.router is not None else 1
    open_shards: dict[tuple[Split, int], _OpenShard] = {}
    next_index: dict[tuple[Split, int], int] = {}
    shards: list[ShardInfo] = []
    num_documents = num_tokens = 0
    for doc in tokenized_documents(spec):
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"planning {spec.name!r} ran past its deadline")
        path = router.route(doc.index, doc.tokens) if router is not None else 0
        where = (doc.split, path)
        shard = open_shards.setdefault(where, _OpenShard())
        doc_tokens = len(doc.tokens) + num_separator_tokens
        shard.add(doc.index, _le(doc.tokens), separator, doc_tokens)
        num_documents += 1
        num_tokens += doc_tokens
        if shard.num_tokens >= spec.shard_tokens:
            shards.append(shard.close(doc.split, path, next_index.get(where, 0)))
            next_index[where] = next_index.get(where, 0) + 1
            del open_shards[where]
    for (split, path), shard in open_shards.items():
        shards.append(shard.close(split, path, next_index.get((split, path), 0)))
    shards.sort(key=lambda s: (SPLITS.index(s.split), s.path, s.index))
    return ShardPlan(
        dataset=spec.name,
        digest=dataset_digest(spec),
        router_digest=router.digest if router is not None else None,
        num_paths=num_paths,
        num_documents=num_documents,
        num_tokens=num_tokens,
        shards=tuple(shards),
    )


def materialize_shard(spec: DatasetSpec, shard: ShardInfo) -> bytes:
    """Rebuild one shard's bytes from the spec; ``ShardMismatch`` if its hash differs."""
    tokenizer = get_tokenizer(spec.tokenizer)
    separator = _separator(tokenizer)
    parts: list[bytes] = []
    for doc in documents_at(spec, shard.doc_indices()):
        parts.append(_le(tokenizer.encode(doc.text)))
        parts.append(separator)
    content = b"".join(parts)
    found = hashlib.sha256(content).hexdigest()
    if found != shard.sha256:
        raise ShardMismatch(
            f"shard {shard.key} of dataset {spec.name!r} rebuilt with sha256 {found}, "
            f"but the plan records {shard.sha256}: the source changed under the spec"
        )
    return content


def shard_tokens(spec: DatasetSpec, content: bytes) -> np.ndarray:
    """A shard's bytes as its token array (zero-copy, read-only)."""
    dtype = token_dtype(get_tokenizer(spec.tokenizer).vocab_size).newbyteorder("<")
    return np.frombuffer(content, dtype=dtype)


def write_json(file: Path, value: dict[str, Any]) -> None:
    """Write JSON atomically (a temporary file renamed over ``file``), making its directory."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(file)


def save_plan(plan: ShardPlan, file: Path) -> None:
    write_json(file, plan.to_json())


def load_plan(file: Path) -> ShardPlan | None:
    """A saved plan, or None if there is none (or it cannot be read)."""
    try:
        return ShardPlan.from_json(json.loads(file.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def shard_summary(shards: Sequence[ShardInfo]) -> list[dict[str, Any]]:
    """What a worker reports for the shards it trained on: key, tokens and content hash."""
    return [{"key": s.key, "num_tokens": s.num_tokens, "sha256": s.sha256} for s in shards]
