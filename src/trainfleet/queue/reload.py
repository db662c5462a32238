"""Reload planning: compare a manifest with the jobs a queue already holds.

A job id is the digest of its identity, so the plan is a set difference: new ids are
*added*, ids present in both are *kept* (or *changed* when a scheduling field such as
priority or a constraint differs), ids no longer in the manifest are *removed* (they stay
visible, in whatever state they are; a pending one is no longer claimable unless an operator
requeues it). Nothing that already ran is touched. Editing a job's identity (its
hyperparameters, say) therefore adds a new job and removes the old one under the same name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from trainfleet.manifest.identity import job_id
from trainfleet.manifest.spec import JobSpec, Manifest
from trainfleet.queue.base import PlanEntry


@dataclass(frozen=True)
class StoredJob:
    id: str
    name: str
    state: str
    spec: JobSpec
    in_manifest: bool


@dataclass(frozen=True)
class Diff:
    added: list[tuple[str, JobSpec]]
    kept: list[PlanEntry]
    changed: list[tuple[PlanEntry, JobSpec]]
    removed: list[PlanEntry]


def diff_manifest(manifest: Manifest, stored: Iterable[StoredJob]) -> Diff:
    by_id = {s.id: s for s in stored}
    added, kept, changed = [], [], []
    seen = set()
    for spec in manifest.jobs:
        jid = job_id(spec)
        seen.add(jid)
        old = by_id.get(jid)
        if old is None:
            added.append((jid, spec))
            continue
        before, after = old.spec.scheduling(), spec.scheduling()
        delta = {k: [before[k], after[k]] for k in after if before.get(k) != after[k]}
        if not old.in_manifest:
            delta["in_manifest"] = [False, True]
        entry = PlanEntry(id=jid, name=spec.name, state=old.state, changes=delta)
        if delta:
            changed.append((entry, spec))
        else:
            kept.append(entry)
    removed = [
        PlanEntry(id=s.id, name=s.name, state=s.state)
        for s in by_id.values()
        if s.in_manifest and s.id not in seen
    ]
    return Diff(added=added, kept=kept, changed=changed, removed=removed)
