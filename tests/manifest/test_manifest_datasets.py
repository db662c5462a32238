"""Datasets in the manifest: ``[datasets.NAME]`` tables parse into specs, jobs name them, every
mistake names the field, and a dataset enters a job's identity only when the job has one."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetkit import manifest_of, routed_dataset_toml
from trainfleet.data.spec import (
    FilesDataset,
    HuggingFaceDataset,
    StdlibDataset,
    SyntheticDataset,
    dataset_digest,
)
from trainfleet.errors import ManifestError
from trainfleet.manifest import job_id, parse_manifest
from trainfleet.manifest.spec import JobSpec

REVISION = "0123456789abcdef0123456789abcdef01234567"
ROUTED = routed_dataset_toml(
    "dialects",
    num_documents=300,
    doc_tokens=256,
    shard_tokens=8192,
    num_features=256,
    sample_documents=None,
)
PLAIN = '[datasets.plain]\nsource = "synthetic"\nseed = 7\n'


def job(name: str = "a", **keys: Any) -> str:
    body = "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
    return f'[[jobs]]\nname = "{name}"\n{body}'


def render_dataset(fields: dict[str, Any], order: list[str] | None = None) -> str:
    """``[datasets.d]`` with ``fields`` in ``order`` (default: as given)."""
    lines = [f"{k} = {json.dumps(fields[k])}" for k in (order or list(fields))]
    return "[datasets.d]\n" + "\n".join(lines) + "\n"


def only_problem(text: str) -> str:
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, "test.toml")
    problems = info.value.problems
    assert len(problems) == 1, problems
    assert str(info.value) == f"test.toml: {problems[0]}"
    return problems[0]


# --- every source kind parses ------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "kind", "pinned"),
    [
        ('source = "synthetic"\nseed = 3\nnum_dialects = 2', SyntheticDataset, {"seed": 3}),
        (
            'source = "stdlib"\npython_version = "3.11.9"\nfiles = ["json/__init__.py"]',
            StdlibDataset,
            {"python_version": "3.11.9", "files": ["json/__init__.py"]},
        ),
        (
            'source = "files"\nroot = "/data"\npaths = ["*.jsonl"]\nformat = "jsonl"',
            FilesDataset,
            {"root": "/data", "paths": ["*.jsonl"], "format": "jsonl"},
        ),
        (
            f'source = "huggingface"\nrepo = "roneneldan/TinyStories"\nrevision = "{REVISION}"',
            HuggingFaceDataset,
            {"repo": "roneneldan/TinyStories", "revision": REVISION},
        ),
    ],
    ids=["synthetic", "stdlib", "files", "huggingface"],
)
def test_each_source_kind_parses_into_its_spec(body: str, kind: type, pinned: dict) -> None:
    manifest = manifest_of(f"[datasets.ds]\n{body}\nshard_tokens = 4096\n")
    spec = manifest.datasets["ds"]
    assert isinstance(spec, kind)
    assert spec.name == "ds"
    assert spec.shard_tokens == 4096
    assert {k: getattr(spec, k) for k in pinned} == pinned


def test_a_job_names_its_dataset_and_gets_the_spec() -> None:
    manifest = manifest_of(ROUTED + PLAIN + job("p1", dataset="dialects", path=1))
    (only,) = manifest.jobs
    assert only.dataset == manifest.datasets["dialects"]
    assert only.dataset is not None and only.dataset.router is not None
    assert only.dataset.router.num_paths == 3
    assert only.path == 1


def test_defaults_dataset_applies_to_train_jobs_only() -> None:
    manifest = manifest_of(
        '[defaults]\ndataset = "plain"\n'
        + PLAIN
        + job("t")
        + job("c", kind="command", command=["python", "x.py"])
    )
    train, command = manifest.jobs
    assert train.dataset == manifest.datasets["plain"]
    assert command.dataset is None


# --- every mistake names its field -------------------------------------------------------


def test_unknown_dataset_name_lists_the_known_ones() -> None:
    problem = only_problem(ROUTED + PLAIN + job(dataset="dialect", path=0))
    assert problem.startswith("jobs[0] ('a').dataset: unknown dataset 'dialect'")
    assert "['dialects', 'plain']" in problem
    assert "none declared" in only_problem(job(dataset="dialects"))


def test_dataset_given_as_a_table_is_refused() -> None:
    problem = only_problem('[[jobs]]\nname = "a"\ndataset = { source = "synthetic" }\n')
    assert problem.startswith("jobs[0] ('a').dataset: must be the name of a")


def test_name_inside_a_dataset_table_is_refused() -> None:
    problem = only_problem(PLAIN + 'name = "other"\n')
    assert problem == "datasets.plain.name: set by the table name; remove it"


def test_unknown_key_in_a_dataset_table_names_the_key() -> None:
    problem = only_problem(PLAIN + "num_dialect = 3\n")
    assert problem.startswith("datasets.plain.")
    assert "num_dialect: Extra inputs are not permitted" in problem


def test_unknown_key_in_a_dataset_table_is_located_at_its_manifest_key() -> None:
    problem = only_problem(PLAIN + "num_dialect = 3\n")
    assert problem.startswith("datasets.plain.num_dialect: ")


def test_bad_source_lists_the_sources() -> None:
    problem = only_problem('[datasets.d]\nsource = "s3"\n')
    assert problem.startswith("datasets.d: ")
    assert "'s3'" in problem
    assert all(s in problem for s in ("synthetic", "stdlib", "files", "huggingface"))


def test_huggingface_revision_must_be_a_commit_not_a_branch() -> None:
    problem = only_problem(
        '[datasets.d]\nsource = "huggingface"\nrepo = "a/b"\nrevision = "main"\n'
    )
    assert problem.startswith("datasets.d.")
    assert "revision: String should match pattern" in problem


def test_synthetic_alphabets_must_fit_the_printable_bytes() -> None:
    problem = only_problem('[datasets.d]\nsource = "synthetic"\nnum_dialects = 6\n')
    assert problem.startswith("datasets.d")
    assert "num_dialects * alphabet_size = 96 > 94" in problem
    # 5 * 18 = 90 symbols leave room: the bound is the product, not either factor.
    manifest_of('[datasets.d]\nsource = "synthetic"\nnum_dialects = 5\nalphabet_size = 18\n')


def test_unknown_tokenizer_is_named() -> None:
    problem = only_problem(PLAIN + 'tokenizer = "gpt2"\n')
    assert problem.startswith("datasets.plain.tokenizer: unknown tokenizer 'gpt2'")
    assert "bytes" in problem


def test_routed_dataset_needs_a_path() -> None:
    problem = only_problem(ROUTED + job(dataset="dialects"))
    assert problem.startswith("jobs[0] ('a').path: dataset 'dialects' is routed to 3")


def test_path_must_be_below_num_paths() -> None:
    problem = only_problem(ROUTED + job(dataset="dialects", path=3))
    assert problem.startswith("jobs[0] ('a').path: 3 is out of range")
    assert "(0..2)" in problem
    manifest_of(ROUTED + job(dataset="dialects", path=2))


def test_path_needs_a_router() -> None:
    problem = only_problem(PLAIN + job(dataset="plain", path=0))
    assert problem == "jobs[0] ('a').path: dataset 'plain' has no router"
    problem = only_problem(job(path=0))
    assert problem == "jobs[0] ('a').path: a path needs a dataset with a router"


def test_command_jobs_take_no_dataset() -> None:
    problem = only_problem(PLAIN + job(kind="command", command=["x"], dataset="plain"))
    assert problem == "jobs[0] ('a').dataset: only kind='train' jobs take a dataset"


# --- identity ----------------------------------------------------------------------------

# Ids computed by trainfleet at 406d168, before datasets existed: they must never change.
IDS_BEFORE_DATASETS = {
    "gpt-a": "907669a892e946e11fe0b0757dc0725f4ec04641f71b0e4a9a44abd61a42941e",
    "cmd": "82e7821a36ec5d3e2f5852567cd646f38d98976fda99a6d978b6b8946d1b216b",
}
OLD_JOBS = """
[[jobs]]
name = "gpt-a"
mode = "smoke"
hyper = { lr = 0.01, steps = 100 }
[[jobs]]
name = "cmd"
kind = "command"
command = ["python", "t.py"]
hyper = { lr = 0.5 }
"""


def test_jobs_without_a_dataset_keep_the_ids_they_had() -> None:
    manifest = manifest_of(PLAIN + OLD_JOBS)
    for spec in manifest.jobs:
        assert set(spec.identity()) == {"name", "kind", "recipe", "command", "mode", "hyper"}
        assert job_id(spec) == IDS_BEFORE_DATASETS[spec.name]
    bare = JobSpec(name="gpt-a", recipe="gpt", mode="smoke", hyper={"lr": 0.01, "steps": 100})
    assert "dataset" not in bare.identity() and "path" not in bare.identity()
    assert job_id(bare) == IDS_BEFORE_DATASETS["gpt-a"]


def test_adding_a_dataset_or_a_path_changes_the_id() -> None:
    without = manifest_of(PLAIN + job()).jobs[0]
    with_plain = manifest_of(PLAIN + job(dataset="plain")).jobs[0]
    routed_0 = manifest_of(ROUTED + job(dataset="dialects", path=0)).jobs[0]
    routed_1 = manifest_of(ROUTED + job(dataset="dialects", path=1)).jobs[0]
    ids = {job_id(j) for j in (without, with_plain, routed_0, routed_1)}
    assert len(ids) == 4
    assert with_plain.dataset is not None
    assert with_plain.identity()["dataset"] == with_plain.dataset.model_dump(exclude={"name"})
    assert routed_1.identity()["path"] == 1


def test_renaming_a_dataset_table_keeps_the_job_ids() -> None:
    """The name is a label: the id follows what the dataset holds."""
    original = manifest_of(PLAIN + job(dataset="plain")).jobs[0]
    renamed = manifest_of(PLAIN.replace("plain", "other") + job(dataset="other")).jobs[0]
    assert renamed.dataset is not None and renamed.dataset.name == "other"
    assert job_id(renamed) == job_id(original)


@pytest.mark.parametrize(
    "change",
    [{"seed": 8}, {"shard_tokens": 4096}, {"heldout_fraction": 0.2}, {"max_documents": 100}],
    ids=lambda change: next(iter(change)),
)
def test_changing_the_dataset_content_changes_the_id(change: dict[str, Any]) -> None:
    fields = {"source": "synthetic", "seed": 7}
    before = manifest_of(render_dataset(fields) + job(dataset="d"))
    after = manifest_of(render_dataset({**fields, **change}) + job(dataset="d"))
    assert dataset_digest(after.datasets["d"]) != dataset_digest(before.datasets["d"])
    assert job_id(after.jobs[0]) != job_id(before.jobs[0])


def test_scheduling_a_dataset_job_differently_keeps_its_id() -> None:
    base = manifest_of(ROUTED + job(dataset="dialects", path=0)).jobs[0]
    moved = manifest_of(ROUTED + job(dataset="dialects", path=0, priority=5, timeout_s=9)).jobs[0]
    assert job_id(moved) == job_id(base)


SYNTHETIC_FIELDS = {
    "seed": st.integers(0, 2**40),
    "num_dialects": st.integers(1, 5),
    "num_documents": st.integers(2, 10_000),
    "doc_tokens": st.integers(16, 4096),
    "alphabet_size": st.integers(4, 18),
    "shard_tokens": st.integers(256, 1 << 20),
}


@settings(deadline=None, max_examples=40)
@given(fields=st.fixed_dictionaries(SYNTHETIC_FIELDS), data=st.data())
def test_dataset_job_id_ignores_key_order_and_follows_content(fields, data) -> None:
    fields = {"source": "synthetic", **fields}
    order = data.draw(st.permutations(sorted(fields)))
    canonical = manifest_of(render_dataset(fields, sorted(fields)) + job(dataset="d"))
    shuffled = manifest_of(render_dataset(fields, order) + job(dataset="d"))
    assert canonical.jobs[0].dataset.seed == fields["seed"]  # type: ignore[union-attr]
    assert job_id(shuffled.jobs[0]) == job_id(canonical.jobs[0])

    key = data.draw(st.sampled_from(sorted(SYNTHETIC_FIELDS)))
    other = data.draw(SYNTHETIC_FIELDS[key].filter(lambda v: v != fields[key]))
    changed = manifest_of(render_dataset({**fields, key: other}, order) + job(dataset="d"))
    assert job_id(changed.jobs[0]) != job_id(canonical.jobs[0])
