"""The reporting library stands on its own: no Prefect, tasks or flows; its public names load lazily."""

from __future__ import annotations

import subprocess
import sys

import reporting

MODULES = ("reporting.common", "reporting.figures", "reporting.lifecycle", "reporting.comparison",
           "reporting.knowledge", "reporting.long_context")


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_no_prefect_tasks_or_flows():
    loaded = _run(f"import sys\nfor m in {MODULES!r}: __import__(m)\n"
                  "print(sorted({m.split('.')[0] for m in sys.modules}))")
    assert not {"'prefect'", "'tasks'", "'flows'"} & set(loaded.strip("[]\n").split(", "))


def test_escaping_needs_no_matplotlib():
    assert _run("import sys\nfrom reporting import escape_md\nprint(escape_md('a|<b>'), 'matplotlib' in sys.modules)"
                ).split() == ["a\\|&lt;b&gt;", "False"]


def test_every_public_name_resolves():
    assert all(getattr(reporting, name) is not None for name in reporting.__all__)
    assert set(reporting.__all__) <= set(dir(reporting))
