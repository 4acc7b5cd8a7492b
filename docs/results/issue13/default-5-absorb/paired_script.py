"""default-5 sleep with keep_dreams_when_full absorb (machine 8188c1b43e05) against EWC and the previous sleep (same_period, merge) on this machine."""
import json, sys
from pathlib import Path
sys.path.insert(0, "/work/main")
from model.evaluation.continual import accuracy_matrix, final_average_accuracy, forgetting, paired_difference_ci, mean_ci
prev = Path("/work/main/docs/results/issue13/default-5-8188c1b43e05")
before = Path("/work/main/docs/results/issue13/default-5-same-period")
def fa(path):
    r = json.loads(Path(path).read_text()); R = accuracy_matrix(r["accuracy"], len(r["accuracy"]))
    return final_average_accuracy(R), forgetting(R), r["machine"]["id"]
new = {}
for root in ("/tmp/e6a", "/tmp/e6b"):
    for f in sorted(Path(root, "state/compare/default-5/sleep").glob("seed-*/result.json")):
        new[int(f.parent.name.split("-")[1])] = fa(f)
seeds = sorted(new)
ewc = {s: fa(prev / "ewc" / f"seed-{s}" / "result.json") for s in seeds}
old = {s: fa(before / "sleep" / f"seed-{s}" / "result.json") for s in seeds}
old_rows = {r["method"]: {} for r in json.load(open("/work/main/docs/results/issue13/default-5-policy/results.json"))["runs"]}
for r in json.load(open("/work/main/docs/results/issue13/default-5-policy/results.json"))["runs"]:
    R = accuracy_matrix(r["accuracy"], len(r["accuracy"])); old_rows[r["method"]][r["seed"]] = (final_average_accuracy(R), forgetting(R))
lines = [f"seeds {seeds}; machines: new sleep {sorted({v[2] for v in new.values()})}, ewc {sorted({v[2] for v in ewc.values()})}, previous sleep {sorted({v[2] for v in old.values()})}"]
for name, d in (("sleep (absorb)", new), ("sleep before (merge)", old), ("ewc", ewc)):
    lines.append(f"{name:22s} " + "  ".join(f"{s}: {d[s][0]:.3f}/{d[s][1]:.3f}" for s in seeds))
if len(seeds) >= 2:
    for i, what in ((0, "final"), (1, "forgetting")):
        m, lo, hi = mean_ci([new[s][i] for s in seeds]); lines.append(f"sleep (absorb) {what}: {m:.3f} [{lo:.3f}, {hi:.3f}]")
    for other, d in (("ewc (same machine)", ewc), ("sleep before (same machine)", old)):
        for i, what in ((0, "final"), (1, "forgetting")):
            m, lo, hi = paired_difference_ci([new[s][i] for s in seeds], [d[s][i] for s in seeds])
            lines.append(f"sleep - {other} {what}: {m:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    for b in ("joint", "finetune", "cms", "replay"):
        if all(s in old_rows.get(b, {}) for s in seeds):
            m, lo, hi = paired_difference_ci([new[s][0] for s in seeds], [old_rows[b][s][0] for s in seeds])
            lines.append(f"sleep - {b} (old runs, other machines) final: {m:+.3f} [{lo:+.3f}, {hi:+.3f}]")
print("\n".join(lines))
Path(sys.argv[1]).write_text("\n".join(lines) + "\n") if len(sys.argv) > 1 else None
