"""flows/knowledge_shards.py: a knowledge comparison's passages as plain processes, without Prefect, that
`lm-sleep compare` then assembles without learning anything again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.flows.test_compare import _with_policy_training

SCRIPT = Path(__file__).resolve().parents[2] / "flows" / "knowledge_shards.py"
METHODS = ["base", "passage_finetune", "passage_sleep_trained"]


def _shards(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "kn", "--root", str(tmp_path), "--quick", "--procs", "3",
                           "--methods", *METHODS, *extra], capture_output=True, text=True, timeout=600)


def test_shards_without_prefect_are_what_compare_assembles(tmp_path, prefect_harness, monkeypatch):
    import model.evaluation.incorporation_runs as incorporation_runs
    import tasks.knowledge as knowledge
    from flows.compare import compare

    params_path = _with_policy_training(tmp_path)
    out = _shards(tmp_path)
    assert out.returncode == 0, out.stderr
    cdir = tmp_path / "state/compare/kn-quick"
    logs = sorted(p.name for p in (cdir / "shard-logs").iterdir())
    assert "warm.log" in logs and "policy-0.log" in logs
    for log in (cdir / "shard-logs").iterdir():  # the jobs ran on the stand-in, never on Prefect itself
        assert "prefect" not in log.read_text().lower().replace("no_prefect", ""), log.name
    trained_dir = cdir / "passage_sleep_trained/seed-0"
    shards = sorted(trained_dir.glob("progress.shard-*.jsonl"))
    assert len(shards) >= 2 and not (trained_dir / "result.json").exists()
    assert sorted(json.loads(l)["index"] for f in shards for l in f.read_text().splitlines()) == [0, 1]
    assert (cdir / "policy/seed-0/result.json").is_file()

    calls: list[str] = []
    real_learn, real_train = incorporation_runs.learn, knowledge.train_policy
    monkeypatch.setattr(incorporation_runs, "learn", lambda *a, **k: calls.append(a[0]) or real_learn(*a, **k))
    monkeypatch.setattr(knowledge, "train_policy", lambda *a, **k: calls.append("policy") or real_train(*a, **k))
    compare("kn", str(params_path), quick=True, methods=METHODS)
    assert calls == []  # every passage and the policy came from the shards
    result = json.loads((trained_dir / "result.json").read_text())
    assert [row["index"] for row in result["passages"]] == [0, 1]
    trained = json.loads((cdir / "policy/seed-0/result.json").read_text())
    assert json.loads((cdir / "policy/seed-0/policy.json").read_text())["policy_sha256"] == trained["policy_sha256"]
    assert (tmp_path / "reports/kn-quick/README.md").is_file()


def test_the_deadline_stops_the_jobs_and_says_the_passages_are_not_all_done(tmp_path):
    _with_policy_training(tmp_path)
    out = _shards(tmp_path, "--deadline", "0.5")
    assert out.returncode == 1
    assert "deadline; stopping" in out.stderr
    assert not list((tmp_path / "state/compare/kn-quick").glob("*/seed-0/progress*.jsonl"))


def test_a_comparison_that_is_not_knowledge_is_refused(tmp_path):
    import yaml

    params_path = _with_policy_training(tmp_path)
    raw = yaml.safe_load(params_path.read_text())
    raw["evaluation"]["comparisons"]["kn"]["knowledge"]["mode"] = "continued"
    params_path.write_text(yaml.safe_dump(raw))
    out = subprocess.run([sys.executable, str(SCRIPT), "kn", "--root", str(tmp_path)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and "mode single" in out.stderr
