"""Verified contributions: a score counts only when workers other than its author measured it.

``gate`` compares a candidate with a baseline on paired held-out losses (seeded bootstrap);
``spec`` is a referee job's task; ``referee`` is the program a referee worker runs;
``panel`` turns referees' loss arrays into reports and the reports into a verdict.
"""

# The manifest first: its JobSpec carries a RefereeTask (``verify.spec``), and ``verify.spec``
# imports from ``trainfleet.manifest``; loading the manifest package first breaks the cycle.
import trainfleet.manifest  # noqa: F401
