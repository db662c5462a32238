"""``[[pipelines]]`` in the manifest: parsed with the teacher's id filled in, every loader
check names the pipeline and the field, the identity ignores scheduling, and a pipeline task
rides only on a producer or consumer job."""

from __future__ import annotations

import pytest

from fleetkit import manifest_of
from trainfleet.errors import ManifestError
from trainfleet.manifest.identity import job_id
from trainfleet.manifest.pipelines import PipelineTask, bucket, pipeline_id, sample_id
from trainfleet.manifest.spec import JobSpec

HEAD = """
[datasets.text]
source = "synthetic"
num_documents = 50

[datasets.routed]
source = "synthetic"
num_documents = 50
router = { num_paths = 2 }

[[jobs]]
name = "teacher"
dataset = "text"
hyper = { n_layers = 2, d_model = 64, seq_len = 64, steps = 30 }

[[jobs]]
name = "tool"
kind = "command"
command = ["true"]
"""


def pipeline(**fields: object) -> str:
    body = {
        "name": '"distill"',
        "teacher": '"teacher"',
        "dataset": '"text"',
        "student": "{ n_layers = 1, d_model = 32, n_heads = 2, seq_len = 32, lr = 3e-3 }",
        "samples": "16",
        "consumers": "2",
    }
    body.update({k: str(v) for k, v in fields.items()})
    lines = "\n".join(f"{k} = {v}" for k, v in body.items() if v != "DROP")
    return HEAD + "\n[[pipelines]]\n" + lines + "\n"


def problems(text: str) -> str:
    with pytest.raises(ManifestError) as err:
        manifest_of(text)
    return "\n".join(err.value.problems)


def test_a_pipeline_parses_with_its_teacher_id_and_normalized_student() -> None:
    manifest = manifest_of(pipeline())
    (spec,) = manifest.pipelines
    teacher = next(j for j in manifest.jobs if j.name == "teacher")
    assert spec.teacher_id == job_id(teacher)
    assert spec.dataset.name == "text" and spec.consumers == 2 and spec.store == "http"
    assert spec.student["lr"] == 0.003 and isinstance(spec.student["lr"], float)
    assert len(pipeline_id(spec)) == 64
    assert spec.job_name("consumer", 1) == "distill.consumer1"
    assert list(spec.share(0)) == list(range(16))


def test_the_identity_ignores_scheduling_but_not_what_the_samples_are() -> None:
    base = pipeline_id(manifest_of(pipeline()).pipelines[0])
    scheduling = pipeline(consumers=3, priority=5, lease_s=5, consumer_hosts='["h1"]')
    assert pipeline_id(manifest_of(scheduling).pipelines[0]) == base
    for change in ({"samples": 17}, {"top_k": 4}, {"store": '"dir:/tmp/kd"'}, {"seed": 1}):
        assert pipeline_id(manifest_of(pipeline(**change)).pipelines[0]) != base, change
    other_teacher = pipeline().replace("steps = 30", "steps = 31")
    assert pipeline_id(manifest_of(other_teacher).pipelines[0]) != base


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"teacher": '"nobody"'}, "teacher: 'nobody' names no [[jobs]] train job"),
        ({"teacher": '"tool"'}, "teacher: 'tool' names no [[jobs]] train job"),
        ({"student": "{ steps = 5 }"}, "student: steps do not apply"),
        ({"student": "{ seq_len = 128 }"}, "student.seq_len: 128 is longer than the teacher's"),
        ({"student": "{ d_model = 30, n_heads = 4 }"}, "n_heads (4) must divide d_model"),
        ({"student": "{ widht = 3 }"}, "student.widht: Extra inputs are not permitted"),
        ({"dataset": '"routed"'}, "dataset: a pipeline draws from a dataset without a router"),
        ({"dataset": '"nope"'}, "dataset: unknown dataset 'nope'"),
        ({"dataset": "DROP"}, "dataset: a pipeline needs a dataset"),
        ({"low_watermark_mib": 300}, "low_watermark_mib (300.0) must be below"),
        ({"store": '"dir:relative"'}, "store is 'http' or 'dir:'"),
        ({"teacher_id": '"' + "a" * 64 + '"'}, "teacher_id: set by the loader"),
        ({"name": '"teacher"'}, "a job or run is named 'teacher' too"),
        ({"producers": 17}, "producers (17) > samples (16)"),
        ({"consumres": 2}, "did you mean 'consumers'?"),
    ],
)
def test_each_loader_check_names_the_pipeline_and_field(
    fields: dict[str, object], message: str
) -> None:
    found = problems(pipeline(**fields))
    assert "pipelines[0]" in found and message in found, found


def test_duplicate_pipeline_names_are_refused() -> None:
    text = pipeline() + '\n[[pipelines]]\nname = "distill"\nteacher = "teacher"\ndataset = "text"\n'
    assert "pipelines[1] ('distill').name: duplicate pipeline name" in problems(text)


def test_pipeline_jobs_are_never_written_in_a_manifest() -> None:
    text = HEAD + '\n[[jobs]]\nname = "p"\nkind = "producer"\ncommand = ["x"]\n'
    assert "needs a pipeline task of that role" in problems(text)


def test_a_pipeline_task_rides_on_its_role_and_round_trips_as_json() -> None:
    task = PipelineTask(pipeline="distill", pipeline_id="ab" * 32, role="consumer", index=1)
    job = JobSpec(name="distill.consumer1", kind="consumer", task=task)
    again = JobSpec.model_validate_json(job.model_dump_json())
    assert again == job and again.pipeline_task == task and again.replica_task is None
    assert job_id(again) == job_id(job)
    with pytest.raises(ValueError, match="a consumer task rides on a kind='consumer' job"):
        JobSpec(name="x", kind="command", command=["true"], task=task)
    with pytest.raises(ValueError, match="needs a pipeline task of that role"):
        JobSpec(name="x", kind="producer", task=task)


def test_sample_ids_and_buckets_are_stable() -> None:
    assert sample_id(7) == "00000007"
    assert bucket("00000007") == bucket("00000007")
    values = {bucket(sample_id(i)) for i in range(200)}
    assert all(0 <= v < 2**31 for v in values) and len(values) == 200
    assert {v % 3 for v in values} == {0, 1, 2}  # every partition gets samples


def test_a_private_teacher_is_refused_its_model_would_leave_the_tier() -> None:
    private = pipeline().replace('name = "teacher"\n', 'name = "teacher"\ntier = "private"\n', 1)
    assert "teacher: 'teacher' is a private job" in problems(private)
