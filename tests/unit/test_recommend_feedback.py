"""Learning from use: linking a generation to the recommendation it answers, the signal the
engine takes from it, and the same state after a reload from the read models."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta

import pytest

from server.domain.models import Architecture, HistoryEntry, LoraView
from server.domain.recommend.engine import (
    MAX_SKIPS,
    SKIP_PENALTY,
    RecommendationEngine,
)
from server.domain.recommend.feedback import (
    LINK_WINDOW,
    Feedback,
    MadeRecommendation,
    UsedLoras,
    link,
)
from server.infrastructure.read_model import ProjectedChange
from server.infrastructure.recommender import CatalogRecommender
from tests.unit.test_recommend_engine import CATALOG

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def made(
    rec_id: str,
    prompt: str,
    lora_ids: tuple[str, ...],
    *,
    principal: str = "alice",
    minutes: float = 0.0,
) -> MadeRecommendation:
    return MadeRecommendation(rec_id, principal, prompt, lora_ids, T0 + timedelta(minutes=minutes))


def used(
    prompt: str, lora_ids: tuple[str, ...], *, principal: str = "alice", minutes: float = 5.0
) -> UsedLoras:
    return UsedLoras(principal, prompt, lora_ids, T0 + timedelta(minutes=minutes))


# -- linking -------------------------------------------------------------------------------


def test_a_recommended_lora_used_is_accepted_and_the_others_skipped() -> None:
    rec = made("r1", "a castle at dusk", ("a", "b", "c"))
    found = link(7, used("a castle at dusk, <lora:b:0.8>", ("b", "x")), [rec])
    assert found == Feedback(7, "r1", "a castle at dusk", ("b",), ("a", "c"))


def test_a_matching_prompt_without_recommended_loras_skips_them_all() -> None:
    rec = made("r1", "a castle at dusk, watercolor", ("a", "b"))
    found = link(7, used("watercolor castle at dusk, soft light", ("x",)), [rec])
    assert found is not None
    assert (found.accepted, found.skipped) == ((), ("a", "b"))


@pytest.mark.parametrize(
    "generation",
    [
        used("a castle at dusk", ("a",), principal="bob"),  # someone else
        used("a castle at dusk", ("a",), minutes=LINK_WINDOW.total_seconds() / 60 + 1),
        used("a castle at dusk", ("a",), minutes=-1),  # before the recommendation
        used("a dog on a beach", ("x",)),  # another prompt, no recommended LoRA
    ],
)
def test_other_generations_answer_nothing(generation: UsedLoras) -> None:
    assert link(7, generation, [made("r1", "a castle at dusk", ("a", "b"))]) is None


def test_the_newest_unanswered_recommendation_is_answered_once() -> None:
    older = made("r1", "a castle at dusk", ("a", "b"), minutes=0)
    newer = made("r2", "a castle at dusk", ("b", "c"), minutes=1)
    generation = used("a castle at dusk", ("b",))
    first = link(7, generation, [newer, older])
    assert first is not None
    assert first.recommendation_id == "r2"
    second = link(8, generation, [newer, older], answered={"r2"})
    assert second is not None
    assert second.recommendation_id == "r1"
    assert link(9, generation, [newer, older], answered={"r1", "r2"}) is None


def test_a_recommendation_of_nothing_teaches_nothing() -> None:
    assert link(7, used("a castle at dusk", ("a",)), [made("r1", "a castle at dusk", ())]) is None


# -- the signal ------------------------------------------------------------------------------


@pytest.fixture
def engine() -> RecommendationEngine:
    e = RecommendationEngine()
    for view in CATALOG:
        e.upsert(view)
    return e


def confidence(engine: RecommendationEngine, prompt: str, lora_id: str) -> float:
    for rec in engine.recommend(prompt, Architecture.SD1, max_loras=20, diversify=False):
        if rec.lora.id == lora_id:
            return rec.confidence
    return 0.0


ASKED = "a lonely astronaut drifting among jellyfish"


def test_an_accepted_generation_counts_more_than_a_plain_one() -> None:
    plain, learned = RecommendationEngine(), RecommendationEngine()
    for e in (plain, learned):
        for view in CATALOG:
            e.upsert(view)
        e.record_generation("astronaut among jellyfish, <lora:add_detail>", ["detail"])
    learned.record_feedback(ASKED, ["detail"], [])  # the same generation answered ASKED
    later = "lonely astronaut drifting"
    assert confidence(learned, later, "detail") > confidence(plain, later, "detail") > 0


def test_a_skip_lowers_a_lora_near_that_prompt_only(engine: RecommendationEngine) -> None:
    prompt = "pixel art, a knight in a dungeon"
    far = "pixel art, a spaceship over the ocean"
    before, before_far = confidence(engine, prompt, "pixel"), confidence(engine, far, "pixel")
    engine.record_feedback("a knight in a dungeon", [], ["pixel"])
    once = confidence(engine, prompt, "pixel")
    assert once < before
    assert confidence(engine, far, "pixel") == pytest.approx(before_far)
    for _ in range(10):
        engine.record_feedback("a knight in a dungeon", [], ["pixel"])
    # Mild and bounded: never below (1 - SKIP_PENALTY) of what it was.
    assert before * (1 - SKIP_PENALTY) - 1e-9 <= confidence(engine, prompt, "pixel") < once


def test_an_acceptance_clears_the_skips_it_covers(engine: RecommendationEngine) -> None:
    prompt = "pixel art, a knight in a dungeon"
    engine.record_feedback("a knight in a dungeon", [], ["pixel"])
    engine.record_feedback("a spaceship over the ocean", [], ["pixel"])
    engine.record_feedback("knight in a dark dungeon", ["pixel"], ["ink"])
    skips = engine._skips["pixel"]
    assert [sorted(s) for s in skips] == [["ocean", "over", "spaceship"]]
    assert "ink" in engine._skips
    assert confidence(engine, prompt, "pixel") > 0


def test_skips_are_bounded_and_go_with_their_lora(engine: RecommendationEngine) -> None:
    for i in range(MAX_SKIPS + 10):
        engine.record_feedback(f"prompt number{i} with words", [], ["pixel", "unknown"])
    assert len(engine._skips["pixel"]) == MAX_SKIPS
    assert "unknown" not in engine._skips  # not in the catalog: nothing to lower
    engine.remove("pixel")
    assert "pixel" not in engine._skips


# -- reload ------------------------------------------------------------------------------------


class FakeReadModel:
    """What CatalogRecommender reads from the read models: its two streams, the views."""

    def __init__(self, views: list[LoraView]) -> None:
        self.views = views
        self.history_rows: list[HistoryEntry] = []
        self.feedback_rows: list[Feedback] = []

    def all_views(self, batch: int = 2000) -> Iterable[LoraView]:
        return iter(self.views)

    def history(self, batch: int = 5000) -> Iterable[HistoryEntry]:
        return iter(self.history_rows)

    def feedback(self, batch: int = 5000) -> Iterable[Feedback]:
        return iter(self.feedback_rows)

    def position(self) -> int:
        return 0

    def views_by_id(self, lora_ids: Sequence[str]) -> dict[str, LoraView]:
        return {v.id: v for v in self.views if v.id in set(lora_ids)}


def test_a_reload_from_the_read_models_equals_the_live_engine() -> None:
    history = [
        HistoryEntry(3, "a knight in a dungeon <lora:pixel>", ("pixel",)),
        HistoryEntry(6, "knight in a dark dungeon", ("pixel",)),
    ]
    feedback = [
        Feedback(3, "r1", "a knight in a dungeon", (), ("pixel", "ink")),
        Feedback(6, "r2", "knight in a dark dungeon", ("pixel",), ("detail",)),
    ]
    read_model = FakeReadModel(list(CATALOG))
    live = CatalogRecommender(RecommendationEngine(), read_model)  # type: ignore[arg-type]
    live.load()
    for i in range(2):  # one projected batch each
        live.on_change(
            ProjectedChange(i, i + 1, history=history[i : i + 1], feedback=feedback[i : i + 1])
        )
    live.catch_up()
    read_model.history_rows, read_model.feedback_rows = history, feedback
    reloaded = CatalogRecommender(RecommendationEngine(), read_model)  # type: ignore[arg-type]
    reloaded.load()
    for prompt in ("a knight in a dungeon", "pixel art knight", "ink dungeon"):
        a = live.engine.recommend(prompt, Architecture.SD1, max_loras=5)
        b = reloaded.engine.recommend(prompt, Architecture.SD1, max_loras=5)
        assert [(r.lora.id, r.confidence) for r in a] == [(r.lora.id, r.confidence) for r in b]
    assert set(reloaded.engine._skips) == {"ink", "detail"}  # pixel's skip was cleared
