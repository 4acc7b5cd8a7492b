"""How well prototype routing finds an input's period, on development streams disjoint from the evaluation.

Chooses ``cms.routing.feature_layer``, ``metric``, ``shrinkage`` and ``prototypes_per_period``
without touching an evaluation set. Development streams are built from the source's *train* rows of labels
that no evaluation stream uses (every seed of every continual comparison of params.yaml
is built and its labels excluded), split into train/test by the dev seed. For each
setting (feature layer; cosine with K k-means prototypes a period, or mahalanobis with a
prototype per label and shrinkage lambda) the script learns each task's prototypes from its
train prompts with ``model.memory.prototypes`` (the code the lifecycle runs) and reports the share
of test prompts routed to their own task after the last task, mean over dev streams.

    python bench/routing_probe.py                       # embedded default, 3 dev streams of 3 and 5 tasks
    python bench/routing_probe.py --out docs/results/issue13/routing_probe.json

``--joined W ...``: instead, one Mahalanobis router at the default decoder layer and one on the sentence model's
embedding (``cms.routing.feature: sentence``), each a prototype per label, and for each weight w the route
argmin_p w d_sentence(x, p)^2 + (1 - w) d_decoder(x, p)^2 (w = 0: the decoder router, 1: the sentence router);
reports the earlier tasks' texts sent to another task at the end of each dev stream (what sleep forgets by):

    python bench/routing_probe.py --joined 0 0.25 0.5 0.75 1 --dev-seeds 100 101 102 103 104 105

Any text/label data works: the source, template and sizes come from params.yaml's data section.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from model.config import load_params
from model.data.stream import build_stream, load_source
from model.decoding.loading import load_base_model
from model.evaluation.comparison import evaluation_labels
from model.io import write_json
from model.memory.cms import attach_cms
from model.memory.prototypes import (SENTENCE_LAYER, Prototypes, add_period, feature_layer, mahalanobis_scores, route,
                                     sequence_features, standardise)
from model.memory.wake import split_template


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--dev-seeds", type=int, nargs="+", default=[100, 101, 102])
    ap.add_argument("--tasks", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--layers", type=float, nargs="+", default=[0.125, 0.25, 0.375, 0.5],
                    help="feature layers as fractions of the depth")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 4, 8, 16], help="cosine: prototypes a period")
    ap.add_argument("--shrinkage", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7],
                    help="mahalanobis: the pooled covariance's weight on the identity")
    ap.add_argument("--joined", type=float, nargs="+", default=None,
                    help="weights of the sentence router in a score sum with the decoder router (0..1)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.joined is not None and any(not 0.0 <= w <= 1.0 for w in args.joined):
        raise SystemExit(f"--joined: each weight must be in [0, 1], got {args.joined}")
    torch.set_num_threads(2)
    root = Path(".")
    params = load_params(Path(args.params))
    excluded = evaluation_labels(params, root)
    df = load_source(params.data.source, root)
    if "split" in df.columns and df["split"].notna().any():
        df = df[df["split"] == "train"].drop(columns=["split"])  # dev rows come only from the train split
    df = df[~df["label"].isin(excluded)].reset_index(drop=True)
    lm = load_base_model(params.model, root)
    cms = attach_cms(lm.model, params.cms, seed=params.seed)
    n_layers = len(lm.model.get_decoder().layers)
    layers = sorted({min(int(f * n_layers), cms.layer_ids[0]) for f in args.layers})
    print(f"{len(excluded)} evaluation labels excluded; {df['label'].nunique()} dev labels; layers {layers}")
    start = time.perf_counter()
    if args.joined is not None:
        return joined(args, params, df, lm, feature_layer(cms, None), excluded, start)
    table: dict[str, list[float]] = {}
    for n_tasks, seed, plan, rows, prompts in dev_streams(args, params, df):
        for layer in layers:
            feats = {key: sequence_features(lm.model, lm.tokenizer, v, layer, 64, params.wake.max_length)
                     for key, v in prompts.items()}
            settings = [(f"cosine, K={k}", "cosine", k, 0.5) for k in args.k] + [
                (f"mahalanobis, shrinkage {lam}", "mahalanobis", 1, lam) for lam in args.shrinkage]
            for name, metric, k, lam in settings:
                protos: Prototypes | None = None
                for t in plan:
                    protos = add_period(protos, feats[(t, "train")], t, k, layer, seed=seed, metric=metric,
                                        shrinkage=lam, groups=list(rows[(t, "train")].label))
                hits = [float((route(protos, feats[(t, "test")]) == t).float().mean()) for t in plan]
                table.setdefault(f"{n_tasks} tasks, layer {layer}, {name}", []).append(statistics.mean(hits))
        print(f"dev stream {n_tasks} tasks seed {seed} done ({time.perf_counter() - start:.0f} s)", flush=True)
    rows = [{"setting": key, "routing_accuracy": round(statistics.mean(v), 4), "per_stream": [round(x, 4) for x in v]}
            for key, v in table.items()]
    print("| setting | routed to own task (mean over dev streams) |\n| --- | --- |")
    for r in rows:
        print(f"| {r['setting']} | {r['routing_accuracy']:.3f} |")
    if args.out:
        write_json(Path(args.out), {"model": lm.name, "n_layers": n_layers, "dev_seeds": args.dev_seeds,
                                    "excluded_labels": len(excluded), "rows": rows})
    return 0


def dev_streams(args, params, df):
    """Each development stream (``args.tasks`` x ``args.dev_seeds``): (n_tasks, seed, plan, rows, prompts), rows and
    prompts keyed by (task, split) for the train and test splits, each prompt the wake's template before the label."""
    for n_tasks in args.tasks:
        for seed in args.dev_seeds:
            cfg = params.data.model_copy(update={"seed": seed, "n_tasks": n_tasks, "exclude_labels": []})
            stream, plan = build_stream(df, cfg)
            rows = {(t, split): stream[(stream.task == t) & (stream.split == split)] for t in plan
                    for split in ("train", "test")}
            prompts = {key: [split_template(params.wake.template, x, plan[key[0]][0])[0] for x in r.text]
                       for key, r in rows.items()}
            yield n_tasks, seed, plan, rows, prompts


def prototype_scores(protos: Prototypes, features: torch.Tensor) -> torch.Tensor:
    """The Mahalanobis router's scores of every input for every prototype (N, P): its argmax is ``route``."""
    return mahalanobis_scores(standardise(features, protos), protos.centroids.float(), protos.whiten())


def joined(args, params, df, lm, layer: int, excluded: list, start: float) -> int:
    """The score sum of the decoder-layer and the sentence-model routers on each dev stream, per weight."""
    rows = []
    for n_tasks, seed, plan, split, prompts in dev_streams(args, params, df):
        protos, feats = {}, {}
        for name, at in (("decoder", layer), ("sentence", SENTENCE_LAYER)):
            feats[name] = {key: sequence_features(lm.model, lm.tokenizer, v, at, 64, params.wake.max_length)
                           for key, v in prompts.items()}
            for t in plan:
                protos[name] = add_period(protos.get(name), feats[name][(t, "train")], t, 1, at, seed=seed,
                                          metric="mahalanobis", shrinkage=params.cms.routing.shrinkage,
                                          groups=list(split[(t, "train")].label))
        periods = protos["decoder"].periods
        if not torch.equal(periods, protos["sentence"].periods):
            raise RuntimeError("the two routers' prototypes are not in the same order")
        last = max(plan)
        for w in args.joined:
            own = {}
            for t in plan:
                score = (w * prototype_scores(protos["sentence"], feats["sentence"][(t, "test")])
                         + (1.0 - w) * prototype_scores(protos["decoder"], feats["decoder"][(t, "test")]))
                own[t] = periods[score.argmax(dim=1)].eq(t).tolist()
            rows.append({"n_tasks": n_tasks, "seed": seed, "w_sentence": w,
                         "routed_own": {str(t): round(statistics.mean(v), 4) for t, v in own.items()},
                         "earlier_misrouted": sum(len(v) - sum(v) for t, v in own.items() if t < last),
                         "earlier_texts": sum(len(v) for t, v in own.items() if t < last),
                         "last_misrouted": len(own[last]) - sum(own[last])})
        print(f"dev stream {n_tasks} tasks seed {seed} done ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"| sentence weight | {' | '.join(f'{n} tasks: earlier texts misrouted' for n in args.tasks)} | "
          "last tasks' texts misrouted |\n| --- |" + " --- |" * (len(args.tasks) + 1))
    for w in args.joined:
        mine = [r for r in rows if r["w_sentence"] == w]
        cells = [f"{sum(r['earlier_misrouted'] for r in mine if r['n_tasks'] == n)} of "
                 f"{sum(r['earlier_texts'] for r in mine if r['n_tasks'] == n)}" for n in args.tasks]
        print(f"| {w} | {' | '.join(cells)} | {sum(r['last_misrouted'] for r in mine)} |")
    if args.out:
        write_json(Path(args.out), {"model": lm.name, "decoder_layer": layer, "dev_seeds": args.dev_seeds,
                                    "shrinkage": params.cms.routing.shrinkage, "excluded_labels": len(excluded),
                                    "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
