"""Where a finished run's earlier tasks are lost at the end: each test text's routed period, under other settings of
the Mahalanobis router (the covariance shrinkage ``cms.routing.shrinkage``; the feature layer
``cms.routing.feature_layer``), from the run's saved final state.

Prototype routing answers a text with the experts of its nearest prototype's period (model/memory/prototypes.py).
The routing feature is read below the first CMS layer, so it does not depend on what the memory levels learned:
the final state's prototypes (per-label centroids and the pooled scatter) and the texts' features give every
shrinkage's routes exactly, without rerunning the stream. (The wakes of a rerun would also route under the new
setting; this replays only the final routing.) Use development runs:

    python bench/routing_replay.py --runs state/compare/ablations-5-dev/sleep/seed-4 \\
        --shrinkage 0.1 0.25 0.5 0.75 1.0 --out rows.json

``--layers L ...``: the prototypes are built again at decoder layer L, from each period's train texts as its wake
built them (tasks/wake.py: per-label centroids, the residuals pooled, period after period); the run's own layer
rebuilt this way reproduces its routes where no two periods share a view (no merge joined periods).

For each run, layer and shrinkage: the share of each task's test texts routed to its own period (or one that sees the same
experts, as evaluation counts it), and the earlier tasks' (every task but the last) mean of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path

import torch
import yaml

from bench.consolidation_fidelity import run_data_dir
from model.config import load_params
from model.data.stream import load_stream
from model.io import write_json
from model.memory.checkpoint import open_memory_model
from model.memory.prototypes import add_period, feature_layer, route, sequence_features, view_class
from model.memory.wake import split_template
from model.runtime import configure_torch


#: ``--layers -1``: route by the sentence model's embedding of the raw text instead of a decoder layer's.
SENTENCE = -1


def sentence_features(texts: list[str]) -> torch.Tensor:
    """all-MiniLM-L6-v2 embeddings (N, 384) of the raw texts: the sentence model the semantic reward loads."""
    from model.sleep.rewards import SemanticJudge

    judge = SemanticJudge.load(0.5)
    return judge.model.encode(texts, batch_size=64, convert_to_tensor=True, show_progress_bar=False).float()


def rebuilt(loaded, cms, params, stream, plan, layer: int, shrinkage: float, prompted: bool = False):
    """The prototypes of every period at ``layer`` (-1: the sentence model's embedding of the text), from its train
    texts, as each wake adds its own; ``prompted``: the sentence model reads each text in the wake's template."""
    protos = None
    for period in sorted(plan):
        rows = stream[(stream["task"] == period) & (stream["split"] == "train")].sort_values("row_id")
        prompts = [split_template(params.wake.template, t, y)[0] for t, y in zip(rows["text"], rows["label"])]
        feats = (sentence_features(prompts if prompted else list(rows["text"])) if layer == SENTENCE else
                 sequence_features(loaded.model, loaded.tokenizer, prompts, layer, params.wake.eval_batch_size,
                                   params.wake.max_length))
        protos = add_period(protos, feats, period, params.cms.routing.prototypes_per_period, layer,
                            seed=params.seed * 100_003 + period, metric="mahalanobis", shrinkage=shrinkage,
                            groups=[str(y) for y in rows["label"]])
    return protos


def measure(run: Path, shrinkages: list[float], layers: list[int] | None = None, prompted: bool = False) -> list[dict]:
    params_path = run / "params.yaml"
    raw = yaml.safe_load(params_path.read_text())
    data = run_data_dir(run, raw)
    stream, plan = load_stream(data)
    params = load_params(params_path)
    params = params.model_copy(update={"data": params.data.model_copy(update={"out_dir": str(data)})})
    last = max(plan)
    state = run / params.dream.state_dir / f"period-{last}"
    if not state.is_dir():
        raise SystemExit(f"{run}: no final sleep state {state}")
    configure_torch(params.wake.threads, params.wake.deterministic)
    loaded, cms, _ = open_memory_model(params, run, state)
    protos = cms.prototypes
    if protos is None or protos.metric != "mahalanobis":
        raise SystemExit(f"{state}: the state has no Mahalanobis prototypes to re-route with")
    test = stream[stream["split"] == "test"].sort_values("row_id")
    label0 = plan[0][0]
    prompts = [split_template(params.wake.template, t, label0)[0] for t in test["text"]]
    feats = sequence_features(loaded.model, loaded.tokenizer, prompts, protos.layer, params.wake.eval_batch_size,
                              params.wake.max_length)
    tasks = test["task"].tolist()
    rows = []
    for layer in layers or [None]:
        at = protos.layer if layer is None else SENTENCE if layer == SENTENCE else feature_layer(cms, layer)
        z = (feats if layer is None else sentence_features(prompts if prompted else list(test["text"]))
             if at == SENTENCE else
             sequence_features(loaded.model, loaded.tokenizer, prompts, at, params.wake.eval_batch_size,
                               params.wake.max_length))
        for lam in shrinkages:
            mine = (dataclasses.replace(protos, shrinkage=float(lam), _whiten=None) if layer is None
                    else rebuilt(loaded, cms, params, stream, plan, at, float(lam), prompted))
            routed = route(mine, z).tolist()
            view = {p: view_class(cms, p) for p in {*routed, *tasks}}
            own = {}
            for t in sorted(set(tasks)):
                hits = [view[r] == view[t] for r, q in zip(routed, tasks) if q == t]
                own[str(t)] = round(sum(hits) / len(hits), 4)
            rows.append({"run": str(run), "layer": at, "rebuilt": layer is not None, "shrinkage": lam,
                         "prompted": prompted and at == SENTENCE,
                         "run_layer": protos.layer, "run_shrinkage": protos.shrinkage, "routing": own,
                         "earlier": round(statistics.mean(own[str(t)] for t in sorted(set(tasks)) if t < last), 4),
                         "last": own[str(last)]})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", type=Path, required=True)
    ap.add_argument("--shrinkage", nargs="+", type=float, default=[0.1, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--layers", nargs="+", type=int, default=None,
                    help="rebuild the prototypes at these decoder layers, -1 for the sentence model's embedding "
                         "(default: the run's own, as saved)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--prompted", action="store_true", help="with --layers -1: embed the templated prompt, not the text")
    args = ap.parse_args(argv)
    if any(not 0.0 < s <= 1.0 for s in args.shrinkage):
        raise SystemExit(f"--shrinkage: each value must be in (0, 1], got {args.shrinkage}")
    rows = [r for run in args.runs for r in measure(run, args.shrinkage, args.layers, args.prompted)]
    print("| run | layer | shrinkage | each task routed to its own period | earlier tasks | last task |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        tasks = " / ".join(f"{v:.2f}" for v in r["routing"].values())
        print(f"| {Path(r['run']).name} | {r['layer']}{' (rebuilt)' if r['rebuilt'] else ''} | {r['shrinkage']} | "
              f"{tasks} | {r['earlier']:.3f} | {r['last']:.2f} |")
    for key in dict.fromkeys((r["layer"], r["rebuilt"], r["shrinkage"]) for r in rows):
        mine = [r for r in rows if (r["layer"], r["rebuilt"], r["shrinkage"]) == key]
        print(f"layer {key[0]}{' rebuilt' if key[1] else ''}, shrinkage {key[2]}: earlier "
              f"{statistics.mean(r['earlier'] for r in mine):.4f}, last {statistics.mean(r['last'] for r in mine):.4f} "
              f"over {len(mine)} runs")
    if args.out:
        write_json(args.out, {"rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
