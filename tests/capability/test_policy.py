"""Host policy: declared capability only ever takes away from detected; allow/deny lists;
the matching rule's messages."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fleetkit import make_cap
from trainfleet.capability.model import Capability
from trainfleet.capability.policy import effective_capability, job_allowed_on_host
from trainfleet.manifest.spec import HostPolicy, JobSpec
from trainfleet.queue.matching import blockers, requirement_summary


def two_gpu_box() -> Capability:
    return make_cap("gpu-box", cuda=True, vram_gib=24, cores=16, ram_gib=64).model_copy(
        update={"num_gpus": 2, "gpu_names": ["GPU 0", "GPU 1"]}
    )


# --- effective_capability ---------------------------------------------------------------


def test_no_policy_leaves_detection_unchanged():
    detected = two_gpu_box()
    effective, notes = effective_capability(detected, None)
    assert effective == detected
    assert notes == []


def test_empty_policy_changes_nothing_and_notes_nothing():
    detected = two_gpu_box()
    effective, notes = effective_capability(detected, HostPolicy())
    assert effective == detected
    assert notes == []


def test_declared_cuda_without_a_detected_device_is_cpu_only():
    detected = make_cap("gpu-box", cuda=False)
    effective, notes = effective_capability(detected, HostPolicy(cuda=True, vram_gib=24))
    assert effective.cuda is False
    assert effective.num_gpus == 0
    assert effective.vram_gib == 0
    assert any("no CUDA device was detected" in note for note in notes)
    assert any("declared vram_gib=24, detected 0" in note for note in notes)


def test_declared_cuda_false_on_a_cuda_machine_is_cpu_only():
    effective, notes = effective_capability(two_gpu_box(), HostPolicy(cuda=False))
    assert effective.cuda is False
    assert effective.num_gpus == 0
    assert effective.gpu_names == []
    assert effective.vram_gib == 0
    assert effective.cores == 16  # the rest is untouched
    assert len(notes) == 1
    assert "declares cuda=false" in notes[0]


def test_declaring_less_restricts_without_notes():
    policy = HostPolicy(cores=4, ram_gib=8, vram_gib=12, num_gpus=1)
    effective, notes = effective_capability(two_gpu_box(), policy)
    assert (effective.cores, effective.ram_gib, effective.vram_gib) == (4, 8, 12)
    assert effective.num_gpus == 1
    assert effective.gpu_names == ["GPU 0"]
    assert effective.cuda is True
    assert notes == []


def test_declaring_more_adds_nothing_and_says_so():
    policy = HostPolicy(cores=64, ram_gib=512, vram_gib=80, num_gpus=8)
    detected = two_gpu_box()
    effective, notes = effective_capability(detected, policy)
    assert effective == detected
    assert sorted(notes) == sorted(
        [
            "declared cores=64, detected 16",
            "declared ram_gib=512, detected 64",
            "declared vram_gib=80, detected 24",
            "declared num_gpus=8, detected 2",
        ]
    )


def test_zero_gpus_means_no_cuda():
    effective, notes = effective_capability(two_gpu_box(), HostPolicy(num_gpus=0))
    assert effective.cuda is False
    assert effective.num_gpus == 0
    assert effective.gpu_names == []
    assert effective.vram_gib == 0
    assert notes == []


def test_policy_does_not_mutate_the_detected_capability():
    detected = two_gpu_box()
    effective_capability(detected, HostPolicy(cuda=False, cores=1))
    assert detected == two_gpu_box()


@st.composite
def detected_capabilities(draw: st.DrawFn) -> Capability:
    num_gpus = draw(st.integers(0, 8))
    cuda = num_gpus > 0
    return Capability(
        host="h",
        hostname="h",
        cores=draw(st.integers(1, 256)),
        ram_gib=draw(st.floats(0, 2048, allow_subnormal=False)),
        cuda=cuda,
        num_gpus=num_gpus,
        gpu_names=[f"GPU {i}" for i in range(num_gpus)],
        vram_gib=draw(st.floats(0, 200, allow_subnormal=False)) if cuda else 0.0,
    )


policies = st.builds(
    HostPolicy,
    cuda=st.none() | st.booleans(),
    num_gpus=st.none() | st.integers(0, 8),
    vram_gib=st.none() | st.floats(0, 200, allow_subnormal=False),
    ram_gib=st.none() | st.floats(0, 2048, allow_subnormal=False),
    cores=st.none() | st.integers(1, 256),
)


@given(detected=detected_capabilities(), policy=policies)
def test_effective_never_exceeds_detected(detected, policy):
    effective, notes = effective_capability(detected, policy)
    assert effective.cores <= detected.cores
    assert effective.ram_gib <= detected.ram_gib
    assert effective.vram_gib <= detected.vram_gib
    assert effective.num_gpus <= detected.num_gpus
    assert not effective.cuda or detected.cuda
    # ... and never exceeds what was declared either.
    for field in ("cores", "ram_gib", "vram_gib", "num_gpus"):
        declared = getattr(policy, field)
        if declared is not None:
            assert getattr(effective, field) <= declared
    if policy.cuda is False:
        assert not effective.cuda
    # A consistent record: CUDA iff some GPU; no GPU, no VRAM; a name per GPU.
    assert effective.cuda == (effective.num_gpus > 0)
    assert effective.cuda or effective.vram_gib == 0
    assert effective.gpu_names == detected.gpu_names[: effective.num_gpus]
    # Applying the same policy again changes nothing.
    assert effective_capability(effective, policy)[0] == effective
    if policy.cores is not None and policy.cores > detected.cores:
        assert f"declared cores={policy.cores}, detected {detected.cores}" in notes


# --- job_allowed_on_host ----------------------------------------------------------------


def test_no_policy_allows_every_job():
    assert job_allowed_on_host("anything", None) is None
    assert job_allowed_on_host("anything", HostPolicy()) is None


def test_allow_globs():
    policy = HostPolicy(allow_jobs=["gpt-*", "linear-?"])
    assert job_allowed_on_host("gpt-small", policy) is None
    assert job_allowed_on_host("linear-1", policy) is None
    assert job_allowed_on_host("linear-12", policy) == "not in allow_jobs"
    assert job_allowed_on_host("resnet", policy) == "not in allow_jobs"
    assert job_allowed_on_host("GPT-small", policy) == "not in allow_jobs"  # case matters


def test_deny_wins_over_allow():
    policy = HostPolicy(allow_jobs=["gpt-*"], deny_jobs=["gpt-wide-*"])
    assert job_allowed_on_host("gpt-small", policy) is None
    assert job_allowed_on_host("gpt-wide-1", policy) == "denied by deny_jobs pattern 'gpt-wide-*'"


def test_empty_allow_list_allows_nothing():
    assert job_allowed_on_host("gpt-a", HostPolicy(allow_jobs=[])) == "not in allow_jobs"


# --- matching messages ------------------------------------------------------------------


def test_blockers_none_when_the_job_fits():
    job = JobSpec(name="a", require_cuda=True, min_vram_gib=16, min_cores=4, min_ram_gib=8)
    assert blockers(job, make_cap("gpu-box", cuda=True, vram_gib=24), HostPolicy()) == []


def test_blockers_name_every_unmet_requirement():
    job = JobSpec(
        name="a",
        require_cuda=True,
        min_vram_gib=16,
        min_ram_gib=32,
        min_cores=8,
        allowed_hosts=["gpu-box"],
    )
    assert blockers(job, make_cap("cpu-a", cores=4, ram_gib=16), None) == [
        "not in the job's allowed_hosts",
        "needs CUDA",
        "needs a GPU with >= 16 GiB VRAM (has 0)",
        "needs >= 32 GiB RAM (has 16)",
        "needs >= 8 cores (has 4)",
    ]


def test_blockers_small_vram():
    job = JobSpec(name="a", require_cuda=True, min_vram_gib=40)
    assert blockers(job, make_cap("gpu-box", cuda=True, vram_gib=24), None) == [
        "needs a GPU with >= 40 GiB VRAM (has 24)"
    ]


def test_blockers_include_host_policy_denials():
    job = JobSpec(name="gpt-wide-1")
    cap = make_cap("cpu-a")
    denied = HostPolicy(deny_jobs=["gpt-wide-*"])
    assert blockers(job, cap, denied) == ["denied by deny_jobs pattern 'gpt-wide-*' on host cpu-a"]
    assert blockers(job, cap, HostPolicy(allow_jobs=["linear-*"])) == [
        "not in allow_jobs on host cpu-a"
    ]


def test_requirement_summary():
    assert requirement_summary(JobSpec(name="a")) == "any host"
    assert requirement_summary(JobSpec(name="a", require_cuda=True)) == "CUDA"
    assert requirement_summary(JobSpec(name="a", prefer_cuda=True)) == "prefers CUDA"
    job = JobSpec(
        name="a",
        require_cuda=True,
        prefer_cuda=True,
        min_vram_gib=24,
        min_ram_gib=8,
        min_cores=4,
        allowed_hosts=["gpu-box", "gpu-2"],
    )
    assert (
        requirement_summary(job) == "CUDA >= 24 GiB, >= 8 GiB RAM, >= 4 cores, hosts gpu-box,gpu-2"
    )
