"""bench.queue's table and the issue's goals, judged on the figures of one run."""

from __future__ import annotations

import math
from typing import Any

# Published anchors (issue 9), printed beside our figures; not measured here.
ANCHORS = {
    "issue 9 measurement here: minimal ASGI server, 64 conns, unbatched": "1,514 cycles/s",
    "issue 9 measurement here: the same, 8 jobs per request": "3,940 jobs/s",
    "issue 9 measurement here: PostgreSQL SKIP LOCKED from psycopg, no HTTP": "1,018 cycles/s",
    "Solid Queue in production at HEY": "~400 jobs/s",
    "PgQueuer, published, dedicated hardware": "6-18k jobs/s",
}


def _table(results: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    """The table's arms that match, in run order (one per pair); the long mode's rounds are
    not the table's arms."""
    return [
        r
        for r in results
        if "failed" not in r and not r.get("long") and all(r.get(k) == v for k, v in match.items())
    ]


def _median(values: list[float]) -> float | None:
    """The median (of an even count, the lower middle: a pair that ran, not a mean)."""
    return sorted(values)[(len(values) - 1) // 2] if values else None


def _goal(text: str, ours: float | None, target: str, met: bool | None) -> dict[str, Any]:
    return {"goal": text, "ours": ours, "target": target, "met": met}


def goals(results: list[dict[str, Any]], *, long_mode: bool) -> list[dict[str, Any]]:
    """Each of issue 9's goals with our figure beside it; met is None where the arm did not
    run."""
    out = []
    ours = _table(results, server="trainfleet", db="sqlite", n=64, batch=0, coordinators=1)
    refs = {r.get("pair", 0): r for r in _table(results, server="reference", n=64, batch=0)}
    ratios = [
        r["cycles_per_s"] / refs[r.get("pair", 0)]["cycles_per_s"]
        for r in ours
        if r.get("pair", 0) in refs
    ]
    ratio = _median(ratios)  # each of ours against the reference of its own pair
    out.append(
        _goal(
            "unbatched N=64 SQLite vs reference cycles/s",
            ratio,
            ">= 0.80",
            None if ratio is None else ratio >= 0.8,
        )
        | {"pairs": ratios}
    )
    p99s = [r["claim_got_p99_ms"] for r in ours]
    p99 = _median(p99s)
    out.append(
        _goal(
            "unbatched N=64 SQLite claim p99 (ms)", p99, "< 50", None if p99 is None else p99 < 50
        )
        | {"pairs": p99s}
    )
    batched = [  # the goal is SQLite's; the PostgreSQL batched arm is reported, not counted
        r["cycles_per_s"]
        for r in _table(results, server="trainfleet", db="sqlite")
        if r.get("batch")
    ]
    jobs_s = _median(batched)
    out.append(
        _goal("batched jobs/s", jobs_s, ">= 4000", None if jobs_s is None else jobs_s >= 4000)
        | {"pairs": batched}
    )
    fleet = next(
        (r for r in results if str(r.get("arm", "")).startswith("fleet_") and "failed" not in r),
        None,
    )
    fp99 = fleet["claim_got_p99_ms"] if fleet else None
    out.append(
        _goal(
            "fleet: claim p99 (ms) while the fleet heartbeats",
            fp99,
            "< 50",
            None if fp99 is None else fp99 < 50,
        )
    )
    fq = fleet["false_requeues"] if fleet else None
    out.append(_goal("fleet: false requeues", fq, "0", None if fq is None else fq == 0))
    checked = [r for r in results if "check" in r]
    violations = sum(r["check"]["violations"] for r in checked)
    out.append(
        _goal("violations over every arm", violations, "0", violations == 0 if checked else None)
    )
    if long_mode:
        claims = sum(r["check"]["claims"] for r in checked if r.get("long"))
        out.append(
            _goal(
                f"long mode: violations in {claims} claims",
                violations,
                "0",
                violations == 0 and claims >= 1_000_000,
            )
        )
    return out


def _f(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def print_table(result: dict[str, Any]) -> None:
    results = result["arms"]
    refs = {
        (r["n"], r["batch"], r.get("pair", 0)): r
        for r in results
        if r.get("server") == "reference" and "failed" not in r
    }
    head = (
        f"{'arm':<44} {'cyc/s':>8} {'ref':>8} {'vs ref':>6} {'p50 got':>8} {'p99 got':>8}"
        f" {'p50 emp':>8} {'p99 emp':>8} {'srv ms/c':>8} {'gen ms/r':>8} {'viol':>5}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        if "failed" in r:
            print(f"{r['arm']:<44} FAILED: {r['failed'][:150]}")
            continue
        if str(r["arm"]).startswith("fleet_"):
            continue
        # The reference runs on SQLite: a PostgreSQL arm has none of its own.
        ref = refs.get((r["n"], r["batch"], r.get("pair", 0))) if r.get("db") == "sqlite" else None
        ratio = r["cycles_per_s"] / ref["cycles_per_s"] if ref and ref is not r else None
        print(
            f"{r['arm']:<44} {_f(r['cycles_per_s']):>8}"
            f" {_f(ref['cycles_per_s'] if ref else None):>8} {_f(ratio, 2):>6}"
            f" {_f(r['claim_got_p50_ms']):>8} {_f(r['claim_got_p99_ms']):>8}"
            f" {_f(r['claim_empty_p50_ms']):>8} {_f(r['claim_empty_p99_ms']):>8}"
            f" {_f(r['server_cpu_ms_per_cycle'], 2):>8}"
            f" {_f(r['client_cpu_ms_per_request'], 3):>8}"
            f" {r['check']['violations']:>5}"
        )
    for r in results:
        if str(r.get("arm", "")).startswith("fleet_") and "failed" not in r:
            print(
                f"{r['arm']}: {r['fleet_workers']} workers ({r['fleet_held']} holding a job)"
                f" beating every {_f(r.get('advertised_interval_s'))} s"
                f" (beat p99 {_f(r.get('beat_p99_ms'))} ms, {r.get('beat_errors')} errors);"
                f" 64 claimers: {_f(r['cycles_per_s'])} cycles/s, claim p50"
                f" {_f(r['claim_got_p50_ms'])} / p99 {_f(r['claim_got_p99_ms'])} ms;"
                f" false requeues {r['false_requeues']}; setup {_f(r['setup_s'])} s"
                f" ({_f(r.get('register_per_s'))} registers/s, then"
                f" {_f(r.get('fleet_claims_per_s'))} claims/s while beating);"
                f" {_f(r.get('beats_per_s'))} beats/s; CPU cores used: server"
                f" {_f(r.get('server_cpu_cores'), 2)}, generator {_f(r.get('client_cpu_cores'), 2)}"
            )
    for what, why in result.get("skipped", {}).items():
        print(f"skipped {what}: {why}")
    print("\ngoals (issue 9, this machine, this run; the median pair where there are several):")
    for g in result["goals"]:
        met = {True: "met", False: "NOT met", None: "not run"}[g["met"]]
        pairs = g.get("pairs") or []
        each = f"  (pairs: {', '.join(_f(v, 2) for v in pairs)})" if len(pairs) > 1 else ""
        print(f"  {g['goal']:<52} ours {_f(g['ours'], 2):>9}  target {g['target']:<8} {met}{each}")
    print("\npublished anchors (not measured in this run):")
    for what, figure in ANCHORS.items():
        print(f"  {what:<72} {figure}")
    errors = sum(r.get("errors", 0) for r in results)
    if errors:
        print(f"\n{errors} request errors; examples:")
        for r in results:
            for e in r.get("error_examples", [])[:2]:
                print(f"  {r['arm']}: {e[:200]}")
    print(
        "cyc/s: claim+heartbeat+complete cycles (jobs) per second; p50/p99 got/emp: claim"
        " latency (ms) of claims that got a job / found none; srv ms/c: server CPU per"
        " cycle; gen ms/r: the load generator's CPU per request; viol: invariant"
        " violations found in the database afterwards"
    )
