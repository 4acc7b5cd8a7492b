"""Cycle summaries and the HTML index pages built from them (the root ``index.html`` and each run's)."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, field_validator

from model.config import run_id_problem
from store.base import ArtifactStore, exists, get_bytes, put_bytes
from store.keys import CYCLE_DIR_RE, run_prefix, validate_run_id


class DreamFunnel(BaseModel):
    """How many dreams got how far in one sleep (tasks/dream.py's ``funnel``)."""

    model_config = ConfigDict(extra="forbid")

    generated: int = Field(ge=0)
    selected: int = Field(ge=0)
    rewarded: int = Field(ge=0)
    passed_gate: int | None = Field(None, ge=0)
    promoted: int = Field(ge=0)
    rejected: int = Field(ge=0)
    kept: bool | None = Field(None, description="dream.promotion_check: whether the stage's training was kept")
    kept_apart: int | None = Field(None, ge=0, description="dream.keep_dreams: experts the kept training wrote "
                                   "that stay read-only with their period (in the fast level, or moved to the slow "
                                   "level: dream.keep_dreams_in)")


class ExpertRecord(BaseModel):
    """Provenance of one expert slot (a flattened entry of a checkpoint manifest's levels)."""

    model_config = ConfigDict(extra="ignore")

    level: str
    slot: int = Field(ge=0)
    active: bool = True
    origin: str | None = None
    unlocked_at_step: int | None = None
    sha256: str | None = None
    history: list[str] = []


class CycleSummary(BaseModel):
    """What one cycle reports to the index; unknown fields are kept and shown as 'other'.

    Fields: ``period`` (wake period of the cycle), ``accuracy`` (task id -> accuracy on its
    test rows after the sleep), ``mean_accuracy_seen``, ``consolidations`` (one dict per
    consolidation, e.g. src, dst, slot, retention_loss, accuracy_ratio), ``dream_funnel``
    (generated/selected/rewarded/passed_gate/promoted/rejected; None when dreaming is off) and
    ``experts`` (:func:`experts_from_manifest` of the cycle's state manifest).
    """

    model_config = ConfigDict(extra="allow")

    period: int = Field(ge=0)
    accuracy: dict[str, float] = {}
    mean_accuracy_seen: float | None = None
    consolidations: list[dict[str, Any]] = []
    dream_funnel: DreamFunnel | None = None
    experts: list[ExpertRecord] = []

    @field_validator("accuracy", mode="before")
    @classmethod
    def _task_ids_as_text(cls, value: Any) -> Any:
        return {str(k): v for k, v in value.items()} if isinstance(value, Mapping) else value


def experts_from_manifest(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every expert that was ever unlocked, from a ``model.memory.checkpoint.read_manifest`` dict."""
    out = []
    for li, level in enumerate(manifest.get("levels", [])):
        for e in level.get("experts", []):
            if e.get("active") or e.get("origin") is not None:
                out.append({"level": str(level.get("name", li)), **{k: e.get(k) for k in
                            ("slot", "active", "origin", "unlocked_at_step", "sha256")},
                            "history": list(e.get("history", []))})
    return out


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:75em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0 1.2em}td,th{border:1px solid #ccc;padding:.25em .6em;"
    "text-align:left;vertical-align:top}th{background:#f3f3f3}code{font-size:.9em}"
    "img{max-width:100%;border:1px solid #ddd;margin:.5em 0}section{border-top:2px solid #888;margin-top:2em}"
)
_FUNNEL = ("generated", "selected", "rewarded", "passed_gate", "promoted", "rejected", "kept", "kept_apart")
_CONSOLIDATION_FIRST = ("src", "dst", "slot", "retention_loss", "retention_accuracy", "accuracy_ratio")


def _e(value: Any) -> str:
    """Escaped text of a value (floats to 4 significant digits, None as '-', containers as JSON)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return html.escape(f"{value:.4g}")
    if isinstance(value, (dict, list)):
        return html.escape(json.dumps(value, sort_keys=True))
    return html.escape(str(value))


def _link(href: str, text: str) -> str:
    return f'<a href="{html.escape(quote(href), quote=True)}">{html.escape(text)}</a>'


def _table(headers: list[str], rows: list[list[str]]) -> str:
    """An HTML table; ``rows`` hold already-escaped cells."""
    if not rows:
        return "<p>none</p>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body>\n{body}\n</body></html>\n"
    )


def _short(sha: str | None) -> str:
    return f'<code title="{html.escape(sha)}">{html.escape(sha[:12])}</code>' if sha else "-"


def _experts_table(experts: list[dict[str, Any]]) -> str:
    rows = [[_e(x.get("level")), _e(x.get("slot")), _e(x.get("active")), _e(x.get("origin")),
             _e(x.get("unlocked_at_step")), _short(x.get("sha256")), _e("; ".join(x.get("history") or []))]
            for x in experts]
    return _table(["level", "slot", "active", "origin", "unlocked at step", "sha256", "history"], rows)


def _cycle_section(c: Mapping[str, Any]) -> str:
    """One cycle of the run index; links are relative to ``runs/<RUN_ID>/``."""
    n = int(c["cycle"])
    base = f"cycle-{n}/"
    known = set(CycleSummary.model_fields) | {"run_id", "cycle", "artifacts"}
    funnel = c.get("dream_funnel")
    consolidations = c.get("consolidations") or []
    seen = {k for x in consolidations for k in x}
    cols = [k for k in _CONSOLIDATION_FIRST if k in seen] + sorted(seen - set(_CONSOLIDATION_FIRST))
    artifacts = sorted(c.get("artifacts") or [], key=lambda a: a["key"])
    plots = [a for a in artifacts if a["key"].lower().endswith(".png")]
    parts = [
        f'<section id="cycle-{n}"><h2>Cycle {n} (period {_e(c.get("period"))})</h2>',
        f'<p>{_link(base + "summary.json", "summary.json")}</p>',
        "<h3>Accuracy on seen tasks</h3>",
        _table(["task", "accuracy"], [[_e(t), _e(a)] for t, a in (c.get("accuracy") or {}).items()]),
        f"<p>mean over seen tasks: {_e(c.get('mean_accuracy_seen'))}</p>",
        "<h3>Consolidations</h3>",
        _table(cols, [[_e(x.get(k)) for k in cols] for x in consolidations]),
        "<h3>Dreams</h3>",
        _table([k.replace("_", " ") for k in _FUNNEL], [[_e(funnel.get(k)) for k in _FUNNEL]])
        if funnel else "<p>no dreaming</p>",
        "<h3>Experts</h3>", _experts_table(c.get("experts") or []),
        "<h3>Plots</h3>",
        "".join(f'<figure><img src="{html.escape(quote(base + a["key"]), quote=True)}" alt="{html.escape(a["key"])}">'
                f'<figcaption>{html.escape(a["key"])}</figcaption></figure>' for a in plots) or "<p>none</p>",
        "<h3>Artifacts</h3>",
        _table(["artifact", "bytes", "sha256"],
               [[_link(base + a["key"], a["key"]), _e(a.get("size")), _short(a.get("sha256"))] for a in artifacts]),
    ]
    other = {k: v for k, v in c.items() if k not in known}
    if other:
        parts += ["<h3>Other</h3>", _table(["field", "value"], [[_e(k), _e(v)] for k, v in other.items()])]
    return "\n".join(parts) + "</section>"


def render_run_index(run_id: str, cycles: list[Mapping[str, Any]]) -> str:
    """The page ``runs/<RUN_ID>/index.html``: an overview table, then every cycle in full.

    ``cycles`` are the cycles' ``summary.json`` documents: a :class:`CycleSummary` plus
    ``run_id``, ``cycle`` and ``artifacts`` ([{key, size, sha256}], keys relative to the cycle).
    All text is HTML-escaped and every link is relative, so the page works from the bucket
    (static website) and from a fetched or local copy alike.
    """
    validate_run_id(run_id)
    cycles = sorted(cycles, key=lambda c: int(c["cycle"]))
    rows = [[
        f'<a href="#cycle-{int(c["cycle"])}">{int(c["cycle"])}</a>', _e(c.get("period")),
        _e(c.get("mean_accuracy_seen")), _e(len(c.get("consolidations") or [])),
        _e((c.get("dream_funnel") or {}).get("promoted")),
        _e(sum(1 for x in c.get("experts") or [] if x.get("active"))),
    ] for c in cycles]
    body = "\n".join([
        f"<p>{_link('../../index.html', 'all runs')}</p>",
        f"<h1>Run {html.escape(run_id)}</h1>",
        _table(["cycle", "period", "mean accuracy (seen)", "consolidations", "dreams promoted", "active experts"],
               rows),
        *(_cycle_section(c) for c in cycles),
    ])
    return _page(f"lm-sleep run {run_id}", body)


def run_record(run_id: str, cycles: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The short ``runs/<RUN_ID>/run.json`` row the root index is built from."""
    cycles = sorted(cycles, key=lambda c: int(c["cycle"]))
    last = cycles[-1] if cycles else {}
    return {
        "run_id": run_id,
        "cycles": [int(c["cycle"]) for c in cycles],
        "last_mean_accuracy_seen": last.get("mean_accuracy_seen"),
        "dreams_promoted": sum((c.get("dream_funnel") or {}).get("promoted", 0) for c in cycles),
    }


def render_runs_index(runs: list[Mapping[str, Any]]) -> str:
    """The root ``index.html``: one row per run (a :func:`run_record`) linking to its page."""
    rows = [[
        _link(f"runs/{validate_run_id(r['run_id'])}/index.html", r["run_id"]), _e(len(r.get("cycles") or [])),
        _e(r.get("last_mean_accuracy_seen")), _e(r.get("dreams_promoted")),
    ] for r in sorted(runs, key=lambda r: r["run_id"])]
    body = "<h1>lm-sleep runs</h1>\n" + _table(
        ["run", "cycles", "mean accuracy after last cycle", "dreams promoted"], rows
    )
    return _page("lm-sleep runs", body)


def read_cycle_summaries(store: ArtifactStore, run_id: str) -> list[dict[str, Any]]:
    """Every ``cycle-N/summary.json`` of a run, in cycle order."""
    prefix = run_prefix(run_id)
    cycles = sorted(int(m.group(1)) for d in store.children(prefix) if (m := CYCLE_DIR_RE.fullmatch(d)))
    keys = [f"{prefix}cycle-{n}/summary.json" for n in cycles]
    return [json.loads(get_bytes(store, k)) for k in keys if exists(store, k)]


def list_runs(store: ArtifactStore) -> list[dict[str, Any]]:
    """The ``run.json`` record of every run in the store."""
    out = []
    for run_id in store.children("runs/"):
        key = f"runs/{run_id}/run.json"
        if run_id_problem(run_id) is None and exists(store, key):
            out.append(json.loads(get_bytes(store, key)))
    return out


def write_indexes(store: ArtifactStore, run_id: str) -> list[str]:
    """Rebuild ``runs/<RUN_ID>/index.html``, its ``run.json`` and the root ``index.html``."""
    cycles = read_cycle_summaries(store, run_id)
    record = json.dumps(run_record(run_id, cycles), indent=2, sort_keys=True).encode() + b"\n"
    put_bytes(store, record, f"{run_prefix(run_id)}run.json")
    put_bytes(store, render_run_index(run_id, cycles).encode(), f"{run_prefix(run_id)}index.html")
    put_bytes(store, render_runs_index(list_runs(store)).encode(), "index.html")
    return [f"{run_prefix(run_id)}run.json", f"{run_prefix(run_id)}index.html", "index.html"]
