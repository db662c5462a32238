"""The built-in corpora as dataset specs: ``hyper.corpus`` is shorthand for one of them.

A ``gpt`` train job without a ``dataset`` trains on the spec ``builtin_dataset(params)``
builds from its ``hyper`` keys, through the same path as any dataset job (plan, shard cache,
``ShardFeed``), so there is one split rule (``corpus.is_heldout``), one synthetic generator
(``dialects``) and one feed. The mapping:

- ``corpus = "stdlib"``: a ``StdlibDataset`` whose ``files`` are whole ``.py`` files of this
  Python's standard library, chosen so that ``corpus_bytes`` caps their total size and the
  held-out share follows ``heldout_fraction``. Each side (train, held-out, by the stable hash
  of the file's path) has a budget, ``ceil(corpus_bytes * heldout_fraction)`` bytes for
  held-out and the rest for train; files are taken in path order, each onto its side when it
  fits in what is left of that side's budget, and skipped otherwise (so are empty files).
  Budgeting per side keeps the held-out share near the fraction even when the first files in
  path order are few and large. ``python_version`` is pinned to this Python's, so the spec's
  digest changes with the Python that produced the files.
- ``corpus = "synthetic"``: a ``SyntheticDataset`` (the seeded Markov-dialect mixture, whose
  loss floor is known exactly) with ``seed = params.seed`` (modulo 2**63, the spec's range),
  ``doc_tokens = min(1024, corpus_bytes // 64)`` and ``num_documents = corpus_bytes //
  doc_tokens``: about ``corpus_bytes`` bytes in expectation (lengths vary by +-50%), and at
  least 64 documents, so that a small cap still holds some out.

Both keep the spec defaults otherwise (byte tokenizer, shard size, no router) and take
``heldout_fraction`` as the spec's. The spec is a pure function of the params and, for
``stdlib``, of the Python installation it reads.
"""

from __future__ import annotations

import math
import platform
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING

from trainfleet.data.corpus import is_heldout, stdlib_files
from trainfleet.data.spec import MAX_SEED, StdlibDataset, SyntheticDataset
from trainfleet.errors import CorpusTooSmall

if TYPE_CHECKING:
    from trainfleet.train.recipes import GPTParams

SYNTHETIC_DOC_TOKENS = 1024  # the longest mean document length of a built-in synthetic spec
SYNTHETIC_MIN_DOCUMENTS = 64


def stdlib_selection(root: Path, max_bytes: int, heldout_fraction: float) -> list[str]:
    """The files (relative paths, path order) of ``root`` that the per-side budgets take."""
    heldout_budget = math.ceil(max_bytes * heldout_fraction)
    budgets = {False: max_bytes - heldout_budget, True: heldout_budget}
    chosen: list[str] = []
    for rel in stdlib_files(root):
        side = is_heldout(rel, heldout_fraction)
        size = (root / rel).stat().st_size
        if 0 < size <= budgets[side]:
            chosen.append(rel)
            budgets[side] -= size
    return chosen


def builtin_dataset(params: GPTParams) -> StdlibDataset | SyntheticDataset:
    """The dataset spec ``params.corpus`` names, sized by ``corpus_bytes`` (see module doc)."""
    if params.corpus == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = stdlib_selection(root, params.corpus_bytes, params.heldout_fraction)
        if not files:  # an empty list would mean every file
            raise CorpusTooSmall(f"no stdlib file under {root} fits in {params.corpus_bytes} bytes")
        return StdlibDataset(
            name="stdlib",
            source="stdlib",
            heldout_fraction=params.heldout_fraction,
            python_version=platform.python_version(),
            files=files,
        )
    doc_tokens = min(SYNTHETIC_DOC_TOKENS, params.corpus_bytes // SYNTHETIC_MIN_DOCUMENTS)
    return SyntheticDataset(
        name="synthetic",
        source="synthetic",
        heldout_fraction=params.heldout_fraction,
        seed=params.seed % (MAX_SEED + 1),
        num_documents=params.corpus_bytes // doc_tokens,
        doc_tokens=doc_tokens,
    )
