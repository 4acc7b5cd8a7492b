"""Per run: kept dream experts (period -> slot), merges (period: into<-freed), accuracy after each sleep."""
import json, sys
from pathlib import Path
for run in sys.argv[1:]:
    run = Path(run)
    if not (run / "result.json").exists():
        print(run, "(not finished)"); continue
    r = json.loads((run / "result.json").read_text())
    kept, merges = [], []
    for f in sorted((run / "metrics/dreaming").glob("period-*.json")):
        d = json.loads(f.read_text()); p = int(f.stem.split("-")[1])
        if d.get("kept_in_slow"): kept.append(f"{p}->s{d['kept_in_slow']['slot']}" + ("+merge" if d['kept_in_slow'].get('merged') else "") + ("+absorb" if d['kept_in_slow'].get('absorbed') else ""))
    for f in sorted((run / "metrics/consolidation").glob("period-*.json")):
        d = json.loads(f.read_text()); p = int(f.stem.split("-")[1])
        for c in d["consolidations"]:
            if c.get("merged"): merges.append(f"c{p}:{c['merged']['into']}<-{c['merged']['freed']}" + (f" err {c['merged'].get('relative_error')}" if c['merged'].get('relative_error') else ""))
    acc = r["accuracy"][-1]; final = sum(acc.values()) / len(acc)
    print(f"{run.parent.name}/{run.name}: final {final:.3f} last row {[round(v,2) for v in acc.values()]} kept {kept} merges {merges}")
