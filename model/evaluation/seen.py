"""Class-incremental accuracy of a model state: every seen task's test texts, each classified among all the labels
seen so far (docs/design.md §5), answered by the experts routing picks (with prototype routing)."""

from __future__ import annotations

import pandas as pd

from model.config import Params
from model.decoding.forward import TrunkCache
from model.decoding.loading import LoadedModel
from model.memory.cms import ContinuumMemory
from model.memory.prototypes import view_class
from model.memory.routed import routed_classify


def seen_accuracy(params: Params, loaded: LoadedModel, cms: ContinuumMemory, stream: pd.DataFrame,
                  plan: dict[int, list[str]], period: int, trunk: TrunkCache | None = None
                  ) -> tuple[dict[str, float], dict[str, float] | None]:
    """Accuracy of the loaded model on the test rows of tasks 0..period (those that have test rows: not a period
    of plain passages), each among all seen labels, and
    (with prototype routing, else None) the share of each task's texts routed to the task's own period (or one
    that sees the same experts, :func:`model.memory.prototypes.view_class`).

    With prototype routing each text is answered by the experts of its routed period. ``trunk``: a
    :class:`~model.decoding.forward.TrunkCache` shared by the scorings of several states of one model.
    """
    test = stream[(stream["split"] == "test") & (stream["task"] <= period)].sort_values("row_id")
    seen = sorted(set(test["task"].tolist()))  # a period of plain passages has no test rows
    if not seen:
        return {}, None
    labels = list(dict.fromkeys(lab for t in range(period + 1) for lab in plan[t]))  # a label may come back
    pred, routed = routed_classify(
        loaded.model, loaded.tokenizer, cms, params.wake.template, list(test["text"]), labels,
        params.wake.eval_batch_size, params.wake.max_length, trunk,
    )
    correct = pd.Series([p == g for p, g in zip(pred, test["label"])], index=test.index)
    accuracy = {str(t): float(correct[test["task"] == t].mean()) for t in seen}
    if routed is None:
        return accuracy, None
    view = {p: view_class(cms, p) for p in {*routed, *test["task"].tolist()}}
    own = pd.Series([view[r] == view[t] for r, t in zip(routed, test["task"])], index=test.index)
    return accuracy, {str(t): float(own[test["task"] == t].mean()) for t in seen}


__all__ = ["seen_accuracy"]
