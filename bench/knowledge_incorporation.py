"""Single-passage knowledge incorporation on the embedded default (issue: does dreaming work?).

For every passage, starting from the same fresh model each time, no-context QA on the
passage's questions is measured for four conditions:

  (a) base            the model as it is
  (b) passage FT      the fast level fine-tuned on the passage text alone
  (c) promoted dreams the full dream stage: dreams, importance + selection, isolated
                      trials, the Great Expectations gate; promoted dreams trained in
  (d) all dreams      the same generated dreams, trained in without selection or gate

(b), (c) and (d) train the same parameters (one fast expert) for the same number of
steps. Metrics per passage: exact match and token F1 of greedy answers (model.evaluation.grading),
and tau = mean log-likelihood per token of the gold answers. Results are appended to a
JSONL file one passage at a time (a rerun resumes), and summarised with 95% CIs.

The measures and the passage fine-tuning are model/evaluation/incorporation.py's, which
``lm-sleep compare knowledge`` also runs; (c) here resets the ReST-EM updates before
promotion and (d) trains the same dreams, where the comparison's ``sleep`` keeps ReST-EM
as the lifecycle does and ``base_dreams`` samples its own dreams from the base model.

Run:  python bench/knowledge_incorporation.py --passages data/raw/squad/squad_val_seal_eval200.json --n 200
On a GPU, shard the passages over processes (they share the card; each passage's result
does not depend on the sharding), then merge:
      for i in 0 1 2 3; do python bench/knowledge_incorporation.py --device cuda --shard $i/4 & done; wait
      python bench/knowledge_incorporation.py --summarise
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from checks import gate_dreams, validate_dreams  # noqa: E402
from model.config import load_params  # noqa: E402
from model.evaluation.grading import mean_ci95  # noqa: E402
from model.evaluation.incorporation import Reader, evaluate_passage, learn_passage_finetune  # noqa: E402
from model.evaluation.knowledge import load_passages  # noqa: E402
from model.memory.checkpoint import open_memory_model  # noqa: E402
from model.memory.cms import ExpertInfo  # noqa: E402
from model.sleep.dream_checks import add_check_columns  # noqa: E402
from model.sleep.dreaming import dream_about, promote, task_from_passage  # noqa: E402

CONDITIONS = ("base", "passage_ft", "promoted_dreams", "all_dreams")


def measure(lm, passage, task, cfg) -> dict:
    return evaluate_passage(lm.model, lm.tokenizer, passage, task, cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passages", default=str(ROOT / "data/raw/squad/squad_val_seal_eval200.json"))
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench/results/knowledge_incorporation.jsonl"))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--shard", default="0/1", help="I/N: this process takes the passages with index %% N == I")
    ap.add_argument("--summarise", action="store_true", help="only merge the result files and summarise them")
    args = ap.parse_args()
    out = Path(args.out)
    if args.summarise:
        summarise(out)
        return
    shard, n_shards = (int(x) for x in args.shard.split("/"))
    if not 0 <= shard < n_shards:
        raise SystemExit(f"--shard {args.shard}: need 0 <= I < N")
    if n_shards > 1:
        out = out.with_name(f"{out.stem}.shard{shard}of{n_shards}{out.suffix}")
    torch.set_num_threads(args.threads)
    params = load_params(ROOT / "params.yaml")
    params = params.model_copy(update={"model": params.model.model_copy(update={"device": args.device})})
    cfg = params.dream.model_copy(update={"task_source": "squad", "chat": True, "max_new_tokens": 128})
    passages = load_passages(args.passages)[: args.n]
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {json.loads(line)["index"] for line in out.read_text().splitlines()} if out.exists() else set()

    lm, cms, _ = open_memory_model(params, ROOT)
    fresh = {n: p.detach().clone() for n, p in cms.named_memory_parameters()}
    fresh_experts = [[asdict(e) for e in lvl] for lvl in cms.experts]

    def reset() -> None:
        with torch.no_grad():
            for n, p in cms.named_memory_parameters():
                p.copy_(fresh[n])
        cms.experts = [[ExpertInfo(**e) for e in lvl] for lvl in fresh_experts]
        for li in range(cms.n_levels):
            cms.refresh_routing(li)
        cms.reset_level(0)  # as after a consolidation: dreams and FT go into a fresh fast expert

    for i, passage in enumerate(passages):
        if i in done or i % n_shards != shard:
            continue
        t0 = time.perf_counter()
        task = task_from_passage(passage, f"passage{i}", cfg)
        res: dict = {"index": i, "title": passage.title, "n_questions": len(passage.questions)}
        reset()
        res["base"] = measure(lm, passage, task, cfg)
        # the fast level fine-tuned on the passage (long passages in pieces), promote_steps steps
        learn_passage_finetune(Reader(lm.model, lm.tokenizer, cms, cfg), task, origin=f"passage-ft-{i}")
        res["passage_ft"] = measure(lm, passage, task, cfg)
        reset()
        rows = dream_about(lm.model, lm.tokenizer, cms, task, cfg, period=0, seed=params.seed * 1_013 + i)
        table = add_check_columns(pd.DataFrame([asdict(r) for r in rows]), cfg.gate)
        gated = gate_dreams(table, validate_dreams(table, cfg.gate))
        dreams_all = [t for t in gated["text"] if t]
        promoted = list(zip(gated[gated["promoted"]]["context_id"], gated[gated["promoted"]]["text"]))
        reset()
        promote(lm.model, lm.tokenizer, cms, {task.context_id: task}, promoted, cfg, 0)
        res["promoted_dreams"] = {**measure(lm, passage, task, cfg), "n_dreams": len(promoted)}
        reset()
        promote(lm.model, lm.tokenizer, cms, {task.context_id: task}, [(task.context_id, t) for t in dreams_all], cfg, 0)
        res["all_dreams"] = {**measure(lm, passage, task, cfg), "n_dreams": len(dreams_all)}
        res["funnel"] = {
            "generated": int(len(gated)), "selected": int(gated["selected"].sum()),
            "rewarded": int((gated["reward"] == 1.0).sum()), "promoted": len(promoted),
        }
        res["seconds"] = round(time.perf_counter() - t0, 1)
        with out.open("a") as f:
            f.write(json.dumps(res) + "\n")
        print(f"[{i + 1}/{len(passages)}] {passage.title[:30]:30s} " + " ".join(
            f"{c}: f1 {res[c]['f1']:.2f} tau {res[c]['tau']:.2f}" for c in CONDITIONS) + f" ({res['seconds']} s)", flush=True)

    if n_shards == 1:
        summarise(out)


def summarise(path: Path) -> dict:
    """Merge ``path`` and its shard files (one row per passage index) and write the summary with 95% CIs."""
    by_index: dict[int, dict] = {}
    for f in sorted(path.parent.glob(f"{path.stem}*{path.suffix}")):
        if f.name == path.name or f.name.startswith(f"{path.stem}.shard"):
            for line in f.read_text().splitlines():
                row = json.loads(line)
                by_index[row["index"]] = row
    rows = [by_index[i] for i in sorted(by_index)]
    if not rows:
        raise SystemExit(f"no results in {path} or its shard files")
    summary = {"passages": len(rows)}
    for c in CONDITIONS:
        summary[c] = {m: mean_ci95([r[c][m] for r in rows]) for m in ("em", "f1", "tau")}
    path.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{len(rows)} passages (mean [95% CI])")
    for c in CONDITIONS:
        s = summary[c]
        print(f"  {c:16s} " + "  ".join(f"{m} {s[m][0]:.3f} [{s[m][1]:.3f}, {s[m][2]:.3f}]" for m in ("em", "f1", "tau")))
    return summary


if __name__ == "__main__":
    main()
