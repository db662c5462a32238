"""Load a TOML manifest into a validated ``Manifest``, naming file, job and field on error.

Every problem is found in one pass: a bad ``[defaults]`` key is reported once, on
``defaults``, and dropped, so it does not cascade into an error on every job that inherits
it; an unknown key names the nearest valid one. What is suspicious but not wrong (a host
pattern that matches no job, a renamed key) becomes a warning on ``Manifest.warnings``.
"""

from __future__ import annotations

import difflib
import tomllib
import types
import typing
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from trainfleet.capability.policy import declared_capability
from trainfleet.data.spec import (
    SOURCES,
    DatasetSpec,
    FilesDataset,
    HuggingFaceDataset,
    StdlibDataset,
    SyntheticDataset,
)
from trainfleet.data.tokenize import get_tokenizer
from trainfleet.errors import ManifestError, ManifestTooDeep
from trainfleet.manifest.deps import after_problems
from trainfleet.manifest.names import HOST_NAME_RULE, HostName, Name
from trainfleet.manifest.pipelines import STUDENT_IGNORED, PipelineSpec
from trainfleet.manifest.runs import RunSpec
from trainfleet.manifest.spec import (
    RENAMED_KEYS,
    Defaults,
    FairShareSpec,
    HostPolicy,
    JobSpec,
    Manifest,
)
from trainfleet.queue.matching import blockers
from trainfleet.train.recipes import RECIPES, GPTParams

_TOP_LEVEL = {"defaults", "hosts", "datasets", "jobs", "runs", "pipelines", "fair_share"}
_NAME: TypeAdapter[str] = TypeAdapter(Name)
_HOST_NAME: TypeAdapter[str] = TypeAdapter(HostName)
_DATASET: TypeAdapter[Any] = TypeAdapter(DatasetSpec)
_SOURCE_MODELS: dict[str, type[BaseModel]] = {
    "synthetic": SyntheticDataset,
    "stdlib": StdlibDataset,
    "files": FilesDataset,
    "huggingface": HuggingFaceDataset,
}
# Tables and arrays nested deeper than this are refused (no manifest needs it). The one
# limit: the loader applies it, and so does ``POST /v1/manifest`` before it parses.
MAX_DEPTH = 32


def nested_too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether parsed TOML nests tables/arrays more than ``limit`` levels below the top-level
    table (``a = [[1]]`` is 2 levels, ``[t.u]`` is 2); iterative, so no recursion."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        if not isinstance(node, (dict, list)):
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _read_toml(text: str, path: str) -> dict[str, Any]:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ManifestError(path, [f"not valid TOML: {err}"]) from None
    except RecursionError:
        raise ManifestTooDeep(path, [f"nested deeper than {MAX_DEPTH} levels"]) from None
    if nested_too_deep(raw):
        raise ManifestTooDeep(path, [f"nested deeper than {MAX_DEPTH} levels"])
    return raw


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (``RouterSpec | None`` -> ``RouterSpec``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, typing.Annotated):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _keys_at(model: type[BaseModel] | None, loc: tuple[int | str, ...]) -> list[str]:
    """The valid keys of the table at ``loc`` inside ``model`` (empty when unknown)."""
    for part in loc:
        field = model.model_fields.get(part) if model and isinstance(part, str) else None
        if field is None:
            return []
        model = _model_in(field.annotation)
    return list(model.model_fields) if model is not None else []


def suggest(key: str, valid: list[str] | set[str]) -> str:
    """'; did you mean 'x'?' for the valid key nearest to ``key``, or ''."""
    close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _where(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _problems(prefix: str, err: ValidationError, model: type[BaseModel] | None = None) -> list[str]:
    # An error about the whole value (empty loc) belongs to the prefix itself, e.g. "hyper".
    # A discriminated union puts the chosen tag first in the location (``synthetic.seed``);
    # the manifest has no such key, so it is dropped (and names the model to suggest from).
    problems = []
    for e in err.errors():
        loc, within = e["loc"], model
        if loc and loc[0] in SOURCES:
            loc, within = loc[1:], _SOURCE_MODELS[str(loc[0])]
        msg = e["msg"]
        if e["type"] == "extra_forbidden" and loc and isinstance(loc[-1], str):
            msg += suggest(loc[-1], _keys_at(within, loc[:-1]))
        problems.append(f"{prefix}{_where(loc)}: {msg}" if loc else f"{prefix.rstrip('.')}: {msg}")
    return problems


def _validate(
    model: type[BaseModel] | TypeAdapter[Any], raw: Any, prefix: str, problems: list[str]
) -> Any:
    try:
        if isinstance(model, TypeAdapter):
            return model.validate_python(raw)
        return model.model_validate(raw)
    except ValidationError as err:
        problems.extend(_problems(prefix, err, model if isinstance(model, type) else None))
        return None


def _renamed_keys(
    raw: dict[str, Any], where: str, problems: list[str], renamed: list[str]
) -> dict[str, Any]:
    """``raw`` with renamed keys under their new names; the places that used an old one are
    noted in ``renamed`` (for a warning). Setting both names is a problem."""
    raw = dict(raw)
    for old, new in RENAMED_KEYS.items():
        if old not in raw:
            continue
        value = raw.pop(old)
        if new in raw:
            problems.append(f"{where}.{old}: renamed to {new}; set only {new}")
        else:
            raw[new] = value
            renamed.append(f"{where}.{old}")
    return raw


def _parse_defaults(
    raw: Any, datasets: dict[str, Any], problems: list[str], renamed: list[str]
) -> Defaults:
    """Validate ``[defaults]`` key by key: a bad key is reported here, once, and dropped, so
    the jobs that would have inherited it are judged without it."""
    if not isinstance(raw, dict):
        problems.append("defaults: must be a table")
        return Defaults()
    raw = _renamed_keys(raw, "defaults", problems, renamed)
    try:
        defaults = Defaults.model_validate(raw)
    except ValidationError as err:
        problems.extend(_problems("defaults.", err, Defaults))
        bad = {e["loc"][0] for e in err.errors() if e["loc"]}
        try:
            defaults = Defaults.model_validate({k: v for k, v in raw.items() if k not in bad})
        except ValidationError:
            return Defaults()
    drop: dict[str, Any] = {}
    if defaults.dataset is not None and defaults.dataset not in datasets:
        known = sorted(datasets) or "none declared"
        problems.append(f"defaults.dataset: unknown dataset {defaults.dataset!r} (known: {known})")
        drop["dataset"] = None
    if defaults.recipe is not None and defaults.recipe not in RECIPES:
        problems.append(
            f"defaults.recipe: unknown recipe {defaults.recipe!r}; known: {sorted(RECIPES)}"
            + suggest(defaults.recipe, set(RECIPES))
        )
        drop["recipe"] = None
    return defaults.model_copy(update=drop) if drop else defaults


def _inherited(body: dict[str, Any], defaults: Defaults) -> list[str]:
    """The keys (``hyper.KEY`` for hyper) a job takes from ``[defaults]`` rather than sets."""
    keys = [k for k in defaults.model_fields_set if k not in body and k != "hyper"]
    hyper = body.get("hyper", {})
    if isinstance(hyper, dict):
        keys += [f"hyper.{k}" for k in defaults.hyper if k not in hyper]
    return keys


def _attribute(job_problems: list[str], where: str, inherited: list[str]) -> list[str]:
    """Move a problem about an inherited value from the job to ``defaults`` (where it was
    written), so that it is reported once rather than on every job."""
    out = []
    for problem in job_problems:
        for key in inherited:
            head = f"{where}.{key}"
            after = problem[len(head) : len(head) + 1]
            if key != "allowed_hosts" and problem.startswith(head) and after in (":", ".", "["):
                problem = "defaults." + problem[len(where) + 1 :]
                break
        out.append(problem)
    return out


def _pattern_warnings(hosts: dict[str, HostPolicy], names: list[str]) -> list[str]:
    """A host's allow/deny pattern that matches no job is probably a typo: say so."""
    warnings = []
    for host, policy in hosts.items():
        for key in ("allow_jobs", "deny_jobs"):
            for pattern in getattr(policy, key):
                if pattern != "*" and not any(fnmatchcase(n, pattern) for n in names):
                    warnings.append(
                        f"hosts.{host}.{key}: pattern {pattern!r} matches no job"
                        + suggest(pattern, names)
                    )
    return warnings


def _named_tables(raw: Any, key: str, problems: list[str]) -> dict[str, Any]:
    """The [KEY.NAME] tables of a manifest, bad names reported and dropped. A host's NAME
    must be one that can be enrolled (or no worker could ever be that host)."""
    if not isinstance(raw, dict):
        problems.append(f"{key}: must be a table of [{key}.NAME] tables")
        return {}
    adapter, why = (
        (_HOST_NAME, f"not a host name that can be enrolled ({HOST_NAME_RULE})")
        if key == "hosts"
        else (_NAME, "invalid name (letters, digits, . _ -)")
    )
    tables = {}
    for name, body in raw.items():
        try:
            adapter.validate_python(name)
        except ValidationError:
            problems.append(f"{key}.{name[:80]!r}: {why}")
            continue
        tables[name] = body
    return tables


def _parse_datasets(raw: Any, problems: list[str]) -> dict[str, Any]:
    datasets = {}
    for name, body in _named_tables(raw, "datasets", problems).items():
        if not isinstance(body, dict):
            problems.append(f"datasets.{name}: must be a table")
            continue
        if "name" in body:
            problems.append(f"datasets.{name}.name: set by the table name; remove it")
            continue
        spec = _validate(_DATASET, {**body, "name": name}, f"datasets.{name}.", problems)
        if spec is None:
            continue
        try:
            get_tokenizer(spec.tokenizer)
        except ValueError as err:
            problems.append(f"datasets.{name}.tokenizer: {err}")
            continue
        datasets[name] = spec
    return datasets


def _resolve_dataset(
    merged: dict[str, Any], datasets: dict[str, Any], where: str, problems: list[str]
) -> bool:
    """Replace the job's dataset name by its spec; False (and a problem) if it cannot."""
    name = merged.get("dataset")
    if name is None:
        return True
    if not isinstance(name, str):
        problems.append(f"{where}.dataset: must be the name of a [datasets.NAME] table")
        return False
    if name not in datasets:
        known = sorted(datasets) or "none declared"
        problems.append(f"{where}.dataset: unknown dataset {name!r} (known: {known})")
        return False
    merged["dataset"] = datasets[name]
    return True


def _check_dataset(job: JobSpec, where: str, problems: list[str]) -> None:
    dataset = job.dataset
    if dataset is None:
        if job.path is not None:
            problems.append(f"{where}.path: a path needs a dataset with a router")
        return
    if job.kind != "train":
        problems.append(f"{where}.dataset: only kind='train' jobs take a dataset")
    if dataset.router is None:
        if job.path is not None:
            problems.append(f"{where}.path: dataset {dataset.name!r} has no router")
    elif job.path is None:
        problems.append(
            f"{where}.path: dataset {dataset.name!r} is routed to "
            f"{dataset.router.num_paths} paths; say which one (path = 0..)"
        )
    elif job.path >= dataset.router.num_paths:
        problems.append(
            f"{where}.path: {job.path} is out of range; dataset {dataset.name!r} has "
            f"{dataset.router.num_paths} paths (0..{dataset.router.num_paths - 1})"
        )


def _check_job(
    job: JobSpec, hosts: dict[str, HostPolicy], where: str, problems: list[str]
) -> JobSpec:
    """Add the job's problems to ``problems``; return the job with a train job's ``hyper`` as
    its recipe reads it (``lr = 1`` and ``lr = 1.0`` are one job). Only the keys the
    manifest set are kept, so adding a recipe default later changes no id."""
    if job.kind == "replica":
        problems.append(
            f"{where}.kind: 'replica' jobs are a run's tasks, made by the coordinator;"
            " declare a [[runs]] table instead"
        )
    elif job.kind == "referee":
        problems.append(
            f"{where}.kind: 'referee' jobs re-measure market submissions, made by the"
            " coordinator; they are never written in a manifest"
        )
    elif job.kind == "train":
        if job.command is not None:
            problems.append(f"{where}.command: only kind='command' jobs take a command")
        recipe = RECIPES.get(job.recipe or "")
        if recipe is None:
            problems.append(
                f"{where}.recipe: unknown recipe {job.recipe!r}; known: {sorted(RECIPES)}"
                + suggest(job.recipe or "", set(RECIPES))
            )
        else:
            if job.mode not in recipe.modes:
                problems.append(f"{where}.mode: recipe {recipe.name!r} has modes {recipe.modes}")
            try:
                params = recipe.params.model_validate(job.hyper)
            except ValidationError as err:
                problems.extend(_problems(f"{where}.hyper.", err, recipe.params))
            else:
                job = job.model_copy(update={"hyper": {k: getattr(params, k) for k in job.hyper}})
    else:
        if not job.command:
            problems.append(f"{where}.command: kind='command' jobs need a non-empty command")
        if job.recipe is not None:
            problems.append(f"{where}.recipe: only kind='train' jobs take a recipe")
    _check_dataset(job, where, problems)
    if job.min_vram_gib > 0 and not job.require_cuda:
        problems.append(f"{where}.min_vram_gib: a VRAM minimum needs require_cuda = true")
    # Impossible placement: every allowed host is declared and none of them can run it.
    if job.allowed_hosts and all(h in hosts for h in job.allowed_hosts):
        reasons = []
        for host in job.allowed_hosts:
            policy = hosts[host]
            why = blockers(job, declared_capability(host, policy), policy)
            if not why:
                break
            reasons.append(f"{host}: {'; '.join(why)}")
        else:
            problems.append(
                f"{where}.allowed_hosts: no allowed host can run this job ({' | '.join(reasons)})"
            )
    return job


def parse_manifest(
    text: str, path: str = "<manifest>", *, external_after: bool = False
) -> Manifest:
    """Parse and validate manifest text. Raises ``ManifestError`` listing every problem.

    ``external_after``: a job's ``after`` may name a job not in this text (one submitted to
    the coordinator, which checks those names itself: ``queue.deps.check_reload``)."""
    raw = _read_toml(text, path)
    problems: list[str] = []
    renamed: list[str] = []
    for key in sorted(set(raw) - _TOP_LEVEL):
        problems.append(
            f"{key}: unknown top-level key (expected one of {sorted(_TOP_LEVEL)})"
            + suggest(key, _TOP_LEVEL)
        )
    hosts: dict[str, HostPolicy] = {}
    for name, body in _named_tables(raw.get("hosts", {}), "hosts", problems).items():
        policy = _validate(HostPolicy, body, f"hosts.{name}.", problems)
        if policy is not None:
            hosts[name] = policy
    datasets = _parse_datasets(raw.get("datasets", {}), problems)
    defaults = _parse_defaults(raw.get("defaults", {}), datasets, problems, renamed)
    fair_share = _validate(FairShareSpec, raw.get("fair_share", {}), "fair_share.", problems)
    raw_jobs = raw.get("jobs", [])
    if not isinstance(raw_jobs, list):
        problems.append("jobs: must be an array of [[jobs]] tables")
        raw_jobs = []
    jobs: list[JobSpec] = []
    wheres: dict[str, str] = {}  # job name -> its place in the file, for ``after`` problems
    seen: dict[str, int] = {}
    for i, body in enumerate(raw_jobs):
        label = body.get("name") if isinstance(body, dict) else None
        where = f"jobs[{i}] ({label!r})" if label else f"jobs[{i}]"
        if not isinstance(body, dict):
            problems.append(f"{where}: must be a table")
            continue
        job_problems: list[str] = []
        body = _renamed_keys(body, where, job_problems, renamed)
        merged = defaults.apply(body)
        if merged.get("kind", "train") == "train":
            merged.setdefault("recipe", "gpt")
        resolved = _resolve_dataset(merged, datasets, where, job_problems)
        job = _validate(JobSpec, merged, f"{where}.", job_problems) if resolved else None
        # Duplicates are judged on the raw name, so a job with other problems still counts.
        if isinstance(label, str) and label in seen:
            job_problems.append(f"{where}.name: duplicate job name (first at jobs[{seen[label]}])")
            job = None
        elif isinstance(label, str):
            seen[label] = i
        if job is not None:
            jobs.append(_check_job(job, hosts, where, job_problems))
            wheres[job.name] = where
        for problem in _attribute(job_problems, where, _inherited(body, defaults)):
            if not (problem.startswith("defaults.") and problem in problems):
                problems.append(problem)
    problems += after_problems(jobs, wheres, external=external_after)
    runs = _parse_runs(raw.get("runs", []), datasets, hosts, {j.name for j in jobs}, problems)
    pipelines = _parse_pipelines(
        raw.get("pipelines", []), datasets, jobs, {r.name for r in runs}, problems
    )
    if problems:
        raise ManifestError(path, problems)
    warnings = _pattern_warnings(
        hosts, [job.name for job in jobs] + [f"{run.name}.r0.k0" for run in runs]
    )
    if renamed:
        warnings.append(
            "max_attempts is deprecated: it is now max_failures (failed or lost attempts;"
            f" a hand-back does not count); rename it in {', '.join(renamed)}"
        )
    return Manifest(
        defaults=defaults,
        fair_share=fair_share,
        hosts=hosts,
        datasets=datasets,
        jobs=jobs,
        runs=runs,
        pipelines=pipelines,
        warnings=warnings,
    )


_RUN_IGNORED_HYPER = ("steps", "corpus", "corpus_bytes", "heldout_fraction")


def _parse_runs(
    raw_runs: Any,
    datasets: dict[str, Any],
    hosts: dict[str, HostPolicy],
    job_names: set[str],
    problems: list[str],
) -> list[RunSpec]:
    """``[[runs]]``: each validated like a job (the dataset named, hyper as the recipe's
    params, host placement possible). ``[defaults]`` does not apply to runs."""
    if not isinstance(raw_runs, list):
        problems.append("runs: must be an array of [[runs]] tables")
        return []
    runs: list[RunSpec] = []
    seen: dict[str, int] = {}
    for i, body in enumerate(raw_runs):
        label = body.get("name") if isinstance(body, dict) else None
        where = f"runs[{i}] ({label!r})" if label else f"runs[{i}]"
        if not isinstance(body, dict):
            problems.append(f"{where}: must be a table")
            continue
        merged = dict(body)
        if "dataset" not in merged:
            problems.append(f"{where}.dataset: a run needs a dataset (a [datasets.NAME] table)")
            continue
        if not _resolve_dataset(merged, datasets, where, problems):
            continue
        run = _validate(RunSpec, merged, f"{where}.", problems)
        if isinstance(label, str) and label in seen:
            problems.append(f"{where}.name: duplicate run name (first at runs[{seen[label]}])")
            continue
        if isinstance(label, str):
            seen[label] = i
            if label in job_names:
                problems.append(f"{where}.name: a job is named {label!r} too; pick another")
        if run is not None:
            runs.append(_check_run(run, hosts, where, problems))
    return runs


def _check_run(
    run: RunSpec, hosts: dict[str, HostPolicy], where: str, problems: list[str]
) -> RunSpec:
    ignored = [k for k in _RUN_IGNORED_HYPER if k in run.hyper]
    if ignored:
        problems.append(
            f"{where}.hyper: {', '.join(ignored)} do not apply to a run (its budget is rounds"
            " or tokens; its data is the dataset)"
        )
    try:
        params = RECIPES[run.recipe].params.model_validate(run.hyper)
    except ValidationError as err:
        problems.extend(_problems(f"{where}.hyper.", err, RECIPES[run.recipe].params))
        return run
    if run.dataset.router is not None:
        problems.append(f"{where}.dataset: a run trains on a dataset without a router")
    if run.min_vram_gib > 0 and not run.require_cuda:
        problems.append(f"{where}.min_vram_gib: a VRAM minimum needs require_cuda = true")
    gpt = typing.cast(GPTParams, params)
    if run.warmup_rounds >= run.num_rounds(gpt.batch_size, gpt.seq_len):
        problems.append(f"{where}.warmup_rounds: must be fewer than the run's rounds")
    placement = JobSpec(
        name=f"{run.name}.r0.k0",
        kind="command",
        command=["replica"],
        require_cuda=run.require_cuda,
        min_vram_gib=run.min_vram_gib,
        min_ram_gib=run.min_ram_gib,
        min_cores=run.min_cores,
        allowed_hosts=run.allowed_hosts,
    )
    _check_job(placement, hosts, where, problems)  # an impossible placement is reported
    return run.model_copy(update={"hyper": {k: getattr(params, k) for k in run.hyper}})


def _parse_pipelines(
    raw: Any,
    datasets: dict[str, Any],
    jobs: list[JobSpec],
    run_names: set[str],
    problems: list[str],
) -> list[PipelineSpec]:
    """``[[pipelines]]``: each names its dataset (resolved like a run's) and its teacher job;
    ``[defaults]`` does not apply. The teacher's id is filled in (part of the identity)."""
    if not isinstance(raw, list):
        problems.append("pipelines: must be an array of [[pipelines]] tables")
        return []
    by_name = {job.name: job for job in jobs}
    pipelines: list[PipelineSpec] = []
    seen: dict[str, int] = {}
    for i, body in enumerate(raw):
        label = body.get("name") if isinstance(body, dict) else None
        where = f"pipelines[{i}] ({label!r})" if label else f"pipelines[{i}]"
        if not isinstance(body, dict):
            problems.append(f"{where}: must be a table")
            continue
        if "teacher_id" in body:
            problems.append(f"{where}.teacher_id: set by the loader from teacher; remove it")
            continue
        merged = dict(body)
        if "dataset" not in merged:
            problems.append(f"{where}.dataset: a pipeline needs a dataset (a [datasets.NAME])")
            continue
        if not _resolve_dataset(merged, datasets, where, problems):
            continue
        spec = _validate(PipelineSpec, merged, f"{where}.", problems)
        if isinstance(label, str) and label in seen:
            problems.append(f"{where}.name: duplicate pipeline name (first at [{seen[label]}])")
            continue
        if isinstance(label, str):
            seen[label] = i
            if label in by_name or label in run_names:
                problems.append(f"{where}.name: a job or run is named {label!r} too")
        if spec is not None:
            checked = _check_pipeline(spec, by_name, where, problems)
            if checked is not None:
                pipelines.append(checked)
    return pipelines


def _check_pipeline(
    spec: PipelineSpec, jobs: dict[str, JobSpec], where: str, problems: list[str]
) -> PipelineSpec | None:
    """The pipeline with its teacher's id and its student as GPTParams read them, or None
    (and problems)."""
    from trainfleet.manifest.identity import job_id

    teacher = jobs.get(spec.teacher)
    if teacher is None or teacher.kind != "train" or teacher.recipe != "gpt":
        problems.append(
            f"{where}.teacher: {spec.teacher!r} names no [[jobs]] train job of recipe 'gpt'"
            + suggest(spec.teacher, [j.name for j in jobs.values() if j.kind == "train"])
        )
        return None
    if teacher.tier == "private":
        problems.append(
            f"{where}.teacher: {spec.teacher!r} is a private job; a pipeline hands its"
            " teacher's model to producer workers and its logits to students outside the"
            " private tier"
        )
        return None
    if spec.dataset.router is not None:
        problems.append(f"{where}.dataset: a pipeline draws from a dataset without a router")
    ignored = [k for k in STUDENT_IGNORED if k in spec.student]
    if ignored:
        problems.append(
            f"{where}.student: {', '.join(ignored)} do not apply to a student (its steps are"
            " the samples; its data the dataset)"
        )
        return None
    try:
        student = GPTParams.model_validate(spec.student)
    except ValidationError as err:
        problems.extend(_problems(f"{where}.student.", err, GPTParams))
        return None
    teacher_seq_len = GPTParams.model_validate(teacher.hyper).seq_len
    if student.seq_len > teacher_seq_len:
        problems.append(
            f"{where}.student.seq_len: {student.seq_len} is longer than the teacher's"
            f" ({teacher_seq_len}); the teacher cannot label positions it never saw"
        )
    normalized = {k: getattr(student, k) for k in spec.student}
    return spec.model_copy(update={"student": normalized, "teacher_id": job_id(teacher)})


def load_manifest(path: str | Path, *, external_after: bool = False) -> Manifest:
    """Read and parse a manifest file (``external_after``: as ``parse_manifest``'s)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise ManifestError(str(p), [f"cannot read: {err.strerror or err}"]) from None
    return parse_manifest(text, str(p), external_after=external_after)
