"""Dataset specs: everything a worker needs to rebuild a dataset's bytes, and nothing else.

A spec is a few hundred bytes of TOML (``[datasets.NAME]`` in a manifest). Workers receive the
spec, never the corpus, and materialize their shards locally. The ``source`` key picks the
kind:

- ``synthetic``: a seeded mixture of ``num_dialects`` Markov "dialects" over disjoint
  alphabets; its entropy rate, the loss floor of the task, is computed exactly.
- ``stdlib``: this Python's standard-library ``.py`` sources, pinned by version and file list.
- ``files``: local text / jsonl / parquet files matched by globs, pinned by a content hash.
- ``huggingface``: a Hugging Face hub dataset by name and pinned commit (needs network or a
  warm local cache, and ``pip install 'trainfleet[hf]'``).

Every spec also fixes the held-out fraction, the tokenizer, the shard size and, optionally, a
k-means ``router`` that sends each document to one of ``num_paths`` paths (DiPaCo, Douillard
et al. 2024). ``dataset_digest`` identifies the content a spec produces: the name is a label
and does not enter it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
MAX_SEED = 2**63 - 1  # seeds are packed into 8 bytes
PRINTABLE_SYMBOLS = 94  # printable ASCII without space: the synthetic dialects' alphabet pool


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RouterSpec(_Spec):
    """How to fit the k-means document router. Every field enters the router's digest."""

    num_paths: int = Field(ge=1, le=1024, description="paths (clusters) documents are routed to")
    num_features: int = Field(
        1024, ge=16, le=65536, description="hashed bag-of-tokens feature buckets"
    )
    feature_seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the feature hashing")
    sample_documents: int = Field(
        2048, ge=1, le=1_000_000, description="fit on the first N training documents"
    )
    max_iterations: int = Field(25, ge=1, le=1000, description="Lloyd iterations at most")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the k-means++ initialisation")


class _DatasetBase(_Spec):
    name: Name = Field(description="the dataset's name in the manifest ([datasets.NAME])")
    heldout_fraction: float = Field(
        0.1, gt=0, lt=0.5, description="share of documents held out, by stable document hash"
    )
    tokenizer: str = Field("bytes", description="tokenizer name; 'bytes' = one token per byte")
    shard_tokens: int = Field(
        262_144, ge=256, le=2**31, description="tokens per shard (a shard ends at a document)"
    )
    max_documents: int | None = Field(
        None, ge=2, description="use only the first N documents in corpus order"
    )
    router: RouterSpec | None = Field(None, description="k-means router over documents")


class SyntheticDataset(_DatasetBase):
    """A seeded mixture of Markov dialects with an exactly known entropy rate."""

    source: Literal["synthetic"]
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the dialects and of the text")
    num_dialects: int = Field(4, ge=1, le=47, description="k: distinct dialects in the mixture")
    num_documents: int = Field(2000, ge=2, le=100_000_000, description="documents in the corpus")
    doc_tokens: int = Field(
        1024, ge=16, le=1 << 20, description="mean document length (lengths vary by +-50%)"
    )
    alphabet_size: int = Field(
        16, ge=2, le=PRINTABLE_SYMBOLS, description="symbols of each dialect's own alphabet"
    )
    branching: int = Field(4, ge=1, description="successors each symbol may be followed by")

    @model_validator(mode="after")
    def _fits(self) -> SyntheticDataset:
        if self.num_dialects * self.alphabet_size > PRINTABLE_SYMBOLS:
            raise ValueError(
                f"num_dialects * alphabet_size = {self.num_dialects * self.alphabet_size} > "
                f"{PRINTABLE_SYMBOLS}: the dialects' alphabets must be disjoint printable bytes"
            )
        if self.branching > self.alphabet_size:
            raise ValueError(
                f"branching ({self.branching}) cannot exceed alphabet_size ({self.alphabet_size})"
            )
        return self


class StdlibDataset(_DatasetBase):
    """This Python's standard-library ``.py`` sources, one document per file."""

    source: Literal["stdlib"]
    python_version: str | None = Field(
        None, description="pin: refuse to materialize under another Python (e.g. '3.11.9')"
    )
    files: list[str] = Field(
        default_factory=list, description="relative paths to use; empty = every .py file"
    )
    files_sha256: Sha256 | None = Field(
        None, description="pin: sha256 of the sorted file list, one path per line"
    )


class FilesDataset(_DatasetBase):
    """Local files, one document per text file, jsonl line or parquet row."""

    source: Literal["files"]
    root: str = Field(description="directory the globs are relative to (same on every worker)")
    paths: list[str] = Field(min_length=1, description="glob patterns under root, e.g. '*.jsonl'")
    format: Literal["text", "jsonl", "parquet"] = Field("text", description="file format")
    text_field: str = Field("text", description="the text column of jsonl / parquet records")
    content_sha256: Sha256 | None = Field(
        None, description="pin: sha256 over the sorted (path, file sha256) list"
    )


class HuggingFaceDataset(_DatasetBase):
    """A Hugging Face hub dataset, pinned to a commit."""

    source: Literal["huggingface"]
    repo: str = Field(min_length=1, description="hub dataset name, e.g. 'roneneldan/TinyStories'")
    revision: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{40}$")] = Field(
        description="the dataset repo's commit sha (40 hex digits): a branch name moves"
    )
    config: str | None = Field(None, description="dataset configuration name, if any")
    split: str = Field("train", description="split to read")
    text_field: str = Field("text", description="the text column")


DatasetSpec = Annotated[
    SyntheticDataset | StdlibDataset | FilesDataset | HuggingFaceDataset,
    Field(discriminator="source"),
]
SOURCES = ("synthetic", "stdlib", "files", "huggingface")


def canonical(value: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no whitespace. Hashes are taken over these."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def content_fields(spec: BaseModel) -> dict[str, Any]:
    """The fields that decide a dataset's content (all but its name)."""
    return spec.model_dump(exclude={"name"})


def dataset_digest(spec: BaseModel) -> str:
    """sha256 of what the spec produces: same digest, same documents, shards and router."""
    return hashlib.sha256(canonical(content_fields(spec))).hexdigest()
