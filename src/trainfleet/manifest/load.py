"""Load a TOML manifest into a validated ``Manifest``, naming file, job and field on error."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from trainfleet.capability.policy import declared_capability
from trainfleet.data.spec import SOURCES, DatasetSpec
from trainfleet.data.tokenize import get_tokenizer
from trainfleet.errors import ManifestError
from trainfleet.manifest.spec import Defaults, HostPolicy, JobSpec, Manifest, Name
from trainfleet.queue.matching import blockers
from trainfleet.train.recipes import RECIPES

_TOP_LEVEL = {"defaults", "hosts", "datasets", "jobs"}
_NAME: TypeAdapter[str] = TypeAdapter(Name)
_DATASET: TypeAdapter[Any] = TypeAdapter(DatasetSpec)


def _where(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _problems(prefix: str, err: ValidationError, union_tags: tuple[str, ...] = ()) -> list[str]:
    # An error about the whole value (empty loc) belongs to the prefix itself, e.g. "hyper".
    # A discriminated union puts the chosen tag first in the location (``synthetic.seed``);
    # the manifest has no such key, so it is dropped.
    problems = []
    for e in err.errors():
        loc = e["loc"]
        if loc and loc[0] in union_tags:
            loc = loc[1:]
        problems.append(
            f"{prefix}{_where(loc)}: {e['msg']}" if loc else f"{prefix.rstrip('.')}: {e['msg']}"
        )
    return problems


def _validate(
    model: type[BaseModel] | TypeAdapter[Any], raw: Any, prefix: str, problems: list[str]
) -> Any:
    try:
        if isinstance(model, TypeAdapter):
            return model.validate_python(raw)
        return model.model_validate(raw)
    except ValidationError as err:
        problems.extend(_problems(prefix, err, SOURCES))
        return None


def _named_tables(raw: Any, key: str, problems: list[str]) -> dict[str, Any]:
    """The [KEY.NAME] tables of a manifest, bad names reported and dropped."""
    if not isinstance(raw, dict):
        problems.append(f"{key}: must be a table of [{key}.NAME] tables")
        return {}
    tables = {}
    for name, body in raw.items():
        try:
            _NAME.validate_python(name)
        except ValidationError:
            problems.append(f"{key}.{name!r}: invalid name (letters, digits, . _ -)")
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
    if job.kind == "train":
        if job.command is not None:
            problems.append(f"{where}.command: only kind='command' jobs take a command")
        recipe = RECIPES.get(job.recipe or "")
        if recipe is None:
            problems.append(
                f"{where}.recipe: unknown recipe {job.recipe!r}; known: {sorted(RECIPES)}"
            )
        else:
            if job.mode not in recipe.modes:
                problems.append(f"{where}.mode: recipe {recipe.name!r} has modes {recipe.modes}")
            try:
                params = recipe.params.model_validate(job.hyper)
            except ValidationError as err:
                problems.extend(_problems(f"{where}.hyper.", err))
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


def parse_manifest(text: str, path: str = "<manifest>") -> Manifest:
    """Parse and validate manifest text. Raises ``ManifestError`` listing every problem."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ManifestError(path, [f"not valid TOML: {err}"]) from None
    problems: list[str] = []
    for key in sorted(set(raw) - _TOP_LEVEL):
        problems.append(f"{key}: unknown top-level key (expected one of {sorted(_TOP_LEVEL)})")
    defaults = _validate(Defaults, raw.get("defaults", {}), "defaults.", problems) or Defaults()
    hosts: dict[str, HostPolicy] = {}
    for name, body in _named_tables(raw.get("hosts", {}), "hosts", problems).items():
        policy = _validate(HostPolicy, body, f"hosts.{name}.", problems)
        if policy is not None:
            hosts[name] = policy
    datasets = _parse_datasets(raw.get("datasets", {}), problems)
    raw_jobs = raw.get("jobs", [])
    if not isinstance(raw_jobs, list):
        problems.append("jobs: must be an array of [[jobs]] tables")
        raw_jobs = []
    jobs: list[JobSpec] = []
    seen: dict[str, int] = {}
    for i, body in enumerate(raw_jobs):
        label = body.get("name") if isinstance(body, dict) else None
        where = f"jobs[{i}] ({label!r})" if label else f"jobs[{i}]"
        if not isinstance(body, dict):
            problems.append(f"{where}: must be a table")
            continue
        merged = defaults.apply(body)
        if merged.get("kind", "train") == "train":
            merged.setdefault("recipe", "gpt")
        resolved = _resolve_dataset(merged, datasets, where, problems)
        job = _validate(JobSpec, merged, f"{where}.", problems) if resolved else None
        # Duplicates are judged on the raw name, so a job with other problems still counts.
        if isinstance(label, str) and label in seen:
            problems.append(f"{where}.name: duplicate job name (first at jobs[{seen[label]}])")
            continue
        if isinstance(label, str):
            seen[label] = i
        if job is None:
            continue
        jobs.append(_check_job(job, hosts, where, problems))
    if problems:
        raise ManifestError(path, problems)
    return Manifest(defaults=defaults, hosts=hosts, datasets=datasets, jobs=jobs)


def load_manifest(path: str | Path) -> Manifest:
    """Read and parse a manifest file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise ManifestError(str(p), [f"cannot read: {err.strerror or err}"]) from None
    return parse_manifest(text, str(p))
