"""The sleep method of a knowledge comparison with the real dream gate (Great Expectations)."""

from __future__ import annotations

import pytest

from model.config import DreamConfig
from model.evaluation.incorporation import Reader
from model.evaluation.incorporation_runs import run_single
from model.evaluation.knowledge import QA, Passage
import model.sleep.dreaming as dreaming
from tasks.knowledge import gate_function
from tests.model.helpers import tiny_with_cms

PASSAGE = Passage("Balance", "The balance of the savings account is shown in the app. Money moves to savings every week.",
                  [QA("Where is the balance shown?", "in the app"), QA("When does money move?", "every week")])
#: What a good dreamer would write about the passage, a near-copy of one of them, and noise.
DREAMS = [
    "Where is the balance shown? in the app. When does money move? every week.",
    "The balance is shown in the app, and money moves to savings every week.",
    "Where is the balance shown? in the app. When does money move? every week!",
    "zq xv kk pp rr",
]


def _cfg() -> DreamConfig:
    return DreamConfig(dreams_per_context=len(DREAMS), max_new_tokens=24, min_new_tokens=1, top_k=3, random_extra=1,
                       trial_steps=2, trial_lr=1e-2, lora_r=4, lora_alpha=8.0, rounds=1, rest_steps=1, promote_steps=8,
                       lr=1e-2, max_length=96, chat=False, gate={"min_tokens": 1})


@pytest.mark.parametrize("seed", [0, 1])
def test_sleep_gates_out_near_duplicates_promotes_rewarded_dreams_and_raises_tau(monkeypatch, seed):
    monkeypatch.setattr(dreaming, "generate_dreams",
                        lambda model, tokenizer, cms, task, cfg, seed, sampling=None: (dreaming.dream_prompt(tokenizer, task, cfg), list(DREAMS)))
    cfg = _cfg()
    gate = gate_function(cfg.gate)
    lm, cms = tiny_with_cms(seed)
    base = run_single("base", Reader(lm.model, lm.tokenizer, cms, cfg, seed), [(0, PASSAGE)])[0]
    lm, cms = tiny_with_cms(seed)
    learned = []
    slept = run_single("sleep", Reader(lm.model, lm.tokenizer, cms, cfg, seed, gate), [(0, PASSAGE)],
                       on_passage=lambda row, got: learned.append(got))[0]
    table = learned[0].dreams
    assert list(table["failed_checks"]) == ["", "", "not_near_duplicate", ""]  # the near-copy of dream 0 is rejected
    assert list(table["promoted"]) == list(table["gate_passed"] & (table["reward"] == 1.0))
    f = slept["funnel"]
    assert f["generated"] == 4 and f["passed_gate"] == 3 and f["promoted"] == int(table["promoted"].sum()) >= 1
    assert slept["tau"] > base["tau"]


def _run(method: str, seed: int, taus: list[float], tokens: list[int] | None = None) -> dict:
    rows = [{"index": i, "tau": t, "em": 0.0, "f1": 0.0, "dream_tokens": (tokens or [0] * len(taus))[i]}
            for i, t in enumerate(taus)]
    return {"method": method, "seed": seed, "passages": rows}


def test_issue_14_checks_pair_by_passage_and_divide_by_dream_tokens():
    from reporting.knowledge import early_checks, paired_checks

    ft = [-5.0, -4.0, -6.0, -5.5]
    results = [_run("passage_finetune", 0, ft),
               _run("passage_sleep", 0, [t + 0.2 for t in ft], [100, 200, 0, 50]),
               _run("passage_dreams", 0, [t + 0.1 for t in ft], [400, 400, 400, 400]),
               _run("passage_sleep_trained", 0, [t + d for t, d in zip(ft, (0.3, 0.5, 0.4, 0.6))])]
    checks = paired_checks(results, [0])
    c = checks["tau"]["trained-policy sleep - passage fine-tuning"]
    assert c["n"] == 4 and c["mean"] == pytest.approx(0.45) and 0 < c["low"] < 0.45 < c["high"]
    assert checks["tau"]["trained-policy sleep - untrained-policy sleep"]["mean"] == pytest.approx(0.25)
    pt = checks["per_token"]
    assert pt["n"] == 3  # passage 2 trained no promoted dream: nothing to divide by
    # promoted: 0.2 per 100, 200 and 50 tokens; all dreams: 0.1 per 400 tokens (per 1000 tokens)
    assert pt["promoted"]["mean"] == pytest.approx(1000 * (0.2 / 100 + 0.2 / 200 + 0.2 / 50) / 3)
    assert pt["all"]["mean"] == pytest.approx(0.25) and pt["difference"]["mean"] > 0

    cpt = [_run("passage_finetune", s, [-5.0 - k for k in range(12)]) for s in (0, 1)]
    cpt += [_run("passage_sleep", s, [-5.0 - k + (0.1 if k < 10 else -3.0) for k in range(12)]) for s in (0, 1)]
    early = early_checks(cpt, [0, 1], early=10)
    c = early["untrained-policy sleep - passage fine-tuning, first passages"]
    assert c["n"] == 10 and c["mean"] == pytest.approx(0.1)  # the last two passages are not the early ones


def test_continued_slices_average_the_first_and_last_passages_and_weight_routing_by_questions():
    from reporting.knowledge import slices, slices_markdown

    runs = [_run("passage_finetune", s, [-5.0 - k for k in range(12)]) for s in (0, 1)]
    sleep = [_run("passage_sleep", s, [-4.0 - s for _ in range(12)]) for s in (0, 1)]
    for r in sleep:  # passage 0 has 3 questions, routed 1/3 right; every other passage 1 question, routed right
        for row in r["passages"]:
            row["n_questions"], row["routed_own"] = (3, 1 / 3) if row["index"] == 0 else (1, 1.0)
    t = slices(runs + sleep, ["passage_finetune", "passage_sleep", "absent"], [0, 1], early=10)
    assert set(t) == {"passage_finetune", "passage_sleep"}
    assert t["passage_finetune"]["first"] == pytest.approx(-9.5) and t["passage_finetune"]["last"] == pytest.approx(-11.5)
    assert t["passage_finetune"]["all"] == pytest.approx(-10.5) and t["passage_finetune"]["routed_own"] is None
    assert t["passage_sleep"]["first"] == pytest.approx(-4.5)  # each passage averaged over the two seeds
    assert t["passage_sleep"]["routed_own"] == pytest.approx((2 * 1 + 2 * 11) / (2 * 3 + 2 * 11))
    md = "\n".join(slices_markdown(runs + sleep, ["passage_finetune", "passage_sleep"], [0, 1], early=10))
    assert "| passage_finetune | -9.500 | -11.500 | -10.500 | -- |" in md and "| passage_sleep | -4.500 |" in md
