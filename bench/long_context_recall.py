"""Does reading store a needle in the weights? Recall after LoRA reading against the reading budget (issue #16).

Where the long-context comparison loses its answers, measured on development needles only: each item's
document (``--length`` tokens of SQuAD dev prose hiding ``--keys`` "the secret number of the <key> is <4
digits>" facts) is read by LoRA next-token prediction (``read_lora``, the comparison's ``finetune``) for
``--epochs`` passes at ``--lr``, from the same fresh adapters, then asked with no document in two forms:

* ``question``: the comparison's own prompt, "Question: What is the secret number of the <key>?\\nAnswer:";
* ``cloze``: the fact's own words up to the value, "The secret number of the <key> is" (what next-token
  prediction on the document trains directly).

The references read nothing: the same two prompts with no memory (``no_memory``) and after the item's facts
alone (``facts_only``, the ceiling). Candidates: the document's values (chance 1 / ``--keys``), scored by PMI as
in the comparison.

    python bench/long_context_recall.py --items 12 --length 512 --epochs 1 4 16 --lr 1e-3 1e-2 \\
        --out docs/results/issue16/recall/recall.json
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def cloze_prompt(question: str) -> str:
    """"What is the secret number of the red fox?" -> "The secret number of the red fox is"."""
    from model.evaluation.long_context import NEEDLE_QUESTION

    head, tail = NEEDLE_QUESTION.split("{key}")
    if not (question.startswith(head) and question.endswith(tail)):
        raise ValueError(f"not a needle question: {question!r}")
    return f"The secret number of the {question[len(head):len(question) - len(tail)]} is"


def recall(model, tokenizer, docs, prompts, max_length: int) -> float:
    """Share of ``docs`` whose answer is the best candidate after its prompt (PMI, as the comparison scores)."""
    from model.evaluation.long_context import answer

    right = [d.item.candidates[answer(model, tokenizer, [p], d.item.candidates, max_length, "pmi")[0]] == d.item.answer
             for d, p in zip(docs, prompts)]
    return sum(right) / len(right)


def run(model, tokenizer, lora, docs, epochs: list[int], lrs: list[float], window: int, grad_clip: float,
        on_row=None) -> list[dict]:
    """One row per reference and per (lr, epochs) reading: recall in the question and the cloze form."""
    from model.evaluation.long_context import question_prompt
    from model.evaluation.long_context_methods import document_pieces, read_lora

    fresh = [x.detach().clone() for x in lora]
    questions = [question_prompt(d.item.question) for d in docs]
    clozes = [cloze_prompt(d.item.question) for d in docs]
    max_length = window + 16
    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)

    model.eval()
    facts = [" ".join(d.item.facts) for d in docs]
    emit({"reading": "no_memory", "question": recall(model, tokenizer, docs, questions, max_length),
          "cloze": recall(model, tokenizer, docs, clozes, max_length)})
    emit({"reading": "facts_only",  # the comparison's facts_only prompt, and the cloze after the same facts
          "question": recall(model, tokenizer, docs, [question_prompt(d.item.question, f) for d, f in zip(docs, facts)],
                             4 * max_length),
          "cloze": recall(model, tokenizer, docs, [f"{f}\n\n{c}" for f, c in zip(facts, clozes)], 4 * max_length)})
    for lr in lrs:
        for n in epochs:
            start = time.perf_counter()
            q_right = c_right = 0
            steps = 0
            for i, d in enumerate(docs):
                with torch.no_grad():
                    for x, v in zip(lora, fresh):
                        x.copy_(v)
                reading = read_lora(model, tokenizer, lora, document_pieces(tokenizer, d, window), lr, n, max_length,
                                    grad_clip, seed=i)
                steps += reading.gradient_steps
                model.eval()
                q_right += recall(model, tokenizer, [d], [questions[i]], max_length) == 1.0
                c_right += recall(model, tokenizer, [d], [clozes[i]], max_length) == 1.0
            emit({"reading": "lora", "lr": lr, "epochs": n, "steps_per_document": steps / len(docs),
                  "question": q_right / len(docs), "cloze": c_right / len(docs),
                  "seconds": round(time.perf_counter() - start, 1)})
    with torch.no_grad():
        for x, v in zip(lora, fresh):
            x.copy_(v)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=12, help="needle items (development seed)")
    ap.add_argument("--keys", type=int, default=4, help="facts per document (chance = 1 / keys)")
    ap.add_argument("--length", type=int, default=512, help="document tokens")
    ap.add_argument("--window", type=int, default=512, help="tokens per piece (one step each, per epoch)")
    ap.add_argument("--epochs", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--lr", type=float, nargs="+", default=[1e-3, 1e-2])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="JSON of the rows (default: print only)")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import sys

    sys.path.insert(0, str(ROOT))
    from bench.results import save_results
    from model.config import load_params
    from model.decoding.loading import load_base_model
    from model.evaluation.baselines import attach_lora
    from model.evaluation.long_context import DEV_NEEDLE_SEED, build_document, load_distractors, needle_items
    from model.runtime import configure_torch

    params = load_params(ROOT / "params.yaml")
    configure_torch(args.threads, True)
    lm = load_base_model(params.model, root=ROOT)
    b = params.evaluation.baselines
    lora = attach_lora(lm.model, b.lora_r, b.lora_alpha, b.lora_targets, seed=params.seed)
    prose = load_distractors(ROOT / "data/raw/squad/squad_val_dev800.json")  # development prose
    docs = [build_document(lm.tokenizer, it, prose, args.length, seed=0)
            for it in needle_items(args.items, args.keys, DEV_NEEDLE_SEED)]
    rows = run(lm.model, lm.tokenizer, lora, docs, args.epochs, args.lr, args.window, params.wake.grad_clip,
               on_row=lambda r: print(r, flush=True))
    if args.out:
        save_results({"items": args.items, "keys": args.keys, "length": args.length, "window": args.window,
                      "chance": 1 / args.keys, "lora": {"r": b.lora_r, "alpha": b.lora_alpha, "targets": b.lora_targets},
                      "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
