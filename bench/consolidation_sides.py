"""The two sides of bench/consolidation_vs_trl.py, one per child process: ours (``run_ours``: the real
``model.sleep.consolidation.consolidate`` loop) and TRL's GKD trainer (``run_trl``), with the setup they share
(the prompts, the model with a "woken" CMS, the consolidation config, the step timing). What they measure and
why it is like for like is in that script's docstring.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.results import peak_rss_mib
from model.config import ConsolidationConfig, Params, load_params
from model.data.stream import build_stream, load_source
from model.decoding.loading import load_base_model
from model.decoding.sampling import sample_continuations
from model.memory.cms import ContinuumMemory, attach_cms
from model.memory.wake import split_template
from model.sleep.consolidation import encode_distillation

ROOT = Path(__file__).resolve().parents[1]
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


def bench_params(source: str = "embedded") -> Params:
    """params.yaml with the model of ``source``: the embedded default, or ``tiny`` (built in code: a smoke run)."""
    params = load_params(ROOT / "params.yaml")
    return params.model_copy(update={"model": params.model.model_copy(update={"source": source})})


def bench_prompts(params: Params, n: int) -> list[str]:
    """``n`` CLINC training prompts ``"{text} -> "`` (as bench/wake_throughput.py builds its batch)."""
    cfg = params.data.model_copy(update={"n_tasks": 1, "labels_per_task": 8, "train_per_label": 16, "test_per_label": 1})
    stream, _ = build_stream(load_source(params.data.source, ROOT), cfg)
    rows = stream[stream["split"] == "train"].head(n)
    return [split_template(params.wake.template, t, lab)[0] for t, lab in zip(rows["text"], rows["label"])]


def bench_config(params: Params, lmbda: float, steps: int) -> ConsolidationConfig:
    return params.consolidation.model_copy(
        # init zero: the new expert starts at B = 0 on both sides (TRL's student is that freshly unlocked expert);
        # with params.yaml's init copy ours would start as the teacher's copy, at a loss of 0. One teacher sample
        # per prompt: D is --batch sequences, and every off-policy step of both sides trains on all of them.
        update={"divergence": "jsd", "beta": BETA, "on_policy_fraction": lmbda, "alpha": 1.0, "steps": steps,
                "init": "zero", "samples_per_prompt": 1}
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
    b = encode_distillation(tok, prompts, texts, max_length)
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

    params = bench_params(args.source)
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

    params = bench_params(args.source)
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
