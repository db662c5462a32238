"""Job dependencies (``after``): the checks a manifest's names must pass, and cycle finding.

A job names the jobs it waits for by name. Within one file the loader refuses a job that
names itself, a cycle ("a -> b -> a": none of its jobs could ever start) and, unless its
caller allows names from outside the file, a name no job of the file has. A coordinator
allows outside names on reload and checks them itself against the jobs submitted to its
queue (``queue.deps.check_reload``), with the same ``find_cycle`` over both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from trainfleet.manifest.spec import JobSpec


def find_cycle(edges: Mapping[str, Sequence[str]]) -> list[str] | None:
    """A cycle in the graph ``name -> names it waits for``, as its names with the first
    repeated at the end (``["a", "b", "a"]``), or None. Names without edges of their own
    (outside the graph) end a path. Iterative, so a long chain cannot exhaust the stack."""
    done: set[str] = set()
    for start in sorted(edges):
        if start in done:
            continue
        path: list[str] = [start]
        on_path = {start}
        stack = [iter(edges.get(start, ()))]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                name = path.pop()
                on_path.discard(name)
                done.add(name)
                continue
            if nxt in on_path:
                return [*path[path.index(nxt) :], nxt]
            if nxt in done or nxt not in edges:
                continue
            path.append(nxt)
            on_path.add(nxt)
            stack.append(iter(edges[nxt]))
    return None


def cycle_text(cycle: list[str]) -> str:
    return " -> ".join(cycle)


def after_problems(
    jobs: Sequence[JobSpec], wheres: Mapping[str, str], *, external: bool
) -> list[str]:
    """The problems of the jobs' ``after`` lists (``wheres``: each job's place in the file,
    ``jobs[1] ('b')``). ``external``: a name no job of the file has is left for the caller
    to check (the coordinator knows its submitted jobs); otherwise it is a problem."""
    names = {job.name for job in jobs}
    problems = []
    for job in jobs:
        where = wheres.get(job.name, job.name)
        if job.name in job.after:
            problems.append(f"{where}.after: a job cannot wait for itself")
        if len(set(job.after)) != len(job.after):
            problems.append(f"{where}.after: names a job twice")
        unknown = [n for n in job.after if n not in names and n != job.name]
        if unknown and not external:
            problems.append(
                f"{where}.after: no job named {', '.join(map(repr, unknown))} in this"
                " manifest (a job submitted to the coordinator can be named on reload)"
            )
    edges = {job.name: [n for n in job.after if n != job.name] for job in jobs}
    cycle = find_cycle(edges)
    if cycle is not None:
        problems.append(
            f"{wheres.get(cycle[0], cycle[0])}.after: dependency cycle {cycle_text(cycle)}"
        )
    return problems
