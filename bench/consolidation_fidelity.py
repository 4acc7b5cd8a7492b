"""How much of what a wake learned survives its consolidation, under consolidation settings to compare.

Where the 5-seed diagnostics say sleep loses most (docs/results/issue13/promotion-check/: the current
task drops 4-8 points from "after wake" to "after consolidation"), this replays only that step. For each
finished comparison run given (its params.yaml and its saved wake states; use development runs, e.g.
``state/compare/ablations-dev/no_dreaming/seed-0``), each period and each variant, it consolidates the
saved wake state in a scratch project with the variant's settings (the code the lifecycle runs:
``model/sleep/stage.py``) and scores every seen task among every seen label, as evaluation does.

    python bench/consolidation_fidelity.py --runs state/compare/ablations-dev/no_dreaming/seed-0 \\
        --variants base 'steps=32' 'lr=0.01' 'alpha=1.0' --out docs/results/issue13/consolidation_fidelity.json

A variant is ``base`` (the run's own settings) or comma-separated ``key=value`` pairs of the
``consolidation`` section (YAML values); a dotted key sets one field of a subsection
(``rehearsal.steps=8``), the rest of it as the run had it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from model.config import load_params
from model.data.stream import load_stream
from model.evaluation.seen import seen_accuracy
from model.io import write_json
from model.memory.checkpoint import open_memory_model, read_manifest
from model.runtime import configure_torch
from model.sleep.stage import consolidate_due_levels


#: Settings the wake applies, not the consolidation: a saved wake state already holds their effect, so a variant
#: that changes them would replay the same consolidation under a false name (tasks/wake.py keeps the prompt buffer).
FIXED_BY_WAKE = ("prompt_buffer_size",)


def _variant(spec: str) -> dict:
    if spec == "base":
        return {}
    out = {}
    for pair in spec.split(","):
        key, _, value = pair.partition("=")
        if not key or not _:
            raise SystemExit(f"--variants: {spec!r}: expected base or key=value[,key=value]")
        if key.strip() in FIXED_BY_WAKE:
            raise SystemExit(f"--variants: {spec!r}: consolidation.{key.strip()} is applied by the wake (its saved "
                             "state holds the prompts it kept), so replaying the consolidation cannot vary it")
        *path, leaf = key.strip().split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


def _merged(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` applied, subsections merged field by field."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merged(base.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def run_data_dir(run: Path, raw: dict) -> Path:
    """The run's prepared stream: its params' out_dir, or the comparison's data/seed-N/processed beside it."""
    given = Path(raw["data"]["out_dir"])
    if given.is_dir():
        return given
    local = run.parent.parent / "data" / run.name / "processed"
    if local.is_dir():
        return local
    raise SystemExit(f"{run / 'params.yaml'}: data.out_dir {given} is missing, and so is {local}")


def _state_accuracy(params, root: Path, state: Path, stream, plan, period: int) -> dict[str, float]:
    """Every seen task's accuracy among every seen label in the state ``state`` (as the evaluate stage scores)."""
    loaded, cms, _ = open_memory_model(params, root, state)
    return seen_accuracy(params, loaded, cms, stream, plan, period)[0]


def measure(run: Path, period: int, overrides: dict) -> dict:
    raw = yaml.safe_load((run / "params.yaml").read_text())
    data = run_data_dir(run, raw)
    stream, plan = load_stream(data)
    with tempfile.TemporaryDirectory(prefix="fidelity-") as tmp:
        root = Path(tmp)
        raw = {**raw, "data": {**raw["data"], "out_dir": str(data)},
               "consolidation": _merged(raw["consolidation"], overrides)}
        (root / "params.yaml").write_text(yaml.safe_dump(raw))
        params = load_params(root / "params.yaml")
        woke_dir = root / params.wake.state_dir / f"period-{period}"
        shutil.copytree(run / params.wake.state_dir / f"period-{period}", woke_dir)
        configure_torch(params.wake.threads, params.wake.deterministic)  # as the lifecycle's stages run
        woke = _state_accuracy(params, root, woke_dir, stream, plan, period)
        manifest = read_manifest(woke_dir)
        loaded, cms, optimizer = open_memory_model(params, root, woke_dir, with_optimizer=True)
        start = time.perf_counter()
        consolidate_due_levels(loaded, cms, optimizer, params, plan, period, manifest["metadata"], manifest["step"])
        seconds = time.perf_counter() - start
        slept = seen_accuracy(params, loaded, cms, stream, plan, period)[0]
    return {"run": str(run), "period": period, "overrides": overrides, "seconds": round(seconds, 1),
            "after_wake": woke, "after_consolidation": slept,
            "current_drop": round(woke[str(period)] - slept[str(period)], 4),
            "earlier_after_consolidation": (round(statistics.mean(slept[str(t)] for t in range(period)), 4)
                                            if period else None)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="finished comparison run directories")
    ap.add_argument("--periods", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--variants", nargs="+", default=["base"])
    ap.add_argument("--out", default=None, help="a JSON file for the rows")
    args = ap.parse_args(argv)
    rows = []
    for variant in args.variants:
        for run in map(Path, args.runs):
            for period in args.periods:
                row = measure(run, period, _variant(variant)) | {"variant": variant}
                rows.append(row)
                print(json.dumps({k: row[k] for k in ("variant", "run", "period", "current_drop",
                                                      "earlier_after_consolidation", "seconds")}), flush=True)
                if args.out:
                    write_json(args.out, {"rows": rows})
    print("| variant | mean drop of the current task (wake -> consolidation) | earlier tasks after | seconds |")
    print("| --- | --- | --- | --- |")
    for variant in args.variants:
        mine = [r for r in rows if r["variant"] == variant]
        earlier = [r["earlier_after_consolidation"] for r in mine if r["earlier_after_consolidation"] is not None]
        print(f"| {variant} | {statistics.mean(r['current_drop'] for r in mine):.3f} | "
              f"{statistics.mean(earlier) if earlier else float('nan'):.3f} | "
              f"{statistics.median(r['seconds'] for r in mine):.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
