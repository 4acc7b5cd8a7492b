"""The dream gate: derived rapidfuzz scores, the GX suite, gating, promotion and the report."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rapidfuzz import fuzz

from checks import CHECKS, DreamGateError, DreamValidation, gate_dream_table, gate_dreams, validate_dreams
import checks.dreams
from model.config import DreamGateConfig
from model.sleep.dream_checks import CHECK_COLUMNS, DREAM_COLUMNS, add_check_columns, dup_scores

GATE = DreamGateConfig()  # tokens in [8, 512], near-duplicate at 90, copy at 95

CONTEXTS = {
    "ctx-normans": (
        "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region "
        "in France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway."
    ),
    "ctx-amazon": (
        "The Amazon rainforest covers most of the Amazon basin of South America. This basin encompasses seven "
        "million square kilometres, of which five and a half million are covered by the rainforest."
    ),
    "ctx-steam": (
        "Steam engines are external combustion engines, where the working fluid is separate from the combustion "
        "products. The ideal thermodynamic cycle used to analyze this process is called the Rankine cycle."
    ),
}
DREAMS = {
    "ctx-normans": [
        "Normandy is named after a people, so its name is older than its French identity.",
        "Scandinavian seafarers settled in northern France and became a distinct group.",
        "A region's name can preserve the memory of the settlers who once raided it.",
    ],
    "ctx-amazon": [
        "Most of a continent's largest river basin lies under tropical forest.",
        "Roughly seventy-eight percent of the drainage area is forested land.",
        "Deforestation anywhere in the basin shrinks one of Earth's largest forests.",
    ],
    "ctx-steam": [
        "The fluid that does the work never mixes with the burning fuel in such machines.",
        "Engineers model these machines with an idealised cycle named after Rankine.",
        "Because heat is supplied from outside, many different fuels can drive the engine.",
    ],
}
REWARDS = [1.0, 0.0, np.nan]  # per dream position within a context: tried+improved, tried, not tried
IDS = [f"p0-{c}-{j}" for c in DREAMS for j in range(3)]


def _table() -> pd.DataFrame:
    """A valid dream table: 3 contexts x 3 dreams, one period, one round."""
    rows = []
    for c, texts in DREAMS.items():
        for j, text in enumerate(texts):
            tried = not np.isnan(REWARDS[j])
            rows.append({
                "dream_id": f"p0-{c}-{j}",
                "period": 0,
                "round": 0,
                "context_id": c,
                "context": CONTEXTS[c],
                "prompt": f"Read the passage and list its implications.\n{CONTEXTS[c]}",
                "text": text,
                "n_tokens": 12 + j,
                "importance": 0.5 - 0.1 * j,
                "selected": tried,
                "selection": ["topk", "random", "none"][j],
                "tau_before": 0.25 if tried else np.nan,
                "tau_after": (0.5 if REWARDS[j] == 1.0 else 0.25) if tried else np.nan,
                "reward": REWARDS[j],
                "trial_error": None,
            })
    df = pd.DataFrame(rows)
    assert list(df.columns) == list(DREAM_COLUMNS)
    return df


def _promoted_ids(df: pd.DataFrame) -> list[str]:
    return df.loc[df["reward"] == 1.0, "dream_id"].tolist()


def _run(df: pd.DataFrame, gate: DreamGateConfig = GATE) -> tuple[DreamValidation, pd.DataFrame]:
    scored = add_check_columns(df, gate)
    validation = validate_dreams(scored, gate)
    json.dumps(validation.to_json(), allow_nan=False)
    return validation, gate_dreams(scored, validation)


def _set(df: pd.DataFrame, dream_id: str, column: str, value: object) -> pd.DataFrame:
    bad = df.copy()
    bad.loc[bad["dream_id"] == dream_id, column] = value
    return bad


# --- a valid table -----------------------------------------------------------------------------


def test_valid_table_passes_and_rewarded_dreams_are_promoted() -> None:
    df = _table()
    validation, gated = _run(df)
    assert validation.success, validation.to_markdown()
    assert [c["name"] for c in validation.checks] == list(CHECKS)
    assert all(c["success"] and c["failing_dream_ids"] == [] for c in validation.checks)
    assert gated["gate_passed"].all()
    assert (gated["failed_checks"] == "").all()
    assert gated.loc[gated["promoted"], "dream_id"].tolist() == _promoted_ids(df) == [
        "p0-ctx-normans-0", "p0-ctx-amazon-0", "p0-ctx-steam-0"
    ]
    assert validation.promoted == _promoted_ids(df)
    assert list(gated.columns) == [*DREAM_COLUMNS, *CHECK_COLUMNS, "gate_passed", "failed_checks", "promoted"]
    assert gated["gate_passed"].dtype == bool and gated["promoted"].dtype == bool
    pd.testing.assert_frame_equal(gated[list(DREAM_COLUMNS)], df)  # the dream columns are untouched


def test_validate_computes_missing_check_columns() -> None:
    validation = validate_dreams(_table(), GATE)
    assert validation.success and len(validation.dreams) == 9


# --- one bad dream per rule --------------------------------------------------------------------

Corrupt = Callable[[pd.DataFrame], tuple[pd.DataFrame, list[str]]]
BAD = "p0-ctx-amazon-0"  # a rewarded dream: it would be promoted if it passed


def _empty_text(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    return _set(df, BAD, "text", ""), [BAD]


def _whitespace_text(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    return _set(df, BAD, "text", " \t\n "), [BAD]


def _null_text(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    return _set(df, BAD, "text", None), [BAD]


def _too_few_tokens(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    return _set(df, BAD, "n_tokens", GATE.min_tokens - 1), [BAD]


def _too_many_tokens(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    return _set(df, BAD, "n_tokens", GATE.max_tokens + 1), [BAD]


def _near_duplicate(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    # the last Amazon dream repeats the first one with one word changed
    earlier = df.loc[df["dream_id"] == "p0-ctx-amazon-0", "text"].item()
    later = "p0-ctx-amazon-2"
    bad = _set(df, later, "text", earlier.replace("largest", "biggest"))
    bad.loc[bad["dream_id"] == later, "reward"] = 1.0
    return bad, [later]


def _near_duplicate_earlier_by_row_order(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    # BAD repeats another Amazon dream that comes before it in the table: BAD, the later row, is flagged
    first = "p0-ctx-amazon-1"
    bad = _set(df, BAD, "text", df.loc[df["dream_id"] == first, "text"].item() + " ")
    order = bad["dream_id"].tolist()
    order.remove(first)
    order.insert(order.index(BAD), first)
    return bad.set_index("dream_id", drop=False).loc[order].reset_index(drop=True), [BAD]


def _verbatim_context_copy(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    sentence = "This basin encompasses seven million square kilometres, of which five and a half million are covered"
    assert sentence in CONTEXTS["ctx-amazon"]
    return _set(df, BAD, "text", sentence + "."), [BAD]


def _nan_importance(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    return _set(df, BAD, "importance", np.nan), [BAD]


def _inf_importance(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    return _set(df, BAD, "importance", np.inf), [BAD]


def _minus_inf_importance(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    return _set(df, BAD, "importance", -np.inf), [BAD]


def _reward_half(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    return _set(df, BAD, "reward", 0.5), [BAD]


def _non_string_prompt(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    bad = df.astype({"prompt": object})
    bad.loc[bad["dream_id"] == BAD, "prompt"] = 42
    return bad, [BAD]


def _bad_selection(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    return _set(df, BAD, "selection", "best"), [BAD]


def _repeated_dream_id(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    bad = _set(df, "p0-ctx-amazon-1", "dream_id", BAD)
    return bad, [BAD]


BAD_DREAMS: list[tuple[Corrupt, str]] = [
    (_empty_text, "text_not_empty"),
    (_whitespace_text, "text_not_empty"),
    (_null_text, "text_not_empty"),
    (_too_few_tokens, "length_bounds"),
    (_too_many_tokens, "length_bounds"),
    (_near_duplicate, "not_near_duplicate"),
    (_near_duplicate_earlier_by_row_order, "not_near_duplicate"),
    (_verbatim_context_copy, "not_context_copy"),
    (_nan_importance, "importance_finite"),
    (_inf_importance, "importance_finite"),
    (_minus_inf_importance, "importance_finite"),
    (_reward_half, "reward_valid"),
    (_non_string_prompt, "schema"),
    (_bad_selection, "schema"),
    (_repeated_dream_id, "schema"),
]


@pytest.mark.parametrize(("corrupt", "check"), BAD_DREAMS, ids=[f.__name__.strip("_") for f, _ in BAD_DREAMS])
def test_each_bad_dream_fails_exactly_its_check(corrupt: Corrupt, check: str) -> None:
    bad, bad_ids = corrupt(_table())
    validation, gated = _run(bad)
    assert not validation.success
    assert [c["name"] for c in validation.failed] == [check], validation.to_markdown()
    assert validation.check[check]["failing_dream_ids"] == bad_ids
    assert not validation.check[check]["errors"]

    is_bad = gated["dream_id"].isin(bad_ids)
    assert not gated.loc[is_bad, "gate_passed"].any()
    assert (gated.loc[is_bad, "failed_checks"] == check).all()
    assert not gated.loc[is_bad, "promoted"].any()
    others = gated[~is_bad]
    assert others["gate_passed"].all() and (others["failed_checks"] == "").all()
    assert others["promoted"].tolist() == (others["reward"] == 1.0).tolist()
    assert others["promoted"].sum() >= 2


def test_similar_dream_of_another_context_or_period_is_not_a_near_duplicate() -> None:
    df = _table()
    amazon = df.loc[df["dream_id"] == "p0-ctx-amazon-0", "text"].item()
    other_context = _set(df, "p0-ctx-steam-0", "text", amazon)  # first of its context
    validation, gated = _run(other_context)
    assert validation.success, validation.to_markdown()
    assert gated.loc[gated["dream_id"] == "p0-ctx-steam-0", "dup_score"].item() == 0.0

    next_period = _set(df, "p0-ctx-amazon-2", "period", 1)
    next_period = _set(next_period, "p0-ctx-amazon-2", "text", amazon)
    validation, gated = _run(next_period)
    assert validation.success, validation.to_markdown()
    assert gated.loc[gated["dream_id"] == "p0-ctx-amazon-2", "dup_score"].item() == 0.0

    later_round = _set(df, "p0-ctx-amazon-2", "round", 1)
    later_round = _set(later_round, "p0-ctx-amazon-2", "text", amazon)
    validation, _ = _run(later_round)
    assert [c["name"] for c in validation.failed] == ["not_near_duplicate"]  # rounds of one period do count
    assert validation.check["not_near_duplicate"]["failing_dream_ids"] == ["p0-ctx-amazon-2"]


def test_thresholds_come_from_the_gate_config() -> None:
    df = _table()
    dream = df.loc[df["dream_id"] == BAD, "text"].item()
    score = fuzz.partial_ratio(dream, CONTEXTS["ctx-amazon"])
    strict = DreamGateConfig(copy_threshold=score)  # copy_score >= threshold is a copy
    validation, _ = _run(df, strict)
    assert BAD in validation.check["not_context_copy"]["failing_dream_ids"]
    validation, _ = _run(df, DreamGateConfig(copy_threshold=score + 0.01))
    assert BAD not in validation.check["not_context_copy"]["failing_dream_ids"]
    validation, _ = _run(df, DreamGateConfig(min_tokens=13, max_tokens=13))
    assert validation.check["length_bounds"]["failing_count"] == 6  # n_tokens are 12, 13, 14 per context


# --- table-level schema failures reject every dream ---------------------------------------------


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda df: df.drop(columns=["trial_error"]), id="missing_column"),
        pytest.param(lambda df: df.assign(extra=1), id="extra_column"),
        pytest.param(lambda df: df[[*DREAM_COLUMNS[1:], DREAM_COLUMNS[0]]], id="reordered_columns"),
        pytest.param(lambda df: df.astype({"period": "float64"}), id="float_period"),
        pytest.param(lambda df: df.astype({"selected": "int64"}), id="int_selected"),
    ],
)
def test_table_level_schema_failure_rejects_every_dream(corrupt: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
    validation, gated = _run(corrupt(_table()))
    assert [c["name"] for c in validation.failed] == ["schema"], validation.to_markdown()
    assert validation.check["schema"]["failing_dream_ids"] == IDS
    assert not gated["gate_passed"].any() and not gated["promoted"].any()
    assert (gated["failed_checks"] == "schema").all()


def test_missing_checked_column_fails_schema_and_that_check_with_its_error() -> None:
    validation, gated = _run(_table().drop(columns=["importance"]))
    assert [c["name"] for c in validation.failed] == ["schema", "importance_finite"]
    importance = validation.check["importance_finite"]
    assert importance["failing_dream_ids"] == IDS
    assert importance["errors"] and "importance" in importance["errors"][0]
    assert (gated["failed_checks"] == "schema;importance_finite").all()
    assert "importance" in validation.to_markdown()


def test_missing_text_column_is_reported_not_raised() -> None:
    validation, gated = _run(_table().drop(columns=["text"]))
    failed = [c["name"] for c in validation.failed]
    assert failed[0] == "schema" and {"text_not_empty", "not_near_duplicate", "not_context_copy"} <= set(failed)
    assert not gated["promoted"].any()


# --- outcomes, errors, the report --------------------------------------------------------------


def test_every_dream_rejected_is_a_normal_outcome(tmp_path: Path) -> None:
    df = _table().assign(n_tokens=1)
    gated = gate_dream_table(df, GATE, tmp_path)
    assert not gated["gate_passed"].any() and not gated["promoted"].any()
    assert (gated["failed_checks"] == "length_bounds").all()
    report = json.loads((tmp_path / "gate.json").read_text(encoding="utf-8"))
    assert report["success"] is False
    assert (report["n_dreams"], report["n_promoted"], report["n_rejected"]) == (9, 0, 9)
    assert report["failed_checks"] == ["length_bounds"]
    md = (tmp_path / "gate.md").read_text(encoding="utf-8")
    assert "9 dreams, 0 promoted, 9 rejected" in md


def test_an_expectation_that_raises_is_a_gate_error_naming_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    import great_expectations as gx

    real = checks.dreams._expectations

    def with_broken(gate: DreamGateConfig) -> list[tuple[str, object]]:
        broken = gx.expectations.ExpectColumnValuesToBeBetween(column="no_such_column", min_value=0, max_value=1)
        return [*real(gate), ("reward_valid", broken)]

    monkeypatch.setattr(checks.dreams, "_expectations", with_broken)
    df = add_check_columns(_table(), GATE)
    with pytest.raises(DreamGateError, match="'reward_valid'") as err:
        validate_dreams(df, GATE)
    assert err.value.check == "reward_valid" and err.value.column == "no_such_column"
    assert "no_such_column" in str(err.value) and "raised inside Great Expectations" in str(err.value)


def test_gate_task_writes_reports_listing_rejected_dreams(tmp_path: Path) -> None:
    df = _set(_set(_table(), BAD, "text", "  "), BAD, "n_tokens", 2)
    df = _set(df, "p0-ctx-steam-1", "reward", 0.5)
    long_text = "Engineers " + "x" * 200
    df = _set(df, "p0-ctx-steam-1", "text", long_text)
    report_dir = tmp_path / "reports" / "dreams"
    gated = gate_dream_table(df, GATE, report_dir)

    assert sorted(p.name for p in report_dir.iterdir()) == ["gate.json", "gate.md"]
    row = gated.set_index("dream_id")
    assert row.loc[BAD, "failed_checks"] == "text_not_empty;length_bounds"
    assert row.loc["p0-ctx-steam-1", "failed_checks"] == "reward_valid"
    assert gated["promoted"].sum() == 2

    report = json.loads((report_dir / "gate.json").read_text(encoding="utf-8"))
    assert report["success"] is False
    assert (report["n_dreams"], report["n_promoted"], report["n_rejected"], report["n_passed"]) == (9, 2, 2, 7)
    assert report["failed_checks"] == ["text_not_empty", "length_bounds", "reward_valid"]
    assert report["rejected"] == [
        {"dream_id": BAD, "failed_checks": ["text_not_empty", "length_bounds"], "text": "  "},
        {"dream_id": "p0-ctx-steam-1", "failed_checks": ["reward_valid"], "text": long_text[:80]},
    ]
    assert report["gate"] == GATE.model_dump()

    md = (report_dir / "gate.md").read_text(encoding="utf-8")
    assert md.startswith("# Dream gate")
    assert "**FAILED**: 9 dreams, 2 promoted, 2 rejected" in md
    assert "| length_bounds |" in md and "| FAIL | 1 |" in md
    assert f"| {BAD} | `'  '` | text_not_empty; length_bounds |" in md
    assert f"| p0-ctx-steam-1 | {long_text[:80]}… | reward_valid |" in md


def test_markdown_of_a_passing_table() -> None:
    validation, _ = _run(_table())
    md = validation.to_markdown()
    assert "**PASSED**: 9 dreams, 3 promoted, 0 rejected" in md
    assert "No dream was rejected." in md
    assert md.count("| pass |") == len(CHECKS)


def test_gate_maps_by_dream_id_not_position() -> None:
    df = _set(_table(), BAD, "importance", np.nan)
    scored = add_check_columns(df, GATE)
    validation = validate_dreams(scored, GATE)
    shuffled = scored.iloc[::-1].set_index(pd.Index([f"r{i}" for i in range(len(scored))]))
    gated = gate_dreams(shuffled, validation)
    assert gated.loc[gated["dream_id"] == BAD, "failed_checks"].item() == "importance_finite"
    assert gated["gate_passed"].sum() == 8
    with pytest.raises(ValueError, match="not in this validation"):
        gate_dreams(_set(scored, BAD, "dream_id", "someone-else"), validation)


# --- the derived scores ------------------------------------------------------------------------


def test_dup_score_is_max_ratio_against_earlier_dreams_of_the_same_context_and_period() -> None:
    df = pd.DataFrame({
        "period": [0, 0, 0, 1, 0, 0],
        "context_id": ["a", "a", "b", "a", "a", "a"],
        "context": ["ctx"] * 6,
        "text": ["the cat sat", "the cat sat", "the cat sat", "the cat sat", "the cat sax", "abcd"],
    })
    out = add_check_columns(df, GATE)
    assert out["dup_score"].tolist() == pytest.approx([
        0.0,  # first of (0, a)
        100.0,  # repeat of row 0
        0.0,  # first of (0, b)
        0.0,  # first of (1, a)
        100 * (1 - 2 / 22),  # Indel distance 2 over 22 characters, against row 0/1
        max(fuzz.ratio("abcd", t) for t in ["the cat sat", "the cat sat", "the cat sax"]),
    ])
    assert fuzz.ratio("abcd", "abce") == 75.0
    assert dup_scores(["abcd", "abce", "abcd"], ["g", "g", "h"]) == [0.0, 75.0, 0.0]
    assert out["dup_score"].dtype == np.float64


def test_copy_score_is_partial_ratio_of_the_stripped_dream_against_its_context() -> None:
    context = "the cat sat on the mat"
    df = pd.DataFrame({
        "period": 0,
        "context_id": ["a", "b", "c", "d", "e", "f"],
        "context": context,
        "text": ["cat sat", "  cat sat \n", "dog", "", " \t ", "the cat sat on the mat and then it slept"],
    })
    out = add_check_columns(df, GATE)
    assert out["copy_score"].tolist() == pytest.approx([
        100.0,  # a verbatim piece of the context
        100.0,  # surrounding whitespace is ignored
        fuzz.partial_ratio("dog", context),
        0.0,  # empty
        0.0,  # whitespace only: no spurious match on the context's spaces
        100.0,  # contains the whole context
    ])
    assert out["text_len"].tolist() == [7, 7, 3, 0, 0, 40]
    assert out["text_len"].dtype == np.int64


def test_add_check_columns_copies_and_recomputes() -> None:
    df = _table()
    before = df.copy()
    out = add_check_columns(df.assign(dup_score=-1.0), GATE)
    pd.testing.assert_frame_equal(df, before)
    assert list(out.columns) == [*DREAM_COLUMNS, *CHECK_COLUMNS]
    assert (out["dup_score"] >= 0).all()
    out2 = add_check_columns(df.drop(columns=["context"]), GATE)
    assert out2["copy_score"].isna().all() and not out2["dup_score"].isna().any()


def test_a_parquet_round_trip_keeps_a_valid_table_valid(tmp_path: Path) -> None:
    df = _set(_table(), "p0-ctx-steam-1", "trial_error", "CUDA out of memory")
    for table in (df, _table()):  # trial_error with one message (str dtype) and all None (object dtype)
        table.to_parquet(tmp_path / "dreams.parquet", index=False)
        back = pd.read_parquet(tmp_path / "dreams.parquet")
        validation, gated = _run(back)
        assert validation.success, validation.to_markdown()
        gated.to_parquet(tmp_path / "gated.parquet", index=False)
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "gated.parquet"), gated)


def test_no_selection_ablation_marks_pass_the_schema() -> None:
    validation, gated = _run(_table().assign(selection="all", selected=True))
    assert validation.success, validation.to_markdown()
    assert gated["promoted"].sum() == 3
