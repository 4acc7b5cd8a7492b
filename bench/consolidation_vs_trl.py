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

Run:  python bench/consolidation_vs_trl.py [--threads 2] [--steps 5] [--warmup 1] [--batch 8] [--lambdas 0 1]
Writes bench/results/consolidation_vs_trl.json. TRL is a benchmark dependency only.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.config import ConsolidationConfig, Params, load_params  # noqa: E402
from model.data.stream import build_stream, load_source  # noqa: E402
from model.decoding.loading import load_base_model  # noqa: E402
from model.decoding.sampling import sample_continuations  # noqa: E402
from model.memory.cms import ContinuumMemory, attach_cms  # noqa: E402
from model.memory.wake import encode, split_template  # noqa: E402

TARGET_SPEEDUP = 1.5  # ours/trl steps/s, from the issue
TARGET_MEMORY = 0.7  # ours/trl peak RSS, from the issue
BETA = 0.5
WAKE_STD = 0.05  # std of the fast level's B in simulate_wake
SRC, DST = 0, 1  # fast -> slow


# ----------------------------------------------------------------------------- shared setup
def rss_mib() -> float:
    """Current resident set size of this process (MiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_prompts(params: Params, n: int) -> list[str]:
    """``n`` CLINC training prompts ``"{text} -> "`` (as bench/wake_throughput.py builds its batch)."""
    cfg = params.data.model_copy(update={"n_tasks": 1, "labels_per_task": 8, "train_per_label": 16, "test_per_label": 1})
    stream, _ = build_stream(load_source(params.data.source, ROOT), cfg)
    rows = stream[stream["split"] == "train"].head(n)
    return [split_template(params.wake.template, t, lab)[0] for t, lab in zip(rows["text"], rows["label"])]


def bench_config(params: Params, lmbda: float, steps: int) -> ConsolidationConfig:
    return params.consolidation.model_copy(
        update={"divergence": "jsd", "beta": BETA, "on_policy_fraction": lmbda, "alpha": 1.0, "steps": steps}
    )


def load_with_cms(params: Params):
    """The base model with our CMS attached and a "woken" fast level."""
    loaded = load_base_model(params.model, ROOT)
    cms = attach_cms(loaded.model, params.cms, seed=params.seed)
    simulate_wake(cms, params.seed)
    return loaded.model, loaded.tokenizer, cms


def simulate_wake(cms: ContinuumMemory, seed: int) -> None:
    """Give the fast level's active experts B ~ N(0, WAKE_STD), seeded, as if wake had trained them.

    Without it every expert has B = 0, the teacher equals the student and every loss and
    gradient is exactly 0. Identical on every copy of the model (same seed, same order).
    """
    g = torch.Generator().manual_seed(seed + 12345)
    with torch.no_grad():
        for bank in cms.banks(SRC):
            for s in cms.active_slots(SRC):
                bank.B[s].normal_(0.0, WAKE_STD, generator=g)


def batch_shape(tok, prompts: list[str], texts: list[str], max_length: int) -> dict:
    """Tokens ours processes for these sequences (packed rows, completion positions)."""
    b = encode(tok, prompts, texts, max_length)
    return {"rows": int(b.input_ids.shape[0]), "row_length": int(b.input_ids.shape[1]), "tokens": b.n_tokens,
            "completion_tokens": int(b.completion_mask.sum())}


def b_norm(params: list) -> float:
    """Norm of the new expert's B matrices (0 until it has been trained: it is unlocked with B = 0)."""
    return float(torch.sqrt(sum((p.detach().float() ** 2).sum() for p in params[1::3])))


def timed(stamps: list[float], warmup: int) -> list[float]:
    """Seconds of the steps after ``warmup`` from end-of-step timestamps (step k = stamps[k-1] - stamps[k-2])."""
    deltas = [b - a for a, b in zip(stamps, stamps[1:])]  # steps 2..K
    return deltas[warmup - 1 :]


def summary(times: list[float]) -> dict:
    med = statistics.median(times)
    return {"step_seconds": times, "median_step_seconds": med, "steps_per_second": 1.0 / med}


# ----------------------------------------------------------------------------- ours
def run_ours(args: argparse.Namespace) -> dict:
    from model.sleep.consolidation import consolidate

    params = load_params(ROOT / "params.yaml")
    prompts = bench_prompts(params, args.batch)
    rss_imports = rss_mib()
    model, tok, cms = load_with_cms(params)
    rss_loaded = rss_mib()
    cfg = bench_config(params, args.lmbda, args.warmup + args.steps)

    stamps: list[float] = []
    records = []

    def on_step(rec) -> None:
        stamps.append(time.perf_counter())
        records.append(rec)

    result = consolidate(
        model, tok, cms, SRC, DST, prompts, cfg, params.wake.max_length, judge=None, seed=params.seed,
        origin="bench", on_step=on_step,
    )
    teacher_data = [r["text"] for r in result.samples if r["kind"] == "teacher_data"]
    shapes = {}
    for k in range(1, cfg.steps + 1):
        drawn = [r for r in result.samples if r["kind"] == "on_policy" and r["step"] == k]
        if drawn:
            shapes[k] = batch_shape(tok, [r["prompt"] for r in drawn], [r["text"] for r in drawn], params.wake.max_length)
    if not shapes:  # off-policy: every step trains on D (the order differs, the tokens do not)
        shapes = {k: batch_shape(tok, prompts, teacher_data, params.wake.max_length) for k in range(1, cfg.steps + 1)}
    return {
        "side": "ours",
        "lmbda": args.lmbda,
        **summary(timed(stamps, args.warmup)),
        "on_policy_steps": [r.on_policy for r in records],
        "losses": [r.distillation for r in records],
        "tokens_per_step": [shapes[k] for k in sorted(shapes)],
        "teacher_data": teacher_data,
        "prompts": prompts,
        "new_expert_B_norm": b_norm(cms.level_parameters(DST, [result.slot])),
        "rss_after_imports_mib": rss_imports,
        "rss_after_models_mib": rss_loaded,
        "peak_rss_mib": peak_rss_mib(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


# ----------------------------------------------------------------------------- TRL
def run_trl(args: argparse.Namespace) -> dict:
    import datasets
    import trl
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    params = load_params(ROOT / "params.yaml")
    prompts = bench_prompts(params, args.batch)
    rss_imports = rss_mib()
    # Student: our CMS model, fast level masked, one new slow expert (the only trainable tensors).
    model, tok, cms = load_with_cms(params)
    slot = cms.unlock(DST, origin="bench")
    cms.set_level_enabled(SRC, False)
    new_params = cms.level_parameters(DST, [slot])
    # Teacher: a second copy, every level on (what our teacher view computes).
    teacher, _, _ = load_with_cms(params)
    teacher.eval()
    rss_loaded = rss_mib()
    cfg = bench_config(params, args.lmbda, args.warmup + args.steps)

    # D: the teacher's samples, the same call (and seed) as consolidate() makes.
    data = sample_continuations(
        teacher, tok, prompts, cfg.samples_per_prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_p, params.seed
    )
    rows = []
    for s in data:  # the same tokens as model.memory.wake.encode: prompt with special tokens, completion + EOS
        p = tok(s.prompt, add_special_tokens=True)["input_ids"]
        c = tok(s.text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append({"prompt": s.prompt, "input_ids": p + c, "completion_mask": [0] * len(p) + [1] * len(c)})
    # One epoch of cfg.steps identical batches, read in order: every step sees the same 8 sequences.
    dataset = datasets.Dataset.from_list(rows * cfg.steps)

    gkd_args = GKDConfig(
        output_dir=tempfile.mkdtemp(prefix="gkd-bench-"),
        lmbda=args.lmbda,
        beta=BETA,
        temperature=cfg.temperature,
        max_new_tokens=cfg.max_new_tokens,
        seq_kd=False,
        gradient_checkpointing=args.trl_gc,  # TRL's SFTConfig default is True (and then no KV cache when sampling)
        max_length=params.wake.max_length,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_steps=cfg.steps,
        learning_rate=cfg.lr,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=cfg.grad_clip,
        optim="adamw_torch",
        train_sampling_strategy="sequential",
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=params.seed,
    )

    begin: list[float] = []
    end: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            begin.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            end.append(time.perf_counter())

    trainer = GKDTrainer(
        model=model, teacher_model=teacher, args=gkd_args, train_dataset=dataset, processing_class=tok,
        callbacks=[Clock()],
    )

    # Observers only (record what happened; the wrapped calls are unchanged).
    losses: list[float] = []
    generated: list[dict] = []
    compute_loss, generate = trainer.compute_loss, trainer.generate_on_policy_outputs

    def observed_compute_loss(*a, **k):
        loss = compute_loss(*a, **k)
        losses.append(float(loss.detach()))
        return loss

    def observed_generate(*a, **k):
        ids, mask, labels = generate(*a, **k)
        generated.append({"rows": int(ids.shape[0]), "row_length": int(ids.shape[1]), "tokens": int(mask.sum()),
                          "completion_tokens": int((labels != -100).sum())})
        return ids, mask, labels

    trainer.compute_loss = observed_compute_loss
    trainer.generate_on_policy_outputs = observed_generate
    torch.set_num_threads(args.threads)  # after accelerate/Trainer set-up, in case either touched it

    with cms.trainable_only(new_params):
        trainer_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        trainer.train()
    shutil.rmtree(gkd_args.output_dir, ignore_errors=True)  # nothing is saved there (save_strategy="no")

    batch = trainer.data_collator(rows)
    off_policy_shape = {"rows": int(batch["input_ids"].shape[0]), "row_length": int(batch["input_ids"].shape[1]),
                        "tokens": int(batch["attention_mask"].sum()),
                        "completion_tokens": int((batch["labels"][:, 1:] != -100).sum())}
    return {
        "side": "trl",
        "lmbda": args.lmbda,
        **summary(timed(end, args.warmup)),
        "begin_to_end_median_step_seconds": statistics.median(
            [e - b for b, e in zip(begin, end)][args.warmup :]
        ),
        "losses": losses,
        "tokens_per_step": generated if generated else [off_policy_shape] * cfg.steps,
        "teacher_data": [s.text for s in data],
        "prompts": prompts,
        "gradient_checkpointing": args.trl_gc,
        "new_expert_B_norm": b_norm(new_params),
        "trainable_parameters": trainer_params,
        "new_expert_parameters": sum(p.numel() for p in new_params),
        "rss_after_imports_mib": rss_imports,
        "rss_after_models_mib": rss_loaded,
        "peak_rss_mib": peak_rss_mib(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "trl": trl.__version__,
    }


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
               "--warmup", str(args.warmup), "--batch", str(args.batch), "--child-out", str(out)]
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

    params = load_params(ROOT / "params.yaml")
    print(f"threads={args.threads} batch={args.batch} steps={args.steps} (+{args.warmup} warm-up) "
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
