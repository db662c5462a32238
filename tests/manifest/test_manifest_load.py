"""Loading manifests: the example loads with defaults applied; every mistake names file,
job and field, and all of them are reported at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleetkit import manifest_of, routed_dataset_toml
from trainfleet.errors import ManifestError
from trainfleet.manifest import load_manifest, parse_manifest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fleet.toml"


def problems_of(text: str, path: str = "test.toml") -> list[str]:
    """Parse ``text`` expecting failure; check the message leads with the path."""
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, path)
    err = info.value
    assert err.path == path
    assert str(err).startswith(f"{path}: ")
    assert all(line.startswith(f"{path}: ") for line in str(err).splitlines())
    assert err.problems
    return err.problems


def only_problem(text: str) -> str:
    problems = problems_of(text)
    assert len(problems) == 1, problems
    return problems[0]


# --- the example manifest ---------------------------------------------------------------


def test_example_manifest_loads_with_defaults_applied():
    manifest = load_manifest(EXAMPLE)
    jobs = {job.name: job for job in manifest.jobs}
    assert list(jobs) == [
        "gpt-dialects-path0",
        "gpt-dialects-path1",
        "gpt-lr1e-3",
        "gpt-lr3e-3",
        "gpt-lr1e-2",
        "gpt-wide-lr3e-3",
        "linear-baseline",
    ]
    assert set(manifest.hosts) == {"gpu-box", "cpu-a", "cpu-b"}
    assert manifest.defaults.prefer_cuda_wait_s == 5
    dialects = manifest.datasets["dialects"]
    for path in (0, 1):
        routed = jobs[f"gpt-dialects-path{path}"]
        assert routed.dataset == dialects and routed.path == path
    assert dialects.router is not None and dialects.router.num_paths == 2

    default_hyper = {
        "steps": 60,
        "seq_len": 64,
        "batch_size": 16,
        "corpus": "stdlib",
        "corpus_bytes": 400000,
    }
    # Train jobs: default hyper merged under their own, the job's value winning.
    assert jobs["gpt-lr1e-3"].hyper == {**default_hyper, "lr": 1e-3}
    assert jobs["gpt-wide-lr3e-3"].hyper == {**default_hyper, "lr": 3e-3, "d_model": 128}
    for name in ("gpt-lr1e-3", "gpt-lr3e-3", "gpt-lr1e-2", "gpt-wide-lr3e-3"):
        assert jobs[name].kind == "train"
        assert jobs[name].recipe == "gpt"
        assert jobs[name].max_failures == 3
        assert jobs[name].timeout_s == 600

    # The command job keeps only its own hyper, gets no default recipe, but does inherit
    # scheduling defaults it does not override.
    command = jobs["linear-baseline"]
    assert command.kind == "command"
    assert command.hyper == {"steps": 200, "lr": 0.5}
    assert command.recipe is None
    assert command.command == ["python", "examples/scripts/train_bigram.py"]
    assert command.timeout_s == 120
    assert command.max_failures == 3


def test_job_values_override_scalar_defaults():
    manifest = manifest_of(
        """
        [defaults]
        priority = 2
        min_cores = 2
        [[jobs]]
        name = "a"
        [[jobs]]
        name = "b"
        priority = 9
        """
    )
    a, b = manifest.jobs
    assert (a.priority, a.min_cores) == (2, 2)
    assert (b.priority, b.min_cores) == (9, 2)


# --- unknown keys and wrong types -------------------------------------------------------


def test_unknown_top_level_key():
    problem = only_problem('jbos = []\n[[jobs]]\nname = "a"\n')
    assert problem.startswith("jbos: unknown top-level key")


def test_unknown_key_in_job_names_job_and_field():
    problem = only_problem('[[jobs]]\nname = "a"\nlerning_rate = 1\n')
    assert problem.startswith("jobs[0] ('a').lerning_rate: ")
    assert "Extra inputs are not permitted" in problem


def test_unknown_key_in_host_names_host_and_field():
    problem = only_problem("[hosts.cpu-a]\ncudaa = true\n")
    assert problem.startswith("hosts.cpu-a.cudaa: ")


def test_unknown_key_in_defaults():
    problem = only_problem("[defaults]\nretries = 3\n")
    assert problem.startswith("defaults.retries: ")


def test_wrong_type_names_job_and_field():
    problem = only_problem('[[jobs]]\nname = "a"\npriority = "high"\n')
    assert problem.startswith("jobs[0] ('a').priority: ")
    assert "integer" in problem


def test_invalid_host_name_is_a_manifest_error():
    problem = only_problem('[hosts."bad name"]\ncuda = false\n')
    assert problem.startswith("hosts.'bad name': not a host name that can be enrolled")


UNENROLLABLE = ["open:x", "h" * 64, "open:" + "h" * 58, "-lead", "gpu\u2010box"]


@pytest.mark.parametrize("name", UNENROLLABLE)
def test_a_host_that_cannot_be_enrolled_is_refused_where_it_is_named(name: str):
    """``open:x`` in allowed_hosts would pin a job to any open-mode worker that calls itself x;
    a [hosts.NAME] longer than an enrollment allows could never apply. Both are errors that
    name the key, judged by the capability model's one host-name policy."""
    from trainfleet.capability.model import is_host_name

    assert not is_host_name(name)
    toml_name = json.dumps(name)
    rule = "not a host name that can be enrolled (1-63 of letters, digits"
    job = only_problem(f'[[jobs]]\nname = "a"\nallowed_hosts = ["ok", {toml_name}]\n')
    assert job.startswith(f"jobs[0] ('a').allowed_hosts[1]: {name!r} is {rule}"), job
    inherited = f'[defaults]\nallowed_hosts = [{toml_name}]\n[[jobs]]\nname = "a"\n'
    defaults = only_problem(inherited + '[[jobs]]\nname = "b"\n')  # once, not per job
    assert defaults.startswith(f"defaults.allowed_hosts[0]: {name!r} is {rule}"), defaults
    host = only_problem(f"[hosts.{toml_name}]\ncores = 1\n")
    assert host.startswith(f"hosts.{name!r}: {rule}"), host


def test_the_longest_enrollable_host_name_is_accepted():
    name = "h" * 63
    manifest = parse_manifest(
        f'[hosts.{name}]\ncores = 1\n[[jobs]]\nname = "a"\nallowed_hosts = ["{name}"]\n'
    )
    assert list(manifest.hosts) == [name] and manifest.jobs[0].allowed_hosts == [name]


def test_a_spec_stored_with_an_unenrollable_host_still_reads():
    """A queue database from a release that took any string keeps working: the name is read
    as stored (it matches no worker), while a manifest may no longer give it."""
    from pydantic import ValidationError

    from trainfleet.manifest.spec import JobSpec

    stored = JobSpec.model_validate_json('{"name": "a", "allowed_hosts": ["open:x"]}')
    assert stored.allowed_hosts == ["open:x"]
    with pytest.raises(ValidationError, match="can be enrolled"):
        JobSpec.model_validate({"name": "a", "allowed_hosts": ["open:x"]})


def test_duplicate_job_names_mention_both_indexes():
    problem = only_problem('[[jobs]]\nname = "a"\n[[jobs]]\nname = "b"\n[[jobs]]\nname = "a"\n')
    assert problem.startswith("jobs[2] ('a').name: duplicate job name")
    assert "jobs[0]" in problem


# --- recipe, hyper and kind rules -------------------------------------------------------


def test_train_job_with_unknown_recipe():
    problem = only_problem('[[jobs]]\nname = "a"\nrecipe = "resnet"\n')
    assert problem.startswith("jobs[0] ('a').recipe: unknown recipe 'resnet'")
    assert "gpt" in problem


def test_hyper_key_not_a_recipe_param():
    problem = only_problem('[[jobs]]\nname = "a"\nhyper = { lerning_rate = 0.1 }\n')
    assert problem.startswith("jobs[0] ('a').hyper.lerning_rate: ")


def test_unknown_default_hyper_key_is_reported_once_on_defaults():
    problems = problems_of(
        '[defaults]\nhyper = { lerning_rate = 0.1 }\n[[jobs]]\nname = "a"\n[[jobs]]\nname = "b"\n'
    )
    assert [p.split(":")[0] for p in problems] == ["defaults.hyper.lerning_rate"]


def test_hyper_value_out_of_range():
    problem = only_problem('[[jobs]]\nname = "a"\nhyper = { lr = -1 }\n')
    assert problem.startswith("jobs[0] ('a').hyper.lr: ")
    assert "greater than 0" in problem


def test_hyper_not_a_table_is_a_manifest_error():
    problem = only_problem('[defaults]\nhyper = { lr = 0.1 }\n[[jobs]]\nname = "a"\nhyper = 3\n')
    assert problem.startswith("jobs[0] ('a').hyper: ")
    assert "dictionary" in problem


def test_heads_must_divide_width():
    problem = only_problem('[[jobs]]\nname = "a"\nhyper = { n_heads = 3, d_model = 64 }\n')
    assert problem.startswith("jobs[0] ('a').hyper: ")
    assert "n_heads (3) must divide d_model (64)" in problem


def test_unknown_mode_for_recipe():
    problem = only_problem('[[jobs]]\nname = "a"\nmode = "turbo"\n')
    assert problem.startswith("jobs[0] ('a').mode: recipe 'gpt' has modes")
    assert "smoke" in problem


def test_command_job_needs_a_command():
    problem = only_problem('[[jobs]]\nname = "a"\nkind = "command"\n')
    assert problem.startswith("jobs[0] ('a').command: ")
    assert "non-empty command" in problem


def test_command_job_may_not_take_a_recipe():
    problem = only_problem(
        '[[jobs]]\nname = "a"\nkind = "command"\ncommand = ["x"]\nrecipe = "gpt"\n'
    )
    assert problem.startswith("jobs[0] ('a').recipe: only kind='train' jobs take a recipe")


def test_train_job_may_not_take_a_command():
    problem = only_problem('[[jobs]]\nname = "a"\ncommand = ["x"]\n')
    assert problem.startswith("jobs[0] ('a').command: only kind='command' jobs take a command")


def test_default_recipe_is_not_applied_to_command_jobs():
    manifest = manifest_of(
        '[defaults]\nrecipe = "gpt"\n[[jobs]]\nname = "a"\nkind = "command"\ncommand = ["x"]\n'
    )
    assert manifest.jobs[0].recipe is None


def test_vram_minimum_needs_require_cuda():
    problem = only_problem('[[jobs]]\nname = "a"\nmin_vram_gib = 8\n')
    assert problem.startswith("jobs[0] ('a').min_vram_gib: ")
    assert "require_cuda" in problem
    manifest = manifest_of('[[jobs]]\nname = "a"\nmin_vram_gib = 8\nrequire_cuda = true\n')
    assert manifest.jobs[0].min_vram_gib == 8


# --- placement --------------------------------------------------------------------------


def test_impossible_placement_cuda_job_on_cpu_host():
    problem = only_problem(
        """
        [hosts.cpu-a]
        cuda = false
        [[jobs]]
        name = "a"
        require_cuda = true
        allowed_hosts = ["cpu-a"]
        """
    )
    assert problem.startswith("jobs[0] ('a').allowed_hosts: no allowed host can run this job")
    assert "cpu-a: needs CUDA" in problem


def test_impossible_placement_host_denies_job():
    problem = only_problem(
        """
        [hosts.cpu-a]
        deny_jobs = ["gpt-*"]
        [[jobs]]
        name = "gpt-big"
        allowed_hosts = ["cpu-a"]
        """
    )
    assert problem.startswith("jobs[0] ('gpt-big').allowed_hosts: no allowed host can run")
    assert "deny_jobs pattern 'gpt-*'" in problem


def test_impossible_placement_lists_every_allowed_host():
    problem = only_problem(
        """
        [hosts.cpu-a]
        cuda = false
        [hosts.small]
        ram_gib = 4
        cuda = false
        [[jobs]]
        name = "a"
        min_ram_gib = 8
        allowed_hosts = ["cpu-a", "small"]
        require_cuda = true
        """
    )
    assert "cpu-a: needs CUDA" in problem
    assert "small: needs CUDA; needs >= 8 GiB RAM (has 4)" in problem


def test_possible_placement_is_accepted():
    manifest = manifest_of(
        """
        [hosts.cpu-a]
        cuda = false
        [hosts.gpu-box]
        cuda = true
        vram_gib = 24
        [[jobs]]
        name = "a"
        require_cuda = true
        min_vram_gib = 16
        allowed_hosts = ["cpu-a", "gpu-box"]
        """
    )
    assert manifest.jobs[0].allowed_hosts == ["cpu-a", "gpu-box"]


def test_allowed_hosts_with_an_undeclared_host_is_accepted():
    # An undeclared host could have anything, so the job is not provably impossible.
    manifest = manifest_of(
        """
        [hosts.cpu-a]
        cuda = false
        [[jobs]]
        name = "a"
        require_cuda = true
        allowed_hosts = ["cpu-a", "somewhere-else"]
        """
    )
    assert manifest.jobs[0].allowed_hosts == ["cpu-a", "somewhere-else"]


# --- unreadable input and many problems -------------------------------------------------


def test_invalid_toml():
    problem = only_problem('[[jobs]]\nname = "a\n')
    assert problem.startswith("not valid TOML: ")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert str(info.value).startswith(f"{path}: ")
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("cannot read")


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "fleet.toml"
    path.write_text('[[jobs]]\nname = "a"\npriority = "high"\n', encoding="utf-8")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert info.value.path == str(path)
    assert str(info.value).startswith(f"{path}: jobs[0] ('a').priority: ")


def test_every_problem_is_reported_not_just_the_first():
    problems = problems_of(
        """
        colour = "blue"
        [hosts.cpu-a]
        cudaa = true
        [[jobs]]
        name = "a"
        lerning_rate = 1
        [[jobs]]
        name = "b"
        recipe = "resnet"
        min_vram_gib = 8
        [[jobs]]
        name = "c"
        hyper = { lr = -1, n_heads = 3 }
        [[jobs]]
        name = "d"
        kind = "command"
        [[jobs]]
        name = "b"
        """
    )
    heads = [p.split(":")[0] for p in problems]
    assert heads == [
        "colour",
        "hosts.cpu-a.cudaa",
        "jobs[0] ('a').lerning_rate",
        "jobs[1] ('b').recipe",
        "jobs[1] ('b').min_vram_gib",
        "jobs[2] ('c').hyper.lr",
        "jobs[3] ('d').command",
        "jobs[4] ('b').name",
    ]


# --- one pass, no cascade, suggestions, warnings ---------------------------------------------


def test_a_bad_defaults_key_does_not_cascade_into_the_jobs():
    # Before: the whole [defaults] table was dropped, so every job lost its dataset and
    # reported errors it does not have ("a path needs a dataset with a router").
    problems = problems_of(
        '[defaults]\ndataset = "tiny"\nmax_failurs = 3\npriority = "high"\n'
        + routed_dataset_toml("tiny")
        + '\n[[jobs]]\nname = "a"\npath = 0\n[[jobs]]\nname = "b"\npath = 1\n'
    )
    heads = [p.split(":")[0] for p in problems]
    assert sorted(heads) == ["defaults.max_failurs", "defaults.priority"], problems
    assert any(p.endswith("did you mean 'max_failures'?") for p in problems)


def test_an_unknown_default_dataset_is_reported_once():
    problems = problems_of(
        '[defaults]\ndataset = "nope"\n[[jobs]]\nname = "a"\n[[jobs]]\nname = "b"\n'
    )
    assert len(problems) == 1 and problems[0].startswith("defaults.dataset: unknown dataset")


def test_a_bad_inherited_value_is_reported_once_and_a_job_own_value_on_the_job():
    problems = problems_of(
        '[defaults]\nhyper = { lr = -1 }\n[[jobs]]\nname = "a"\n[[jobs]]\nname = "b"\n'
        'hyper = { lr = -2 }\n[[jobs]]\nname = "c"\n'
    )
    assert [p.split(":")[0] for p in problems] == ["defaults.hyper.lr", "jobs[1] ('b').hyper.lr"]


@pytest.mark.parametrize(
    ("text", "head", "suggestion"),
    [
        ('[[jobs]]\nname = "a"\npriorty = 1\n', "jobs[0] ('a').priorty", "priority"),
        ("[hosts.h]\nallow_job = []\n", "hosts.h.allow_job", "allow_jobs"),
        ("[defaults]\ntimeout = 3\n", "defaults.timeout", "timeout_s"),
        ("job = []\n", "job", "jobs"),
        ('[[jobs]]\nname = "a"\nhyper = { step = 3 }\n', "jobs[0] ('a').hyper.step", "steps"),
        (
            '[datasets.d]\nsource = "synthetic"\nnum_documents = 9\n[datasets.d.router]\n'
            "num_paths = 2\nnum_featurs = 64\n",
            "datasets.d.router.num_featurs",
            "num_features",
        ),
        ('[datasets.d]\nsource = "synthetic"\nseeds = 1\n', "datasets.d.seeds", "seed"),
    ],
)
def test_an_unknown_key_names_the_nearest_valid_one(text: str, head: str, suggestion: str):
    problem = only_problem(text)
    assert problem.split(":")[0] == head
    assert problem.endswith(f"did you mean {suggestion!r}?"), problem


def test_an_unknown_recipe_names_the_nearest_one():
    problem = only_problem('[[jobs]]\nname = "a"\nrecipe = "gtp"\n')
    assert problem.endswith("did you mean 'gpt'?"), problem


def test_a_key_nothing_like_any_valid_one_gets_no_suggestion():
    assert "did you mean" not in only_problem('[[jobs]]\nname = "a"\nzzzzqqq = 1\n')


def test_host_patterns_that_match_no_job_are_warnings_not_errors():
    manifest = manifest_of(
        """
        [hosts.a]
        allow_jobs = ["gpt-*", "lnear-*"]
        deny_jobs = ["gpt-wide-*"]
        [hosts.b]
        [[jobs]]
        name = "gpt-small"
        [[jobs]]
        name = "linear-1"
        kind = "command"
        command = ["true"]
        """
    )
    assert len(manifest.jobs) == 2
    assert manifest.warnings == [
        "hosts.a.allow_jobs: pattern 'lnear-*' matches no job; did you mean 'linear-1'?",
        "hosts.a.deny_jobs: pattern 'gpt-wide-*' matches no job",
    ]
    # Warnings are not part of what the manifest is: its hash ignores them.
    assert "warnings" not in manifest.model_dump()


def test_max_attempts_still_reads_as_max_failures_with_a_warning():
    manifest = manifest_of(
        '[defaults]\nmax_attempts = 4\n[[jobs]]\nname = "a"\n[[jobs]]\nname = "b"\n'
        "max_attempts = 2\n"
    )
    assert [j.max_failures for j in manifest.jobs] == [4, 2]
    assert len(manifest.warnings) == 1
    assert "max_attempts is deprecated" in manifest.warnings[0]
    assert "defaults.max_attempts" in manifest.warnings[0]
    assert "jobs[1] ('b').max_attempts" in manifest.warnings[0]
    assert manifest_of('[[jobs]]\nname = "a"\nmax_failures = 2\n').warnings == []


def test_setting_both_names_of_max_failures_is_an_error():
    problem = only_problem('[[jobs]]\nname = "a"\nmax_attempts = 2\nmax_failures = 3\n')
    assert problem.startswith("jobs[0] ('a').max_attempts: renamed to max_failures")


def test_a_spec_stored_with_the_old_key_still_reads():
    from trainfleet.manifest.spec import JobSpec

    assert JobSpec.model_validate({"name": "a", "max_attempts": 5}).max_failures == 5


@pytest.mark.parametrize(
    "text",
    [
        "a = " + "[" * 50_000 + "]" * 50_000 + "\n",
        "a = " + "{ b = " * 5_000 + "1" + " }" * 5_000 + "\n",
        "[" + ".".join(["t"] * 200) + "]\nx = 1\n",
    ],
    ids=["arrays", "inline-tables", "dotted-tables"],
)
def test_deep_nesting_is_a_manifest_error_not_a_recursion_error(text: str):
    problem = only_problem(text)
    assert "nested deeper than" in problem
