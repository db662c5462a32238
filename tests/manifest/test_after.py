"""The loader's checks of ``after``: no self reference, no cycle (named), and names outside
the file only where the caller allows them (a coordinator's reload knows submitted jobs)."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trainfleet.errors import ManifestError
from trainfleet.manifest import parse_manifest
from trainfleet.manifest.deps import find_cycle


def jobs(*specs: tuple[str, list[str]]) -> str:
    head = '[[jobs]]\nkind = "command"\ncommand = ["true"]\n'
    return "".join(f'{head}name = "{n}"\nafter = {json.dumps(after)}\n' for n, after in specs)


def problems(text: str, **kw: bool) -> list[str]:
    with pytest.raises(ManifestError) as err:
        parse_manifest(text, "f.toml", **kw)
    return err.value.problems


def test_after_within_the_file_is_accepted() -> None:
    m = parse_manifest(jobs(("a", []), ("b", ["a"]), ("c", ["a", "b"])), "f.toml")
    assert [j.after for j in m.jobs] == [[], ["a"], ["a", "b"]]


def test_a_job_cannot_wait_for_itself() -> None:
    assert problems(jobs(("a", ["a"]))) == ["jobs[0] ('a').after: a job cannot wait for itself"]


def test_a_cycle_is_refused_and_named() -> None:
    text = jobs(("a", ["c"]), ("b", ["a"]), ("c", ["b"]), ("d", ["a"]))
    assert problems(text) == ["jobs[0] ('a').after: dependency cycle a -> c -> b -> a"]


def test_a_name_outside_the_file_needs_the_callers_leave() -> None:
    text = jobs(("a", []), ("b", ["a", "ghost"]))
    assert problems(text) == [
        "jobs[1] ('b').after: no job named 'ghost' in this manifest (a job submitted to the"
        " coordinator can be named on reload)"
    ]
    assert parse_manifest(text, "f.toml", external_after=True).jobs[1].after == ["a", "ghost"]


def test_a_name_twice_and_a_bad_name_are_problems() -> None:
    assert problems(jobs(("a", []), ("b", ["a", "a"]))) == [
        "jobs[1] ('b').after: names a job twice"
    ]
    assert any("jobs[0] ('a').after[0]" in p for p in problems(jobs(("a", ["no spaces"]))))


@given(st.dictionaries(st.sampled_from("abcdef"), st.lists(st.sampled_from("abcdef"), max_size=3)))
def test_find_cycle_finds_a_real_cycle_exactly_when_there_is_one(
    edges: dict[str, list[str]],
) -> None:
    cycle = find_cycle(edges)
    # Reference: a graph is acyclic iff repeatedly removing nodes with no edge into the
    # remaining graph empties it.
    left = dict(edges)
    while True:
        sinks = [n for n, out in left.items() if not any(m in left for m in out)]
        if not sinks:
            break
        for n in sinks:
            del left[n]
    assert (cycle is None) == (not left)
    if cycle is not None:
        assert cycle[0] == cycle[-1] and len(set(cycle[:-1])) == len(cycle) - 1
        assert all(b in edges[a] for a, b in itertools.pairwise(cycle))
