"""What the built-in ``stdlib`` corpus is made of, and the stable rule that splits documents.

Split. A document is held out when the first 8 hex digits of ``sha256(id)``, read as a
fraction of 2**32, fall below the spec's ``heldout_fraction``. This depends on the id alone: a
document keeps its side whatever the seed, the document order or the corpus size. Every
dataset is split this way (``shards.plan_shards``), the built-in ones included (``builtin``).

Files. The ``stdlib`` source is this Python's own standard library ``.py`` files, id = path
relative to the stdlib directory (POSIX form), sorted by that path. Directories named
``site-packages``, ``test``, ``tests``, ``idlelib`` and ``__pycache__`` are skipped.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idlelib", "__pycache__"})


def doc_hash_fraction(doc_id: str) -> float:
    """The stable position of a document in [0, 1): its sha256's first 8 hex digits / 2**32."""
    return int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) / 2**32


def is_heldout(doc_id: str, heldout_fraction: float) -> bool:
    """Whether a document is held out: its stable position is below ``heldout_fraction``."""
    return doc_hash_fraction(doc_id) < heldout_fraction


def stdlib_files(root: Path) -> list[str]:
    """Relative POSIX paths of the ``.py`` files under ``root``, exclusions applied, sorted."""
    paths: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        rel_dir = Path(dirpath).relative_to(root)
        paths.extend((rel_dir / f).as_posix() for f in filenames if f.endswith(".py"))
    return sorted(paths)
