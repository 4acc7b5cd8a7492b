"""The sentence_lda baseline (model/evaluation/prototype_classifier.py): label means and a pooled covariance of the
sentence model's embedding, nearest mean among the candidates; no raw data, no training."""

from __future__ import annotations

import pytest

from model.evaluation.prototype_classifier import PrototypeClassifier

TASK_A = {
    "balance": ["what is my account balance", "how much money do i have in the bank", "show my checking balance",
                "tell me the balance of my savings"],
    "alarm": ["wake me up at seven tomorrow", "set an alarm for six am", "please set my morning alarm",
              "turn on an alarm for eight"],
}
TASK_B = {
    "weather": ["will it rain today", "what is the forecast for tomorrow", "is it going to be sunny",
                "how cold is it outside"],
    "recipe": ["how do i bake bread", "give me a recipe for pancakes", "how to cook pasta at home",
               "what can i make with eggs and flour"],
}
HELD_OUT = [("what's left in my bank account", "balance"), ("set an alarm at 5:30", "alarm"),
            ("do i need an umbrella today", "weather"), ("how do i make a pizza dough", "recipe")]


def _rows(task: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    return [t for texts in task.values() for t in texts], [lab for lab, texts in task.items() for _ in texts]


def test_it_learns_task_after_task_and_answers_among_the_candidates_only():
    clf = PrototypeClassifier(shrinkage=0.5, batch_size=4)
    clf.learn(*_rows(TASK_A), period=0)
    assert clf.labels == ["balance", "alarm"]
    assert clf.predict([t for t, _ in HELD_OUT[:2]], ["balance", "alarm"]) == ["balance", "alarm"]
    clf.learn(*_rows(TASK_B), period=1)
    assert clf.labels == ["balance", "alarm", "weather", "recipe"]
    everything = ["balance", "alarm", "weather", "recipe"]
    assert clf.predict([t for t, _ in HELD_OUT], everything) == [lab for _, lab in HELD_OUT]
    # the first task's texts keep their labels after the second (nothing of task 0 was changed)
    assert clf.predict(TASK_A["balance"] + TASK_A["alarm"], everything) == ["balance"] * 4 + ["alarm"] * 4
    # among candidates that exclude the right label, the answer is one of the candidates
    assert set(clf.predict([t for t, _ in HELD_OUT], ["weather", "recipe"])) <= {"weather", "recipe"}


def test_bad_use_is_refused_with_what_is_wrong():
    clf = PrototypeClassifier(shrinkage=0.5, batch_size=4)
    with pytest.raises(ValueError, match="predict before any task"):
        clf.predict(["hello"], ["balance"])
    with pytest.raises(ValueError, match="task 0: 2 prompts for 1 labels"):
        clf.learn(["a", "b"], ["x"], period=0)
    clf.learn(*_rows(TASK_A), period=0)
    with pytest.raises(ValueError, match=r"labels \['alarm'\] were learned by an earlier task"):
        clf.learn(["wake me at nine"], ["alarm"], period=1)
    with pytest.raises(ValueError, match=r"labels \['weather'\] were never learned"):
        clf.predict(["will it rain"], ["balance", "weather"])
