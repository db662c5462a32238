"""Train a byte-level bigram language model: the example ``kind = "command"`` job.

Any program can be a trainfleet job. This one shows the whole contract, and imports nothing
from trainfleet to make the point:

- **Flags.** Each ``hyper`` key of the job becomes a ``--key value`` flag appended to its
  ``command``: ``hyper = { steps = 200, lr = 0.5 }`` runs
  ``python examples/scripts/train_bigram.py --steps 200 --lr 0.5``. Parse them strictly
  (argparse rejects unknown flags), so a typo in the manifest fails the job loudly.
- **Outputs.** Write anything to ``$TRAINFLEET_OUTPUT_DIR``; when the process exits 0 the
  worker packs that directory and uploads it as the job's artifact. ``metrics.json`` there
  is reported as the job's result.
- **Environment.** The worker sets ``TRAINFLEET_JOB_ID``, ``TRAINFLEET_ATTEMPT``,
  ``TRAINFLEET_MODE`` and ``TRAINFLEET_NUM_THREADS`` (the CPU threads this job may use).
- **Logs.** stdout and stderr are the job's log; flush progress lines as they happen.
- **Exit status.** Non-zero means the attempt failed; the coordinator may retry it.

The model is a 256x256 table of next-byte logits trained with Adam on minibatches of byte
pairs from a few of this Python's stdlib modules; ``argparse.py`` is held out. Run it alone
(outputs go to ``./bigram-out``)::

    python examples/scripts/train_bigram.py --steps 200 --lr 0.5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

TRAIN_MODULES = [
    "os.py",
    "json/__init__.py",
    "json/decoder.py",
    "json/encoder.py",
    "functools.py",
    "collections/__init__.py",
    "shutil.py",
    "pathlib.py",
]
HELDOUT_MODULE = "argparse.py"
BATCH_SIZE = 4096  # byte pairs per step
LOG_EVERY = 50


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=0.5, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed for minibatch sampling")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    return args


def read_bytes(modules: list[str]) -> torch.Tensor:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    data = b"".join((stdlib / m).read_bytes() for m in modules)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def pair_counts(tokens: torch.Tensor) -> torch.Tensor:
    """256x256 matrix: how often byte j follows byte i."""
    flat = torch.bincount(tokens[:-1] * 256 + tokens[1:], minlength=256 * 256)
    return flat.view(256, 256).float()


def mean_loss(logits: torch.Tensor, counts: torch.Tensor) -> float:
    """Exact cross-entropy (nats/byte) over every pair in ``counts``."""
    return float(-(counts * F.log_softmax(logits, dim=1)).sum() / counts.sum())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("TRAINFLEET_NUM_THREADS", "1")))
    out_dir = Path(os.environ.get("TRAINFLEET_OUTPUT_DIR", "bigram-out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    job = os.environ.get("TRAINFLEET_JOB_ID", "-")
    attempt = os.environ.get("TRAINFLEET_ATTEMPT", "-")
    print(f"job {job} attempt {attempt} steps {args.steps} lr {args.lr}", flush=True)

    train = read_bytes(TRAIN_MODULES)
    heldout_counts = pair_counts(read_bytes([HELDOUT_MODULE]))
    generator = torch.Generator().manual_seed(args.seed)
    logits = torch.zeros(256, 256, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=args.lr)

    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(train) - 1, (BATCH_SIZE,), generator=generator)
        loss = F.cross_entropy(logits[train[idx]], train[idx + 1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % LOG_EVERY == 0 or step == args.steps:
            print(f"step {step}/{args.steps} loss {loss.item():.4f}", flush=True)
    train_s = time.perf_counter() - start

    with torch.no_grad():
        heldout_loss = mean_loss(logits, heldout_counts)
    metrics = {
        "heldout_loss": heldout_loss,
        "train_loss": loss.item(),
        "tokens_per_s": args.steps * BATCH_SIZE / train_s,
        "steps": args.steps,
        "lr": args.lr,
        "seed": args.seed,
        "train_bytes": len(train),
        "heldout_module": HELDOUT_MODULE,
    }
    save_file({"logits": logits.detach().contiguous()}, str(out_dir / "bigram.safetensors"))
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(
        f"heldout_loss {heldout_loss:.4f} nats/byte (uniform {math.log(256):.4f}), "
        f"{metrics['tokens_per_s']:.0f} tokens/s, wrote {out_dir}",
        flush=True,
    )


if __name__ == "__main__":
    main()
