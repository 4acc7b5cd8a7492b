"""How far prototype routing is from routers that keep every raw example, on a comparison's finished runs.

Sleep's router keeps statistics only (a prototype per label and one pooled covariance, model/memory/prototypes.py);
what it misroutes at the end of a stream is most of what sleep forgets. This asks whether a router that stored
every training text (which sleep may not) would do much better on the same feature, i.e. whether the loss is the
router's or the feature's. For each run directory (a comparison's ``<method>/seed-<s>``: its effective params.yaml
rebuilds the seed's stream from ``data.source``) it embeds the wake prompts with the run's routing feature
(``cms.routing.feature``: only ``sentence``, the comparisons' router, is supported here) and reports, per router, the
share of each task's test prompts routed to their own period after the last task:

- ``prototypes``: the deployed router, rebuilt period by period as the wakes do (checked against the run's own
  ``routing_accuracy``);
- ``1-NN`` / ``10-NN``: cosine nearest neighbours among every training prompt of every period (raw data kept);
- ``logistic``: a linear classifier of the period, trained on every training prompt (raw data kept).

It also reports the nearest-label accuracy of the deployed router's prototypes (the label of the nearest
prototype among all labels seen), beside the run's final accuracy, for scale. A diagnostic: nothing is chosen by it.

    python bench/routing_ceiling.py --root <project> <project>/state/compare/default/sleep/seed-* \\
        --out docs/results/issue13/squad-titles/routing-ceiling.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from model.config import Params, load_params
from model.data.stream import build_stream, load_source
from model.io import write_json
from model.evaluation.prototype_classifier import PrototypeClassifier
from model.memory.prototypes import route, sentence_features
from model.memory.wake import split_template

ROUTERS = ("prototypes", "1-NN", "10-NN", "logistic")


def knn_route(train: torch.Tensor, train_periods: torch.Tensor, test: torch.Tensor, k: int) -> torch.Tensor:
    """The majority period of each test row's ``k`` cosine nearest training rows (ties: the nearer): (M,)."""
    sim = F.normalize(test, dim=1) @ F.normalize(train, dim=1).T  # (M, N)
    idx = sim.topk(min(k, train.shape[0]), dim=1).indices  # (M, k), nearest first
    votes = train_periods[idx]  # (M, k)
    n_periods = int(train_periods.max()) + 1
    counts = F.one_hot(votes, n_periods).float()  # (M, k, P)
    weight = torch.linspace(1.0, 0.999, votes.shape[1])[None, :, None]  # a tie goes to the nearer neighbour
    return (counts * weight).sum(1).argmax(1)


def logistic_route(train: torch.Tensor, train_periods: torch.Tensor, test: torch.Tensor,
                   l2: float = 1e-3, steps: int = 200) -> torch.Tensor:
    """A softmax classifier of the period on standardised features, L2 ``l2``, full-batch L-BFGS: (M,)."""
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    x, z = (train - mean) / std, (test - mean) / std
    n_periods = int(train_periods.max()) + 1
    w = torch.zeros(x.shape[1], n_periods, requires_grad=True)
    b = torch.zeros(n_periods, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, train_periods) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (z @ w + b).argmax(1)


def comparison_seeds(params_path: Path, name: str) -> list[tuple[str, Params]]:
    """(where, params) of each seed of comparison ``name``: the project's params, the comparison's overrides and
    the seed, as its runs have them (for a comparison that was not run here)."""
    params = load_params(params_path)
    if name not in params.evaluation.comparisons:
        raise SystemExit(f"{params_path}: evaluation.comparisons has no {name!r}")
    comp = params.evaluation.comparisons[name]
    base = params.for_run(comp.overrides, f"evaluation.comparisons.{name}.overrides")
    return [(f"{name} seed {seed}", base.model_copy(update={"seed": seed, "data": base.data.model_copy(
        update={"seed": seed})})) for seed in comp.seeds]


def one_run(where: str, params: Params, root: Path, run: Path | None = None) -> dict:
    """The routers of one stream (``params``' data and seed); with ``run``, beside that run's recorded routing."""
    routing = params.cms.routing
    if routing.feature != "sentence" or routing.metric != "mahalanobis":
        raise SystemExit(f"{where}: cms.routing must be feature sentence, metric mahalanobis "
                         f"(got {routing.feature}, {routing.metric})")
    stream, plan = build_stream(load_source(params.data.source, root), params.data)
    prompts, labels, feats = {}, {}, {}
    for t in plan:
        for split in ("train", "test"):
            rows = stream[(stream.task == t) & (stream.split == split)]
            prompts[(t, split)] = [split_template(params.wake.template, x, plan[t][0])[0] for x in rows.text]
            labels[(t, split)] = [str(x) for x in rows.label]
            feats[(t, split)] = sentence_features(prompts[(t, split)], params.wake.eval_batch_size)
    lda = PrototypeClassifier(routing.shrinkage, params.wake.eval_batch_size)  # the deployed router's statistics
    for t in plan:
        lda.learn_features(feats[(t, "train")], labels[(t, "train")], t, seed=params.seed * 100_003 + t)
    train = torch.cat([feats[(t, "train")] for t in plan])
    train_periods = torch.cat([torch.full((len(prompts[(t, "train")]),), t) for t in plan])
    test = torch.cat([feats[(t, "test")] for t in plan])
    test_periods = torch.cat([torch.full((len(prompts[(t, "test")]),), t) for t in plan])
    routed = {"prototypes": route(lda.protos, test), "1-NN": knn_route(train, train_periods, test, 1),
              "10-NN": knn_route(train, train_periods, test, 10),
              "logistic": logistic_route(train, train_periods, test)}
    own = {name: {str(t): round(float((r[test_periods == t] == t).float().mean()), 4) for t in plan}
           for name, r in routed.items()}
    # the deployed router's nearest prototype as a label classifier, among every label seen (sentence_lda)
    test_labels = [lab for t in plan for lab in labels[(t, "test")]]
    label_acc = statistics.mean(p == g for p, g in zip(lda.predict_features(test, lda.labels), test_labels, strict=True))
    result = json.loads((run / "result.json").read_text()) if run and (run / "result.json").is_file() else {}
    recorded = (result.get("routing_accuracy") or [None])[-1]  # after the last task: {task: share routed home}
    last = (result.get("accuracy") or [None])[-1]  # the accuracy matrix's last row: {task: accuracy}
    final = round(statistics.mean(last.values()), 4) if isinstance(last, dict) else None
    return {"run": where, "seed": params.seed, "n_train": int(train.shape[0]), "n_test": int(test.shape[0]),
            "routed_own": own, "recorded_routing": recorded, "nearest_label_accuracy": round(label_acc, 4),
            "run_final_accuracy": final}


def mean_own(row: dict, name: str) -> float:
    return statistics.mean(row["routed_own"][name].values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="*", help="run directories of a comparison (<method>/seed-<s>)")
    ap.add_argument("--comparison", default=None, help="instead, every seed of this comparison of --params")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--root", default=".", help="the project the runs' data.source is relative to")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if bool(args.runs) == bool(args.comparison):
        raise SystemExit("give run directories or --comparison, not both")
    torch.manual_seed(0)
    root = Path(args.root)
    if args.comparison:
        rows = [one_run(where, p, root) for where, p in comparison_seeds(Path(args.params), args.comparison)]
    else:
        rows = [one_run(str(r), load_params(Path(r) / "params.yaml"), root, Path(r)) for r in args.runs]
    print("| seed | " + " | ".join(f"{n}: own period (per task)" for n in ROUTERS) + " | run's own routing | "
          "nearest-label accuracy | run's final accuracy |")
    print("| --- |" + " --- |" * (len(ROUTERS) + 3))
    for r in rows:
        cells = [f"{mean_own(r, n):.3f} ({' / '.join(f'{v:.2f}' for v in r['routed_own'][n].values())})" for n in ROUTERS]
        rec = r["recorded_routing"]
        rec_s = " / ".join(f"{v:.2f}" for v in rec.values()) if isinstance(rec, dict) else "-"
        fin = f"{r['run_final_accuracy']:.3f}" if isinstance(r["run_final_accuracy"], float) else "-"
        print(f"| {r['seed']} | {' | '.join(cells)} | {rec_s} | {r['nearest_label_accuracy']:.3f} | {fin} |")
    means = {n: round(statistics.mean(mean_own(r, n) for r in rows), 4) for n in ROUTERS}
    print("| mean | " + " | ".join(f"{means[n]:.3f}" for n in ROUTERS) + " | | "
          f"{statistics.mean(r['nearest_label_accuracy'] for r in rows):.3f} | |")
    if args.out:
        write_json(Path(args.out), {"runs": rows, "mean_routed_own": means})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
