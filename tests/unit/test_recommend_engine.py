"""Ranking behaviour of the recommendation engine on a small fixed catalog."""

from __future__ import annotations

import json

import numpy as np
import pytest

from server.domain.models import (
    Architecture,
    BaseModelRef,
    LoraMetadata,
    LoraSource,
    LoraView,
)
from server.domain.recommend.engine import RecommendationEngine
from server.domain.recommend.prompt import parse_prompt
from server.domain.recommend.ranker import FEATURES, LinearModel, Ranker


def lora(
    lora_id: str,
    name: str,
    *,
    base: str = "SD 1.5",
    triggers: tuple[str, ...] = (),
    tags: tuple[str, ...] = (),
    description: str = "",
    file_name: str = "",
    available: bool = True,
    downloads: int = 100,
    weight: float | None = None,
) -> LoraView:
    return LoraView(
        id=lora_id,
        metadata=LoraMetadata(
            name=name,
            base_model=BaseModelRef.parse(base),
            file_name=file_name or name.lower().replace(" ", "_"),
            trigger_words=triggers,
            tags=tags,
            description=description,
            downloads=downloads,
            preferred_weight=weight,
        ),
        source=LoraSource.CATALOG,
        source_id=f"test:{lora_id}",
        available=available,
    )


CATALOG = [
    lora(
        "ink",
        "Ink Wash Painting",
        triggers=("shuimobysim",),
        tags=("style", "chinese"),
        description="Traditional chinese ink wash painting style.",
        weight=0.7,
    ),
    lora(
        "pixel",
        "Pixel Art",
        triggers=("pixel art",),
        tags=("style", "retro", "8bit"),
        description="Retro pixel art sprites.",
    ),
    lora(
        "miku1",
        "Hatsune Miku v1",
        triggers=("hatsune miku",),
        tags=("character",),
        description="Vocaloid character.",
    ),
    lora(
        "miku2",
        "Hatsune Miku v2",
        triggers=("hatsune miku",),
        tags=("character",),
        description="Vocaloid character, improved.",
    ),
    lora(
        "miku3",
        "Hatsune Miku v3",
        triggers=("hatsune miku",),
        tags=("character",),
        description="Vocaloid character, third version.",
    ),
    lora(
        "cyber",
        "Cyberpunk City",
        base="SDXL 1.0",
        triggers=("neon city",),
        tags=("cyberpunk", "city"),
    ),
    lora(
        "quality",
        "Masterpiece Booster",
        tags=("masterpiece", "best quality"),
        description="masterpiece best quality 8k highres ultra detailed",
    ),
    lora(
        "offline",
        "Watercolor",
        triggers=("wtrcolor",),
        tags=("style", "watercolor"),
        available=False,
    ),
    lora("detail", "Add Detail", tags=("detail",), file_name="add_detail"),
]


@pytest.fixture
def engine() -> RecommendationEngine:
    e = RecommendationEngine()
    for view in CATALOG:
        e.upsert(view)
    return e


def ids(recs: list) -> list[str]:  # type: ignore[type-arg]
    return [r.lora.id for r in recs]


def test_a1111_syntax_is_parsed() -> None:
    parsed = parse_prompt(
        r"(masterpiece:1.2), [1girl], \(smile\), <lora:add_detail:0.6> "
        "BREAK hatsune_miku, (pixel art:1.3)"
    )
    assert [(t.name, t.weight) for t in parsed.lora_tags] == [("add_detail", 0.6)]
    assert "lora" not in parsed.text
    assert "1.2" not in parsed.text
    assert "masterpiece" not in parsed.terms
    assert parsed.terms[:1] == ("1girl",)
    assert tuple(parsed.terms[-2:]) == ("pixel", "art")


def test_trigger_words_find_their_lora(engine: RecommendationEngine) -> None:
    recs = engine.recommend("a mountain temple, shuimobysim, mist", Architecture.SD1)
    assert ids(recs)[0] == "ink"
    assert recs[0].weight == 0.7
    assert recs[0].trigger_words == ("shuimobysim",)
    assert any("shuimobysim" in reason for reason in recs[0].reasons)
    assert 0.0 <= recs[0].confidence <= 1.0


def test_only_compatible_loras(engine: RecommendationEngine) -> None:
    assert "cyber" not in ids(
        engine.recommend("neon city at night, cyberpunk", Architecture.SD1, max_loras=10)
    )
    assert ids(engine.recommend("neon city at night, cyberpunk", Architecture.SDXL)) == ["cyber"]


def test_unavailable_only_when_allowed(engine: RecommendationEngine) -> None:
    prompt = "wtrcolor, a lighthouse, watercolor"
    assert "offline" not in ids(engine.recommend(prompt, Architecture.SD1, max_loras=10))
    allowed = engine.recommend(prompt, Architecture.SD1, include_unavailable=True)
    assert ids(allowed)[0] == "offline"


def test_explicit_lora_tag_is_an_explicit_choice(engine: RecommendationEngine) -> None:
    recs = engine.recommend("<lora:add_detail:0.4> a cat", Architecture.SD1)
    assert ids(recs)[0] == "detail"
    assert recs[0].confidence == 1.0
    assert recs[0].weight == 0.4
    assert "explicitly" in recs[0].reasons[0]


def test_quality_boilerplate_does_not_dominate(engine: RecommendationEngine) -> None:
    recs = engine.recommend(
        "masterpiece, best quality, 8k, highres, pixel art, a knight", Architecture.SD1
    )
    assert ids(recs)[0] == "pixel"
    assert "quality" not in ids(recs)[:1]


def test_near_duplicates_are_skipped_and_said(engine: RecommendationEngine) -> None:
    recs = engine.recommend("hatsune miku singing, pixel art", Architecture.SD1, max_loras=3)
    miku = [i for i in ids(recs) if i.startswith("miku")]
    assert len(miku) == 1
    assert "pixel" in ids(recs)
    kept = next(r for r in recs if r.lora.id.startswith("miku"))
    assert any("near-duplicates" in reason for reason in kept.reasons)
    plain = engine.recommend("hatsune miku singing", Architecture.SD1, max_loras=3, diversify=False)
    assert len([i for i in ids(plain) if i.startswith("miku")]) == 3


def test_min_confidence_filters(engine: RecommendationEngine) -> None:
    recs = engine.recommend("shuimobysim", Architecture.SD1, max_loras=10)
    top = recs[0].confidence
    assert (
        engine.recommend("shuimobysim", Architecture.SD1, min_confidence=min(1.0, top + 1e-6)) == []
    )
    assert all(
        r.confidence >= 0.01
        for r in engine.recommend("shuimobysim", Architecture.SD1, min_confidence=0.01)
    )


def test_history_teaches_the_engine(engine: RecommendationEngine) -> None:
    prompt = "a lonely astronaut drifting among jellyfish"
    before = engine.recommend(prompt, Architecture.SD1, max_loras=10)
    assert "detail" not in ids(before)
    for _ in range(3):
        engine.record_generation("astronaut, jellyfish, deep space, drifting", ["detail"])
    after = engine.recommend(prompt, Architecture.SD1)
    assert ids(after)[0] == "detail"
    assert any("past generations" in reason for reason in after[0].reasons)


def test_history_recorded_before_the_lora_arrives_is_kept() -> None:
    e = RecommendationEngine()
    e.record_generation("origami crane, folded paper", ["late"])
    e.upsert(lora("late", "Late Arrival"))
    assert ids(e.recommend("origami crane", Architecture.SD1)) == ["late"]


def test_updates_and_removals_apply_at_once(engine: RecommendationEngine) -> None:
    engine.upsert(lora("pixel", "Pixel Art", triggers=("voxelized",), tags=("style",)))
    assert ids(engine.recommend("voxelized castle", Architecture.SD1))[0] == "pixel"
    engine.remove("pixel")
    assert "pixel" not in ids(
        engine.recommend("voxelized castle, pixel art", Architecture.SD1, max_loras=10)
    )
    assert len(engine) == len(CATALOG) - 1


def test_search_pages_the_same_ranking(engine: RecommendationEngine) -> None:
    hits = engine.search("hatsune miku", None, limit=10)
    assert {h.lora.id for h in hits[:3]} == {"miku1", "miku2", "miku3"}
    assert engine.search("zzzz-nothing", None, limit=10) == []


def test_ranker_keeps_two_models_and_picks_by_trigger_specificity() -> None:
    n = len(FEATURES)
    spec = FEATURES.index("query_trigger_specificity")
    trigger = LinearModel(np.ones(n), 0.0, np.zeros(n), np.ones(n))
    plain = LinearModel(-np.ones(n), 0.0, np.zeros(n), np.ones(n), rank_prior=2.0)
    ranker = Ranker.from_json(Ranker(trigger, plain, 0.65).to_json())
    assert ranker.threshold == 0.65
    assert ranker.plain.rank_prior == 2.0
    rows = np.full((2, n), 0.1)
    rows[:, FEATURES.index("inverse_rank")] = [1.0, 0.5]
    rows[:, spec] = 0.8
    assert ranker.model_for(rows) is ranker.trigger
    rows[:, spec] = 0.2
    assert ranker.model_for(rows) is ranker.plain
    assert ranker.predict(rows)[0] > ranker.predict(rows)[1]
    with pytest.raises(ValueError, match="refit"):
        Ranker.from_json(json.dumps({"features": ["bm25_all"]}))


def test_only_specific_trigger_phrases_select_the_trigger_model() -> None:
    e = RecommendationEngine(Ranker.neutral())
    for view in CATALOG:
        e.upsert(view)
    e.upsert(lora("eyes", "Eye Detail", triggers=("eyes",)))
    for i in range(4):  # a word common in catalog text names no LoRA in particular
        e.upsert(lora(f"portrait{i}", f"Portrait {i}", description="a face with blue eyes"))
    spec = FEATURES.index("query_trigger_specificity")
    _, boilerplate = e.candidate_features("masterpiece, best quality, 8k", Architecture.SD1, True)
    assert len(boilerplate) == 0 or boilerplate[0, spec] == 0.0
    _, unique = e.candidate_features("a temple, shuimobysim", Architecture.SD1, True)
    _, common = e.candidate_features("a temple, blue eyes", Architecture.SD1, True)
    assert unique[0, spec] > common[0, spec] > 0.0


def test_shipped_ranker_loads_both_models() -> None:
    ranker = Ranker.default()
    assert ranker.trigger.coefficients.shape == ranker.plain.coefficients.shape == (len(FEATURES),)
    assert len(ranker.trigger.calibration_x) > 0
    assert len(ranker.plain.calibration_x) > 0
