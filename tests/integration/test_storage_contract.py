"""The storage contract: the same tests on every back end (SQLite file and PostgreSQL).
Each back end subclasses StorageContract and says how to make a fresh store URL."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file
from sqlalchemy import event as sa_event

from server.application.commands import (
    CatalogRecordInput,
    ImportLoRACatalogCommand,
    ImportLoRAsCommand,
    RecommendLoRAsCommand,
    RecordGenerationCommand,
    RegisterLoRACommand,
    UpdateLoRACommand,
)
from server.application.context import SYSTEM_CONTEXT, DispatchContext
from server.application.queries import (
    GetAllLoRAsQuery,
    GetGenerationQuery,
    GetLoRAByIdQuery,
    ListEventsQuery,
    ListGenerationsQuery,
)
from server.bootstrap import Container
from server.devtools.synthetic_loras import write_synthetic_lora
from server.domain.errors import ConflictError, ConsistencyTimeoutError, ValidationError
from server.domain.generation import Generation, GenerationState
from server.domain.lora import Lora, metadata_to_dict
from server.domain.models import (
    Architecture,
    BaseModelRef,
    EventFilter,
    LoraFile,
    LoraFilter,
    LoraKind,
    LoraMetadata,
    LoraSource,
    LoraView,
)
from server.domain.recommend.engine import RecommendationEngine
from server.infrastructure.read_model import ProjectedChange
from server.infrastructure.recommend_snapshot import FILE_NAME as SNAPSHOT_FILE
from server.infrastructure.storage_url import POSTGRES_TCP
from tests.support import make_container, postgres_schema, sqlite_url


def catalog(n: int, prefix: str = "civitai") -> tuple[CatalogRecordInput, ...]:
    return tuple(
        CatalogRecordInput(
            source_id=f"{prefix}:{i}",
            name=f"LoRA {i:04d}",
            base_model="SDXL 1.0" if i % 3 == 0 else "SD 1.5",
            tags=("style", f"t{i % 5}"),
            trigger_words=(f"trg{i}",),
            description=f"number {i}",
            downloads=i,
        )
        for i in range(n)
    )


class StorageContract:
    @pytest.fixture
    def url(self, tmp_path: Path) -> Iterator[str]:
        raise NotImplementedError

    @pytest.fixture
    def c(self, tmp_path: Path, url: str) -> Iterator[Container]:
        container = make_container(tmp_path, url)
        yield container
        container.close()

    def test_catalog_round_trip_and_read_your_writes(self, c: Container) -> None:
        result = c.commands.dispatch(
            ImportLoRACatalogCommand(records=catalog(30)),
            DispatchContext(request_id="b1", principal="p"),
        )
        assert result.unwrap().created == 30
        page = c.queries.dispatch(
            GetAllLoRAsQuery(page_size=100), DispatchContext(min_position=result.position)
        ).data
        assert page.total_size == 30
        assert [v.name for v in page][:3] == ["LoRA 0000", "LoRA 0001", "LoRA 0002"]
        sdxl = c.read_model.list_loras(LoraFilter(Architecture.SDXL), 100)
        assert sdxl.total_size == 10
        tagged = c.read_model.list_loras(LoraFilter(None, "T1"), 100)
        assert {v.name for v in tagged} == {f"LoRA {i:04d}" for i in range(30) if i % 5 == 1}

    def test_idempotent_batches(self, c: Container) -> None:
        ctx = DispatchContext(request_id="same-batch")
        first = c.commands.dispatch(ImportLoRACatalogCommand(records=catalog(10)), ctx)
        position = c.store.max_position()
        again = c.commands.dispatch(ImportLoRACatalogCommand(records=catalog(10)), ctx)
        assert again.unwrap() == first.unwrap()
        assert c.store.max_position() == position

    def test_concurrent_writers_of_one_aggregate_conflict(self, c: Container) -> None:
        c.commands.dispatch(ImportLoRACatalogCommand(records=catalog(1)), DispatchContext())
        c.projector.catch_up()
        (view,) = c.read_model.all_views()
        first = c.store.get_lora(uuid.UUID(view.id))
        second = c.store.get_lora(uuid.UUID(view.id))
        assert isinstance(first, Lora)
        assert isinstance(second, Lora)
        first.edit(changes={"name": "one"}, principal="a", request_id="")
        second.edit(changes={"name": "two"}, principal="b", request_id="")
        c.store.save(first)
        with pytest.raises(ConflictError):
            c.store.save(second)

    def test_concurrent_imports_all_land(self, c: Container) -> None:
        errors: list[BaseException] = []

        def work(k: int) -> None:
            try:
                c.commands.dispatch(
                    ImportLoRACatalogCommand(records=catalog(20, f"w{k}")),
                    DispatchContext(request_id=f"w{k}"),
                ).unwrap()
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        c.projector.wait_for(c.store.max_position(), 10)
        assert c.read_model.list_loras(LoraFilter(), 1).total_size == 80
        positions = [e.position for e in c.read_model.events(EventFilter(), 1000)]
        assert positions == sorted(positions)
        assert len(positions) == 80

    def test_rebuilt_projections_equal_incremental_ones(self, c: Container) -> None:
        result = c.commands.dispatch(
            ImportLoRACatalogCommand(records=catalog(12)), DispatchContext()
        )
        c.projector.catch_up()
        lora_id = c.read_model.list_loras(LoraFilter(), 1).items[0].id
        c.commands.dispatch(
            UpdateLoRACommand(lora_id=lora_id, changes={"tags": ["x"]}), DispatchContext()
        )
        c.projector.catch_up()
        before = (list(c.read_model.all_views()), c.read_model.events(EventFilter(), 1000))
        c.projector.stop()
        c.projector.rebuild()
        after = (list(c.read_model.all_views()), c.read_model.events(EventFilter(), 1000))
        assert after == before
        assert result.position < c.read_model.position()

    def test_embeddings_are_a_kind_that_lists_filter_and_rebuilds_keep(self, c: Container) -> None:
        root = c.files.roots[0]
        write_synthetic_lora(
            root / "style.safetensors", architecture=Architecture.SD1, name="style"
        )
        save_file({"emb_params": np.zeros((2, 768), np.float32)}, str(root / "EasyNeg.safetensors"))
        updates = list(c.commands.stream(ImportLoRAsCommand(), DispatchContext()))
        c.projector.wait_for(updates[-1].position, 5.0)

        def names(kind: LoraKind | None) -> list[tuple[str, LoraKind]]:
            page = c.read_model.list_loras(LoraFilter(kind=kind), 100)
            return [(v.metadata.file_name, v.kind) for v in page]

        assert names(LoraKind.EMBEDDING) == [("EasyNeg", LoraKind.EMBEDDING)]
        assert names(LoraKind.LORA) == [("style", LoraKind.LORA)]
        assert len(names(None)) == 2
        sd1 = c.read_model.list_loras(LoraFilter(Architecture.SD1, kind=LoraKind.EMBEDDING), 10)
        assert [v.metadata.file_name for v in sd1] == ["EasyNeg"]
        c.projector.stop()
        c.projector.rebuild()
        assert names(LoraKind.EMBEDDING) == [("EasyNeg", LoraKind.EMBEDDING)]

    def test_state_survives_a_restart(self, tmp_path: Path, url: str) -> None:
        c = make_container(tmp_path, url)
        position = c.commands.dispatch(
            ImportLoRACatalogCommand(records=catalog(3)), DispatchContext(request_id="persist")
        ).position
        end = c.store.max_position()  # the answer's position, then its record's note of it
        c.projector.wait_for(end, 5)
        c.close()
        reopened = make_container(tmp_path, url)
        try:
            assert reopened.read_model.position() == end
            page = reopened.queries.dispatch(GetAllLoRAsQuery()).data
            assert page.total_size == 3
            retry = reopened.commands.dispatch(
                ImportLoRACatalogCommand(records=catalog(3)), DispatchContext(request_id="persist")
            )
            assert retry.unwrap().created == 3  # the first answer, nothing written twice
            assert retry.position == position
            assert reopened.store.max_position() == end
        finally:
            reopened.close()

    def test_consistency_token_waits_and_bounds(self, c: Container) -> None:
        c.projector.stop()  # nothing projects: a wait must time out, not hang
        result = c.commands.dispatch(
            ImportLoRACatalogCommand(records=catalog(1)), DispatchContext()
        )
        with pytest.raises(ConsistencyTimeoutError):
            c.queries.dispatch(
                GetAllLoRAsQuery(),
                DispatchContext(min_position=result.position, deadline=time.monotonic() + 0.3),
            )
        with pytest.raises(ValidationError):
            c.queries.dispatch(
                GetAllLoRAsQuery(), DispatchContext(min_position=result.position + 1000)
            )
        c.projector.start()
        page = c.queries.dispatch(
            GetAllLoRAsQuery(), DispatchContext(min_position=result.position)
        ).data
        assert page.total_size == 1

    def test_registered_files_and_audit_filters(self, c: Container) -> None:
        root = c.files.roots[0]
        write_synthetic_lora(root / "a.safetensors", architecture=Architecture.SD2, name="A")
        reg = c.commands.dispatch(
            RegisterLoRACommand(path="a.safetensors"),
            DispatchContext(principal="carol", request_id="r"),
        )
        lora = reg.unwrap().lora
        view = c.queries.dispatch(
            GetLoRAByIdQuery(lora_id=lora.id), DispatchContext(min_position=reg.position)
        ).data
        assert view.file is not None
        assert lora.file is not None
        assert view.file.sha256 == lora.file.sha256
        assert c.read_model.find_by_sha256(view.file.sha256) == view
        assert c.read_model.find_by_path("a.safetensors") == view
        events = c.queries.dispatch(ListEventsQuery(principal="carol")).data
        assert [e.aggregate_id for e in events] == [lora.id]
        late = c.queries.dispatch(
            ListEventsQuery(start_time=events.items[0].occurred_at.replace(year=2999))
        ).data
        assert len(late) == 0

    def test_generations_project_page_and_filter(self, c: Container) -> None:
        """The generation lifecycle as events, projected and paged newest first (no executor:
        the aggregate is saved as the generation commands save it)."""
        ids = []
        for i in range(5):
            g = Generation(
                generation_id=str(uuid.uuid4()),
                spec={"model": "m", "prompt": f"p{i}", "steps": 2},
                principal="alice",
                request_id=f"r{i}",
            )
            if i % 2 == 0:
                g.start(1, "alice", f"r{i}")
                g.succeed(
                    [
                        {
                            "index": 0,
                            "sha256": "ab",
                            "size_bytes": 3,
                            "mime_type": "image/png",
                            "seed": i,
                        }
                    ],
                    {"denoising_seconds": 0.5},
                    "alice",
                    f"r{i}",
                )
            c.store.save(g)
            ids.append(str(g.id))
            time.sleep(0.01)  # distinct submission times
        position = c.store.max_position()
        ctx = DispatchContext(principal="alice", min_position=position)
        page = c.queries.dispatch(ListGenerationsQuery(page_size=2), ctx).data
        assert [v.id for v in page] == [ids[4], ids[3]]
        assert page.total_size == 5
        rest = c.queries.dispatch(
            ListGenerationsQuery(page_size=10, page_token=page.next_page_token), ctx
        ).data
        assert [v.id for v in rest] == [ids[2], ids[1], ids[0]]
        done = c.queries.dispatch(ListGenerationsQuery(state="SUCCEEDED"), ctx).data
        assert [v.id for v in done] == [ids[4], ids[2], ids[0]]
        view = c.queries.dispatch(GetGenerationQuery(generation_id=ids[2]), ctx).data
        assert view.state is GenerationState.SUCCEEDED
        assert view.images[0].seed == 2
        assert view.timings == {"denoising_seconds": 0.5}
        assert view.end_time is not None
        trail = c.read_model.events(EventFilter(aggregate_id=ids[0]), 10).items
        assert [e.type for e in trail] == [
            "GenerationSubmitted",
            "GenerationStarted",
            "GenerationSucceeded",
        ]

    @pytest.mark.parametrize("final", ["SUCCEEDED", "FAILED", "CANCELLED"])
    def test_a_generations_times_are_the_times_of_the_events_that_set_them(
        self, c: Container, final: str
    ) -> None:
        """create_time is the Submitted event's time and end_time the final event's, as the
        audit trail records them (not the event before it), live and after a reload."""
        g = Generation(
            generation_id=str(uuid.uuid4()),
            spec={"model": "m", "prompt": "p", "steps": 2},
            principal="alice",
            request_id="t1",
        )
        time.sleep(0.02)
        g.start(1, "alice", "t1")
        time.sleep(0.02)  # the final event comes well after Started
        if final == "SUCCEEDED":
            g.succeed([], {}, "alice", "t1")
        elif final == "FAILED":
            g.fail("it broke", [], "alice", "t1")
        else:
            g.cancel([], "alice", "t1")
        c.store.save(g)
        ctx = DispatchContext(principal="alice", min_position=c.store.max_position())
        view = c.queries.dispatch(GetGenerationQuery(generation_id=str(g.id)), ctx).data
        trail = c.read_model.events(EventFilter(aggregate_id=str(g.id)), 10).items
        assert [e.type for e in trail][-1] == f"Generation{final.title()}"
        assert view.state is GenerationState(final)
        assert view.create_time == trail[0].occurred_at
        assert view.end_time == trail[-1].occurred_at
        assert view.end_time != trail[1].occurred_at  # not Started's time
        loaded = c.store.get(g.id)
        assert isinstance(loaded, Generation)
        assert loaded.view().end_time == trail[-1].occurred_at

    def test_events_stored_under_the_old_aggregate_topic_still_load(self, c: Container) -> None:
        """The aggregate moved from server.domain.generation_job; logs written before name
        that module in every event's topic."""
        g = Generation(
            generation_id=str(uuid.uuid4()),
            spec={"model": "m", "prompt": "old", "steps": 2},
            principal="alice",
            request_id="old-1",
        )
        g.start(1, "alice", "old-1")
        g.fail("it broke", [], "alice", "old-1")
        mapper, recorder = c.store.app.mapper, c.store.app.recorder
        stored = [mapper.to_stored_event(e) for e in g.collect_events()]
        legacy = [
            dataclasses.replace(
                s, topic=s.topic.replace(_topic(Generation), "server.domain.generation_job:")
            )
            for s in stored
        ]
        assert all(s.topic.startswith("server.domain.generation_job:Generation.") for s in legacy)
        recorder.insert_events(legacy)
        ctx = DispatchContext(principal="alice", min_position=c.store.max_position())
        view = c.queries.dispatch(GetGenerationQuery(generation_id=str(g.id)), ctx).data
        assert view.state is GenerationState.FAILED
        assert view.error == "it broke"
        loaded = c.store.get(g.id)
        assert isinstance(loaded, Generation)
        assert loaded.version == 3
        events = c.read_model.events(EventFilter(), 1000)
        assert [e.type for e in events if e.aggregate_id == str(g.id)] == [
            "GenerationSubmitted",
            "GenerationStarted",
            "GenerationFailed",
        ]

    def test_an_answered_recommendation_is_learned_and_survives_a_restart(
        self, tmp_path: Path, url: str
    ) -> None:
        """RecommendLoRAs, then a generation of the same principal that used one of the LoRAs
        (saved and recorded as the generation recorder does): the projector links them, the
        LoRA used ranks higher for that prompt and the ones not used lower, for everyone, and
        so again after a restart (rebuilt from the read models)."""
        c = make_container(tmp_path, url)
        prompt = "gothcstl, ruincstl, faircstl, a stone castle on a cliff at dusk"
        c.commands.dispatch(
            ImportLoRACatalogCommand(records=castles()), DispatchContext(request_id="cat")
        ).unwrap()
        c.projector.wait_for(c.store.max_position(), 5)
        alice = DispatchContext(principal="alice", request_id="rec-1")
        before = confidences(c, prompt)
        made = c.commands.dispatch(
            RecommendLoRAsCommand(
                prompt=prompt, base_model="SD 1.5", max_loras=3, include_unavailable=True
            ),
            alice,
        ).unwrap()
        recommended = [r.lora.id for r in made]
        assert len(recommended) == 3
        c.projector.wait_for(c.store.max_position(), 5)
        c.recommender.catch_up()
        c.recommender.save_snapshot()
        taken = (tmp_path / SNAPSHOT_FILE).read_bytes()  # between recommendation and answer
        chosen = recommended[1]
        g = Generation(
            generation_id=str(uuid.uuid4()),
            spec={"model": "m", "prompt": prompt, "steps": 2},
            principal="alice",
            request_id="gen-1",
        )
        g.start(1, "alice", "gen-1")
        g.succeed([], {}, "alice", "gen-1")
        c.store.save(g)
        c.commands.dispatch(
            RecordGenerationCommand(
                prompt=f"{prompt}, <lora:x:0.8>", lora_ids=(chosen,), generation_key=str(g.id)
            ),
            SYSTEM_CONTEXT,
        ).unwrap()
        c.projector.wait_for(c.store.max_position(), 5)
        [learned] = list(c.read_model.feedback())
        assert learned.recommendation_id == made.recommendation_id
        assert learned.prompt == prompt
        assert learned.accepted == (chosen,)
        assert set(learned.skipped) == set(recommended) - {chosen}
        after = confidences(c, prompt)
        assert after[chosen] >= before[chosen]
        assert ranking(before)[0] != chosen
        assert ranking(after)[0] == chosen
        # The control: the same catalog, history and acceptance, without the skips.
        plain = RecommendationEngine()
        for view in c.read_model.all_views():
            plain.upsert(view)
        for past in c.read_model.history():
            plain.record_generation(past.prompt, past.lora_ids)
        plain.record_feedback(learned.prompt, learned.accepted, ())
        control = {
            r.lora.id: round(r.confidence, 4)
            for r in plain.search(prompt, Architecture.SD1, limit=20)
        }
        for skipped in learned.skipped:
            assert after[skipped] < control[skipped]
        # A plain generation of bob's (no recommendation of his) teaches no feedback.
        c.commands.dispatch(
            RecordGenerationCommand(prompt=prompt, lora_ids=(chosen,)),
            DispatchContext(principal="bob"),
        ).unwrap()
        c.projector.wait_for(c.store.max_position(), 5)
        assert len(list(c.read_model.feedback())) == 1
        after = confidences(c, prompt)
        c.close()
        reopened = make_container(tmp_path, url)  # restores the snapshot saved at close
        try:
            assert confidences(reopened, prompt) == after
        finally:
            reopened.close()
        # A snapshot from before the answer: it is replayed from the log, linked to a
        # recommendation the snapshot's batches held.
        (tmp_path / SNAPSHOT_FILE).write_bytes(taken)
        replayed = make_container(tmp_path, url)
        try:
            assert confidences(replayed, prompt) == after
            replayed.projector.rebuild()  # linked again from the log alone: the same answer
            assert list(replayed.read_model.feedback()) == [learned]
        finally:
            replayed.close()

    def test_read_model_rows_give_back_every_field_of_a_view(self, c: Container) -> None:
        views = read_model_views(24)
        write_views(c, views)
        for view in views:
            assert c.read_model.get(view.id) == view
        assert sorted(c.read_model.all_views(batch=5), key=lambda v: v.id) == views
        metadata = c.read_model.lora_metadata([v.id for v in views])
        assert metadata == {v.id: (v.version, metadata_to_dict(v.metadata)) for v in views}

    def test_listings_page_through_every_filter_in_name_order(self, c: Container) -> None:
        views = read_model_views(60)
        write_views(c, views)
        filters = [
            LoraFilter(),
            LoraFilter(Architecture.SDXL),
            LoraFilter(None, "Red"),
            LoraFilter(available_only=True),
            LoraFilter(kind=LoraKind.EMBEDDING),
            LoraFilter(Architecture.SD1, "red"),
            LoraFilter(None, "BLUE", available_only=True, kind=LoraKind.LORA),
            LoraFilter(None, "absent"),
        ]
        for flt in filters:
            expected = [
                v.id
                for v in sorted(views, key=lambda v: (v.name.casefold(), v.id))
                if _matches(v, flt)
            ]
            seen: list[str] = []
            token = ""
            while True:
                page = c.read_model.list_loras(flt, 7, token)
                assert page.total_size == len(expected), flt
                seen += [v.id for v in page]
                token = page.next_page_token
                if not token:
                    break
            assert seen == expected, flt

    def test_a_listing_counts_its_total_once_per_catalog_change(self, c: Container) -> None:
        views = read_model_views(40)
        write_views(c, views[:30])
        counts: list[str] = []

        def capture(*args: Any) -> None:
            if "count(" in str(args[2]).lower():
                counts.append(args[2])

        sa_event.listen(c.read_model.engine, "before_cursor_execute", capture)
        try:
            token, pages = "", 0
            while True:
                page = c.read_model.list_loras(LoraFilter(Architecture.SDXL), 4, token)
                assert page.total_size == 15
                pages, token = pages + 1, page.next_page_token
                if not token:
                    break
            assert pages == 4
            assert len(counts) == 1
            assert c.read_model.list_loras(LoraFilter(None, "red"), 4).total_size == len(
                [v for v in views[:30] if _matches(v, LoraFilter(None, "red"))]
            )
            assert len(counts) == 2  # another filter is counted on its own
            write_views(c, views[30:])  # a change: every total is counted again
            assert c.read_model.list_loras(LoraFilter(Architecture.SDXL), 4).total_size == 20
            assert len(counts) == 3
            after = c.read_model.position()
            deleted = [
                v.id for v in views if v.metadata.base_model.architecture is Architecture.SDXL
            ][:3]
            assert c.read_model.apply(
                ProjectedChange(after=after, position=after + 1, deletes=deleted)
            )
            assert c.read_model.list_loras(LoraFilter(Architecture.SDXL), 4).total_size == 17
        finally:
            sa_event.remove(c.read_model.engine, "before_cursor_execute", capture)


def read_model_views(n: int) -> list[LoraView]:
    """Views with every field set, or left empty, in turns; some share a name but for case
    (the id breaks the tie in a listing)."""
    offset = dt.timezone(dt.timedelta(hours=5, minutes=30))
    views = []
    for i in range(n):
        created = dt.datetime(2026, 1, 1 + i % 28, 12, i % 60, tzinfo=dt.UTC)
        file = None
        if i % 3 == 0:
            modified = dt.datetime(2025, 6, 1, 8, 30, 15, 123456, tzinfo=offset)
            file = LoraFile(f"dir/{i}.safetensors", 1000 + i, f"{i:064x}", modified)
        metadata = LoraMetadata(
            name=f"name {i // 2:03d}" if i % 2 else f"NAME {i // 2:03d}",
            base_model=BaseModelRef(
                [Architecture.SD1, Architecture.SDXL][i % 2], ["SD 1.5", "SDXL 1.0"][i % 2]
            ),
            file_name=f"file_{i}",
            trigger_words=() if i % 4 == 0 else (f"trig{i}", 'a "quoted", word'),
            tags=(("Red", "blue"), ("red",), ("BLUE",), ())[i % 4],
            description="" if i % 5 == 0 else f"line one\nline two of {i} \u00e9",
            preferred_weight=None if i % 2 else 0.25 * (i % 5),
            training_tags=() if i % 3 else (("1girl", i), ("solo", 2)),
            rank=[0, 8, 32][i % 3],
            downloads=i * 1_000_003,
            kind=LoraKind.EMBEDDING if i % 7 == 0 else LoraKind.LORA,
        )
        views.append(
            LoraView(
                id=str(uuid.UUID(int=i + 1)),
                metadata=metadata,
                source=LoraSource.FILE if file else LoraSource.CATALOG,
                source_id="" if file else f"civitai:{i}",
                file=file,
                available=file is not None,
                create_time=None if i % 11 == 0 else created,
                update_time=None if i % 11 == 0 else created + dt.timedelta(seconds=i),
                version=1 + i % 4,
            )
        )
    return sorted(views, key=lambda v: v.id)


def write_views(c: Container, views: list[LoraView]) -> None:
    """Straight into the read model, as the projector writes a batch."""
    after = c.read_model.position()
    assert c.read_model.apply(ProjectedChange(after=after, position=after + 1, upserts=views))


def _matches(view: LoraView, flt: LoraFilter) -> bool:
    return (
        (flt.architecture is None or view.metadata.base_model.architecture == flt.architecture)
        and (not flt.tag or flt.tag.casefold() in {t.casefold() for t in view.metadata.tags})
        and (not flt.available_only or view.available)
        and (flt.kind is None or view.kind == flt.kind)
    )


def castles() -> tuple[CatalogRecordInput, ...]:
    return tuple(
        CatalogRecordInput(
            source_id=f"castle:{i}",
            name=f"{style} castles",
            base_model="SD 1.5",
            tags=("style", "castle", style),
            trigger_words=(f"{style[:4]}cstl",),
            description=f"{style} stone castles on cliffs at dusk",
            downloads=100,
        )
        for i, style in enumerate(("gothic", "ruined", "fairytale", "medieval", "snowy"))
    )


def confidences(c: Container, prompt: str) -> dict[str, float]:
    """Each LoRA's confidence for `prompt`, best first (the search ranking: writes nothing)."""
    found = c.recommender.search(prompt, Architecture.SD1, 20)
    return {r.lora.id: r.confidence for r in found}


def ranking(scores: dict[str, float]) -> list[str]:
    return list(scores)


class TestSQLite(StorageContract):
    @pytest.fixture
    def url(self, tmp_path: Path) -> str:
        return sqlite_url(tmp_path)

    def test_each_listing_filter_reads_an_index_in_page_order(self, c: Container) -> None:
        """No filter ListLoras offers sorts its matches or scans the table for a page or its
        count (SQLite's plans; PostgreSQL's depend on its statistics)."""
        write_views(c, read_model_views(60))
        engine = c.read_model.engine
        statements: list[tuple[str, Any]] = []

        def capture(*args: Any) -> None:
            statements.append((args[2], args[3]))  # (conn, cursor, statement, parameters, ...)

        filters = [
            LoraFilter(),
            LoraFilter(Architecture.SDXL),
            LoraFilter(None, "red"),
            LoraFilter(available_only=True),
            LoraFilter(kind=LoraKind.EMBEDDING),
        ]
        for flt in filters:
            statements.clear()
            sa_event.listen(engine, "before_cursor_execute", capture)
            try:  # the first page counts (once per catalog change), the second only reads
                first = c.read_model.list_loras(flt, 5)
                c.read_model.list_loras(flt, 5, first.next_page_token)
            finally:
                sa_event.remove(engine, "before_cursor_execute", capture)
            (count,) = [s for s in statements if "count(" in s[0].lower()]
            page = statements[-1]
            with engine.connect() as conn:
                for statement, parameters in (count, page):
                    plan = " | ".join(
                        str(row[-1])
                        for row in conn.exec_driver_sql(
                            "EXPLAIN QUERY PLAN " + statement, parameters
                        ).all()
                    )
                    assert "TEMP B-TREE" not in plan, (flt, plan)
                    assert plan.startswith("SEARCH") or "COVERING INDEX" in plan, (flt, plan)


@pytest.mark.postgres
class TestPostgres(StorageContract):
    @pytest.fixture
    def url(self, tmp_path: Path) -> Iterator[str]:
        with postgres_schema() as url:
            yield url

    def test_every_connection_notices_a_vanished_host(self, c: Container) -> None:
        """Keepalives and a TCP user timeout on the event store's and the read models'
        connections, read back from the kernel's options on their live sockets."""
        datastore = c.store.app.recorder.datastore  # type: ignore[attr-defined]
        with datastore.get_connection() as conn:
            events = _tcp_options(conn.pgconn.socket)
        with c.read_model.engine.connect() as conn:
            dbapi: Any = conn.connection.dbapi_connection  # a psycopg connection
            reads = _tcp_options(dbapi.pgconn.socket)
        expected = {
            "keepalive": POSTGRES_TCP["keepalives"],
            "idle": POSTGRES_TCP["keepalives_idle"],
            "interval": POSTGRES_TCP["keepalives_interval"],
            "count": POSTGRES_TCP["keepalives_count"],
            "user_timeout_ms": POSTGRES_TCP["tcp_user_timeout"],
        }
        assert events == expected
        assert reads == expected


def _tcp_options(fd: int) -> dict[str, int]:
    s = socket.socket(fileno=os.dup(fd))
    try:
        return {
            "keepalive": s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            "idle": s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            "interval": s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            "count": s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            "user_timeout_ms": s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
        }
    finally:
        s.close()


def test_listeners_run_before_waiters_wake(tmp_path: Path) -> None:
    """A query that waited for a position must not find a cache entry or an index that
    predates it: the projector calls its listeners before it publishes the position."""
    c = make_container(tmp_path)
    try:
        seen: list[tuple[int, int]] = []
        c.projector.on_change(lambda change: seen.append((c.projector.position, change.position)))
        result = c.commands.dispatch(
            ImportLoRACatalogCommand(records=catalog(2)), DispatchContext()
        )
        c.projector.wait_for(result.position, 10)
        assert seen
        assert all(published < applied for published, applied in seen)
        cached = c.queries.dispatch(GetAllLoRAsQuery()).data
        assert cached.total_size == 2
        more = c.commands.dispatch(
            ImportLoRACatalogCommand(records=catalog(5, "more")), DispatchContext()
        )
        fresh = c.queries.dispatch(
            GetAllLoRAsQuery(), DispatchContext(min_position=more.position)
        ).data
        assert fresh.total_size == 7
    finally:
        c.close()


def _topic(cls: type[Any]) -> str:
    return f"{cls.__module__}:"
