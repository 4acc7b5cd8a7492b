"""One-off check behind docs/benchmarks.md (issue #18): on-policy consolidation steps with and without the
PromptTrunk, interleaved in one process on deep copies of one woken model (bench/consolidation_sides.py's setup).
Run from anywhere: python docs/results/issue18/prompt-trunk/interleaved_ab.py"""
import sys, time, copy, statistics, torch
ROOT = __import__("pathlib").Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "bench"))
torch.set_num_threads(2)
import consolidation_sides as S
import model.sleep.consolidation as C
params = S.bench_params("embedded")
prompts = S.bench_prompts(params, 8)
model0, tok, cms0 = S.load_with_cms(params)
cfg = S.bench_config(params, 1.0, 4)
Trunk = C.PromptTrunk
res = {"trunk": [], "none": []}
for rep in range(5):
    for mode in (["trunk", "none"] if rep % 2 == 0 else ["none", "trunk"]):
        model, cms = copy.deepcopy((model0, cms0))
        C.PromptTrunk = Trunk if mode == "trunk" else (lambda start, **k: None)
        stamps = []
        C.consolidate(model, tok, cms, S.SRC, S.DST, prompts, cfg, params.wake.max_length, judge=None, seed=params.seed,
                      origin="bench", on_step=lambda r: stamps.append(time.perf_counter()))
        d = [b - a for a, b in zip(stamps, stamps[1:])]
        res[mode] += d
        print(rep, mode, [round(x, 2) for x in d], flush=True)
        del model, cms
for k, v in res.items():
    print(k, "median", round(statistics.median(v), 3), "n", len(v))
