"""Security (issue #17): model and dataset text stays text in every page a browser may open, paths from params
stay inside the project, and the local servers listen on loopback only.

The pages are checked in a real headless Chromium (``--dump-dom``): every payload, were it run, would mark the
page (``document.body.dataset.pwned``); a control page with the same payloads unescaped proves the browser runs
them. Without a Chromium binary (``make install-browser``) the browser tests skip and say why.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from checks import DreamValidation, StreamValidation
from model.config import OUTPUT_PATHS, ConfigError, load_params
from store import InvalidKeyError, LocalStore, Outbox, publish_cycle, validate_run_id

# Each would set body[data-pwned] if a browser ran it; `"` and `'` try to leave an attribute, `javascript:` a link.
PAYLOADS = [
    "<script>document.body.dataset.pwned='script'</script>",
    "<img src=x onerror=\"document.body.dataset.pwned='img'\">",
    "\"><svg onload=\"document.body.dataset.pwned='svg'\"></svg>",
    "' onmouseover='document.body.dataset.pwned=1' x='",
    "<a href=\"javascript:document.body.dataset.pwned='a'\">click</a>",
    "[click](javascript:document.body.dataset.pwned='md') & <b>bold</b>",
]
BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome", "headless_shell")


def _browser() -> str:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    pytest.skip(f"no headless Chromium on PATH (tried {', '.join(BROWSERS)}): run `make install-browser` "
                "(apt-get install chromium-headless-shell); .ci/run installs it when it runs as root")


def dump_dom(page: Path, tmp_path: Path) -> str:
    """The DOM of ``page`` after Chromium loaded it and ran whatever scripts it would run."""
    out = subprocess.run(
        [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=1000", "--dump-dom",
         page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0 and "<body" in out.stdout, f"chromium failed ({out.returncode}):\n{out.stderr[-2000:]}"
    return out.stdout


class _Dom(HTMLParser):
    """Tags, attributes and text of a dumped DOM."""

    def __init__(self, dom: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.feed(dom)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def assert_inert(dom: str, texts: list[str]) -> None:
    """No payload ran or became markup, and each of ``texts`` shows as text."""
    parsed = _Dom(dom)
    assert "data-pwned" not in dom, "a payload ran in the browser"
    assert [t for t, _ in parsed.tags if t in ("script", "svg", "iframe", "object", "embed")] == []
    assert [(t, k) for t, a in parsed.tags for k in a if k.startswith("on")] == []
    links = [v for _, a in parsed.tags for k, v in a.items() if k in ("href", "src", "action", "formaction")]
    assert [v for v in links if re.sub(r"[\s\x00-\x1f]", "", v).lower().startswith("javascript:")] == []
    shown = " ".join("".join(parsed.text).split())
    for t in texts:
        assert " ".join(t.split()) in shown, f"{t!r} is not shown as text"


def markdown_page(markdown: str, dest: Path) -> Path:
    """``markdown`` rendered as a permissive renderer would (raw HTML passed through, links not vetted)."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": True}).enable("table")
    md.validateLink = lambda url: True
    dest.write_text(f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"></head><body>{md.render(markdown)}"
                    "</body></html>", encoding="utf-8")
    return dest


# ---------------------------------------------------------------------------- a: text in pages


def test_the_browser_runs_the_payloads_of_an_unescaped_page(tmp_path: Path) -> None:
    """The control: the same payloads written raw do run (so an inert page below means escaped, not ignored)."""
    raw = tmp_path / "raw.html"
    raw.write_text("<!DOCTYPE html><html><body>" + "".join(f"<p>{p}</p>" for p in PAYLOADS[:3]) + "</body></html>")
    assert "data-pwned" in dump_dom(raw, tmp_path)
    md = markdown_page("| dream |\n| --- |\n" + "".join(f"| {p} |\n" for p in PAYLOADS[:2]), tmp_path / "md.html")
    assert "data-pwned" in dump_dom(md, tmp_path)
    link = markdown_page(PAYLOADS[5], tmp_path / "link.html")
    assert 'href="javascript:' in dump_dom(link, tmp_path)


def _summary() -> dict:
    """A cycle summary with a payload in every free-text field the index shows."""
    p = PAYLOADS
    return {
        "period": 0,
        "accuracy": {p[0]: 0.5, p[3]: 0.25},  # task ids as text
        "mean_accuracy_seen": 0.375,
        "consolidations": [{"src": p[1], "dst": p[2], "slot": 0, "note": p[4]}],
        "dream_funnel": {"generated": 2, "selected": 1, "rewarded": 1, "passed_gate": 1, "promoted": 1, "rejected": 1},
        "experts": [{"level": p[5], "slot": 0, "active": True, "origin": p[1], "unlocked_at_step": 0,
                     "sha256": p[2], "history": [p[3], p[4]]}],
        "labels": p,  # fields the index does not know are shown as 'other'
        "dream": p[0],
        p[4]: p[2],
    }


def _reports(tmp_path: Path) -> dict[str, Path]:
    """gate.md with payload dreams and validation.md with payload dataset rows, as their writers write them."""
    gate = DreamValidation(
        success=False,
        checks=[{"name": "length_bounds", "success": False, "failing_count": len(PAYLOADS),
                 "expectations": [{"expectation": "expect_column_values_to_be_between", "success": False,
                                   "column": "n_tokens", "table_level": False, "failing_dream_ids": ["d0"],
                                   "observed": None, "error": PAYLOADS[1]}]}],
        dreams=[{"dream_id": f"d{i}", "text": p, "reward": 0.0, "failed_checks": ["length_bounds"]}
                for i, p in enumerate(PAYLOADS)],
    )
    stream = StreamValidation(success=False, checks=[
        {"name": "label_in_plan", "expectation": "expect_column_values_to_be_in_set", "column": "label",
         "success": False, "failing_count": len(PAYLOADS), "error": PAYLOADS[0], "observed": None,
         "examples": [{"row_id": i, "text": p} for i, p in enumerate(PAYLOADS)]}])
    (tmp_path / "gate.md").write_text(gate.to_markdown(), encoding="utf-8")
    (tmp_path / "validation.md").write_text(stream.to_markdown(), encoding="utf-8")
    return {"reports/gate.md": tmp_path / "gate.md", "reports/validation.md": tmp_path / "validation.md"}


def test_the_artifact_index_pages_show_dreams_labels_and_run_ids_as_text(tmp_path: Path) -> None:
    run_id = "javascript.-onerror_x"  # as odd as the run-id rule allows
    store = LocalStore(tmp_path / "store")
    publish_cycle(store, run_id, 0, _reports(tmp_path), _summary(), Outbox(tmp_path / "outbox"))
    run_page = tmp_path / "store" / "runs" / run_id / "index.html"
    assert_inert(dump_dom(run_page, tmp_path), PAYLOADS)
    root = dump_dom(tmp_path / "store" / "index.html", tmp_path)
    assert_inert(root, [run_id])
    assert f'href="runs/{run_id}/index.html"' in root


def test_markdown_reports_stay_text_even_in_a_renderer_that_passes_html_through(tmp_path: Path) -> None:
    reports = _reports(tmp_path)
    shown = {"reports/gate.md": PAYLOADS, "reports/validation.md": [repr(p) for p in PAYLOADS]}  # rows as repr
    for name, path in reports.items():
        text = path.read_text(encoding="utf-8")
        assert "<" not in text and not re.search(r"(?<!\\)\]\(", text), name  # no tag, no link syntax
        assert_inert(dump_dom(markdown_page(text, tmp_path / f"{path.stem}.html"), tmp_path), shown[name])


@pytest.mark.parametrize("bad", ["<script>", "javascript:alert(1)", 'a"b', "a'b", "a>b", "a<b", "x onerror=y"])
def test_run_ids_that_could_carry_markup_are_refused_everywhere(bad: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidKeyError, match="invalid run id"):
        validate_run_id(bad)
    with pytest.raises(InvalidKeyError):
        publish_cycle(LocalStore(tmp_path / "store"), bad, 0, {}, _summary(), Outbox(tmp_path / "outbox"))
    assert not (tmp_path / "store").exists()
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"lifecycle": {"run_id": bad}}))
    with pytest.raises(ConfigError, match="lifecycle.run_id"):
        load_params(params)


# ---------------------------------------------------------------------------- b: paths stay in the project


def _params(tmp_path: Path, **sections: dict) -> Path:
    path = tmp_path / "project" / "params.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(sections))
    return path


@pytest.mark.parametrize("field", OUTPUT_PATHS)
@pytest.mark.parametrize("value", ["../../etc", "/etc", "state/../../x"])
def test_an_output_path_that_leaves_the_project_is_refused_naming_the_field(field: str, value: str,
                                                                           tmp_path: Path) -> None:
    section, key = field.split(".")
    with pytest.raises(ConfigError) as err:
        load_params(_params(tmp_path, **{section: {key: value}}))
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'project' / 'params.yaml'}: invalid parameters:") and f"  {field}: " in msg
    assert ("absolute" if value.startswith("/") else "'..'") in msg and len(msg.splitlines()) == 2


def test_an_output_path_through_a_symlink_out_of_the_project_is_refused(tmp_path: Path) -> None:
    params = _params(tmp_path, lifecycle={"state_root": "state"}, intake={"inbox": "inbox"})
    load_params(params)  # nothing there yet: fine
    (tmp_path / "elsewhere").mkdir()
    (params.parent / "state").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError) as err:
        load_params(params)
    msg = str(err.value)
    fields = [line.split(":")[0].strip() for line in msg.splitlines()[1:]]
    # every path under state/ is refused (the states, comparisons' work; the inbox lies under state_root), nothing else
    assert sorted(fields) == ["consolidation.state_dir", "dream.state_dir", "evaluation.work_dir",
                              "lifecycle.state_root", "wake.state_dir"]
    assert f"outside the project directory {(tmp_path / 'project').resolve()}" in msg and "symbolic link" in msg
    # a symlink that stays inside the project is fine
    (params.parent / "state").unlink()
    (params.parent / "disk").mkdir()
    (params.parent / "state").symlink_to(params.parent / "disk")
    load_params(params)


def test_comparison_overrides_may_not_leave_the_run_directory(tmp_path: Path) -> None:
    comp = {"methods": ["sleep"], "overrides": {"lifecycle": {"state_root": "../../../x"}}}
    with pytest.raises(ConfigError, match=r"evaluation\.comparisons\.c\.overrides\.lifecycle\.state_root: '\.\./"):
        load_params(_params(tmp_path, evaluation={"comparisons": {"c": comp}}))


def test_an_absolute_data_dir_is_allowed_only_over_a_prepared_stream(tmp_path: Path) -> None:
    """As in the params `lm-sleep compare` writes for its runs: the seed's shared stream, read-only."""
    stream = tmp_path / "shared" / "processed"
    params = _params(tmp_path, data={"out_dir": str(stream)})
    with pytest.raises(ConfigError, match="data.out_dir: .* is an absolute path"):
        load_params(params)
    stream.mkdir(parents=True)
    (stream / "tasks.json").write_text("{}")
    assert load_params(params).data.out_dir == str(stream)


def test_every_directory_field_of_params_is_checked() -> None:
    """A new *_dir / *_root / *_path output field must join OUTPUT_PATHS (inputs: the model, data and passages)."""
    from pydantic import BaseModel

    from model.config import Params

    inputs = {"model.path", "data.source.path", "dream.passages"}
    found = set()
    for section, info in Params.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            found |= {f"{section}.{k}" for k in info.annotation.model_fields
                      if k.endswith(("_dir", "_root", "_path")) or k in ("inbox", "path", "passages")}
    assert found - inputs == set(OUTPUT_PATHS)
