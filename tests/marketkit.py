"""Test helpers for the market: a tiny competition's terms, referee panels, submissions and
decisions as the coordinator makes them (without the coordinator)."""

from __future__ import annotations

import hashlib
import itertools

from trainfleet.manifest.spec import JobSpec
from trainfleet.queue import JobQueue
from trainfleet.queue.market_base import CompetitionRecord, SubmissionRecord
from trainfleet.verify.market import CompetitionSpec, payment
from trainfleet.verify.panel import Verdict
from trainfleet.verify.spec import RefereeTask

DATASET = {"name": "held", "source": "synthetic", "num_documents": 200}
HYPER = {"n_layers": 1, "d_model": 16, "n_heads": 2, "seq_len": 16}
BASELINE_SCORE = 3.0
_submissions = itertools.count()


def sha(label: object) -> str:
    return hashlib.sha256(str(label).encode()).hexdigest()


def terms(name: str = "tiny-lm", **changes: object) -> CompetitionSpec:
    body = {"name": name, "hyper": HYPER, "dataset": DATASET, "rate": 100.0, **changes}
    return CompetitionSpec.model_validate(body)


def panel(competition: CompetitionRecord, sid: str, candidate: str, producer: str) -> list[JobSpec]:
    """The competition's referee jobs for one submission, against its current frontier."""
    jobs = []
    for index in range(competition.spec.referees):
        task = RefereeTask(
            submission_id=sid,
            competition_id=competition.id,
            index=index,
            candidate=candidate,
            frontier=competition.frontier,
            hyper=dict(competition.spec.hyper),
            dataset=competition.spec.dataset,
            windows=competition.spec.windows,
            seed=index,
            producer=producer,
        )
        jobs.append(JobSpec(name=f"ref.{sid[:12]}.{index}", kind="referee", task=task))
    return jobs


def submit(
    queue: JobQueue, model: object, *, producer: str = "alice", claim: float = 2.5
) -> SubmissionRecord:
    competition = queue.get_competition("tiny-lm")
    sid = sha(("submission", next(_submissions)))
    tasks = panel(competition, sid, sha(model), producer)
    return queue.submit(competition.id, sha(model), 1000, producer, claim, tasks, submission_id=sid)


def accepted(improvement: float, frontier: float, certified: int = 3) -> Verdict:
    return Verdict("accepted", 3, certified, improvement, frontier - improvement, "accepted: test")


def pay(queue: JobQueue, submission: SubmissionRecord, improvement: float) -> SubmissionRecord:
    """Decide ``submission`` as the coordinator would, with a consensus ``improvement``."""
    spec = queue.get_competition(submission.competition_id).spec
    verdict = accepted(improvement, submission.frontier_score)
    return queue.decide(submission.id, verdict, payment(spec, submission.frontier_score, verdict))
