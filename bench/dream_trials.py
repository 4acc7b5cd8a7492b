"""Isolated dream trials on the embedded default model: 8 trials batched against 1, in one run.

Each trial: a fresh LoRA (q_proj, v_proj), ``--steps`` SFT steps on a ~150-token dream,
then tau = mean log-likelihood of the gold answers to 5 questions (before: base; after:
with the adapter). Measured in the same process, at the same thread count:

  * t(1): :func:`model.sleep.trials.run_trials` with 1 dream; t(8): with 8 dreams (batched);
    median of ``--repeats`` interleaved runs after one warm-up of each;
  * the FLOPs of one run of each (torch's FlopCounterMode), to separate "more work"
    from "less efficient work";
  * the sequential baseline: 8 x :func:`model.sleep.trials.run_trial_peft` (one run).

Dreams are SQuAD passages (data/raw/squad) cut to ``--dream-tokens`` tokens, standing in
for dreams; the questions are those of the first passage. Both layer choices are
measured by default: adapters on every layer, and on the top 8 only (then the frozen
layers below run once per dream and once for the questions).

Run:  python bench/dream_trials.py [--threads 2] [--repeats 3] [--layers all top8] [--no-peft]
Writes bench/results/dream_trials.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import PreTrainedTokenizerBase

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import save_results  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.decoding.loading import load_base_model, resolve_device  # noqa: E402
from model.sleep.trial_lora import AnswerLoglik  # noqa: E402
from model.sleep.trials import TrialRecipe, run_trial_peft, run_trials  # noqa: E402

SQUAD = ROOT / "data/raw/squad/squad_train_seal100.json"
FALLBACK = (
    "The Amazon rainforest covers much of the Amazon basin of South America. The basin spans seven "
    "million square kilometres, of which five and a half million are covered by the rainforest. The "
    "region includes territory belonging to nine nations; most of the forest lies within Brazil, "
    "followed by Peru and Colombia. The rainforest likely formed during the Eocene era, after a "
    "global reduction of tropical temperatures when the Atlantic Ocean had widened enough to provide "
    "a warm, moist climate to the Amazon basin. It has been in existence for at least 55 million "
    "years, and most of the region remained free of savanna-type biomes at least until the current "
    "ice age, when the climate was drier and savanna more widespread."
)
FALLBACK_QA = [
    ("Which country holds most of the Amazon rainforest?", "Brazil"),
    ("How many nations have territory in the Amazon region?", "nine"),
    ("In which era did the rainforest likely form?", "Eocene"),
    ("How long has the rainforest existed?", "at least 55 million years"),
    ("Which ocean had widened to give the basin a warm, moist climate?", "the Atlantic Ocean"),
]


def load_task(tokenizer: PreTrainedTokenizerBase, n_dreams: int, dream_tokens: int) -> tuple[list[str], list[tuple[str, str]], str]:
    """(dreams, question-answer pairs, source): passages cut to ``dream_tokens`` tokens."""
    if SQUAD.exists():
        passages = json.loads(SQUAD.read_text())
        texts = [p["context"] for p in passages]
        qa = [(q["question"], q["answer"]) for q in passages[0]["questions"]][:5]
        source = str(SQUAD.relative_to(ROOT))
    else:
        texts, qa, source = [FALLBACK], FALLBACK_QA, "fixed paragraph"
    long_enough = [t for t in texts if len(tokenizer(t, add_special_tokens=False)["input_ids"]) >= dream_tokens] or texts
    dreams = []
    for i in range(n_dreams):
        ids = tokenizer(long_enough[i % len(long_enough)], add_special_tokens=False)["input_ids"][:dream_tokens]
        dreams.append(tokenizer.decode(ids))
    return dreams, qa, source


def sync() -> None:
    """Wait for queued GPU work, so wall times cover it (no-op on the CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def count_flops(fn: Callable[[], object]) -> float:
    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def bench_layers(model, tokenizer, dreams: list[str], measure: AnswerLoglik, layers: list[int] | None,
                 args: argparse.Namespace) -> dict:
    recipe = TrialRecipe(steps=args.steps, lr=args.lr, r=args.r, alpha=2 * args.r, target_modules=["q_proj", "v_proj"],
                         layers=layers, max_length=args.max_length)

    def batched(k: int):
        return run_trials(model, tokenizer, dreams[:k], measure, recipe, seeds=list(range(k)))

    res: dict = {"layers": "all" if layers is None else layers}
    batched(1), batched(8)  # warm-up
    times: dict[int, list[float]] = {1: [], 8: []}
    for _ in range(args.repeats):
        for k in (1, 8):
            sync()
            t = time.perf_counter()
            out = batched(k)
            sync()
            times[k].append(time.perf_counter() - t)
            assert all(r.error is None for r in out), [r.error for r in out]
    t1, t8 = statistics.median(times[1]), statistics.median(times[8])
    f1, f8 = count_flops(lambda: batched(1)), count_flops(lambda: batched(8))
    res.update({
        "t1_s": times[1], "t8_s": times[8], "t1_median_s": t1, "t8_median_s": t8, "ratio_t8_over_t1": t8 / t1,
        "gflop_1": f1 / 1e9, "gflop_8": f8 / 1e9, "flop_ratio_8_over_1": f8 / f1,
        "achieved_gflops_1": f1 / t1 / 1e9, "achieved_gflops_8": f8 / t8 / 1e9,
        "rewards_8": [r.reward for r in out], "tau_before": out[0].tau_before, "tau_after_8": [r.tau_after for r in out],
    })
    print(f"  layers={res['layers']}: t(1) {t1:.2f} s, t(8) {t8:.2f} s, t(8)/t(1) = {t8 / t1:.2f} "
          f"(FLOPs x{f8 / f1:.2f}; {f1 / t1 / 1e9:.0f} -> {f8 / t8 / 1e9:.0f} GFLOP/s)")
    if args.peft:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            sync()
            t = time.perf_counter()
            ref = [run_trial_peft(model, tokenizer, d, measure, recipe, seed=i, index=i)
                   for i, d in enumerate(dreams[:8])]
            sync()
            tp = time.perf_counter() - t
        res.update({"peft_sequential_8_s": tp, "ratio_peft8_over_t8": tp / t8, "ratio_peft8_over_t1": tp / t1,
                    "peft_rewards_8": [r.reward for r in ref]})
        print(f"  layers={res['layers']}: peft one by one x8 {tp:.2f} s = {tp / t8:.2f} x t(8), {tp / t1:.2f} x t(1)")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dream-tokens", type=int, default=150)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--layers", nargs="+", choices=["all", "top8"], default=["all", "top8"])
    ap.add_argument("--no-peft", dest="peft", action="store_false", help="skip the sequential peft baseline")
    ap.add_argument("--out", default=str(ROOT / "bench/results/dream_trials.json"))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    loaded = load_base_model(ModelConfig(), ROOT)
    loaded.model.to(resolve_device(args.device))
    model, tok = loaded.model, loaded.tokenizer
    dreams, qa, source = load_task(tok, 8, args.dream_tokens)
    measure = AnswerLoglik(model, tok, [f"Question: {q}\nAnswer:" for q, _ in qa], [f" {a}" for _, a in qa], args.max_length)
    n_layers = model.config.num_hidden_layers
    dream_lens = [len(tok(d, add_special_tokens=False)["input_ids"]) for d in dreams]
    print(f"threads={args.threads} model={loaded.name} dreams from {source}: {dream_lens} tokens; "
          f"{len(qa)} questions ({measure.batch.n_tokens} tokens); steps={args.steps} r={args.r}")
    res: dict = {
        "threads": args.threads, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "model": loaded.name, "torch": torch.__version__, "dream_source": source,
        "dream_tokens": dream_lens, "questions": len(qa), "question_tokens": measure.batch.n_tokens,
        "steps": args.steps, "r": args.r, "alpha": 2 * args.r, "target_modules": ["q_proj", "v_proj"],
        "repeats": args.repeats, "by_layers": [],
    }
    for choice in args.layers:
        layers = None if choice == "all" else list(range(n_layers - 8, n_layers))
        res["by_layers"].append(bench_layers(model, tok, dreams, measure, layers, args))
    save_results(res, args.out)


if __name__ == "__main__":
    main()
