"""Wake training throughput on the embedded default model, against this CPU's GEMM peak.

Measures in one run, at the same thread count:
  * the fp32 and bf16 GEMM peak (best of several square matmuls);
  * a wake step (CMS on the top layers, base frozen, loss on completion tokens only):
    tokens/s and achieved FLOP/s (FLOPs counted by torch's FlopCounterMode on one
    step, time from the median of timed steps);
  * the reference: a plain full forward+backward of the whole model (all weights
    trainable, logits at every position) over the same batch;
  * peak RSS of the process.

Run:  python bench/wake_throughput.py [--threads 2] [--batch 32] [--steps 6] [--dtypes float32 bfloat16]
Writes bench/results/wake_throughput.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import save_results  # noqa: E402
from model.config import load_params  # noqa: E402
from model.data.stream import build_stream, load_source  # noqa: E402
from model.decoding.forward import Batch  # noqa: E402
from model.decoding.loading import load_base_model  # noqa: E402
from model.memory.cms import attach_cms  # noqa: E402
from model.memory.optimizer import ChunkedOptimizer  # noqa: E402
from model.memory.wake import encode, sft_loss, split_template  # noqa: E402


def gemm_peak(dtype: torch.dtype, n: int = 1536, reps: int = 5) -> float:
    """Best FLOP/s of an n x n x n matmul in ``dtype``."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def time_steps(fn, steps: int) -> float:
    """Median seconds per call after one warm-up call."""
    fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def make_batch(tokenizer, params, batch_size: int) -> Batch:
    cfg = params.data.model_copy(update={"n_tasks": 1, "labels_per_task": 8, "train_per_label": 16, "test_per_label": 1})
    stream, _ = build_stream(load_source(params.data.source, ROOT), cfg)
    rows = stream[stream["split"] == "train"].head(batch_size)
    pairs = [split_template(params.wake.template, t, lab) for t, lab in zip(rows["text"], rows["label"])]
    return encode(tokenizer, [p for p, _ in pairs], [c for _, c in pairs], params.wake.max_length)


def measure(params, dtype: str, batch_size: int, steps: int, peaks: dict[str, float]) -> dict:
    """Time a wake step and a plain full forward+backward with the base model in ``dtype``."""
    params = params.model_copy(update={"model": params.model.model_copy(update={"dtype": dtype})})
    loaded = load_base_model(params.model, ROOT)
    model, tok = loaded.model, loaded.tokenizer
    batch = make_batch(tok, params, batch_size)
    n_tokens = batch.n_tokens

    # Reference: plain full forward + backward of the whole model, every weight trainable.
    model.requires_grad_(True)
    model.train()

    def full_step() -> None:
        out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, labels=batch.input_ids, use_cache=False)
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    full_flops = count_flops(full_step)
    full_s = time_steps(full_step, steps)
    model.requires_grad_(False)

    # Wake: CMS levels on the top layers, base frozen, the chunked optimiser stepping.
    cms = attach_cms(model, params.cms, seed=params.seed)
    opt = ChunkedOptimizer(cms, grad_clip=params.wake.grad_clip)
    model.train()

    def wake_step() -> None:
        sft_loss(model, batch).backward()
        opt.step()

    wake_flops = count_flops(lambda: sft_loss(model, batch).backward())
    for p in cms.parameters():
        p.grad = None
    wake_s = time_steps(wake_step, steps)
    own_peak = peaks[dtype]

    def rates(flops: float, seconds: float) -> dict:
        return {
            "seconds_per_step": seconds,
            "tokens_per_second": n_tokens / seconds,
            "gflop_per_step": flops / 1e9,
            "achieved_gflops": flops / seconds / 1e9,
            "fraction_of_fp32_peak": flops / seconds / peaks["float32"],
            "fraction_of_bf16_peak": flops / seconds / peaks["bfloat16"],
            "fraction_of_own_dtype_peak": flops / seconds / own_peak,
        }

    return {
        "tokens_per_step": n_tokens,
        "packed_rows": int(batch.input_ids.shape[0]),
        "row_length": int(batch.input_ids.shape[1]),
        "packing_efficiency": n_tokens / batch.input_ids.numel(),
        "wake": rates(wake_flops, wake_s),
        "full_forward_backward": rates(full_flops, full_s),
        "wake_speedup_over_full_step": full_s / wake_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    ap.add_argument("--out", default=str(ROOT / "bench/results/wake_throughput.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    params = load_params(ROOT / "params.yaml")
    peaks = {"float32": gemm_peak(torch.float32), "bfloat16": gemm_peak(torch.bfloat16)}
    print(f"threads={args.threads} batch={args.batch}; GEMM peak: fp32 {peaks['float32'] / 1e9:.1f} GFLOP/s, "
          f"bf16 {peaks['bfloat16'] / 1e9:.1f} GFLOP/s")
    res: dict = {
        "threads": args.threads,
        "batch": args.batch,
        "gemm_peak_gflops": {k: v / 1e9 for k, v in peaks.items()},
        "torch": torch.__version__,
        "by_dtype": {},
    }
    for dtype in args.dtypes:
        r = measure(params, dtype, args.batch, args.steps, peaks)
        res["by_dtype"][dtype] = r
        for name in ("wake", "full_forward_backward"):
            x = r[name]
            print(f"  {dtype:8s} {name:22s} {x['tokens_per_second']:6.0f} tokens/s {x['achieved_gflops']:6.1f} GFLOP/s  "
                  f"= {100 * x['fraction_of_fp32_peak']:3.0f}% of fp32 peak, {100 * x['fraction_of_bf16_peak']:3.0f}% of bf16 peak")
        print(f"  {dtype:8s} packing efficiency {100 * r['packing_efficiency']:.0f}% ({r['tokens_per_step']} tokens in "
              f"{r['packed_rows']}x{r['row_length']})")
    save_results(res, args.out)


if __name__ == "__main__":
    main()
