"""How well a question finds its passage among the passages learned so far, on development passages.

Chooses the router of the passage experts (model/memory/passage_experts.py) without touching an evaluation
set: the passages are a SQuAD-format file's first N from an offset (default: squad_val_dev800, which no
knowledge comparison evaluates on). Every router embeds texts with the sentence model (all-MiniLM-L6-v2)
and reports the share of the questions routed to their own passage:

- ``nearest_sentence``: a prototype per passage sentence, the question's most similar one (cosine; the
  product's :func:`model.memory.passage_experts.route_questions`);
- ``sentence_mean``: the mean of the passage's sentence embeddings;
- ``whole_passage``: the passage embedded as one text;
- ``lifecycle_cosine_k<K>`` / ``lifecycle_mahalanobis_k<K>``: the lifecycle's prototypes
  (:func:`model.memory.prototypes.add_period`, standardised by the first passage's sentences) with K per passage.

    python bench/passage_routing.py --out docs/results/issue14/passage-routing/routing.json
    python bench/passage_routing.py --passages data/raw/squad/squad_val_dev800.json --n 100 --offset 100

Each router also reports the share routed to a passage of the right article (sibling passages share a title),
which bounds how much of the error is a near miss.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from model.evaluation.knowledge import Passage, passage_sentences, select_passages
from model.io import write_json
from model.memory.cms import CMSError
from model.memory.passage_experts import Features, add_passage_prototypes, default_features, route_questions
from model.memory.prototypes import SENTENCE_LAYER, add_period, route


def routing_accuracy(passages: Sequence[Passage], features: Features = default_features,
                     k: Sequence[int] = (4, 16)) -> dict[str, dict[str, float]]:
    """Each router's share of the questions routed to their own passage (``own``) and to a passage of the same
    title (``title``), after every passage is learned. Routers that fail (a singular covariance) report None."""
    sentences = [passage_sentences(p.context) for p in passages]
    questions = [q.question for p in passages for q in p.questions]
    owner = torch.tensor([i for i, p in enumerate(passages) for _ in p.questions])
    titles = [p.title for p in passages]

    def score(routed: torch.Tensor) -> dict[str, float]:
        same_title = [titles[int(r)] == titles[int(o)] for r, o in zip(routed, owner)]
        return {"own": float((routed == owner).float().mean()), "title": sum(same_title) / len(same_title)}

    raw = features(questions)  # embedded once; every router routes these
    q = F.normalize(raw.float(), dim=1)
    sent = [features(s) for s in sentences]
    out: dict[str, dict[str, float]] = {}
    protos = None
    for i, f in enumerate(sent):
        protos = add_passage_prototypes(protos, f, i)
    out["nearest_sentence"] = score(torch.tensor(route_questions(protos, questions, lambda _: raw)))
    means = F.normalize(torch.stack([F.normalize(f.float(), dim=1).mean(0) for f in sent]), dim=1)
    out["sentence_mean"] = score((q @ means.T).argmax(1))
    whole = F.normalize(features([p.context for p in passages]).float(), dim=1)
    out["whole_passage"] = score((q @ whole.T).argmax(1))
    for metric in ("cosine", "mahalanobis"):
        for kk in k:
            try:
                lp = None
                for i, f in enumerate(sent):
                    lp = add_period(lp, f, i, min(kk, f.shape[0]), SENTENCE_LAYER, metric=metric, shrinkage=0.5)
                out[f"lifecycle_{metric}_k{kk}"] = score(route(lp, raw))
            except (CMSError, torch.linalg.LinAlgError) as e:
                out[f"lifecycle_{metric}_k{kk}"] = {"own": None, "title": None, "error": str(e).split("\n")[0]}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--passages", default="data/raw/squad/squad_val_dev800.json")
    ap.add_argument("--n", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    result = {"passages": args.passages, "offset": args.offset, "by_n": {}}
    for n in args.n:
        chosen = [p for _, p in select_passages(args.passages, n, args.offset)]
        acc = routing_accuracy(chosen)
        result["by_n"][str(n)] = {"questions": sum(len(p.questions) for p in chosen), "routers": acc}
        for name, r in acc.items():
            own = "fails" if r["own"] is None else f"{r['own']:.3f}"
            title = "" if r["title"] is None else f" (same title {r['title']:.3f})"
            print(f"{n:4d} passages  {name:28s} own passage {own}{title}")
    if args.out:
        write_json(Path(args.out), result)
    else:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
