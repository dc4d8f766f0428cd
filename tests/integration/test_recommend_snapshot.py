"""The recommendation index's snapshot on each store: saved beside the read models, restored
at start with only the later events replayed, and ignored (index rebuilt) when unusable."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.application.commands import (
    CatalogRecordInput,
    DeleteLoRACommand,
    ImportLoRACatalogCommand,
    RecordGenerationCommand,
    UpdateLoRACommand,
)
from server.application.context import DispatchContext
from server.bootstrap import Container
from server.domain.lora import lora_id_for_source
from server.infrastructure.recommend_snapshot import FILE_NAME
from tests.support import make_container, postgres_schema, sqlite_url

ANIMALS = ["fox", "owl", "crane", "otter", "lynx", "heron", "moth", "newt", "wren", "yak"]
STYLES = ["ink", "pixel", "origami", "neon", "velvet", "marble", "cobalt", "amber"]
PROMPTS = [f"{a} in {s} style, detailed" for a in ANIMALS[:6] for s in STYLES[:5]] + [
    f"trg{i} portrait" for i in range(0, 48, 5)
]


def records(start: int, stop: int) -> tuple[CatalogRecordInput, ...]:
    return tuple(
        CatalogRecordInput(
            source_id=f"snap:{i}",
            name=f"{ANIMALS[i % 10].title()} {STYLES[i % 8].title()} q{i}",
            base_model="SDXL 1.0" if i % 4 == 0 else "SD 1.5",
            tags=("style" if i % 2 else "character", STYLES[i % 8], ANIMALS[(i * 3) % 10]),
            trigger_words=(f"trg{i}",),
            description=f"{ANIMALS[i % 10]} drawn in {STYLES[(i + 1) % 8]} with {ANIMALS[i % 7]} "
            + " ".join(f"d{i}x{k}" for k in range(i % 9)),
            downloads=100 + i * 7,
        )
        for i in range(start, stop)
    )


def run(c: Container, command: Any) -> None:
    c.commands.dispatch(
        command, DispatchContext(request_id=str(uuid.uuid4()), principal="p")
    ).unwrap()


def lora_id(i: int) -> str:
    return str(lora_id_for_source(f"snap:{i}"))


def settled(c: Container) -> None:
    c.projector.wait_for(c.store.max_position(), 30)
    c.recommender.catch_up()


def answers(c: Container) -> list[list[tuple[str, float, tuple[str, ...]]]]:
    return [
        [
            (r.lora.id, r.confidence, r.reasons)
            for r in c.recommender.recommend(
                p, base, max_loras=3, min_confidence=None, include_unavailable=True
            )
        ]
        for p in PROMPTS
        for base in ("SD 1.5", "SDXL 1.0")
    ]


class SnapshotContract:
    @pytest.fixture
    def url(self, tmp_path: Path) -> Iterator[str]:
        raise NotImplementedError

    def test_restart_restores_the_snapshot_and_replays_the_rest(
        self, tmp_path: Path, url: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        first = make_container(tmp_path, url)
        try:
            run(first, ImportLoRACatalogCommand(records=records(0, 40)))
            for i in range(0, 40, 6):
                run(
                    first,
                    RecordGenerationCommand(
                        prompt=f"{ANIMALS[i % 10]} on a hill, {STYLES[i % 8]}",
                        lora_ids=(lora_id(i),),
                        generation_key=f"g{i}",
                    ),
                )
            settled(first)
            first.recommender.save_snapshot()
            snapshot = tmp_path / FILE_NAME
            taken = snapshot.read_bytes()
            # After the snapshot: an update, a delete, more history and more LoRAs.
            run(
                first,
                UpdateLoRACommand(
                    lora_id=lora_id(3), changes={"trigger_words": ["cobalt heron"], "tags": ["x"]}
                ),
            )
            run(first, DeleteLoRACommand(lora_id=lora_id(7)))
            run(
                first,
                RecordGenerationCommand(
                    prompt="velvet moth at dusk",
                    lora_ids=(lora_id(12), lora_id(45)),
                    generation_key="late",
                ),
            )
            run(first, ImportLoRACatalogCommand(records=records(40, 48)))
            settled(first)
            expected = answers(first)
        finally:
            first.close()
        assert sum(1 for a in expected if a) > 40

        snapshot.write_bytes(taken)  # as if the server had stopped before saving again
        caplog.set_level(logging.INFO, logger="loracle.recommender")
        restored = make_container(tmp_path, url)
        try:
            assert "restored from the snapshot" in caplog.text
            assert "0 batches" not in caplog.text
            assert answers(restored) == expected
        finally:
            restored.close()

        caplog.clear()
        snapshot.write_bytes(b"not a snapshot")
        rebuilt = make_container(tmp_path, url)
        try:
            assert "unreadable" in caplog.text
            assert "restored from the snapshot" not in caplog.text
            assert answers(rebuilt) == expected
        finally:
            rebuilt.close()
        assert snapshot.read_bytes() != b"not a snapshot"  # saved again at stop

    def test_a_snapshot_ahead_of_the_read_models_is_not_restored(
        self, tmp_path: Path, url: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        c = make_container(tmp_path, url)
        try:
            run(c, ImportLoRACatalogCommand(records=records(0, 5)))
            settled(c)
            c.recommender.save_snapshot()
            c.projector.rebuild()  # a schema change drops the read models; rebuilt, same place
            c.read_model.reset()  # ... here still empty: the snapshot is ahead of them
            caplog.set_level(logging.INFO, logger="loracle.recommender")
            c.recommender.load()
            assert "ahead of the read models" in caplog.text
            assert len(c.recommender.engine) == 0
        finally:
            c.close()


class TestSQLite(SnapshotContract):
    @pytest.fixture
    def url(self, tmp_path: Path) -> str:
        return sqlite_url(tmp_path)


@pytest.mark.postgres
class TestPostgres(SnapshotContract):
    @pytest.fixture
    def url(self, tmp_path: Path) -> Iterator[str]:
        with postgres_schema() as url:
            yield url
