"""The sleep's code paths on a GPU give what they give on the CPU (skipped without CUDA).

Same tiny model and memory levels on both devices: wake steps, label scoring, greedy
decoding, isolated trials, dream stage, consolidation and a state round trip.
"""

from __future__ import annotations

import copy

import pytest
import torch

from model.decoding.sampling import sample_continuations
from model.memory.checkpoint import load_state, save_state
from model.memory.wake import encode, score_candidates, sft_loss
from model.sleep.consolidation import consolidate
from model.sleep.dreaming import dream_about
from model.sleep.trial_lora import AnswerLoglik
from model.sleep.trials import TrialRecipe, run_trials
from tests.model.helpers import make_nonzero, tiny_with_cms
from tests.model.test_consolidation import PROMPTS
from tests.model.test_consolidation import _cfg as consolidation_cfg
from tests.model.test_dreaming import PASSAGE
from tests.model.test_dreaming import _cfg as dream_cfg
from tests.model.test_trials import ANSWERS, DREAMS, QUESTIONS, SEEDS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TOL = dict(rtol=1e-3, atol=1e-4)  # TF32/cuBLAS vs CPU kernels


@pytest.fixture(autouse=True)
def _exact_fp32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield


def pair():
    """The same tiny model with both levels populated, on CPU and on CUDA."""
    lm, cms = tiny_with_cms()
    make_nonzero(cms, 0)
    make_nonzero(cms, 1)
    gpu_lm, gpu_cms = copy.deepcopy((lm, cms))
    gpu_lm.model.to("cuda")
    return (lm, cms), (gpu_lm, gpu_cms)


def test_wake_loss_scores_and_greedy_decoding_match():
    (lm, _), (glm, _) = pair()
    batch = encode(lm.tokenizer, PROMPTS, ["balance", "restaurant", "alarm", "money"], 32)
    torch.testing.assert_close(sft_loss(glm.model, batch).cpu(), sft_loss(lm.model, batch), **TOL)
    s_cpu = score_candidates(lm.model, lm.tokenizer, PROMPTS, ["balance", "alarm"], 8, 32)
    s_gpu = score_candidates(glm.model, glm.tokenizer, PROMPTS, ["balance", "alarm"], 8, 32)
    torch.testing.assert_close(s_gpu, s_cpu, **TOL)
    g_cpu = sample_continuations(lm.model, lm.tokenizer, PROMPTS, max_new_tokens=8, temperature=0.0)
    g_gpu = sample_continuations(glm.model, glm.tokenizer, PROMPTS, max_new_tokens=8, temperature=0.0)
    assert [s.text for s in g_gpu] == [s.text for s in g_cpu]
    a = sample_continuations(glm.model, glm.tokenizer, PROMPTS, 2, 8, temperature=1.0, seed=5)
    b = sample_continuations(glm.model, glm.tokenizer, PROMPTS, 2, 8, temperature=1.0, seed=5)
    assert [s.text for s in a] == [s.text for s in b]  # seeded on the GPU too


def test_isolated_trials_match():
    (lm, _), (glm, _) = pair()
    kw = dict(steps=3, lr=1e-2, r=4, alpha=8, target_modules=["q_proj", "v_proj"], layers=[1, 3], max_length=96)
    out = []
    for m in (lm, glm):
        measure = AnswerLoglik(m.model, m.tokenizer, QUESTIONS, ANSWERS, max_length=64)
        out.append(run_trials(m.model, m.tokenizer, DREAMS, measure, TrialRecipe(**kw), seeds=SEEDS))
    for c, g in zip(*out):
        assert c.error is None and g.error is None
        torch.testing.assert_close(torch.tensor(g.losses), torch.tensor(c.losses), **TOL)
        torch.testing.assert_close(g.tau_after, c.tau_after, **TOL)


def test_dream_stage_consolidation_and_state_round_trip_run_on_the_gpu(tmp_path):
    _, (glm, gcms) = pair()
    rows = dream_about(glm.model, glm.tokenizer, gcms, PASSAGE, dream_cfg(), period=0, seed=1)
    assert len(rows) == 4 and any(r.selected for r in rows)
    res = consolidate(glm.model, glm.tokenizer, gcms, 0, 1, PROMPTS, consolidation_cfg(steps=4, alpha=0.7),
                      32, None, seed=0, origin="consolidation:gpu")
    assert all(torch.isfinite(torch.tensor(s.loss)) for s in res.steps)
    assert all(p.device.type == "cuda" for p in gcms.level_parameters(1))
    save_state(gcms, tmp_path / "state")
    (lm2, cms2), _ = pair()
    load_state(cms2, tmp_path / "state")  # CUDA-trained state onto a CPU model
    for (n, p), (_, q) in zip(cms2.named_memory_parameters(), gcms.named_memory_parameters()):
        torch.testing.assert_close(p, q.cpu(), rtol=0, atol=0, msg=n)
