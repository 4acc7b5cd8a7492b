"""Soak: many ingest -> wake -> sleep cycles in one process; RSS and disk per cycle, flat after retention.

Builds a project for the tiny model in a directory, then for each cycle writes a CSV of new labelled
rows (two intents per cycle, drawn from a pool, so labels come back), ingests it and runs one inbox
period (``flows.intake.cycle``: wake, sleep, evaluation, retention). After every cycle it records the
process's resident memory, the bytes under the project directory and the seconds the cycle took.

    python bench/soak.py --cycles 30 --out docs/results/issue15/soak.json   # + soak.png beside it

The test suite runs the same function (tests/flows/test_soak.py) and checks the targets of issue #15:
RSS grows less than 10% from cycle 5 to the last, and disk use is flat after the retention window.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import tempfile
import time
from pathlib import Path

import pandas as pd
import psutil
import yaml

WORDS = ["alarm", "money", "rain", "song", "clock", "funny", "plane", "cook", "bank", "movie", "train", "pizza"]


def soak_params(keep_periods: int) -> dict:
    """A tiny-model project: small levels (a level fills up and merges), short sleeps with dreams."""
    return {
        "seed": 0,
        "model": {"source": "tiny"},
        "cms": {"top_layers": 2, "levels": [
            {"name": "fast", "chunk_size": 1, "lr": 0.05, "n_experts": 3, "d_low": 8, "top_k": 2},
            {"name": "slow", "chunk_size": 4, "lr": 0.02, "n_experts": 3, "d_low": 8, "top_k": 3}]},
        "wake": {"batch_size": 4, "epochs": 1, "max_length": 32, "threads": 1},
        "consolidation": {"steps": 2, "batch_size": 4, "prompt_buffer_size": 4, "lti_prefixes": 1,
                          "lti_group_size": 2, "max_new_tokens": 4, "gamma": 0.0,
                          "rehearsal": {"per_label": 1, "max_new_tokens": 6}},
        "dream": {"context_examples": 2, "tau_examples": 2, "dreams_per_context": 2, "max_new_tokens": 6,
                  "min_new_tokens": 2, "top_k": 1, "random_extra": 0, "trial_steps": 1, "lora_r": 4,
                  "lora_alpha": 8.0, "rest_steps": 1, "promote_steps": 1, "max_length": 64,
                  "gate": {"min_tokens": 1}},
        "lifecycle": {"publish": False, "diagnostics": False},
        "intake": {"keep_periods": keep_periods},
    }


#: What retention bounds: the periods' states, dreams and dream reports (the inbox's batches and stream stay).
RETAINED = ("state/wake", "state/consolidated", "state/sleep", "dreams", "reports/dreams")


def prototype_bytes(root: Path) -> int:
    """Bytes of the routing prototypes (centroids and their periods) in the retained states: they grow by a
    centroid per label (mahalanobis) or K centroids (cosine) a period by design (routing remembers where every
    period's inputs lie), so they are apart. The pooled covariance is d x d whatever the age: in the states."""
    from safetensors import safe_open

    total = 0
    for path in root.glob("state/*/period-*/experts.safetensors"):
        with safe_open(str(path), "pt") as f:
            for key in ("routing.centroids", "routing.periods"):
                if key in f.keys():
                    total += math.prod(f.get_slice(key).get_shape()) * (4 if key.endswith("centroids") else 8)
    return total


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0


def write_batch(root: Path, cycle: int, rows_per_label: int = 5) -> Path:
    rng = random.Random(cycle)
    labels = rng.sample(WORDS, 2)
    rows = [{"text": f"please {w} {w} batch {cycle} item {i}", "label": w} for w in labels for i in range(rows_per_label)]
    path = root / "incoming" / f"batch-{cycle:03d}.csv"
    path.parent.mkdir(exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def soak(root: Path, cycles: int, keep_periods: int = 3, on_cycle=None, overrides: dict | None = None) -> list[dict]:
    """Run ``cycles`` ingest-wake-sleep cycles in ``root``; one record per cycle. ``overrides``: params merged into
    :func:`soak_params` (a switch's own soak, e.g. {"dream": {"keep_dreams": True}})."""
    from model.config import merge_overrides

    root.mkdir(parents=True, exist_ok=True)
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(merge_overrides(soak_params(keep_periods), overrides or {})))
    proc = psutil.Process()
    records = []
    try:
        for i in range(cycles):
            records.append(_cycle(root, params, i, proc))
            if i == 0:  # what the first cycle leaves alive (the imports, mostly: ~0.8 M objects) is not scanned again
                gc.freeze()  # by each cycle's collection (0.8 s each here); later garbage is collected as before
            if on_cycle is not None:
                on_cycle(records[-1])
    finally:
        gc.unfreeze()
    return records


def _cycle(root: Path, params: Path, i: int, proc: psutil.Process) -> dict:
    """Ingest cycle ``i``'s batch, run the cycle, collect garbage; the cycle's record."""
    from flows.intake import cycle as run_cycle
    from flows.intake import ingest

    start = time.perf_counter()
    ingest(str(write_batch(root, i)), str(params))
    out = run_cycle(str(params))
    gc.collect()
    return {"cycle": i, "period": out["wake"]["period"], "seconds": round(time.perf_counter() - start, 2),
            "rss_mb": round(proc.memory_info().rss / 2**20, 1), "disk_mb": round(disk_bytes(root) / 2**20, 3),
            "states_mb": round((sum(disk_bytes(root / d) for d in RETAINED) - prototype_bytes(root)) / 2**20, 3),
            "prototypes_mb": round(prototype_bytes(root) / 2**20, 3),
            "inbox_mb": round(disk_bytes(root / "state" / "inbox") / 2**20, 3),
            "accuracy": out["sleep"]["evaluate"]["mean_accuracy_seen"]}


def plot(records: list[dict], dest: Path, keep_periods: int) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.4), dpi=120, layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    x = [r["cycle"] for r in records]
    ax1.plot(x, [r["rss_mb"] for r in records], marker="o", markersize=3)
    ax1.set(xlabel="cycle", ylabel="resident memory (MiB)", title="RSS after each cycle")
    ax2.plot(x, [r["disk_mb"] for r in records], marker="o", markersize=3, label="project")
    ax2.plot(x, [r["states_mb"] for r in records], marker="o", markersize=3, label="states + dreams, w/o prototypes")
    ax2.plot(x, [r["prototypes_mb"] for r in records], marker="o", markersize=3, label="routing prototypes")
    ax2.plot(x, [r["inbox_mb"] for r in records], marker="o", markersize=3, label="inbox (batches, stream)")
    ax2.axvline(keep_periods, color="#888888", linestyle="--", linewidth=1)
    ax2.set(xlabel="cycle", ylabel="disk (MiB)", title=f"disk (retention: last {keep_periods} periods)")
    ax2.legend(fontsize=8)
    fig.savefig(dest, format="png", metadata={"Software": None})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cycles", type=int, default=30)
    ap.add_argument("--keep-periods", type=int, default=3)
    ap.add_argument("--dir", default=None, help="project directory (default: a temporary one)")
    ap.add_argument("--out", default=None, help="JSON of the records (a PNG plot beside it)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=YAML",
                    help="override a param of the soak's project, e.g. --set dream.keep_dreams=true (repeatable)")
    args = ap.parse_args(argv)
    overrides: dict = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            ap.error(f"--set {item!r}: want SECTION.KEY=VALUE")
        *path, leaf = key.split(".")
        node = overrides
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        root = Path(args.dir) if args.dir else Path(tmp)
        records = soak(root, args.cycles, args.keep_periods,
                       on_cycle=lambda r: print(json.dumps(r), flush=True), overrides=overrides)
    rss5, rss_last = records[min(5, len(records) - 1)]["rss_mb"], records[-1]["rss_mb"]
    summary = {"cycles": args.cycles, "keep_periods": args.keep_periods, "overrides": overrides,
               "rss_growth_from_cycle_5": round(rss_last / rss5 - 1, 4),
               "median_cycle_seconds": sorted(r["seconds"] for r in records)[len(records) // 2], "records": records}
    print(json.dumps({k: v for k, v in summary.items() if k != "records"}))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2) + "\n")
        plot(records, out.with_suffix(".png"), args.keep_periods)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
