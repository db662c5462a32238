"""``[[runs]]`` in a manifest: validated at load like jobs, every problem named."""

from __future__ import annotations

import pytest

from trainfleet.errors import ManifestError
from trainfleet.manifest import parse_manifest

DATASET = """
[datasets.syn]
source = "synthetic"
num_documents = 200
"""

RUN = """
[[runs]]
name = "collab"
dataset = "syn"
replicas = 4
inner_steps = 10
rounds = 3
compression = "int8"
hyper = { n_layers = 1, d_model = 16, seq_len = 16, batch_size = 4, lr = 1e-2 }
"""


def problems(text: str) -> str:
    with pytest.raises(ManifestError) as err:
        parse_manifest(text)
    return str(err.value)


def test_a_run_loads_with_its_dataset_and_paper_defaults() -> None:
    run = parse_manifest(DATASET + RUN).runs[0]
    assert run.dataset.name == "syn"
    assert run.compression.kind == "int8"
    assert (run.outer_lr, run.outer_momentum) == (0.7, 0.9)  # the DiLoCo paper's defaults
    assert run.quorum == 2  # half the replicas unless min_quorum says otherwise
    assert run.hyper["lr"] == 0.01


def test_topk_compression_as_a_table() -> None:
    text = DATASET + RUN.replace(
        'compression = "int8"', 'compression = { kind = "topk", density = 0.02, bits = 4 }'
    )
    spec = parse_manifest(text).runs[0].compression
    assert (spec.kind, spec.density, spec.bits, spec.error_feedback) == ("topk", 0.02, 4, True)


def test_a_token_budget_sets_the_rounds() -> None:
    text = DATASET + RUN.replace("rounds = 3", "tokens = 10000")
    run = parse_manifest(text).runs[0]
    # 4 replicas x 10 steps x 4 x 16 tokens = 2560 tokens a round: 10000 needs 4 rounds.
    assert run.num_rounds(4, 16) == 4


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (('dataset = "syn"', 'dataset = "nope"'), "runs[0] ('collab').dataset: unknown dataset"),
        (("rounds = 3", "rounds = 3\ntokens = 5"), "set exactly one budget"),
        (("replicas = 4", "replicas = 4\nmin_quorum = 5"), "min_quorum 5 > replicas 4"),
        (("lr = 1e-2", "lr = 1e-2, steps = 9"), "steps do not apply to a run"),
        (("d_model = 16", "d_model = 10"), "runs[0] ('collab').hyper"),
        (('compression = "int8"', 'compression = "zip"'), "runs[0] ('collab').compression"),
        (("inner_steps = 10", "inner_stepz = 10"), "did you mean 'inner_steps'"),
        (("rounds = 3", "rounds = 3\nwarmup_rounds = 3"), "warmup_rounds: must be fewer"),
    ],
)
def test_bad_runs_are_refused_with_the_field_named(change: tuple[str, str], expected: str) -> None:
    assert expected in problems(DATASET + RUN.replace(*change))


def test_run_and_job_names_are_unique() -> None:
    assert "duplicate run name" in problems(DATASET + RUN + RUN)
    job = '\n[[jobs]]\nname = "collab"\nhyper = { steps = 5 }\n'
    assert "a job is named 'collab' too" in problems(DATASET + job + RUN)


def test_a_manifest_cannot_declare_replica_jobs() -> None:
    text = '[[jobs]]\nname = "x"\nkind = "replica"\n'
    assert "declare a [[runs]] table instead" in problems(text)


def test_a_run_identity_ignores_scheduling() -> None:
    base = parse_manifest(DATASET + RUN).runs[0]
    moved = parse_manifest(DATASET + RUN.replace("rounds = 3", "rounds = 3\npriority = 5")).runs[0]
    longer = parse_manifest(DATASET + RUN.replace("inner_steps = 10", "inner_steps = 20")).runs[0]
    assert base.identity() == moved.identity()
    assert base.identity() != longer.identity()
