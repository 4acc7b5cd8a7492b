"""One consolidation (distillation) step of ours against TRL's GKD trainer, same run, same work.

Both sides distil the same teacher into the same student on the embedded default model
(``model.decoding.loading.load_base_model(params.model)``) with our CMS attached:

* teacher = the model with every memory level on (the fast level holds what "wake"
  learned, see ``simulate_wake``); student = the fast level masked plus one newly
  unlocked expert of the slow level, which is the only thing trained (A, B and its
  router row in every CMS layer; AdamW, lr and grad clip from params.consolidation);
* the batch: ``--batch`` CLINC prompts ``"{text} -> "`` built from ``model.data.stream`` as in
  bench/wake_throughput.py; the off-policy data D are the teacher's own samples of
  those prompts (``sample_continuations`` under the teacher view, seed params.seed,
  identical on both sides; the parent checks they are the same texts);
* lambda (on-policy fraction) in {0, 1}: 0 = every step trains on D; 1 = every step
  first samples new continuations from the student (no gradient through sampling);
* the same divergence: generalised JSD with beta = 0.5. Ours computes
  beta KL(T||M) + (1-beta) KL(S||M), M = beta T + (1-beta) S; TRL's
  ``GKDTrainer.generalized_jsd_loss`` builds M = beta T + (1-beta) S the same way
  (``logsumexp([log S + log(1-beta), log T + log beta])``) and returns the same sum,
  so ``beta=0.5`` means the same thing on both sides (and so do its endpoints:
  0 = KL(T||S), 1 = KL(S||T)). Temperature 1 on both (TRL's default is 0.9);
  ``max_new_tokens`` and top-k 0 / top-p 1 sampling are the same; alpha = 1 (no
  Learning to Imitate), so both sides do distillation only.

What one timed step is:

* **ours**: the real ``model.sleep.consolidation.consolidate`` loop, timed between two
  consecutive ``on_step`` callbacks: pick the batch, (if on-policy) sample under the
  student view, ``encode`` (packed rows), shared prefix below the first CMS layer
  (no grad), teacher suffix (no grad), student suffix, LM head at completion
  positions only, ``distillation_loss``, backward, grad clip, AdamW on the new expert.
  One model in memory, two mask states.
* **trl**: the real ``trl.experimental.gkd.GKDTrainer.train()`` loop (stock
  ``DataCollatorForChatML`` on pre-tokenised rows, sequential sampler, constant lr, no
  logging/saving), timed between two consecutive ``on_step_end`` callbacks: collate,
  ``training_step`` (with probability lmbda ``generate_on_policy_outputs`` with the
  student, else the given data), ``compute_loss`` (full student forward with logits at
  every position, full teacher forward under no_grad, ``generalized_jsd_loss`` over the
  completion tokens), backward, grad clip, AdamW, lr-scheduler step, zero_grad. The
  student is our CMS model (one new expert trainable via ``ContinuumMemory.trainable_only``);
  the teacher is a second copy of the model, as TRL takes it (``teacher_model=``).
  The ``on_step_begin -> on_step_end`` time is recorded too. Two TRL settings run:
  ``trl`` with ``gradient_checkpointing=False`` (like for like: no recomputation, and
  on-policy sampling with a KV cache, as ours) and ``trl_default`` with TRL's own
  default ``gradient_checkpointing=True`` (SFTConfig turns it on; GKDTrainer then also
  samples with ``use_cache=False``). Ratios are reported against each.

The first ``--warmup`` steps are not timed; steps/s = 1 / median of the next ``--steps``.
Each (side, lambda) runs in its own subprocess of this script (``--side``), so that
its peak RSS (a high-water mark, ru_maxrss) is its own; the parent collects their JSON.

The two sides (and the setup they share) are in bench/consolidation_sides.py; this script is the parent.

Run:  python bench/consolidation_vs_trl.py [--source embedded|tiny] [--threads 2] [--steps 5] [--warmup 1] [--batch 8] [--lambdas 0 1]
Writes bench/results/consolidation_vs_trl.json. TRL is a benchmark dependency only.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.consolidation_sides import BETA, WAKE_STD, bench_params, run_ours, run_trl  # noqa: E402

TARGET_SPEEDUP = 2.0  # ours/trl steps/s, issue #18 (1.5 before it)
TARGET_MEMORY = 0.6  # ours/trl peak RSS, issue #18 (0.7 before it)


# ----------------------------------------------------------------------------- parent
TRL_VARIANTS = {
    # name: gradient_checkpointing
    "trl": False,  # like for like: no recomputation, KV-cached sampling (TRL's fastest setting)
    "trl_default": True,  # TRL's SFTConfig/GKDConfig default; it also samples without a KV cache
}


def run_child(args: argparse.Namespace, side: str, lmbda: float) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "child.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--side", "ours" if side == "ours" else "trl",
               "--lmbda", str(lmbda), "--threads", str(args.threads), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--batch", str(args.batch), "--source", args.source,
               "--child-out", str(out)]
        if side != "ours" and TRL_VARIANTS[side]:
            cmd.append("--trl-gc")
        t = time.perf_counter()
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TRL_EXPERIMENTAL_SILENCE": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
            raise SystemExit(f"{side} (lambda={lmbda}) failed with exit code {proc.returncode}")
        res = json.loads(out.read_text())
        res["process_wall_seconds"] = time.perf_counter() - t
        return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per side and lambda (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (>= 1)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--trl-variants", nargs="+", choices=list(TRL_VARIANTS), default=list(TRL_VARIANTS),
                    help="trl: gradient_checkpointing=False (like for like); trl_default: TRL's default True")
    ap.add_argument("--source", choices=["embedded", "tiny"], default="embedded", help="tiny: a smoke run")
    ap.add_argument("--out", default=str(ROOT / "bench/results/consolidation_vs_trl.json"))
    ap.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)  # internal: one child process
    ap.add_argument("--lmbda", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--trl-gc", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.warmup < 1:
        ap.error("--warmup must be >= 1 (the first step has no previous step end to time from)")

    if args.side is not None:
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        res = run_ours(args) if args.side == "ours" else run_trl(args)
        Path(args.child_out).write_text(json.dumps(res))
        return

    params = bench_params(args.source)
    print(f"source={args.source} threads={args.threads} batch={args.batch} steps={args.steps} (+{args.warmup} warm-up) "
          f"max_new_tokens={params.consolidation.max_new_tokens} divergence=JSD beta={BETA} alpha=1")
    load_before = os.getloadavg()
    by_lambda = {}
    for lmbda in args.lambdas:
        runs = {side: run_child(args, side, lmbda) for side in ["ours", *args.trl_variants]}
        ours = runs["ours"]
        entry: dict = {"ours": ours}
        for v in args.trl_variants:
            other = runs[v]
            speed = ours["steps_per_second"] / other["steps_per_second"]
            mem = ours["peak_rss_mib"] / other["peak_rss_mib"]
            entry[f"vs_{v}"] = {
                "steps_per_second_ratio": speed,
                "peak_rss_ratio": mem,
                "speed_target_met": speed >= TARGET_SPEEDUP,
                "memory_target_met": mem <= TARGET_MEMORY,
                "same_teacher_data": ours["teacher_data"] == other["teacher_data"],
                "first_step_loss": {"ours": ours["losses"][0], v: other["losses"][0]},
            }
            entry[v] = other
        by_lambda[str(lmbda)] = entry
        print(f"  lambda={lmbda}: done ("
              + ", ".join(f"{k} {r['process_wall_seconds']:.0f} s" for k, r in runs.items()) + " of process wall time)")

    first = next(iter(by_lambda.values()))
    res = {
        "threads": args.threads,
        "batch": args.batch,
        "timed_steps": args.steps,
        "warmup_steps": args.warmup,
        "max_new_tokens": params.consolidation.max_new_tokens,
        "max_length": params.wake.max_length,
        "divergence": f"generalised JSD, beta={BETA} on both sides (TRL generalized_jsd_loss builds the same "
                      f"mixture M = beta*T + (1-beta)*S and returns beta*KL(T||M) + (1-beta)*KL(S||M))",
        "alpha": 1.0,
        "temperature": params.consolidation.temperature,
        "wake_simulation": f"fast-level B ~ N(0, {WAKE_STD}) on every copy, so teacher != student",
        "targets": {"steps_per_second_ratio_at_least": TARGET_SPEEDUP, "peak_rss_ratio_at_most": TARGET_MEMORY},
        "torch": first["ours"]["torch"],
        "trl": first[args.trl_variants[0]]["trl"],
        "trl_variants": {v: {"gradient_checkpointing": TRL_VARIANTS[v]} for v in args.trl_variants},
        "timed": {
            "ours": "model.sleep.consolidation.consolidate loop, between consecutive on_step callbacks",
            "trl": "GKDTrainer.train() loop, between consecutive on_step_end callbacks",
        },
        "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},  # others share the machine
        "by_lambda": by_lambda,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")

    print(f"\n{'lambda':>6} {'side':>12} {'steps/s':>8} {'s/step':>7} {'peak RSS MiB':>13} {'RSS after load':>15} "
          f"{'peak - imports':>15}")
    for lmbda, r in by_lambda.items():
        for side in ["ours", *args.trl_variants]:
            x = r[side]
            print(f"{lmbda:>6} {side:>12} {x['steps_per_second']:8.3f} {x['median_step_seconds']:7.2f} "
                  f"{x['peak_rss_mib']:13.0f} {x['rss_after_models_mib']:15.0f} "
                  f"{x['peak_rss_mib'] - x['rss_after_imports_mib']:15.0f}")
        for v in args.trl_variants:
            c = r[f"vs_{v}"]
            print(f"{'':>6} ours/{v}: steps/s {c['steps_per_second_ratio']:.2f}x (target >= {TARGET_SPEEDUP}: "
                  f"{'met' if c['speed_target_met'] else 'NOT met'}), peak RSS {c['peak_rss_ratio']:.2f}x "
                  f"(target <= {TARGET_MEMORY}: {'met' if c['memory_target_met'] else 'NOT met'}); "
                  f"same teacher data: {c['same_teacher_data']}; first-step loss ours "
                  f"{c['first_step_loss']['ours']:.6f} {v} {c['first_step_loss'][v]:.6f}")
    print(f"results in {out}")


if __name__ == "__main__":
    main()
