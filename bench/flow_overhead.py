"""What a Prefect flow run costs the pipeline when it does nothing: with and without flow-run heartbeats.

A lifecycle runs dozens of short subflows (wake, sleep, evaluate, publish per cycle) and a comparison
hundreds, so a fixed cost per flow run adds up. Prefect 3 starts a heartbeat thread for every flow run and
joins it when the run ends; ``flows/__init__.py`` switches heartbeats off unless ``LM_SLEEP_FLOW_HEARTBEATS=1``.
Each setting runs in a process of its own (the switch is process-wide), on the same temporary local API, and
reports the median of ``--repeats`` timings of ``--flows`` parent flows with one subflow each.

    python bench/flow_overhead.py --flows 10 --repeats 3 --out docs/results/issue18/flow_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import json, sys, time
import flows  # the project's Prefect setup (telemetry, heartbeats)
from prefect import flow
from prefect.settings import get_current_settings

@flow
def child() -> int:
    return 1

@flow
def parent() -> int:
    return child()

n, repeats = int(sys.argv[1]), int(sys.argv[2])
parent()  # the API and the engine warm up
times = []
for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(n):
        parent()
    times.append(time.perf_counter() - start)
print(json.dumps({"heartbeat_frequency": get_current_settings().flows.heartbeat_frequency, "seconds": times}))
"""


def run(flows: int, repeats: int, heartbeats: bool) -> dict:
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("LM_SLEEP_FLOW_HEARTBEATS", None)
    if heartbeats:
        env["LM_SLEEP_FLOW_HEARTBEATS"] = "1"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", CHILD, str(flows), str(repeats)], env=env, cwd=root,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flows", type=int, default=10, help="parent flows per timing (each runs one subflow)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="a JSON file for the results")
    args = ap.parse_args(argv)
    rows = {}
    for name, on in (("heartbeats on (Prefect's default)", True), ("heartbeats off (this project)", False)):
        res = run(args.flows, args.repeats, on)
        med = statistics.median(res["seconds"])
        rows[name] = {"heartbeat_frequency": res["heartbeat_frequency"], "seconds": res["seconds"],
                      "median_seconds": round(med, 3), "per_flow_run_seconds": round(med / (2 * args.flows), 4)}
        print(f"{name}: {med:.2f} s for {args.flows} parents + {args.flows} subflows "
              f"({rows[name]['per_flow_run_seconds'] * 1000:.0f} ms a flow run)", flush=True)
    on, off = (rows[k]["median_seconds"] for k in rows)
    summary = {"flows": args.flows, "repeats": args.repeats, "rows": rows, "speedup": round(on / off, 2),
               "measured": time.strftime("%Y-%m-%d")}
    print(f"speedup {summary['speedup']}x")
    if args.out:
        from model.io import write_json

        write_json(Path(args.out), summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
