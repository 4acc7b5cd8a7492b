"""What every benchmark does with its numbers: the process's peak memory, and the results JSON written atomically
(model.io.write_text: a crash never leaves half a file); and how a benchmark runs a comparison in a work directory
of its own."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from model.io import write_text


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (a high-water mark), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save_results(results: dict[str, Any], out: str | Path) -> Path:
    """``results`` with the peak RSS added (``peak_rss_mib``), written to ``out`` (its folder made); says where."""
    results["peak_rss_mib"] = peak_rss_mib()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, json.dumps(results, indent=2) + "\n")
    print(f"peak RSS {results['peak_rss_mib']:.0f} MiB; results in {out}")
    return out


def run_comparison(root: Path, params: dict, work: Path, tag: str, comparison: str, args: list[str]) -> float:
    """``lm-sleep compare comparison *args`` in a process of its own with ``params`` (a parsed params.yaml, left
    unchanged) writing under ``work`` (inside ``root``); returns its wall time in seconds."""
    p = json.loads(json.dumps(params))
    rel = work.relative_to(root)  # paths in params are relative to the project directory
    p.setdefault("evaluation", {}).update({"work_dir": str(rel / "state"), "reports_dir": str(rel / "reports")})
    path = root / f".bench-{tag}.yaml"  # beside params.yaml: its relative data paths stay valid
    path.write_text(yaml.safe_dump(p, sort_keys=False))
    cmd = [sys.executable, "-m", "flows.cli", "compare", comparison, "--params", str(path), *args]
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"}
    start = time.perf_counter()
    try:
        subprocess.run(cmd, cwd=root, env=env, check=True)
    finally:
        path.unlink(missing_ok=True)
    return time.perf_counter() - start
