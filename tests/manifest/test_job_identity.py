"""Job identity: an id depends on what a job *is*, never on how its TOML is written.

Jobs are generated as dicts and rendered to TOML by a tiny renderer below. Every choice it
makes (key order, string quoting, number spelling, inline vs dotted vs sub-table ``hyper``,
spacing, comments, section order) comes from a ``style``: ``Plain`` always takes the first
option, ``Drawn`` lets Hypothesis choose. Any two renderings of the same dict must give the
same ids and the same manifest hash.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetkit import manifest_of
from trainfleet.manifest import job_id, manifest_hash, parse_manifest

T = TypeVar("T")


class Style(Protocol):
    def order(self, items: Sequence[T]) -> list[T]: ...

    def pick(self, options: Sequence[str]) -> str: ...


class Plain:
    """The canonical rendering: given order, first option everywhere."""

    def order(self, items: Sequence[T]) -> list[T]:
        return list(items)

    def pick(self, options: Sequence[str]) -> str:
        return options[0]


class Drawn:
    """A rendering chosen by Hypothesis."""

    def __init__(self, data: st.DataObject):
        self.data = data

    def order(self, items: Sequence[T]) -> list[T]:
        return self.data.draw(st.permutations(list(items)))

    def pick(self, options: Sequence[str]) -> str:
        return self.data.draw(st.sampled_from(list(options)))


# --- the renderer -----------------------------------------------------------------------


def _float_g17(x: float) -> str:
    text = format(x, ".17g")  # another spelling that parses back to the same float
    return text if any(c in text for c in ".en") else text + ".0"


def render_value(value: Any, style: Style) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return style.pick([str(value), f"{value:_}", f"+{value}" if value >= 0 else str(value)])
    if isinstance(value, float):
        return style.pick([repr(value), _float_g17(value)])
    if isinstance(value, str):
        return style.pick([json.dumps(value), f"'{value}'"])
    if isinstance(value, list):
        sep = style.pick([", ", ",", " ,  "])
        return "[" + sep.join(render_value(v, style) for v in value) + "]"
    raise AssertionError(f"cannot render {value!r}")


def render_key(key: str, style: Style) -> str:
    return style.pick([key, f'"{key}"', f"'{key}'"])


def render_pair(key: str, value: Any, style: Style) -> str:
    indent = style.pick(["", "  ", "\t"])
    eq = style.pick([" = ", "=", "  =\t", " =  "])
    trailer = style.pick(["", "  # a comment", "\t# x = 1 [jobs]", " #"])
    return f"{indent}{key}{eq}{value}{trailer}"


def render_table(header: str, body: dict[str, Any], style: Style) -> list[str]:
    """``[header]`` (or ``[[header]]`` when header is ``jobs``) with a ``hyper`` sub-table."""
    brackets = "[[{}]]" if header == "jobs" else "[{}]"
    lines = [brackets.format(header) + style.pick(["", "  # table"])]
    items: list[tuple[str, str]] = [
        (render_key(k, style), render_value(v, style)) for k, v in body.items() if k != "hyper"
    ]
    hyper = body.get("hyper")
    hyper_tail: list[str] = []
    if hyper is not None:
        hyper_keys = style.order(sorted(hyper))
        how = style.pick(["inline", "dotted", "table"])
        if how == "inline":
            sep = style.pick([", ", ",", "  ,  "])
            inner = sep.join(
                f"{render_key(k, style)} = {render_value(hyper[k], style)}" for k in hyper_keys
            )
            items.append(("hyper", style.pick(["{ " + inner + " }", "{" + inner + "}"])))
        elif how == "dotted":
            dot = style.pick([".", " . "])
            items += [
                (f"hyper{dot}{render_key(k, style)}", render_value(hyper[k], style))
                for k in hyper_keys
            ]
        else:
            hyper_tail.append(f"[{header}.hyper]")
            hyper_tail += [
                render_pair(render_key(k, style), render_value(hyper[k], style), style)
                for k in hyper_keys
            ]
    for key, value in style.order(items):
        lines.append(render_pair(key, value, style))
        lines.append(style.pick(["", "", "# between keys", "   "]))
    return lines + hyper_tail


def render_manifest(manifest: dict[str, Any], style: Style) -> str:
    """TOML for ``{"defaults": {...}, "hosts": {name: {...}}, "jobs": [{...}]}``."""
    sections: dict[str, list[str]] = {"defaults": [], "hosts": [], "jobs": []}
    if "defaults" in manifest:
        sections["defaults"] = render_table("defaults", manifest["defaults"], style)
    for name in style.order(list(manifest.get("hosts", {}))):
        # A bare key may not contain ".", which would nest tables.
        spelled = style.pick([f'"{name}"'] if "." in name else [name, f'"{name}"'])
        header = style.pick([f"hosts.{spelled}", f" hosts . {spelled} "])
        sections["hosts"] += render_table(header, manifest["hosts"][name], style)
    for job in manifest.get("jobs", []):  # job order is meaning, not formatting
        sections["jobs"] += render_table("jobs", job, style)
    lines = [style.pick(["", "# a manifest", "\n\n"])]
    for section in style.order(["defaults", "hosts", "jobs"]):
        lines += sections[section]
    return "\n".join(lines) + "\n"


# --- strategies -------------------------------------------------------------------------

names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,15}", fullmatch=True)
labels = st.text(alphabet="abcxyz0123 -_.", max_size=12)
hypers = st.fixed_dictionaries(
    {},
    optional={
        "lr": st.floats(min_value=0, max_value=1, exclude_min=True, allow_subnormal=False),
        "steps": st.integers(1, 1000),
        "seed": st.integers(0, 2**31),
        "warmup_steps": st.integers(0, 100),
        "corpus": st.sampled_from(["stdlib", "synthetic"]),
    },
)
scheduling = {
    "model": labels,
    "priority": st.integers(-10, 10),
    "max_failures": st.integers(1, 100),
    "timeout_s": st.floats(min_value=1, max_value=1e6, allow_subnormal=False),
    "min_cores": st.integers(1, 64),
    "prefer_cuda": st.booleans(),
    "allowed_hosts": st.lists(names, max_size=3),
}
jobs = st.fixed_dictionaries(
    {"name": names, "hyper": hypers},
    optional={"mode": st.sampled_from(["full", "smoke"]), **scheduling},
)
host_policies = st.fixed_dictionaries(
    {},
    optional={
        "description": labels,
        "priority": st.integers(-5, 5),
        "cuda": st.booleans(),
        "cores": st.integers(1, 128),
        "ram_gib": st.floats(min_value=0, max_value=1024, allow_subnormal=False),
        "allow_jobs": st.lists(st.sampled_from(["*", "gpt-*", "a*"]), min_size=1, max_size=2),
    },
)
defaults = st.fixed_dictionaries(
    {},
    optional={
        "hyper": hypers,
        "priority": st.integers(-10, 10),
        "max_failures": st.integers(1, 100),
        "prefer_cuda_wait_s": st.floats(min_value=0, max_value=600, allow_subnormal=False),
    },
)
manifests = st.fixed_dictionaries(
    {
        "defaults": defaults,
        "hosts": st.dictionaries(names, host_policies, max_size=3),
        "jobs": st.lists(jobs, min_size=1, max_size=3, unique_by=lambda j: j["name"]),
    }
)


def parse(text: str):
    return parse_manifest(text, "identity.toml")


# --- properties -------------------------------------------------------------------------


@settings(deadline=None, max_examples=50)
@given(job=jobs, data=st.data())
def test_job_id_ignores_key_order_whitespace_and_comments(job, data):
    plain = parse(render_manifest({"jobs": [job]}, Plain())).jobs[0]
    # The renderer really wrote what was generated (else the property would be vacuous).
    assert plain.name == job["name"]
    assert plain.hyper == job["hyper"]
    for _ in range(2):
        text = render_manifest({"jobs": [job]}, Drawn(data))
        drawn = parse(text).jobs[0]
        assert drawn == plain, text
        assert job_id(drawn) == job_id(plain), text


@settings(deadline=None, max_examples=50)
@given(manifest=manifests, data=st.data())
def test_manifest_hash_ignores_key_order_whitespace_and_comments(manifest, data):
    plain = parse(render_manifest(manifest, Plain()))
    assert [j.name for j in plain.jobs] == [j["name"] for j in manifest["jobs"]]
    assert set(plain.hosts) == set(manifest["hosts"])
    text = render_manifest(manifest, Drawn(data))
    drawn = parse(text)
    assert manifest_hash(drawn) == manifest_hash(plain), text
    assert [job_id(j) for j in drawn.jobs] == [job_id(j) for j in plain.jobs]


@settings(deadline=None)
@given(job=jobs, field=st.sampled_from(sorted(scheduling)), data=st.data())
def test_scheduling_fields_never_change_the_id(job, field, data):
    changed = {**job, field: data.draw(scheduling[field])}
    before = parse(render_manifest({"jobs": [job]}, Plain())).jobs[0]
    after = parse(render_manifest({"jobs": [changed]}, Plain())).jobs[0]
    assert job_id(after) == job_id(before)


# --- which fields are identity ----------------------------------------------------------

BASE = {"name": "gpt-a", "hyper": {"lr": 0.01, "steps": 100}}
COMMAND = {"name": "cmd", "kind": "command", "command": ["python", "t.py"], "hyper": {"lr": 0.5}}


def id_of(job: dict[str, Any], **manifest: Any) -> str:
    return job_id(parse(render_manifest({**manifest, "jobs": [job]}, Plain())).jobs[0])


def test_job_id_is_64_hex_chars():
    ident = id_of(BASE)
    assert len(ident) == 64
    int(ident, 16)


@pytest.mark.parametrize(
    "change",
    [
        {"name": "gpt-b"},
        {"mode": "smoke"},
        {"hyper": {"lr": 0.02, "steps": 100}},
        {"hyper": {"lr": 0.01, "steps": 101}},
        {"hyper": {"lr": 0.01, "steps": 100, "seed": 1}},
        {"hyper": {"lr": 0.01}},
    ],
    ids=["name", "mode", "hyper-lr", "hyper-steps", "hyper-added", "hyper-removed"],
)
def test_identity_fields_change_the_id(change):
    assert id_of({**BASE, **change}) != id_of(BASE)


@pytest.mark.parametrize(
    "change",
    [
        {"command": ["python", "t.py", "--fast"]},
        {"hyper": {"lr": 0.25}},
        {"kind": "train", "command": None},
    ],
    ids=["argv", "hyper", "kind"],
)
def test_command_identity_fields_change_the_id(change):
    changed = {k: v for k, v in {**COMMAND, **change}.items() if v is not None}
    assert id_of(changed) != id_of(COMMAND)


@pytest.mark.parametrize(
    "change",
    [
        {"priority": 7},
        {"timeout_s": 10},
        {"max_failures": 9},
        {"max_attempts": 9},  # the old name of max_failures, still read
        {"min_cores": 4},
        {"min_ram_gib": 8},
        {"allowed_hosts": ["somewhere"]},
        {"require_cuda": True, "min_vram_gib": 16},
        {"prefer_cuda": True},
        {"model": "another label"},
    ],
    ids=lambda change: ",".join(change),
)
@pytest.mark.parametrize("job", [BASE, COMMAND], ids=["train", "command"])
def test_scheduling_fields_do_not_change_the_id(job, change):
    assert id_of({**job, **change}) == id_of(job)


def test_default_hyper_is_identity_for_train_jobs_only():
    with_default = {"defaults": {"hyper": {"seed": 3}}}
    assert id_of(BASE, **with_default) != id_of(BASE)
    assert id_of(BASE, **with_default) == id_of({**BASE, "hyper": {**BASE["hyper"], "seed": 3}})
    assert id_of(COMMAND, **with_default) == id_of(COMMAND)


def test_scheduling_defaults_do_not_change_the_id():
    moved = {"defaults": {"priority": 4, "timeout_s": 99, "max_failures": 7, "min_cores": 2}}
    assert id_of(BASE, **moved) == id_of(BASE)


def test_manifest_hash_changes_with_content():
    base = manifest_of('[[jobs]]\nname = "a"\n')
    assert manifest_hash(manifest_of('[[jobs]]\nname = "a"\npriority = 1\n')) != manifest_hash(base)
    assert manifest_hash(manifest_of('[hosts.h]\n[[jobs]]\nname = "a"\n')) != manifest_hash(base)
    assert manifest_hash(manifest_of('# comment\n[[jobs]]\n name="a"\n')) == manifest_hash(base)


def test_int_and_float_spellings_of_a_recipe_param_are_one_job() -> None:
    one = manifest_of('[[jobs]]\nname = "a"\nhyper = { lr = 1 }')
    other = manifest_of('[[jobs]]\nname = "a"\nhyper = { lr = 1.0 }')
    assert job_id(one.jobs[0]) == job_id(other.jobs[0])
    assert one.jobs[0].hyper == {"lr": 1.0}
