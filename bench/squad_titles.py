"""A second text/label dataset for the continual comparisons: SQuAD questions labelled with their article.

Every setting of the comparisons (routing feature, prototypes, shrinkage, learning rates, consolidation steps)
was chosen on development streams of CLINC150 intents. Whether sleep's ordering against the baselines holds on
data it was not tuned on is the question the issue's external check asks; this builds such data from what the
repo already holds: each question of ``data/raw/squad/squad_val_dev800.json`` (SQuAD v1.1 dev, CC BY-SA 4.0)
becomes a row ``{"text": question, "label": article title}`` (underscores as spaces: "Super Bowl 50"), for
the articles with at least ``--min-questions`` questions. Topic classification of questions, not intents:
longer texts, labels that are names, and classes whose questions share no phrasing template.

    python bench/squad_titles.py --out /tmp/squad_titles.jsonl
    # then, in a params file with data.source {path: /tmp/squad_titles.jsonl, format: jsonl}:
    lm-sleep compare default --params params-squad.yaml --seeds 0 1 2

The output is deterministic (passage order, then question order) and written atomically.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from model.data.stream import DataError
from model.io import write_text


def title_rows(passages: list[dict], min_questions: int) -> list[dict[str, str]]:
    """One row per question of the articles with at least ``min_questions`` questions, in file order."""
    counts: collections.Counter[str] = collections.Counter()
    for p in passages:
        counts[p["title"]] += len(p["questions"])
    kept = {t for t, c in counts.items() if c >= min_questions}
    return [{"text": q["question"].strip(), "label": p["title"].replace("_", " ")}
            for p in passages if p["title"] in kept for q in p["questions"] if q["question"].strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default="data/raw/squad/squad_val_dev800.json")
    ap.add_argument("--min-questions", type=int, default=40,
                    help="articles with fewer questions are left out (a label needs train_per_label + "
                         "test_per_label of them, 30 by default)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    source = Path(args.source)
    try:
        passages = json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{source}: not found (--source)") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{source}: not valid JSON: {e}") from None
    for i, p in enumerate(passages):
        for field in ("title", "questions"):
            if field not in p:
                raise DataError(f"{source}: passage {i} has no field {field!r}")
    rows = title_rows(passages, args.min_questions)
    labels = collections.Counter(r["label"] for r in rows)
    write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{args.out}: {len(rows)} questions of {len(labels)} articles "
          f"({min(labels.values())}-{max(labels.values())} each)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
