"""How long a job's Prefect server takes to answer on a new database: from the migrated template, or migrated by
the server itself (``LM_SLEEP_PREFECT_DB_TEMPLATE=0``), interleaved in one run, each start in a new PREFECT_HOME.

A new database is what the first ``lm-sleep run`` on a machine starts, and what every test module's server and
every benchmark's fresh home starts. A start on an existing database is timed beside them (the template cannot
do better than that). ``flows.server.local_server`` is the code ``lm-sleep run`` and ``lm-sleep compare`` use.

    python bench/server_start.py --repeats 3 --out docs/results/issue18/server_start.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import save_results  # noqa: E402
from flows.server import local_server  # noqa: E402

SWITCH = "LM_SLEEP_PREFECT_DB_TEMPLATE"  # tasks/prefect_db.py's switch, as a user sets it


def start(home: Path, template: bool) -> float:
    """Seconds from ``local_server``'s call to its server's first healthy answer, with PREFECT_HOME ``home``."""
    os.environ["PREFECT_HOME"] = str(home)
    os.environ[SWITCH] = "1" if template else "0"
    t0 = time.perf_counter()
    with local_server(home / "server.log"):
        return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/server_start.json")
    args = ap.parse_args(argv)
    os.environ.pop("PREFECT_API_URL", None)
    for key in [k for k in os.environ if k.startswith("PREFECT_") and "_DATABASE_" in k]:
        del os.environ[key]
    # the template as `make install` leaves it, so no timed start builds it
    subprocess.run([sys.executable, "-m", "tasks.prefect_db"], cwd=ROOT, check=True)
    times: dict[str, list[float]] = {"template": [], "migrated by the server": [], "existing database": []}
    with tempfile.TemporaryDirectory(prefix="server-start-") as tmp:
        for r in range(args.repeats):
            for name, template in (("template", True), ("migrated by the server", False)):
                home = Path(tmp) / f"{r}-{template}"
                times[name].append(start(home, template))
                print(f"repeat {r}: {name}: {times[name][-1]:.2f} s", flush=True)
            times["existing database"].append(start(Path(tmp) / f"{r}-True", True))  # the template's home again
            print(f"repeat {r}: existing database: {times['existing database'][-1]:.2f} s", flush=True)
    median = {k: statistics.median(v) for k, v in times.items()}
    results = {"repeats": args.repeats, "seconds": times,
               "median_s": median,
               "saved_s": median["migrated by the server"] - median["template"],
               "ratio_template_to_migrated": median["template"] / median["migrated by the server"]}
    print(f"median start: template {median['template']:.2f} s, migrated by the server "
          f"{median['migrated by the server']:.2f} s, existing database {median['existing database']:.2f} s")
    save_results(results, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
