"""Small deterministic text corpora for the built-in trainer, split by a stable document hash.

A corpus is a sequence of documents (an id and its bytes) in a fixed order:

- ``stdlib``: this Python's own standard library ``.py`` sources, one document per file, id =
  path relative to the stdlib directory (POSIX form), sorted by that path. Directories named
  ``site-packages``, ``test``, ``tests``, ``idlelib`` and ``__pycache__`` are skipped.
- ``synthetic``: seeded text from a word-level Markov chain over a fixed small vocabulary,
  documents ``synthetic/000000``, ``synthetic/000001``, ... in that order.

Split. A document is held out when the first 8 hex digits of ``sha256(id)``, read as a
fraction of 2**32, fall below ``heldout_fraction``. This depends on the id alone: a document
keeps its side whatever the seed, the file order or ``max_bytes``.

Size. ``max_bytes`` caps document content (separators not counted) and is shared between the
sides by budget: held-out gets ``ceil(max_bytes * heldout_fraction)`` bytes, train the rest.
Non-empty documents are taken in corpus order, each onto its side, until its budget is full;
the document that fills a budget is cut short to fit it. Budgeting per side keeps the held-out
share near ``heldout_fraction`` even when the first files in path order are few and large.
Growing ``max_bytes`` only appends to each side. Both sides must be non-empty: if the documents
run out with one side empty, the document nearest the boundary by hash (lowest hash for an
empty held-out side, highest for an empty train side) moves over. Each side is its documents,
in corpus order, joined by ``SEPARATOR``.

Determinism contract: ``load_corpus`` is a pure function of its arguments plus, for
``stdlib``, the Python installation it reads: pin the Python version and the file list (both
recorded in ``Corpus.info``: ``python_version``, ``file_list_sha256``) to get the same bytes;
``content_sha256`` is the final check. ``synthetic`` depends only on its arguments, ``seed``
included (``random.Random`` is stable across CPython 3 releases).
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

SEPARATOR = b"\n\n"
EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idlelib", "__pycache__"})

# The synthetic corpus: a fixed vocabulary; the seed picks the chain's transitions and the text.
_WORDS = (
    "the a one every some model worker job queue shard step loss batch token byte data "
    "coordinator fleet machine replica gradient weight layer head attention window corpus "
    "trains sends claims runs reports uploads reads writes waits fails retries joins leaves "
    "learns averages checks stores splits quickly slowly again often never always before "
    "after while because and but then so with from into over under"
)
_VOCABULARY = tuple(_WORDS.split())
_SUCCESSOR_WEIGHTS = (8, 4, 2, 1, 1, 1)  # the first successor of a word is the likeliest


@dataclass(frozen=True)
class Corpus:
    """A corpus split into training and held-out bytes, with a JSON-able ``info`` record."""

    train: bytes
    heldout: bytes
    info: dict[str, Any]


def doc_hash_fraction(doc_id: str) -> float:
    """The stable position of a document in [0, 1): its sha256's first 8 hex digits / 2**32."""
    return int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) / 2**32


def is_heldout(doc_id: str, heldout_fraction: float) -> bool:
    """Whether a document is held out (before the non-empty fix-up, see the module doc)."""
    return doc_hash_fraction(doc_id) < heldout_fraction


def stdlib_files(root: Path) -> list[str]:
    """Relative POSIX paths of the ``.py`` files under ``root``, exclusions applied, sorted."""
    paths: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        rel_dir = Path(dirpath).relative_to(root)
        paths.extend((rel_dir / f).as_posix() for f in filenames if f.endswith(".py"))
    return sorted(paths)


def stdlib_documents(root: Path) -> Iterator[tuple[str, bytes]]:
    """The ``stdlib`` corpus's documents, (relative path, bytes), in path order."""
    for rel in stdlib_files(root):
        yield rel, (root / rel).read_bytes()


def synthetic_documents(seed: int) -> Iterator[tuple[str, bytes]]:
    """The ``synthetic`` corpus's documents, (``synthetic/NNNNNN``, bytes), without end."""
    rng = random.Random(seed)
    successors = {w: rng.sample(_VOCABULARY, len(_SUCCESSOR_WEIGHTS)) for w in _VOCABULARY}
    index = 0
    while True:
        sentences = []
        for _ in range(rng.randint(3, 20)):
            word = rng.choice(_VOCABULARY)
            words = [word.capitalize()]
            for _ in range(rng.randint(4, 14)):
                word = rng.choices(successors[word], weights=_SUCCESSOR_WEIGHTS)[0]
                words.append(word)
            sentences.append(" ".join(words) + ".")
        yield f"synthetic/{index:06d}", (" ".join(sentences) + "\n").encode()
        index += 1


def take_documents(
    documents: Iterator[tuple[str, bytes]], max_bytes: int, heldout_fraction: float
) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    """(train, held-out) documents in corpus order, each side filled to its budget."""
    heldout_budget = math.ceil(max_bytes * heldout_fraction)
    budgets = {False: max_bytes - heldout_budget, True: heldout_budget}
    sides: dict[bool, list[tuple[str, bytes]]] = {False: [], True: []}
    for doc_id, content in documents:
        side = is_heldout(doc_id, heldout_fraction)
        if content and budgets[side] > 0:
            sides[side].append((doc_id, content[: budgets[side]]))
            budgets[side] -= len(sides[side][-1][1])
        if budgets[False] <= 0 and budgets[True] <= 0:
            break
    train, heldout = sides[False], sides[True]
    if len(train) + len(heldout) < 2:
        raise ValueError(f"need at least 2 documents to split, got {len(train) + len(heldout)}")
    if not heldout:
        moved = min(train, key=lambda doc: (doc_hash_fraction(doc[0]), doc[0]))
        train.remove(moved)
        heldout.append(moved)
    elif not train:
        moved = max(heldout, key=lambda doc: (doc_hash_fraction(doc[0]), doc[0]))
        heldout.remove(moved)
        train.append(moved)
    return train, heldout


def load_corpus(
    name: Literal["stdlib", "synthetic"], max_bytes: int, heldout_fraction: float, seed: int
) -> Corpus:
    """Load corpus ``name`` capped at ``max_bytes`` and split it; only synthetic uses ``seed``."""
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    info: dict[str, Any] = {"name": name, "python_version": sys.version.split()[0]}
    if name == "stdlib":
        documents = stdlib_documents(Path(sysconfig.get_paths()["stdlib"]))
    elif name == "synthetic":
        documents = synthetic_documents(seed)
        info["seed"] = seed
    else:
        raise ValueError(f"unknown corpus {name!r}; expected 'stdlib' or 'synthetic'")

    train_docs, heldout_docs = take_documents(documents, max_bytes, heldout_fraction)
    if name == "stdlib":
        file_list = "\n".join(sorted(doc_id for doc_id, _ in train_docs + heldout_docs))
        info["file_list_sha256"] = hashlib.sha256(file_list.encode()).hexdigest()
    train = SEPARATOR.join(content for _, content in train_docs)
    heldout = SEPARATOR.join(content for _, content in heldout_docs)
    info.update(
        num_documents=len(train_docs) + len(heldout_docs),
        num_train_documents=len(train_docs),
        num_heldout_documents=len(heldout_docs),
        content_sha256=hashlib.sha256(train + b"\0" + heldout).hexdigest(),
        train_bytes=len(train),
        heldout_bytes=len(heldout),
    )
    return Corpus(train=train, heldout=heldout, info=info)
