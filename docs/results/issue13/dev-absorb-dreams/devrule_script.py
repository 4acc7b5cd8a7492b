import json, sys
from pathlib import Path
sys.path.insert(0, "/work/main")
from model.evaluation.continual import accuracy_matrix, final_average_accuracy, forgetting
runs = {"sleep": {2: "/tmp/ref", 3: "/tmp/ref3wt", 4: "/tmp/ref"}, "absorb_dreams": {2: "/tmp/cand", 3: "/tmp/cand", 4: "/tmp/cand4"}}
out = {}
for m, seeds in runs.items():
    for s, root in seeds.items():
        f = Path(root) / "state/compare/ablations-5-dev" / m / f"seed-{s}" / "result.json"
        r = json.loads(f.read_text()); R = accuracy_matrix(r["accuracy"], len(r["accuracy"]))
        out.setdefault(m, {})[s] = {"final": final_average_accuracy(R), "forgetting": forgetting(R), "machine": r["machine"]["id"]}
for m, v in out.items():
    fin = [v[s]["final"] for s in sorted(v)]; fg = [v[s]["forgetting"] for s in sorted(v)]
    print(f"{m:14s}", {s: f"{x['final']:.3f}/{x['forgetting']:.3f}" for s, x in sorted(v.items())}, f"mean final {sum(fin)/len(fin):.3f} forgetting {sum(fg)/len(fg):.3f}", {x['machine'] for x in v.values()})
json.dump(out, open(sys.argv[1], "w"), indent=1) if len(sys.argv) > 1 else None
