"""The training market, walked through on live processes: a competition that pays only for
held-out improvements that other hosts' workers re-measured.

    python examples/market_demo.py     (what `make market-demo` runs)

1. starts a coordinator (`trainfleet serve`, SQLite + artifacts in .market-demo/), enrolls four
   hosts (`trainfleet hosts enroll NAME --token-file F`): three referees, ref-a, ref-b and
   ref-c, each running a worker (`trainfleet join`), and alice, a host that submits models;
2. writes a baseline (the model family's init) and creates the competition of
   examples/competition.toml with it (`trainfleet market create`): the coordinator scores the
   baseline itself, and that score is the first frontier;
3. alice trains a better model on her own machine (`python -m trainfleet.train`, the program a
   worker runs for a `train` job, a few hundred steps on the competition's training shards),
   measures its honest claim (`trainfleet market score`) and submits it with her host's join
   token (`trainfleet market submit --wait`): three referees re-measure it on their own
   held-out windows, accept the claim and certify the improvement: she is paid;
4. she submits a lightly trained model claiming a loss far below what it scores: rejected as
   an inflated claim, paid nothing;
5. she submits the paid model again: a duplicate, no referee runs, paid nothing;
6. shows the leaderboard and the ledger (`trainfleet market leaderboard`, `market ledger`):
   alice's balance is the rate times the verified improvement.

Every step goes through the real CLI, and its output is shown. The demo exits 0 only when the
three submissions end as expected (accepted and paid, rejected, duplicate) and the books
balance; otherwise it exits 1 and says what differed. Ctrl-C stops the workers (each hands back
its running job) and then the coordinator, as `examples/demo.py` does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from rich.console import Console
from rich.text import Text
from safetensors.torch import save_file

from trainfleet.cli.market import load_competition
from trainfleet.client import Client
from trainfleet.train.inner import init_weights
from trainfleet.verify.market import CompetitionSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import (  # the sibling example's helpers
    Check,
    Children,
    StepFailed,
    free_port,
    say_interrupted,
    summarize,
    trainfleet,
)

REPO = Path(__file__).resolve().parents[1]
REFEREES = ("ref-a", "ref-b", "ref-c")
SUBMITTER = "alice"
GOOD_STEPS = 300  # alice's honest model: seconds of training, several nats better than init
LIGHT_STEPS = 20  # the model behind the inflated claim: barely trained
INFLATION_NATS = 1.0  # how far below its own score the inflated claim goes
Spawn = Callable[[str, list[str]], "subprocess.Popen[bytes]"]
console = Console(width=None if sys.stdout.isatty() else 160, highlight=False)


class Walkthrough:
    """Runs the walkthrough's commands as a user would type them, and shows their output."""

    def __init__(self, root: Path, env: Mapping[str, str]):
        self.root = root
        self.env = dict(env)

    def at(self, name: str) -> str:
        """``name`` in the demo's directory, as the commands see it: from the repository (their
        working directory) when the directory is inside it."""
        path = self.root / name
        return os.path.relpath(path, REPO) if path.is_relative_to(REPO) else str(path)

    def run(
        self,
        shown: str,
        argv: list[str],
        *,
        env: Mapping[str, str] | None = None,
        expect: tuple[int, ...] = (0,),
        tail: int | None = None,
    ) -> tuple[int, str]:
        """Print ``$ shown``, run ``argv`` and print its output as it comes (only the last
        ``tail`` lines, at the end, when given); its exit status and output. ``StepFailed`` if
        the status is not one of ``expect``."""
        console.print(Text(f"\n$ {shown}", style="bold"), soft_wrap=True)
        lines: list[str] = []
        with subprocess.Popen(
            argv,
            env=dict(env if env is not None else self.env),
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                if tail is None:
                    console.print(Text(lines[-1]))
        if tail is not None:
            if len(lines) > tail:
                console.print(Text(f"  ... ({len(lines) - tail} lines)", style="dim"))
            for line in lines[-tail:]:
                console.print(Text(line))
        if proc.returncode not in expect:
            raise StepFailed(f"`{shown}` exited {proc.returncode}, expected {expect}")
        return proc.returncode, "\n".join(lines)

    def trainfleet(
        self,
        *args: str,
        as_user: str = "",
        env: Mapping[str, str] | None = None,
        expect: tuple[int, ...] = (0,),
    ) -> tuple[int, str]:
        """``trainfleet ARGS``, shown after ``as_user`` (how the user set its environment)."""
        shown = as_user + "trainfleet " + shlex.join(args)
        return self.run(shown, trainfleet(*args), env=env, expect=expect)


def write_baseline(spec: CompetitionSpec, path: Path) -> None:
    """The family's init (what round 0 of a run starts from) as a safetensors file."""
    weights = init_weights(spec.params())
    save_file({k: t.contiguous() for k, t in sorted(weights.items())}, str(path))


def train_locally(walk: Walkthrough, spec: CompetitionSpec, steps: int, output: str) -> str:
    """Alice trains on her own machine with the recipe's trainer (the program a worker runs for
    a ``train`` job) on the competition's training shards; the model file it writes."""
    params = json.dumps({**spec.hyper, "steps": steps})
    dataset = spec.dataset.model_dump_json(exclude_defaults=True)
    args = ["-m", "trainfleet.train", "--params", params, "--dataset", dataset]
    argv = [*args, "--output", walk.at(output)]
    walk.run("python " + shlex.join(argv), [sys.executable, *argv], tail=3)
    return walk.at(f"{output}/model.safetensors")


def claim_from(score_output: str) -> float:
    """The loss `market score` measured (it prints "submit it with --claim X")."""
    found = re.search(r"--claim (\S+)", score_output)
    if found is None:
        raise StepFailed(f"`market score` printed no claim: {score_output!r}")
    return float(found.group(1))


def submission_id(submit_output: str) -> str:
    """The id `market submit` printed ("submission ID (STATE): model ...")."""
    found = re.search(r"^submission ([0-9a-f]+) \(", submit_output, re.MULTILINE)
    if found is None:
        raise StepFailed(f"`market submit` printed no submission id: {submit_output!r}")
    return found.group(1)


def check(outcomes: list[Check], what: str, ok: bool, detail: str) -> None:
    outcomes.append((what, ok, detail))


def walkthrough(walk: Walkthrough, client: Client, competition_file: Path) -> list[Check]:
    """Steps 2-6 (the fleet is up); what was checked, whether it held, and what was seen."""
    outcomes: list[Check] = []
    spec = load_competition(competition_file)
    relfile = (
        os.path.relpath(competition_file, REPO)
        if competition_file.is_relative_to(REPO)
        else str(competition_file)
    )
    base = walk.at("base.safetensors")

    console.rule("2. the competition")
    console.print("the baseline: the family's init (trainfleet.train.inner.init_weights)")
    write_baseline(spec, REPO / base)
    walk.trainfleet("market", "create", relfile, "--baseline", base)
    start = client.competition(spec.name)["competition"]

    console.rule(f"3. {SUBMITTER} trains a better model and submits it")
    alice = {k: v for k, v in walk.env.items() if k != "TRAINFLEET_STATE_DIR"}  # not the operator
    alice["TRAINFLEET_TOKEN"] = (walk.root / f"{SUBMITTER}.token").read_text().strip()
    as_alice = f"TRAINFLEET_TOKEN=$(cat {walk.at(SUBMITTER + '.token')}) "
    good = train_locally(walk, spec, GOOD_STEPS, "alice-good")
    # The competition's terms come from the coordinator (alice's join token may read them);
    # `--file FILE` reads them from the competition's file instead, with no coordinator.
    score_args = ("--competition", spec.name, "--cache-dir", walk.at("alice-data"))

    def alice_scores(model: str) -> float:
        _, out = walk.trainfleet("market", "score", model, *score_args, env=alice, as_user=as_alice)
        return claim_from(out)

    def alice_submits(model: str, claim: float) -> tuple[int, str]:
        """`market submit --wait` as alice: its exit status (0 accepted, 1 not) and the id."""
        code, out = walk.trainfleet(
            "market", "submit", model, "--claim", f"{claim:.4f}",
            "--competition", spec.name, "--wait", "--timeout-s", "120",
            env=alice, as_user=as_alice, expect=(0, 1, 3),
        )  # fmt: skip
        return code, submission_id(out)

    claim = alice_scores(good)
    code, sid = alice_submits(good, claim)
    honest = client.submission(sid)["submission"]
    check(
        outcomes,
        "honest claim accepted and paid",
        code == 0 and honest["state"] == "accepted" and honest["paid"] > 0,
        f"{honest['state']}, paid {honest['paid']:.4f}: {honest['verdict']}",
    )

    console.rule("4. an inflated claim")
    light = train_locally(walk, spec, LIGHT_STEPS, "alice-light")
    inflated_claim = alice_scores(light) - INFLATION_NATS
    console.print(f"(claiming {INFLATION_NATS} nat less than it scores: {inflated_claim:.4f})")
    code, sid = alice_submits(light, inflated_claim)
    inflated = client.submission(sid)["submission"]
    check(
        outcomes,
        "inflated claim rejected, paid nothing",
        code == 1
        and inflated["state"] == "rejected"
        and "inflated claim" in inflated["verdict"]
        and inflated["paid"] == 0,
        f"{inflated['state']}, paid {inflated['paid']:.4f}: {inflated['verdict']}",
    )

    console.rule("5. the paid model again")
    code, sid = alice_submits(good, claim)
    again = client.submission(sid)
    check(
        outcomes,
        "resubmission is a duplicate, paid nothing, no referee ran",
        code == 1
        and again["submission"]["state"] == "duplicate"
        and again["submission"]["paid"] == 0
        and not again["referees"],
        f"{again['submission']['state']}, paid {again['submission']['paid']:.4f}:"
        f" {again['submission']['verdict']}",
    )

    console.rule("6. the leaderboard and the books")
    walk.trainfleet("market", "leaderboard", spec.name)
    walk.trainfleet("market", "ledger", spec.name)
    book = client.market_ledger(spec.name)
    end = client.competition(spec.name)["competition"]
    balance = book["balances"].get(SUBMITTER, 0.0)
    expected = spec.rate * (start["baseline_score"] - end["frontier_score"])
    check(
        outcomes,
        f"{SUBMITTER}'s balance = rate x verified improvement",
        set(book["balances"]) == {SUBMITTER}
        and math.isclose(balance, honest["paid"], rel_tol=1e-9)
        and math.isclose(balance, spec.rate * honest["improvement"], rel_tol=1e-6)
        and math.isclose(balance, expected, rel_tol=1e-6),
        f"{balance:.4f} credits = {spec.rate:g} x ({start['baseline_score']:.4f}"
        f" - {end['frontier_score']:.4f})",
    )
    return outcomes


def enroll_and_join(walk: Walkthrough, url: str, spawn: Spawn) -> None:
    """Step 1: enroll the four hosts; start a worker on each referee host."""
    for host in (*REFEREES, SUBMITTER):
        # A join token bound to the host's name, in a 0600 file (never on a command line).
        walk.trainfleet("hosts", "enroll", host, "--token-file", walk.at(f"{host}.token"))
        if host == SUBMITTER:
            continue  # alice runs no worker here: she trains and submits on her own machine
        args = (
            "join", url, "--token-file", walk.at(f"{host}.token"), "--host", host,
            "--threads", "1", "--poll-interval-s", "0.3", "--workdir", walk.at(f"work-{host}"),
        )  # fmt: skip
        console.print(Text(f"\n$ trainfleet {shlex.join(args)} &", style="bold"), soft_wrap=True)
        spawn(f"worker-{host}", trainfleet(*args))


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--competition", default=str(REPO / "examples" / "competition.toml"))
    parser.add_argument(
        "--dir", default=str(REPO / ".market-demo"), help="state and logs (recreated)"
    )
    args = parser.parse_args()

    started = time.monotonic()
    root = Path(args.dir).resolve()
    shutil.rmtree(root, ignore_errors=True)
    (root / "logs").mkdir(parents=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    state = root / "state"
    env = {
        **os.environ,
        "TRAINFLEET_URL": url,
        "TRAINFLEET_STATE_DIR": os.path.relpath(state, REPO),
        "TRAINFLEET_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",  # a command's stdout and stderr lines arrive in order
    }
    env.pop("TRAINFLEET_TOKEN", None)
    children = Children(root / "logs", env)
    spawn = children.spawn

    console.rule("trainfleet market demo")
    console.print(f"coordinator  {url}  (state and logs in {os.path.relpath(root)})")
    console.rule("1. the fleet")
    walk = Walkthrough(root, env)
    serve = (
        "serve", "--port", str(port), "--state-dir", walk.at("state"),
        "--heartbeat-interval-s", "1", "--heartbeat-timeout-s", "10",
    )  # fmt: skip
    console.print(Text(f"$ trainfleet {shlex.join(serve)} &", style="bold"), soft_wrap=True)
    spawn("coordinator", trainfleet(*serve))
    console.print(
        f"(every command below runs with TRAINFLEET_URL={url}; the operator's also with"
        f" TRAINFLEET_STATE_DIR={walk.at('state')}, where `serve` keeps the operator token)"
    )
    outcomes: list[Check] = []
    failure = ""
    interrupted = False
    try:
        client = Client(url, None)
        client.wait_healthy(60)
        client.token = (state / "operator.token").read_text().strip()
        enroll_and_join(walk, url, spawn)
        deadline = time.monotonic() + 60
        while len(client.workers()) < len(REFEREES):
            if time.monotonic() > deadline:
                raise StepFailed(f"the referee workers did not register; see {root / 'logs'}")
            time.sleep(0.3)
        outcomes = walkthrough(walk, client, Path(args.competition).resolve())
        client.close()
    except StepFailed as err:
        failure = str(err)
    except KeyboardInterrupt:
        interrupted = True
        say_interrupted(console)
    finally:
        children.stop()
    if interrupted:
        console.print(f"stopped; the state is kept in {os.path.relpath(root)}.")
        return 130

    return summarize(
        console,
        outcomes,
        failure,
        root,
        expected=4,
        good="the market behaved as expected",
        bad="the market did not",
        started=started,
    )


if __name__ == "__main__":
    sys.exit(main())
