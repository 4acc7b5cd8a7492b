"""What every benchmark does with its numbers: the process's peak memory, and the results JSON written atomically
(model.io.write_text: a crash never leaves half a file)."""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

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
