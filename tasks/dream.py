"""Prefect tasks of sleep stage 2: dream, gate, promote (docs/design.md §3).

A round's trials (dreaming step 4) run in this task's process, or as groups on a task
runner when ``dream.trial_workers`` > 1 (``tasks/trials.py``).
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
from prefect import get_run_logger, task

from checks import gate_dream_table
from model.config import Params
from model.data.stream import PASSAGE_LABEL, PLAN_FILE, task_file
from model.decoding.forward import TrunkCache
from model.evaluation.knowledge import load_passages
from model.io import atomic_dir, atomic_path
from model.memory.checkpoint import open_memory_model, read_manifest, save_state
from model.memory.wake import split_template
from model.runtime import configure_torch
from model.sleep.consolidation import fold_dreams
from model.sleep.dreaming import (DreamTask, dream_about, dream_policy, keep_dreams, keep_dreams_in_slow, promote,
                                  task_from_examples, task_from_passage, train_prompt)
from model.sleep.held_out import HeldOutScore, answer_check, held_out_check, nothing_lost, training_helped
from model.sleep.rewards import SemanticJudge
from tasks.caching import cache_options, remove_outputs, stamp_output, writing_outputs
from tasks.trials import trial_step
from tasks.wake import TIMING, consolidated_state_dir, sleep_state_dir


def _labelled_train(stream: pd.DataFrame, period: int) -> pd.Series:
    """The mask of ``period``'s labelled train rows (not its plain passages)."""
    return (stream["task"] == period) & (stream["split"] == "train") & (stream["label"] != PASSAGE_LABEL)


def _stream_picks(params: Params, stream: pd.DataFrame, period: int) -> tuple[list[tuple[str, str]], list[list[tuple[str, str]]]]:
    """The period's labelled train (text, label) pairs, and the seeded pick of each stream dream task (C first,
    then tau's)."""
    cfg = params.dream
    rng = random.Random(params.seed * 7_907 + period)
    labelled = _labelled_train(stream, period)
    rows = stream[labelled].sort_values("row_id")
    pairs = list(zip(rows["text"], rows["label"]))
    need = cfg.context_examples + cfg.tau_examples
    if len(pairs) < need:
        raise ValueError(
            f"dream: period {period} has {len(pairs)} train examples, fewer than "
            f"dream.context_examples + dream.tau_examples = {need}"
        )
    return pairs, [rng.sample(pairs, need) for _ in range(cfg.passages_per_sleep)]


def dream_skip(params: Params, stream: pd.DataFrame, plan: dict[int, list[str]], period: int) -> str | None:
    """Why a stream sleep cannot dream about ``period`` (None when it can): the period read plain passages only,
    or it has fewer labelled train examples than one dream task takes (an inbox batch may be small). Wake and
    consolidation have learned the period all the same; a prepared stream always has enough (data checks)."""
    cfg = params.dream
    if cfg.task_source != "stream":
        return None
    if not plan.get(period):
        return "the period has plain passages only, no labelled examples to dream about"
    labelled = _labelled_train(stream, period)
    need = cfg.context_examples + cfg.tau_examples
    n = int(labelled.sum())
    if n < need:
        return (f"the period has {n} labelled train examples, fewer than dream.context_examples + "
                f"dream.tau_examples = {need}")
    return None


def dream_tasks(params: Params, root: Path, stream: pd.DataFrame, period: int) -> list[DreamTask]:
    """The (C, tau) tasks of one sleep, drawn (seeded) from the period's wake data or from passages."""
    cfg = params.dream
    if cfg.task_source == "squad":
        rng = random.Random(params.seed * 7_907 + period)
        passages = load_passages(root / cfg.passages)
        picks = rng.sample(range(len(passages)), min(cfg.passages_per_sleep, len(passages)))
        return [task_from_passage(passages[i], f"passage{i}", cfg) for i in picks]
    _, picks = _stream_picks(params, stream, period)
    return [task_from_examples(pick[: cfg.context_examples], pick[cfg.context_examples :], params.wake.template,
                               f"task{period}-{j}", cfg) for j, pick in enumerate(picks)]


def check_examples(params: Params, stream: pd.DataFrame, period: int) -> list[tuple[str, str]]:
    """The promotion check's set on the stream: the period's train examples that no dream saw in its context C."""
    pairs, picks = _stream_picks(params, stream, period)
    seen = {p for pick in picks for p in pick[: params.dream.context_examples]}
    return [p for p in pairs if p not in seen]


def check_score(params: Params, model, tokenizer, cms, tasks: list[DreamTask], examples: list[tuple[str, str]],
                candidates: list[str], trunk: TrunkCache | None = None) -> HeldOutScore:
    """The promotion check of one state: the stream's unseen examples among ``candidates``, or the passages' questions."""
    if params.dream.task_source == "squad":
        return answer_check(model, tokenizer, tasks, params.dream.max_length)
    return held_out_check(model, tokenizer, cms, params.wake.template, examples, candidates,
                          params.wake.eval_batch_size, params.wake.max_length, trunk=trunk)


def merged_periods_check(params: Params, root: Path, src: Path, loaded, cms, meta: dict, period: int,
                         merged_periods: list[int | None], candidates: list[str]) -> dict:
    """``dream.check_merged_periods``: what the stage's merge of a full slow level did to the earlier periods it
    touched, on their rehearsal dreams (the consolidation's ``dreamed_inputs``, labelled; no raw past data) among
    ``candidates``: scored in the state the stage ends with (``loaded``, ``cms``) and in the consolidated one at
    ``src`` (opened again). Returns the report; ``kept`` is False only if those inputs lost log-probability or
    accuracy (:func:`model.sleep.held_out.nothing_lost`)."""
    periods = sorted({q for q in merged_periods if q is not None and q != period})
    examples = [(str(d["text"]), str(d["label"])) for d in meta.get("dreamed_inputs", []) if int(d["task"]) in periods]
    report: dict = {"periods": periods, "examples": len(examples), "checked": bool(examples), "kept": True}
    if not examples:  # the merge joined this period's experts only, or no rehearsal dream of theirs exists
        return report
    after = check_score(params, loaded.model, loaded.tokenizer, cms, [], examples, candidates)
    old, old_cms, _ = open_memory_model(params, root, src)
    before = check_score(params, old.model, old.tokenizer, old_cms, [], examples, candidates)
    return report | {"before": asdict(before), "after": asdict(after), "kept": nothing_lost(before, after)}


def _period_inputs(params: Params, stream: pd.DataFrame, meta: dict, period: int) -> tuple[list[str], list[tuple[str, str]]]:
    """The period's wake prompts (at most ``consolidation.prompt_buffer_size``, seeded) and the old-task dreams the
    consolidation kept (the state's ``dreamed_inputs``, as (prompt, completion)): no earlier period's examples."""
    pairs, _ = _stream_picks(params, stream, period)
    rng = random.Random(params.seed * 4_999 + period)
    prompts = [split_template(params.wake.template, t, lab)[0]
               for t, lab in rng.sample(pairs, min(params.consolidation.prompt_buffer_size, len(pairs)))]
    rehearsal = [split_template(params.wake.template, d["text"], d["label"])
                 for d in meta.get("dreamed_inputs", []) if int(d["task"]) < period]
    return prompts, rehearsal


def fold_stage(params: Params, loaded, cms, optimizer, stream: pd.DataFrame, meta: dict, period: int,
               dreams: list[tuple[str, str]]) -> dict | None:
    """``dream.fold_into_slow``: fold the dream-trained fast level into the slow expert this sleep filled.

    D is the period's wake prompts (at most ``consolidation.prompt_buffer_size``, seeded), the
    rehearsal the old-task dreams the consolidation kept (the state's ``dreamed_inputs``); no
    earlier period's examples are read. ``dreams``: the promoted (train prompt, dream) pairs the fold also
    distils (``dream.fold_dream_weight`` > 0; else none). Returns the fold's report, or None when nothing was folded.
    """
    cfg = params.consolidation
    prompts, rehearsal = _period_inputs(params, stream, meta, period)
    judge = SemanticJudge.load(cfg.semantic_threshold) if cfg.alpha < 1 and cfg.gamma > 0 else None
    res = fold_dreams(loaded.model, loaded.tokenizer, cms, period, prompts, cfg, params.wake.max_length, judge,
                      seed=params.seed * 1_019 + period * 41, sampling=params.sampling, rehearsal=rehearsal,
                      dreams=dreams, dream_weight=params.dream.fold_dream_weight)
    if res is None:
        return None
    optimizer.drop_state(cms.level_parameters(0))
    optimizer.drop_state(cms.level_parameters(1, [res.slot]))
    return {"slot": res.slot, "prompts": len(prompts), "rehearsal": len(rehearsal),
            "dreams": len(dreams),
            "distillation": [round(r.distillation, 5) for r in res.steps]}


def keep_in_slow_stage(params: Params, loaded, cms, optimizer, stream: pd.DataFrame, meta: dict, period: int) -> dict | None:
    """``dream.keep_dreams_in: slow``: the dream-trained fast expert becomes a read-only slow expert of the period
    (:func:`model.sleep.dreaming.keep_dreams_in_slow`); a full slow level merges first, on the fold's inputs (the
    period's wake prompts and the consolidation's rehearsal dreams: no earlier period's examples). Returns the
    move's report, or None when nothing moved."""
    cfg = params.consolidation
    prompts, rehearsal = _period_inputs(params, stream, meta, period)
    res = keep_dreams_in_slow(loaded.model, loaded.tokenizer, cms, period, [*prompts, *(p for p, _ in rehearsal)],
                              params.wake.max_length, cfg.merge_steps, cfg.lr, seed=params.seed * 1_021 + period * 43,
                              merge_when_full=cfg.merge_when_full, merge_policy=cfg.merge_pair,
                              merge_in_view=cfg.merge_in_view, when_full=params.dream.keep_dreams_when_full,
                              merge_start=cfg.merge_start)
    if res is None:
        return None
    optimizer.drop_state(cms.level_parameters(0, [res.src]))
    optimizer.drop_state(cms.level_parameters(1, [res.slot] + ([res.merged.into, res.merged.freed] if res.merged else [])))
    return {"src": res.src, "slot": res.slot, "exact": res.exact,  # the records as a consolidation's merge reports
            "merged": asdict(res.merged) if res.merged else None,
            "absorbed": asdict(res.absorbed) if res.absorbed else None}


def _dream_inputs(params: Params, root: Path, period: int) -> list[Path]:
    passages = [root / params.dream.passages] if params.dream.task_source == "squad" else []
    data = root / params.data.out_dir
    return [consolidated_state_dir(params, root, period), task_file(data, period), data / PLAN_FILE, *passages]


@task(**cache_options(_dream_inputs))
def dream_and_promote(params: Params, root: Path, stream: pd.DataFrame, plan: dict[int, list[str]], period: int) -> dict:
    """Dream about the period's tasks, gate the dream table, train promoted dreams (``dream.train_into``).

    Reads the consolidated state, writes the sleep state, the dream table (all dreams,
    with scores, reward and gate result), the promoted dreams, and the gate report.
    Every dream rejected is a normal outcome: the sleep completes and says so. A failure
    once the gate has started removes whatever of these the task had written. With
    ``dream.promotion_check`` the stage's training is kept only if it helped the check set
    (:func:`model.sleep.held_out.training_helped`); otherwise the sleep state is the consolidated
    one, and the report says so. ``plan`` gives the label names seen so far (the candidates).
    """
    log = get_run_logger()
    cfg = params.dream
    src = consolidated_state_dir(params, root, period)
    out = sleep_state_dir(params, root, period)
    skipped = dream_skip(params, stream, plan, period) if cfg.enabled else None
    if not cfg.enabled or skipped:  # the sleep's state is the consolidated one
        with writing_outputs(out), atomic_dir(out) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
        if skipped:
            log.warning(f"dream {period}: not dreaming: {skipped}")
            return stamp_output({"period": period, "enabled": True, "skipped": skipped, TIMING: {}}, out)
        return stamp_output({"period": period, "enabled": False, TIMING: {}}, out)
    configure_torch(params.wake.threads, params.wake.deterministic)
    meta = read_manifest(src)["metadata"]
    loaded, cms, optimizer = open_memory_model(params, root, src, with_optimizer=True)
    tasks = dream_tasks(params, root, stream, period)
    start = time.perf_counter()
    check = None
    if cfg.promotion_check:
        candidates = [lab for t in sorted(plan) if t <= period for lab in plan[t]]
        examples = check_examples(params, stream, period) if cfg.task_source == "stream" else []
        trunk = TrunkCache(cms.layer_ids[0])  # the layers below the memory: the same before and after
        before = check_score(params, loaded.model, loaded.tokenizer, cms, tasks, examples, candidates, trunk)
    rows = []
    with trial_step(params, root) as trials:
        for j, t in enumerate(tasks):
            rows += dream_about(
                loaded.model, loaded.tokenizer, cms, t, cfg, period, seed=params.seed * 1_013 + period * 37 + j,
                run_trials_fn=trials, sampling=params.sampling,
            )
    report_dir = root / cfg.reports_dir / f"period-{period}"
    tables = {name: root / cfg.dreams_dir / f"period-{period}-{name}.parquet" for name in ("dreams", "promoted")}
    with writing_outputs(report_dir, *tables.values(), out):
        gated = gate_dream_table(pd.DataFrame([asdict(r) for r in rows]), cfg.gate, report_dir)
        promoted = gated[gated["promoted"]]
        tasks_by_id = {t.context_id: t for t in tasks}
        losses = promote(
            loaded.model, loaded.tokenizer, cms, tasks_by_id,
            list(zip(promoted["context_id"], promoted["text"])), cfg, period,
        )
        kept, fold = True, None
        policy = dream_policy(cms, cfg)  # with a dream policy, ReST-EM trained the policy, not the memory
        rest_trained = policy is None and cfg.rest_steps > 0 and bool((gated["reward"] == 1.0).any())
        trained = rest_trained or (cfg.promote_steps > 0 and len(promoted) > 0)
        if cfg.fold_into_slow and trained and cfg.task_source == "stream":
            dreamt = ([(train_prompt(tasks_by_id[c], cfg), t) for c, t in zip(promoted["context_id"], promoted["text"])]
                      if cfg.fold_dream_weight > 0 else [])
            fold = fold_stage(params, loaded, cms, optimizer, stream, meta, period, dreamt)
            if fold is not None:
                log.info(f"dream {period}: folded the dream-trained fast level into slow slot {fold['slot']} "
                         f"({fold['prompts']} prompts, {fold['rehearsal']} rehearsal dreams, {fold['dreams']} dreams' own text)")
        moved = None
        # dream.keep_dreams applies to stream dreams trained into the fast level and not folded
        keeps = cfg.keep_dreams and trained and cfg.task_source == "stream" and cfg.train_into == "fast" and fold is None
        if keeps and cfg.keep_dreams_in == "slow":  # before the check: it scores the state kept
            moved = keep_in_slow_stage(params, loaded, cms, optimizer, stream, meta, period)
            log.info(f"dream {period}: " + (f"the dream-trained fast expert {moved['src']} absorbed into period "
                                            f"{period}'s slow expert {moved['slot']}: the full slow level's merge would "
                                            "have joined two periods" if moved and moved["absorbed"] else
                                            f"the dream-trained fast expert {moved['src']} moved to slow slot "
                                            f"{moved['slot']}, read-only, with period {period}" if moved else
                                            "the dream-trained fast expert stays in the fast level: the dreams trained "
                                            "a wake expert, or the slow level is full and may not merge"))
        if cfg.promotion_check:
            after = (check_score(params, loaded.model, loaded.tokenizer, cms, tasks, examples, candidates, trunk)
                     if trained else before)
            kept = trained and training_helped(before, after)
            merged = (merged_periods_check(params, root, src, loaded, cms, meta, period, moved["merged"]["periods"],
                                           candidates)
                      if kept and cfg.check_merged_periods and moved and moved["merged"] else None)
            if merged is not None and not merged["kept"]:
                kept = False
                log.info(f"dream {period}: the stage's merge cost periods {merged['periods']}' rehearsal dreams "
                         f"{merged['before']} -> {merged['after']}; the dream training is not kept")
            check = {"trained": trained, "before": asdict(before), "after": asdict(after), "kept": kept,
                     "merged_periods": merged}
            if not kept:  # no dream trained, or the training did not help: the sleep's state is the consolidated one
                if trained:
                    log.info(f"dream {period}: check set {before} -> {after}; the dream training is not kept")
                loaded, cms, optimizer = open_memory_model(params, root, src, with_optimizer=True)
                if policy is not None:  # what ReST-EM taught the generator stands on its own trials' rewards
                    cms.dream_policy.load_from(policy)
        kept_slots = [moved["slot"]] if moved and kept and not moved["absorbed"] else []
        if keeps and kept and cfg.keep_dreams_in == "fast":
            kept_slots = keep_dreams(cms, period, params.cms.levels[0].top_k)
            log.info(f"dream {period}: " + (f"the dream-trained fast expert(s) {kept_slots} stay, read-only, with period {period}"
                                            if kept_slots else "the dream-trained fast expert is not kept apart: the "
                                            "fast level has no room (free slot, top_k) or the dreams trained a wake expert"))
        seconds = time.perf_counter() - start
        for name, frame in (("dreams", gated), ("promoted", promoted)):
            with atomic_path(tables[name]) as tmp:
                frame.to_parquet(tmp, index=False)
        save_state(cms, out, optimizer, metadata={**meta, "dream": {"period": period, "promoted": int(len(promoted)), "kept": kept,
                                                                  "folded": fold is not None and kept,
                                                                  "kept_apart": kept_slots,
                                                                  "absorbed_into": moved["slot"] if moved and kept
                                                                  and moved["absorbed"] else None,
                                                                  "kept_in": cfg.keep_dreams_in if kept_slots else None}})
    funnel = {
        "generated": int(len(gated)),
        "selected": int(gated["selected"].sum()),
        "rewarded": int((gated["reward"] == 1.0).sum()),
        "passed_gate": int(gated["gate_passed"].sum()),
        "promoted": int(len(promoted)),
        "rejected": int((~gated["promoted"]).sum()),
        "kept": bool(kept),
        "kept_apart": len(kept_slots),
    }
    if funnel["promoted"] == 0:
        log.info(f"dream {period}: nothing promoted ({funnel}); the sleep goes on without dream training")
    else:
        trained = f"; promotion loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "; promote_steps is 0: not trained"
        log.info(f"dream {period}: {funnel} in {seconds:.0f} s{trained}")
    return stamp_output({"period": period, "enabled": True, "funnel": funnel, "promotion_losses": losses, "check": check,
                         "fold": fold, "kept_in_slow": moved if kept else None,
                         "gate_report": str((report_dir / "gate.md").relative_to(root)),
                         TIMING: {"seconds": round(seconds, 2)}}, out)


@dream_and_promote.on_rollback
def _undo_dreaming(transaction) -> None:
    """A later task of the same sleep failed: remove this dream stage's files (the consolidated state stays)."""
    remove_outputs(transaction)
