"""Documents in corpus order, rebuilt from any dataset spec, with its pins checked first.

A worker holds a spec, never the corpus: this module turns each ``source`` kind into the same
stream of ``Document`` (index in corpus order, a stable id, the text's bytes), one document
at a time, so a corpus never has to fit in memory. ``max_documents`` keeps the first N.

- ``synthetic``: generated (see ``dialects``); id ``synthetic/NNNNNNNN``. Any document can be
  made directly, so ``documents_at`` generates only the ones asked for.
- ``stdlib``: this Python's standard-library ``.py`` files (``corpus.stdlib_files``), or the
  spec's ``files`` list, sorted by relative POSIX path, which is the id. Pins:
  ``python_version`` against ``platform.python_version()`` and ``files_sha256`` =
  sha256 of the sorted paths joined by newlines.
- ``files``: the sorted union of the glob ``paths`` under ``root`` (user-expanded; a relative
  root is relative to the current directory). ``text``: one document per file, id = path;
  ``jsonl``: one per non-blank line, id ``path:LINE`` (1-based); ``parquet``: one per row,
  id ``path:ROW`` (0-based), read one record batch at a time. Pin: ``content_sha256`` = sha256
  over the sorted lines ``f"{path}\\t{sha256 of the file}\\n"``.
- ``huggingface``: ``datasets.load_dataset(..., revision=)``, not streaming: it downloads
  once into the local cache, so a warm cache works offline with ``HF_HUB_OFFLINE=1``; id
  ``REPO@REV12/SPLIT/ROW``. The revision is the pin.

``iter_documents`` checks the pins before it returns, so a mismatch is reported before any
work is done; ``check_source`` checks them too and returns the facts that
``trainfleet data inspect`` shows.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import platform
import sysconfig
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainfleet.data.corpus import stdlib_files
from trainfleet.data.dialects import (
    documents_per_batch,
    entropy_rates_nats,
    generate_documents,
    loss_floor_nats,
    make_dialects,
)
from trainfleet.data.spec import (
    DatasetSpec,
    FilesDataset,
    HuggingFaceDataset,
    StdlibDataset,
    SyntheticDataset,
)
from trainfleet.errors import DataError, SourceMismatch, SourceUnavailable

Texts = Iterable[tuple[str, bytes]]  # (doc_id, text) in corpus order
_HF_MODULES = frozenset({"datasets", "huggingface_hub", "requests", "urllib3", "fsspec"})


@dataclass(frozen=True)
class Document:
    """One document: its position in corpus order (before any split), id and bytes."""

    index: int
    doc_id: str
    text: bytes


def _num_synthetic(spec: SyntheticDataset) -> int:
    return min(spec.num_documents, spec.max_documents or spec.num_documents)


def _synthetic(spec: SyntheticDataset, indices: Sequence[int]) -> Iterator[Document]:
    batch = documents_per_batch(spec)
    for begin in range(0, len(indices), batch):
        chunk = indices[begin : begin + batch]
        for index, text in zip(chunk, generate_documents(spec, chunk), strict=True):
            yield Document(index, f"synthetic/{index:08d}", text)


def _open_stdlib(spec: StdlibDataset) -> tuple[dict[str, Any], Texts]:
    found_version = platform.python_version()
    if spec.python_version is not None and spec.python_version != found_version:
        raise SourceMismatch(
            f"stdlib: pinned python_version {spec.python_version}, found {found_version}"
        )
    root = Path(sysconfig.get_paths()["stdlib"])
    if spec.files:
        paths = sorted(set(spec.files))
        missing = [path for path in paths if not (root / path).is_file()]
        if missing:
            raise SourceMismatch(f"stdlib: pinned files missing under {root}: {', '.join(missing)}")
    else:
        paths = stdlib_files(root)
    files_sha256 = hashlib.sha256("\n".join(paths).encode()).hexdigest()
    if spec.files_sha256 is not None and spec.files_sha256 != files_sha256:
        raise SourceMismatch(
            f"stdlib: pinned files_sha256 {spec.files_sha256}, found {files_sha256} "
            f"({len(paths)} files under {root})"
        )
    facts = {"python_version": found_version, "files_sha256": files_sha256}
    return {**facts, "num_files": len(paths)}, _text_files(root, paths)


def _match_files(spec: FilesDataset) -> tuple[Path, list[str]]:
    root = Path(spec.root).expanduser()
    where = f"files: root {root} with patterns {', '.join(spec.paths)}"
    if not root.is_dir():
        raise SourceUnavailable(f"{where}: the root is not a directory here")
    matched: set[str] = set()
    for pattern in spec.paths:
        try:
            found = [p for p in root.glob(pattern) if p.is_file()]
        except (NotImplementedError, ValueError) as exc:
            raise DataError(f"{where}: bad pattern {pattern!r}: {exc}") from exc
        matched.update(p.relative_to(root).as_posix() for p in found)
    if not matched:
        raise SourceUnavailable(f"{where}: no file matches")
    return root, sorted(matched)


def _content_sha256(root: Path, paths: list[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(root / path, "rb") as file:
            file_sha256 = hashlib.file_digest(file, "sha256").hexdigest()
        digest.update(f"{path}\t{file_sha256}\n".encode())
    return digest.hexdigest()


def _encode(value: object, field: str, where: str) -> bytes:
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is missing or not a string")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(f"{where}: field {field!r} is not valid UTF-8 text: {exc}") from exc


def _field(record: object, field: str, where: str) -> bytes:
    return _encode(record.get(field) if isinstance(record, dict) else None, field, where)


@dataclass(frozen=True)
class _FileTexts:
    """One document per file: iterable in corpus order, and addressable by position without
    reading the files before it (so rebuilding a late shard does not re-read the corpus)."""

    root: Path
    paths: list[str]

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        for path in self.paths:
            yield path, (self.root / path).read_bytes()


def _text_files(root: Path, paths: list[str]) -> Texts:
    return _FileTexts(root, paths)


def _jsonl_files(root: Path, paths: list[str], field: str) -> Texts:
    for path in paths:
        with open(root / path, "rb") as file:
            for line_no, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                where = f"{root / path}:{line_no}"
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    raise DataError(f"{where}: not a JSON record: {exc}") from exc
                yield f"{path}:{line_no}", _field(record, field, where)


def _parquet_files(root: Path, paths: list[str], field: str) -> Texts:
    import pyarrow.parquet as pq

    for path in paths:
        with pq.ParquetFile(root / path) as file:
            if field not in file.schema_arrow.names:
                raise DataError(f"{root / path}: no column {field!r} in {file.schema_arrow.names}")
            row = 0
            for batch in file.iter_batches(columns=[field]):
                for value in batch.column(0).to_pylist():
                    yield f"{path}:{row}", _encode(value, field, f"{root / path}:{row}")
                    row += 1


def _open_files(spec: FilesDataset, with_facts: bool) -> tuple[dict[str, Any], Texts]:
    if spec.format == "parquet":
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError as exc:
            raise SourceUnavailable(
                f"files: reading parquet needs pyarrow: pip install 'trainfleet[parquet]' ({exc})"
            ) from exc
    root, paths = _match_files(spec)
    facts: dict[str, Any] = {"num_files": len(paths)}
    if with_facts or spec.content_sha256 is not None:
        facts["content_sha256"] = _content_sha256(root, paths)
        if spec.content_sha256 not in (None, facts["content_sha256"]):
            raise SourceMismatch(
                f"files: root {root}: pinned content_sha256 {spec.content_sha256}, "
                f"found {facts['content_sha256']} ({len(paths)} files)"
            )
    if spec.format == "jsonl":
        return facts, _jsonl_files(root, paths, spec.text_field)
    if spec.format == "parquet":
        return facts, _parquet_files(root, paths, spec.text_field)
    return facts, _text_files(root, paths)


def _hf_unavailable(spec: HuggingFaceDataset, exc: Exception) -> Exception:
    """``exc`` as SourceUnavailable when it means the hub or its cache cannot be read."""
    modules = {cls.__module__.partition(".")[0] for cls in type(exc).__mro__}
    if not isinstance(exc, OSError) and not modules & _HF_MODULES:
        return exc
    return SourceUnavailable(
        f"huggingface: {spec.repo} at revision {spec.revision} is neither in the local cache "
        f"nor reachable (run once online, or point HF_HOME at a warm cache): {exc}"
    )


def _hf_rows(spec: HuggingFaceDataset, rows: Any) -> Texts:
    prefix = f"{spec.repo}@{spec.revision[:12]}/{spec.split}"
    records = iter(rows)
    for row in itertools.count():
        try:
            record = next(records)
        except StopIteration:
            return
        except Exception as exc:
            raise _hf_unavailable(spec, exc) from exc
        yield f"{prefix}/{row}", _field(record, spec.text_field, f"{prefix}/{row}")


def _open_huggingface(spec: HuggingFaceDataset) -> tuple[dict[str, Any], Texts]:
    try:
        import datasets
    except ImportError as exc:
        raise SourceUnavailable(
            f"huggingface: reading {spec.repo} needs the datasets library: "
            f"pip install 'trainfleet[hf]' ({exc})"
        ) from exc
    try:
        rows = datasets.load_dataset(
            spec.repo, name=spec.config, split=spec.split, revision=spec.revision, streaming=False
        )
    except Exception as exc:
        raise _hf_unavailable(spec, exc) from exc
    facts = {"repo": spec.repo, "revision": spec.revision}
    return {**facts, "config": spec.config, "split": spec.split}, _hf_rows(spec, rows)


def _open(spec: DatasetSpec, with_facts: bool) -> tuple[dict[str, Any], Texts]:
    """Check the pins and return the source's facts and its (not yet started) texts."""
    if isinstance(spec, StdlibDataset):
        return _open_stdlib(spec)
    if isinstance(spec, FilesDataset):
        return _open_files(spec, with_facts)
    assert isinstance(spec, HuggingFaceDataset), "synthetic documents are generated, not read"
    return _open_huggingface(spec)


def _numbered(texts: Texts, max_documents: int | None) -> Generator[Document, None, None]:
    for index, (doc_id, text) in enumerate(itertools.islice(texts, max_documents)):
        yield Document(index, doc_id, text)


def iter_documents(spec: DatasetSpec) -> Iterator[Document]:
    """Every document in corpus order (the first ``max_documents``), pins checked first."""
    if isinstance(spec, SyntheticDataset):
        return _synthetic(spec, range(_num_synthetic(spec)))
    _, texts = _open(spec, with_facts=False)
    return _numbered(texts, spec.max_documents)


def _pick(
    documents: Generator[Document, None, None], wanted: list[int], name: str
) -> Iterator[Document]:
    position = 0
    num_documents = 0
    with contextlib.closing(documents):
        for doc in documents:
            num_documents = doc.index + 1
            if doc.index == wanted[position]:
                yield doc
                position += 1
                if position == len(wanted):
                    return
    raise DataError(
        f"dataset {name!r}: document {wanted[position]} is past the end ({num_documents} documents)"
    )


def documents_at(spec: DatasetSpec, indices: Sequence[int]) -> Iterator[Document]:
    """The documents at ``indices`` (strictly ascending corpus positions), in that order."""
    wanted = list(indices)
    if any(b <= a for a, b in itertools.pairwise(wanted)):
        raise ValueError("documents_at needs strictly ascending indices")
    if not wanted:
        return iter(())
    if wanted[0] < 0:
        raise DataError(f"dataset {spec.name!r}: document {wanted[0]} does not exist")
    if isinstance(spec, SyntheticDataset):
        if wanted[-1] >= _num_synthetic(spec):
            raise DataError(
                f"dataset {spec.name!r}: document {wanted[-1]} is past the end "
                f"({_num_synthetic(spec)} documents)"
            )
        return _synthetic(spec, wanted)
    _, texts = _open(spec, with_facts=False)
    if isinstance(texts, _FileTexts):
        count = len(texts.paths)
        count = count if spec.max_documents is None else min(count, spec.max_documents)
        if wanted[-1] >= count:
            raise DataError(
                f"dataset {spec.name!r}: document {wanted[-1]} is past the end ({count} documents)"
            )
        return (
            Document(i, texts.paths[i], (texts.root / texts.paths[i]).read_bytes()) for i in wanted
        )
    return _pick(_numbered(iter(texts), spec.max_documents), wanted, spec.name)


def check_source(spec: DatasetSpec) -> dict[str, Any]:
    """Verify the spec's pins here and return the facts ``trainfleet data inspect`` shows."""
    if isinstance(spec, SyntheticDataset):
        return {
            "source": spec.source,
            "num_documents": _num_synthetic(spec),
            "loss_floor_nats": loss_floor_nats(spec),
            "entropy_rates_nats": entropy_rates_nats(make_dialects(spec)),
        }
    facts, _ = _open(spec, with_facts=True)
    return {"source": spec.source, **facts}
