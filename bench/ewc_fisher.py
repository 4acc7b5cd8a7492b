"""EWC's empirical Fisher on the embedded default model: one pass per example vs one per batch.

The Fisher is the mean of *per-example* squared gradients, so the textbook way runs one
forward/backward pass per example. :func:`model.evaluation.ewc.per_example_squared_grads`
gets every example's gradient from one pass over a batch (hooks on the LoRA layers).
This script times both on the default comparison's setting (LoRA r=8 on q_proj and
v_proj, CLINC150 "text -> intent" pairs) in one run, checks that they agree, and
reports the speed-up and peak RSS.

Run:  python bench/ewc_fisher.py [--examples 96] [--batch-size 32] [--threads 2]
Writes bench/results/ewc_fisher.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import argparse
import json
import random
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.config import ModelConfig  # noqa: E402
from model.decoding.loading import load_base_model  # noqa: E402
from model.evaluation.baselines import attach_lora  # noqa: E402
from model.evaluation.ewc import EWC  # noqa: E402
from model.memory.wake import split_template  # noqa: E402

CLINC = ROOT / "data/raw/clinc150/data_full.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/ewc_fisher.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rows = [(t, lab) for t, lab in json.loads(CLINC.read_text())["train"] if lab != "oos"]
    pairs = [split_template("{text} -> {label}", t, lab) for t, lab in random.Random(0).sample(rows, args.examples)]
    prompts, comps = [p for p, _ in pairs], [c for _, c in pairs]
    lm = load_base_model(ModelConfig(), ROOT)
    params = attach_lora(lm.model, r=8, alpha=16.0, targets=["q_proj", "v_proj"], seed=0)
    with torch.no_grad():  # trained-looking adapters (B = 0 would zero A's gradient)
        gen = torch.Generator().manual_seed(0)
        for p in params:
            p.normal_(0, 0.02, generator=gen)

    results = {}
    for name, bs in (("per_example_passes", 1), ("batched", args.batch_size)):
        EWC.fisher_diagonal(lm.model, lm.tokenizer, params, prompts[:bs], comps[:bs], bs, 64)  # warm-up
        t0 = time.perf_counter()
        fisher = EWC.fisher_diagonal(lm.model, lm.tokenizer, params, prompts, comps, bs, 64)
        results[name] = {"batch_size": bs, "seconds": time.perf_counter() - t0, "fisher": fisher}
        print(f"{name:>20}: batch {bs:>3}  {results[name]['seconds']:.2f} s for {args.examples} examples", flush=True)

    ref, new = results["per_example_passes"]["fisher"], results["batched"]["fisher"]
    rel = max(float((a - b).abs().max() / a.abs().max()) for a, b in zip(ref, new))
    speedup = results["per_example_passes"]["seconds"] / results["batched"]["seconds"]
    report = {
        "examples": args.examples,
        "threads": args.threads,
        "seconds": {k: v["seconds"] for k, v in results.items()},
        "batch_size": args.batch_size,
        "speedup": speedup,
        "max_relative_difference": rel,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(f"speed-up {speedup:.1f}x, max relative difference {rel:.2e}, peak RSS {report['peak_rss_mib']:.0f} MiB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
