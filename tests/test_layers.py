"""The layers of the code, read from the source (docs/design.md "Where the code is"):

- ``model/`` is pure ML: no Prefect, boto3, DVC or Great Expectations, and nothing from the layers above it;
- ``store/``, ``reporting/`` and ``checks/`` are libraries: no Prefect, tasks or flows;
- ``flows/`` composes tasks: from ``model/`` it takes config types and errors only;
- ``bench/`` measures ``model/`` and the libraries, never tasks (the soak drives whole flows, as a user runs them);
- no two modules import each other, directly or through others, at import time.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = ("model", "store", "reporting", "checks", "tasks", "flows")
ORCHESTRATION = ("prefect", "boto3", "botocore", "dvc", "great_expectations")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> Iterator[tuple[str, list[str], int]]:
    """(module, imported names, line) of every import in ``path``; with ``top_level_only`` only those that run when
    the module is imported (not inside a function, so lazy imports do not count as edges)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # also imports under module-level if/try (TYPE_CHECKING blocks are not run)
        nodes = [n for stmt in tree.body for n in ast.walk(stmt)
                 if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                 and not (isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test))]
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names], node.lineno


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _violations(package: str, allowed) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line}: {module} {names or ''}".strip()
            for path in _files(package) for module, names, line in _imports(path, top_level_only=False)
            if not allowed(module, names)]


def _root(module: str) -> str:
    return module.split(".")[0]


def test_model_is_pure_ml():
    bad = _violations("model", lambda m, _: _root(m) not in ORCHESTRATION + FIRST_PARTY[1:])
    assert not bad, "model/ imports orchestration or a layer above it:\n" + "\n".join(bad)


@pytest.mark.parametrize("library", ["store", "reporting", "checks"])
def test_libraries_need_no_prefect_tasks_or_flows(library):
    bad = _violations(library, lambda m, _: _root(m) not in ("prefect", "tasks", "flows"))
    assert not bad, f"{library}/ imports Prefect, tasks or flows:\n" + "\n".join(bad)


def _config_or_error(module: str, names: list[str]) -> bool:
    if _root(module) != "model":
        return True
    return module in ("model.config", "model.errors") or (bool(names) and all(n.endswith("Error") for n in names))


def test_flows_take_only_config_and_errors_from_model():
    bad = _violations("flows", _config_or_error)
    assert not bad, "flows/ calls model/ directly (put the glue in tasks/):\n" + "\n".join(bad)


def test_bench_needs_no_tasks():
    bad = _violations("bench", lambda m, _: _root(m) != "tasks")
    assert not bad, "bench/ imports tasks:\n" + "\n".join(bad)


def test_no_import_cycles():
    modules = {_module_name(p): p for pkg in FIRST_PARTY for p in _files(pkg)}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for module, names, _ in _imports(path, top_level_only=True):
            if _root(module) not in FIRST_PARTY:
                continue
            # `from pkg import sub` imports the submodule pkg.sub where there is one
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules] or [module]
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    cycles, state = [], dict.fromkeys(graph, 0)  # 0 unseen, 1 on the path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state[nxt] == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif state[nxt] == 0:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if state[node] == 0:
            visit(node, [node])
    # a package's __init__ re-exporting its submodules is not a cycle with them (Python resolves it in order)
    real = [c for c in cycles if not any(b.startswith(a + ".") or a.startswith(b + ".") for a, b in zip(c, c[1:]))]
    assert not real, "import cycles:\n" + "\n".join(" -> ".join(c) for c in real)
