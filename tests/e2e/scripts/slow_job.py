"""A command job for end-to-end tests: prints, sleeps in small steps, writes metrics.

--seconds S   how long to run;  --fail-code C   exit with C instead of finishing.
"""

import argparse
import json
import os
import time
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--seconds", type=float, default=1.0)
parser.add_argument("--fail-code", type=int, default=0)
args = parser.parse_args()

print(f"started attempt {os.environ.get('TRAINFLEET_ATTEMPT')}", flush=True)
end = time.monotonic() + args.seconds
step = 0
while time.monotonic() < end:
    step += 1
    print(f"tick {step}", flush=True)
    time.sleep(0.1)
if args.fail_code:
    raise SystemExit(args.fail_code)
out = Path(os.environ.get("TRAINFLEET_OUTPUT_DIR", "."))
(out / "metrics.json").write_text(json.dumps({"heldout_loss": 1.5, "ticks": step}))
(out / "note.txt").write_text("done\n")
print("finished", flush=True)
