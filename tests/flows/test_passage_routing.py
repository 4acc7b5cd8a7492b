"""bench/passage_routing.py: every router's share of questions routed to their own passage, on real sentence embeddings."""

from __future__ import annotations

from bench.passage_routing import routing_accuracy
from model.evaluation.knowledge import QA, Passage

PASSAGES = [
    Passage("Harbor", "The old harbor of Veltra was rebuilt in 1912 by the engineer Mara Quist. Ships bring salt.",
            [QA("Who rebuilt the harbor of Veltra?", "Mara Quist"), QA("What do the ships bring?", "salt")]),
    Passage("Orchard", "The orchard grows pears and plums on the hill. Bees from the village pollinate the trees.",
            [QA("What fruit does the orchard grow?", "pears and plums"), QA("What pollinates the trees?", "bees")]),
    Passage("Harbor", "The lighthouse beside the harbor was lit by oil until 1950. Its keeper lived in the tower.",
            [QA("Until when was the lighthouse lit by oil?", "1950"), QA("Where did the keeper live?", "the tower")]),
]


def test_every_router_is_scored_and_the_nearest_sentence_finds_each_passage():
    acc = routing_accuracy(PASSAGES, k=(1,))
    assert set(acc) == {"nearest_sentence", "sentence_mean", "whole_passage", "lifecycle_cosine_k1",
                        "lifecycle_mahalanobis_k1"}
    assert acc["nearest_sentence"] == {"own": 1.0, "title": 1.0}
    for r in acc.values():
        if r["own"] is not None:
            assert 0.0 <= r["own"] <= r["title"] <= 1.0  # the own passage has its own title
