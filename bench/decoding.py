"""Sleep-phase decoding on the embedded default model: the sampler against ``generate`` and the ceiling.

Measures in one run, at the same thread count and dtype:
  (a) Hugging Face ``generate`` (sampling, batch 8, KV cache) over the prompts;
  (b) :func:`model.decoding.sampling.sample_continuations` over the same prompts at each of
      ``--batch-sizes`` (continuous batching, static KV cache);
  (c) the ceiling: a plain forward pass of ``--ceiling-batch`` x ``--ceiling-len`` tokens
      (no cache, logits everywhere), median of three after a warm-up, measured before
      (a) and after (b) (the machine is shared: the mean of the two is the ceiling);
  * peak RSS of the process after each part;
  * exactness: greedy sampler output equals greedy ``generate`` token for token, on 4
    prompts x 16 new tokens (``generate`` one prompt at a time, no padding).

Prompts are CLINC150 few-shot prompts ("text -> intent" lines, 0-3 examples, then a
query) of varied lengths; all runs use the same sampling settings (default: 64 new
tokens, temperature 1, top-p 0.95) and count the new tokens each sequence really got
(up to and including EOS). Targets (fp32): (b) >= 50% of (c) and >= 4x (a).

Run:  python bench/decoding.py [--threads 2] [--dtype float32|bfloat16] [--batch-sizes 8 16 32 64 128]
Writes bench/results/decoding[-bfloat16].json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import peak_rss_mib  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.decoding.loading import load_base_model  # noqa: E402
from model.decoding.sampling import DTYPES, base_weights_as, sample_continuations  # noqa: E402

CLINC = ROOT / "data/raw/clinc150/data_full.json"


def clinc_prompts(n: int, seed: int = 0) -> list[str]:
    """n few-shot intent prompts: 0-5 labelled examples, then a query to label."""
    rows = [(t, lab) for t, lab in json.loads(CLINC.read_text())["train"] if lab != "oos"]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        shots = rng.sample(rows, i % 4 + 1)
        lines = [f"{t} -> {lab.replace('_', ' ')}" for t, lab in shots[:-1]]
        out.append("\n".join([*lines, f"{shots[-1][0]} ->"]))
    return out


def new_tokens(row: list[int], eos: int, pad: int) -> int:
    """Tokens a ``generate`` row really produced: up to and including EOS, no padding after."""
    return row.index(eos) + 1 if eos in row else sum(t != pad for t in row)


def run_generate(model, tok, prompts: list[str], batch: int, args) -> dict:
    """(a): ``generate`` over left-padded batches of ``batch`` prompts."""
    tok.padding_side = "left"
    eos, pad = tok.eos_token_id, tok.pad_token_id
    total, start = 0, time.perf_counter()
    torch.manual_seed(args.seed)
    for i in range(0, len(prompts), batch):
        enc = tok(prompts[i : i + batch], return_tensors="pt", padding=True)
        out = model.generate(**enc, max_new_tokens=args.new_tokens, do_sample=True, temperature=args.temperature,
                             top_p=args.top_p, top_k=0, pad_token_id=pad, eos_token_id=eos)
        total += sum(new_tokens(r, eos, pad) for r in out[:, enc["input_ids"].shape[1]:].tolist())
    seconds = time.perf_counter() - start
    return {"batch_size": batch, "new_tokens": total, "seconds": seconds, "tokens_per_second": total / seconds}


def run_sampler(model, tok, prompts: list[str], batch: int, args) -> dict:
    """(b): the sampler at one batch size."""
    start = time.perf_counter()
    out = sample_continuations(model, tok, prompts, 1, args.new_tokens, args.temperature, args.top_p, args.seed,
                               batch_size=batch)
    seconds = time.perf_counter() - start
    total = sum(len(s.tokens) + s.finished for s in out)  # + the EOS of finished rows
    return {"batch_size": batch, "new_tokens": total, "seconds": seconds, "tokens_per_second": total / seconds}


def run_ceiling(model, args) -> dict:
    """(c): a plain forward pass over ceiling_batch x ceiling_len tokens."""
    ids = torch.randint(100, model.config.vocab_size, (args.ceiling_batch, args.ceiling_len))
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False)  # warm-up
        times = []
        for _ in range(3):
            t = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            times.append(time.perf_counter() - t)
    seconds = statistics.median(times)
    return {"shape": [args.ceiling_batch, args.ceiling_len], "seconds": seconds,
            "tokens_per_second": ids.numel() / seconds}


def greedy_check(model, tok, prompts: list[str], n_new: int) -> dict:
    """Greedy sampler output == greedy ``generate`` (one prompt at a time), token for token."""
    got = sample_continuations(model, tok, prompts, 1, n_new, temperature=0.0, batch_size=len(prompts))
    eos, rows = tok.eos_token_id, []
    for p, s in zip(prompts, got):
        enc = tok(p, return_tensors="pt")
        ref = model.generate(**enc, max_new_tokens=n_new, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=eos)[0, enc["input_ids"].shape[1]:].tolist()
        ref = ref[: ref.index(eos)] if eos in ref else ref
        rows.append({"prompt": p[-60:], "equal": list(s.tokens) == ref, "sampler": tok.decode(s.tokens),
                     "generate": tok.decode(ref)})
    return {"all_equal": all(r["equal"] for r in rows), "prompts": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    ap.add_argument("--source", choices=["embedded", "tiny"], default="embedded", help="tiny: a smoke run")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--generate-batch", type=int, default=8)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    ap.add_argument("--ceiling-batch", type=int, default=8)
    ap.add_argument("--ceiling-len", type=int, default=128)
    ap.add_argument("--out", default=None, help="default: bench/results/decoding[-bfloat16].json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_base_model(ModelConfig(source=args.source), ROOT)
    model, tok = loaded.model, loaded.tokenizer
    prompts = clinc_prompts(args.prompts, args.seed)
    lengths = [len(ids) for ids in tok(prompts)["input_ids"]]
    print(f"{loaded.name}, {args.dtype}, threads={args.threads}; {len(prompts)} prompts of {min(lengths)}-"
          f"{max(lengths)} tokens (mean {statistics.mean(lengths):.0f}), {args.new_tokens} new tokens, "
          f"T={args.temperature}, top-p={args.top_p}")
    result: dict = {"model": loaded.name, "dtype": args.dtype, "threads": args.threads, "prompts": len(prompts),
                    "prompt_tokens": {"min": min(lengths), "max": max(lengths), "mean": statistics.mean(lengths)},
                    "new_tokens": args.new_tokens, "temperature": args.temperature, "top_p": args.top_p}
    with base_weights_as(model, DTYPES[args.dtype]):
        result["greedy_equals_generate"] = greedy_check(model, tok, prompts[:4], 16)
        print(f"greedy == generate (4 prompts x 16 tokens): {result['greedy_equals_generate']['all_equal']}")
        first = run_ceiling(model, args)
        print(f"(c) ceiling before: {first['tokens_per_second']:.1f} tokens/s", flush=True)
        result["generate"] = run_generate(model, tok, prompts, args.generate_batch, args)
        result["generate"]["peak_rss_mib"] = peak_rss_mib()
        print(f"(a) generate: {result['generate']['tokens_per_second']:.1f} tokens/s", flush=True)
        result["sampler"] = []
        for b in args.batch_sizes:
            r = run_sampler(model, tok, prompts, b, args)
            r["peak_rss_mib"] = peak_rss_mib()
            result["sampler"].append(r)
            print(f"(b) sampler batch {b}: {r['tokens_per_second']:.1f} tokens/s", flush=True)
        last = run_ceiling(model, args)
    result["ceiling"] = {"shape": first["shape"], "tokens_per_second_before": first["tokens_per_second"],
                         "tokens_per_second_after": last["tokens_per_second"],
                         "tokens_per_second": (first["tokens_per_second"] + last["tokens_per_second"]) / 2,
                         "peak_rss_mib": peak_rss_mib()}
    result["ceiling"]["seconds"] = args.ceiling_batch * args.ceiling_len / result["ceiling"]["tokens_per_second"]
    best = max(result["sampler"], key=lambda r: r["tokens_per_second"])
    ceil, gen = result["ceiling"]["tokens_per_second"], result["generate"]["tokens_per_second"]
    result["best"] = {"batch_size": best["batch_size"], "tokens_per_second": best["tokens_per_second"],
                      "fraction_of_ceiling": best["tokens_per_second"] / ceil,
                      "speedup_over_generate": best["tokens_per_second"] / gen}
    result["targets_met"] = {"half_of_ceiling": best["tokens_per_second"] >= 0.5 * ceil,
                             "4x_generate": best["tokens_per_second"] >= 4 * gen}
    result["peak_rss_mib"] = peak_rss_mib()

    print("\n| run | batch | new tokens | seconds | tokens/s | / ceiling | / generate | peak RSS MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    c = result["ceiling"]
    print(f"| (c) forward {c['shape'][0]}x{c['shape'][1]} (before {c['tokens_per_second_before']:.0f}, after "
          f"{c['tokens_per_second_after']:.0f}) | {c['shape'][0]} | {c['shape'][0] * c['shape'][1]} | "
          f"{c['seconds']:.2f} | {ceil:.1f} | 1.00 | {ceil / gen:.2f} | {c['peak_rss_mib']:.0f} |")
    g = result["generate"]
    print(f"| (a) generate | {g['batch_size']} | {g['new_tokens']} | {g['seconds']:.1f} | {gen:.1f} | "
          f"{gen / ceil:.2f} | 1.00 | {g['peak_rss_mib']:.0f} |")
    for r in result["sampler"]:
        print(f"| (b) sampler | {r['batch_size']} | {r['new_tokens']} | {r['seconds']:.1f} | "
              f"{r['tokens_per_second']:.1f} | {r['tokens_per_second'] / ceil:.2f} | "
              f"{r['tokens_per_second'] / gen:.2f} | {r['peak_rss_mib']:.0f} |")
    print(f"\nbest sampler batch {best['batch_size']}: {result['best']['fraction_of_ceiling']:.2f} of the ceiling "
          f"(target >= 0.5: {result['targets_met']['half_of_ceiling']}), "
          f"{result['best']['speedup_over_generate']:.2f}x generate (target >= 4: {result['targets_met']['4x_generate']})")
    suffix = "" if args.dtype == "float32" else f"-{args.dtype}"
    out = Path(args.out or ROOT / f"bench/results/decoding{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
