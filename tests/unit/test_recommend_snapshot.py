"""The recommendation engine restored from a snapshot answers exactly as the engine that was
built change by change, including the changes applied after the snapshot was taken."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from server.domain.models import Architecture, LoraView
from server.domain.recommend import index
from server.domain.recommend.engine import STATE_VERSION, RecommendationEngine
from server.infrastructure.recommend_snapshot import SnapshotFile
from tests.unit.test_recommend_engine import lora

WORDS = [f"w{i}" for i in range(400)]
STYLES = ("style", "character", "concept", "clothing", "celebrity", "retro")


def make(i: int, rng: random.Random, version: int = 0) -> LoraView:
    words = rng.sample(WORDS, 12)
    return lora(
        f"l{i}",
        f"LoRA {words[0]} {i}",
        base="SDXL 1.0" if i % 4 == 0 else "SD 1.5",
        triggers=(f"{words[1]} {words[2]}",) if i % 3 else (),
        tags=(STYLES[i % len(STYLES)], words[3], words[4]),
        description=" ".join([*words[5:], f"v{version}"]),
        available=i % 5 != 0,
        downloads=rng.randrange(10_000),
        weight=0.6 if i % 7 == 0 else None,
    )


def before(e: RecommendationEngine, rng: random.Random) -> None:
    e.record_generation("w1 w2 w3, an early prompt", ["l250"])  # before l250 exists
    for i in range(220):
        e.upsert(make(i, rng))
    for i in range(0, 220, 3):
        e.record_generation(" ".join(rng.sample(WORDS, 6)), [f"l{i}", f"l{i + 1}"])
    for i in range(5, 220, 17):
        e.remove(f"l{i}")


def after(e: RecommendationEngine, rng: random.Random) -> None:
    for i in range(10, 220, 9):
        e.upsert(make(i, rng, version=1))  # updates (and re-adds of removed ones)
    for i in range(2, 220, 23):
        e.remove(f"l{i}")
    for i in range(220, 260):
        e.upsert(make(i, rng))
    for i in range(1, 260, 4):
        e.record_generation(" ".join(rng.sample(WORDS, 5)), [f"l{i}"])


def answers(e: RecommendationEngine) -> list[object]:
    rng = random.Random(7)
    out: list[object] = []
    for q in range(60):
        prompt = ", ".join(rng.sample(WORDS, 4))
        if q % 10 == 0:
            prompt += f", <lora:l{q}:0.5>"
        for arch in (Architecture.SD1, Architecture.SDXL):
            for unavailable in (False, True):
                recs = e.recommend(prompt, arch, max_loras=4, include_unavailable=unavailable)
                out.append([(r.lora, r.confidence, r.weight, r.reasons, r.score) for r in recs])
        out.append([(r.lora.id, r.confidence, r.score) for r in e.search(prompt, None, limit=8)])
        found, matrix = e.candidate_features(prompt, None, True)
        out.append((found, matrix.tolist()))
    return out


@pytest.fixture(autouse=True)
def small_compactions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fold the overlay in every few documents, so both halves of the index are exercised."""
    monkeypatch.setattr(index, "MIN_COMPACT_DOCS", 16)


def test_restored_engine_answers_like_the_incremental_one(tmp_path: Path) -> None:
    built = RecommendationEngine()
    before(built, random.Random(1))
    file = SnapshotFile(tmp_path / "index.npz", "sqlite:/db")
    file.save(built.state(), 42)
    after(built, random.Random(2))

    views: dict[str, LoraView] = {}
    recorder = RecommendationEngine()  # the same changes, to collect the views
    before(recorder, random.Random(1))
    after(recorder, random.Random(2))
    for lora_id in [f"l{i}" for i in range(260)]:
        found = recorder._lookup([lora_id])
        views.update(found)

    snapshot = file.load()
    assert snapshot is not None
    assert snapshot.position == 42
    restored = RecommendationEngine(views=lambda ids: {i: views[i] for i in ids if i in views})
    restored.restore(snapshot.arrays)
    after(restored, random.Random(2))

    expected = answers(built)
    assert sum(1 for a in expected if a) > 100  # the comparison is not between empty lists
    assert answers(restored) == expected
    assert len(restored) == len(built)


def test_state_round_trips_exactly() -> None:
    e = RecommendationEngine()
    before(e, random.Random(3))
    state = e.state()
    again = RecommendationEngine()
    again.restore(state)
    second = again.state()
    assert state.keys() == second.keys()
    for name, value in state.items():
        assert np.array_equal(value, second[name]), name


def test_a_state_of_another_shape_is_refused() -> None:
    e = RecommendationEngine()
    e.upsert(make(1, random.Random(0)))
    state = e.state()
    current = f'"version": {STATE_VERSION}'.encode()
    assert current in state["text"].tobytes()
    state["text"] = np.frombuffer(
        state["text"].tobytes().replace(current, b'"version": 0'), dtype=np.uint8
    )
    with pytest.raises(ValueError, match="shape"):
        RecommendationEngine().restore(state)


def test_unusable_snapshot_files_are_ignored(tmp_path: Path) -> None:
    e = RecommendationEngine()
    e.upsert(make(1, random.Random(0)))
    path = tmp_path / "index.npz"
    assert SnapshotFile(path, "a").load() is None  # missing
    SnapshotFile(path, "a").save(e.state(), 5)
    assert SnapshotFile(path, "b").load() is None  # another database
    loaded = SnapshotFile(path, "a").load()
    assert loaded is not None
    assert loaded.position == 5
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert SnapshotFile(path, "a").load() is None  # truncated
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind
