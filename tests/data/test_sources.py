"""Every source kind yields documents in corpus order, and refuses to read what its pins deny."""

from __future__ import annotations

import hashlib
import json
import platform
import re
import sys
import sysconfig
import types
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainfleet.data.corpus import stdlib_files
from trainfleet.data.sources import Document, check_source, documents_at, iter_documents
from trainfleet.data.spec import FilesDataset, HuggingFaceDataset, StdlibDataset
from trainfleet.errors import DataError, SourceMismatch, SourceUnavailable

STDLIB = Path(sysconfig.get_paths()["stdlib"])
REVISION = "0123456789abcdef" * 2 + "01234567"


def _stdlib(**fields: Any) -> StdlibDataset:
    return StdlibDataset.model_validate({"name": "lib", "source": "stdlib", **fields})


def _files(root: Path | str, paths: list[str], **fields: Any) -> FilesDataset:
    return FilesDataset.model_validate(
        {"name": "f", "source": "files", "root": str(root), "paths": paths, **fields}
    )


def _hf(**fields: Any) -> HuggingFaceDataset:
    return HuggingFaceDataset.model_validate(
        {
            "name": "h",
            "source": "huggingface",
            "repo": "org/stories",
            "revision": REVISION,
            **fields,
        }
    )


def _write(path: Path, content: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def test_stdlib_documents_are_the_sorted_py_files_and_their_facts() -> None:
    paths = stdlib_files(STDLIB)
    docs = list(iter_documents(_stdlib(max_documents=3)))
    assert [(d.index, d.doc_id) for d in docs] == list(enumerate(paths[:3]))
    assert docs[0].text == (STDLIB / paths[0]).read_bytes()
    facts = check_source(_stdlib())
    assert facts["python_version"] == platform.python_version()
    assert facts["num_files"] == len(paths)
    assert facts["files_sha256"] == hashlib.sha256("\n".join(paths).encode()).hexdigest()
    pinned = _stdlib(python_version=platform.python_version(), files_sha256=facts["files_sha256"])
    assert next(iter_documents(pinned)) == docs[0]


def test_stdlib_pins_that_differ_are_refused_showing_both_values() -> None:
    with pytest.raises(
        SourceMismatch, match=rf"pinned python_version 2\.7\.18, found {sys.version_info.major}\."
    ) as err:
        iter_documents(_stdlib(python_version="2.7.18"))
    assert platform.python_version() in str(err.value)
    wrong = "0" * 64
    found = check_source(_stdlib())["files_sha256"]
    with pytest.raises(SourceMismatch, match=rf"pinned files_sha256 {wrong}, found {found}"):
        iter_documents(_stdlib(files_sha256=wrong))


def test_stdlib_explicit_files_are_sorted_and_a_missing_one_is_named() -> None:
    files = ["os.py", "json/__init__.py", "abc.py"]
    docs = list(iter_documents(_stdlib(files=files)))
    assert [d.doc_id for d in docs] == sorted(files)
    pin = hashlib.sha256("\n".join(sorted(files)).encode()).hexdigest()
    assert check_source(_stdlib(files=files))["files_sha256"] == pin
    with pytest.raises(SourceMismatch, match=r"no_such_module\.py"):
        iter_documents(_stdlib(files=["os.py", "no_such_module.py"]))


def test_text_files_union_of_globs_and_content_pin(tmp_path: Path) -> None:
    _write(tmp_path / "b.txt", "bee")
    _write(tmp_path / "a.txt", "ay")
    _write(tmp_path / "sub" / "c.txt", "sea")
    _write(tmp_path / "skip.md", "no")
    spec = _files(tmp_path, ["*.txt", "**/*.txt"])
    docs = list(iter_documents(spec))
    assert docs == [
        Document(0, "a.txt", b"ay"),
        Document(1, "b.txt", b"bee"),
        Document(2, "sub/c.txt", b"sea"),
    ]
    lines = [f"{d.doc_id}\t{hashlib.sha256(d.text).hexdigest()}\n" for d in docs]
    content = hashlib.sha256("".join(lines).encode()).hexdigest()
    assert check_source(spec) == {"source": "files", "num_files": 3, "content_sha256": content}
    assert list(iter_documents(_files(tmp_path, ["**/*.txt"], content_sha256=content))) == docs
    _write(tmp_path / "a.txt", "changed")
    with pytest.raises(
        SourceMismatch, match=rf"pinned content_sha256 {content}, found [0-9a-f]{{64}}"
    ):
        iter_documents(_files(tmp_path, ["**/*.txt"], content_sha256=content))


def test_relative_and_home_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "data" / "x.txt", "x")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    for root in ("data", "~/data"):
        assert [d.doc_id for d in iter_documents(_files(root, ["*.txt"]))] == ["x.txt"]


def test_no_match_and_missing_root_name_root_and_patterns(tmp_path: Path) -> None:
    _write(tmp_path / "a.txt", "a")
    with pytest.raises(SourceUnavailable, match=r"root .* with patterns \*\.jsonl, \*\.json: no"):
        iter_documents(_files(tmp_path, ["*.jsonl", "*.json"]))
    with pytest.raises(SourceUnavailable, match=r"missing.*not a directory"):
        check_source(_files(tmp_path / "missing", ["*.txt"]))


def test_jsonl_one_document_per_non_blank_line(tmp_path: Path) -> None:
    records = [{"text": "héllo", "n": 1}, {"text": "", "n": 2}, {"text": "three"}]
    lines = [json.dumps(records[0]), "", json.dumps(records[1]), "  ", json.dumps(records[2])]
    _write(tmp_path / "part.jsonl", "\n".join(lines) + "\n")
    docs = list(iter_documents(_files(tmp_path, ["*.jsonl"], format="jsonl")))
    assert [(d.index, d.doc_id, d.text) for d in docs] == [
        (0, "part.jsonl:1", "héllo".encode()),
        (1, "part.jsonl:3", b""),
        (2, "part.jsonl:5", b"three"),
    ]


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ("{not json", "not a JSON record"),
        ('{"body": "x"}', "'text' is missing or not a string"),
        ('{"text": 7}', "'text' is missing or not a string"),
        ('["text"]', "'text' is missing or not a string"),
        ('{"text": "\\ud800"}', "not valid UTF-8"),
    ],
)
def test_a_bad_jsonl_line_is_named_by_file_and_line(
    tmp_path: Path, bad_line: str, problem: str
) -> None:
    path = _write(tmp_path / "d.jsonl", '{"text": "ok"}\n\n' + bad_line + "\n")
    documents = iter_documents(_files(tmp_path, ["d.jsonl"], format="jsonl"))
    assert next(documents).text == b"ok"
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:3: .*{re.escape(problem)}"):
        next(documents)


def test_parquet_one_document_per_row_across_record_batches(tmp_path: Path) -> None:
    texts = [f"row {i}" for i in range(2500)]
    pq.write_table(
        pa.table({"id": list(range(2500)), "body": texts}),
        tmp_path / "p.parquet",
        row_group_size=700,
    )
    spec = _files(tmp_path, ["*.parquet"], format="parquet", text_field="body")
    docs = list(iter_documents(spec))
    assert [d.text for d in docs] == [t.encode() for t in texts]
    assert docs[1234].doc_id == "p.parquet:1234"
    assert [d.index for d in documents_at(spec, [5, 2499])] == [5, 2499]
    with pytest.raises(DataError, match="no column 'text'"):
        list(iter_documents(_files(tmp_path, ["*.parquet"], format="parquet")))


def test_parquet_without_pyarrow_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "p.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(SourceUnavailable, match=r"pip install 'trainfleet\[parquet\]'"):
        iter_documents(_files(tmp_path, ["*.parquet"], format="parquet"))


@pytest.fixture(scope="module")
def jsonl_corpus(tmp_path_factory: pytest.TempPathFactory) -> FilesDataset:
    root = tmp_path_factory.mktemp("corpus")
    for part in range(3):
        lines = [json.dumps({"text": f"doc {part}-{i}"}) for i in range(7)]
        _write(root / f"part{part}.jsonl", "\n".join(lines) + "\n")
    _write(root / "part3.jsonl", "{broken\n")  # read only by a request past document 20
    return _files(root, ["*.jsonl"], format="jsonl", max_documents=21)


@settings(max_examples=50, deadline=None)
@given(st.sets(st.integers(0, 20)))
def test_documents_at_is_iter_documents_filtered(
    jsonl_corpus: FilesDataset, wanted: set[int]
) -> None:
    assert list(documents_at(jsonl_corpus, sorted(wanted))) == [
        doc for doc in iter_documents(jsonl_corpus) if doc.index in wanted
    ]


def test_max_documents_ends_the_corpus(jsonl_corpus: FilesDataset) -> None:
    docs = list(iter_documents(jsonl_corpus))
    assert len(docs) == 21
    assert docs[-1].doc_id == "part2.jsonl:7"
    with pytest.raises(DataError, match=r"document 21 is past the end \(21 documents\)"):
        list(documents_at(jsonl_corpus, [3, 21]))
    with pytest.raises(ValueError, match="ascending"):
        documents_at(jsonl_corpus, [4, 2])
    unlimited = jsonl_corpus.model_copy(update={"max_documents": None})
    with pytest.raises(DataError, match=r"part3\.jsonl:1"):
        list(documents_at(unlimited, [21]))


class _HubError(Exception):
    __module__ = "huggingface_hub.errors"


def _fake_datasets(monkeypatch: pytest.MonkeyPatch, load: Any) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []

    def load_dataset(path: str, **kwargs: Any) -> Any:
        calls.append({"path": path, **kwargs})
        return load()

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", module)
    return calls


def test_huggingface_streams_the_pinned_revision(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"text": "once upon"}, {"text": "a time"}, {"text": "the end"}]
    calls = _fake_datasets(monkeypatch, lambda: iter(rows))
    spec = _hf(config="v2", split="validation", max_documents=2)
    docs = list(iter_documents(spec))
    assert docs == [
        Document(0, "org/stories@0123456789ab/validation/0", b"once upon"),
        Document(1, "org/stories@0123456789ab/validation/1", b"a time"),
    ]
    assert calls[0] == {
        "path": "org/stories",
        "name": "v2",
        "split": "validation",
        "revision": REVISION,
        "streaming": False,
    }
    facts = check_source(spec)
    assert (facts["repo"], facts["revision"]) == ("org/stories", REVISION)


def _raise(exc: Exception) -> Any:
    raise exc


@pytest.mark.parametrize(
    "error", [ConnectionError("offline"), FileNotFoundError("no such repo"), _HubError("nope")]
)
def test_huggingface_unreachable_is_source_unavailable(
    monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    _fake_datasets(monkeypatch, lambda: _raise(error))
    with pytest.raises(
        SourceUnavailable, match=rf"org/stories at revision {REVISION}.*local cache"
    ):
        iter_documents(_hf())


def test_huggingface_failing_mid_stream_is_source_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def rows() -> Any:
        yield {"text": "first"}
        raise OSError("connection reset")

    _fake_datasets(monkeypatch, rows)
    documents = iter_documents(_hf())
    assert next(documents).text == b"first"
    with pytest.raises(SourceUnavailable, match="connection reset"):
        next(documents)


def test_huggingface_other_errors_and_bad_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_datasets(monkeypatch, lambda: _raise(KeyError("a bug")))
    with pytest.raises(KeyError):
        iter_documents(_hf())
    _fake_datasets(monkeypatch, lambda: iter([{"body": "x"}]))
    with pytest.raises(DataError, match=r"org/stories@0123456789ab/train/0: field 'text'"):
        list(iter_documents(_hf()))


def test_huggingface_without_datasets_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(SourceUnavailable, match=r"pip install 'trainfleet\[hf\]'"):
        check_source(_hf())
