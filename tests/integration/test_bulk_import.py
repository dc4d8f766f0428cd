"""ImportLoraCatalog at storage speed, on every back end (SQLite file and PostgreSQL): a batch
is written in a fixed number of transactions whatever its size, an unchanged re-import writes
no LoRA event and rebuilds no aggregate one by one, and the projector applies a batch in one
transaction, building the aggregates a batch creates from the batch itself. Counted through
the store's recorder, never timed."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.application.commands import (
    CatalogRecordInput,
    DeleteLoRACommand,
    ImportLoRACatalogCommand,
)
from server.application.commands.idempotency import fingerprint
from server.application.context import DispatchContext
from server.bootstrap import Container
from server.domain.lora import CommandRecord, lora_id_for_source
from server.domain.models import EventFilter, LoraFilter
from server.infrastructure import read_model as read_model_module
from tests.integration.test_storage_contract import catalog
from tests.support import make_container, postgres_schema, sqlite_url

BIG = 2500  # more than two bulk-read chunks (1,000 aggregates each)


def import_catalog(c: Container, records: tuple[CatalogRecordInput, ...], request_id: str) -> Any:
    return c.commands.dispatch(
        ImportLoRACatalogCommand(records=records), DispatchContext(request_id=request_id)
    ).unwrap()


def spy(c: Container, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts the recorder's writes (one transaction each) and its one-aggregate reads."""
    calls: Counter[str] = Counter()
    recorder = c.store.app.recorder
    for name in ("insert_events", "select_events"):
        original = getattr(recorder, name)

        def counted(*args: Any, _name: str = name, _original: Any = original, **kw: Any) -> Any:
            calls[_name] += 1
            return _original(*args, **kw)

        monkeypatch.setattr(recorder, name, counted)
    return calls


def changed(record: CatalogRecordInput) -> CatalogRecordInput:
    return dataclasses.replace(record, description=record.description + " (new)")


class BulkImportContract:
    @pytest.fixture
    def url(self, tmp_path: Path) -> Iterator[str]:
        raise NotImplementedError

    @pytest.fixture
    def c(self, tmp_path: Path, url: str) -> Iterator[Container]:
        container = make_container(tmp_path, url, start_projector=False)
        yield container
        container.close()

    def test_a_batch_is_written_in_two_transactions_whatever_its_size(
        self, c: Container, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        calls = spy(c, monkeypatch)
        before = c.store.max_position()
        assert import_catalog(c, catalog(BIG), "bulk").created == BIG
        # The LoRAs' events with the request's record, then the note of the answer's position.
        assert calls["insert_events"] == 2
        # Only the idempotency lookups (the per-principal key, then the legacy one).
        assert calls["select_events"] <= 2
        assert c.store.max_position() - before == BIG + 2

    def test_an_unchanged_reimport_writes_no_lora_event_and_rebuilds_none(
        self, c: Container, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import_catalog(c, catalog(BIG), "first")
        c.projector.catch_up()
        calls = spy(c, monkeypatch)
        before = c.store.max_position()
        rebuilt = Counter[str]()
        get_many = c.store.get_many

        def counted_get_many(ids: Any, **kw: Any) -> Any:
            ids = list(ids)
            rebuilt["aggregates"] += len(ids)
            return get_many(ids, **kw)

        monkeypatch.setattr(c.store, "get_many", counted_get_many)
        result = import_catalog(c, catalog(BIG), "again")
        assert (result.created, result.updated, result.unchanged) == (0, 0, BIG)
        assert rebuilt["aggregates"] == 0  # the read model showed every one at its version
        assert calls["select_events"] <= 2
        assert calls["insert_events"] == 2
        written = c.store.notifications(before, 100)
        assert len(written) == 2
        assert all(
            n.topic.startswith(f"{CommandRecord.__module__}:CommandRecord.") for n in written
        )

    def test_a_lagging_read_model_still_finds_unchanged_records_in_bulk(
        self, c: Container, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import_catalog(c, catalog(BIG), "first")  # not projected: the read model is empty
        calls = spy(c, monkeypatch)
        before = c.store.max_position()
        result = import_catalog(c, catalog(BIG), "again")
        assert (result.created, result.updated, result.unchanged) == (0, 0, BIG)
        assert calls["select_events"] <= 2  # rebuilt from bulk reads, not one by one
        assert c.store.max_position() - before == 2

    @pytest.mark.parametrize("projected", [True, False])
    def test_changed_and_deleted_records_are_updated(self, c: Container, projected: bool) -> None:
        records = catalog(10)
        import_catalog(c, records, "first")
        c.projector.catch_up()
        deleted = str(lora_id_for_source(records[0].source_id))
        c.commands.dispatch(DeleteLoRACommand(lora_id=deleted), DispatchContext()).unwrap()
        if projected:
            c.projector.catch_up()
        again = (*records[:7], *(changed(r) for r in records[7:]))
        result = import_catalog(c, again, "again")
        # The deleted record comes back (as it did before bulk reads), three have new text.
        assert (result.created, result.updated, result.unchanged) == (0, 4, 6)
        c.projector.catch_up()
        views = {v.source_id: v for v in c.read_model.all_views()}
        assert len(views) == 10
        assert views[records[0].source_id].version == 3  # Registered, Deleted, RecordUpdated
        assert views[records[9].source_id].metadata.description.endswith("(new)")
        assert views[records[9].source_id].version == 2

    def test_records_repeated_in_one_batch_compare_with_the_pending_change(
        self, c: Container
    ) -> None:
        (record,) = catalog(1)
        import_catalog(c, (record,), "first")
        c.projector.catch_up()
        result = import_catalog(c, (changed(record), record), "twice")
        assert (result.created, result.updated, result.unchanged) == (0, 2, 0)

    def test_the_projector_builds_new_aggregates_from_the_batch(
        self, c: Container, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        records = catalog(BIG)
        import_catalog(c, records, "first")
        read: list[int] = []
        get_many = c.store.get_many

        def counted_get_many(ids: Any, **kw: Any) -> Any:
            ids = list(ids)
            read.append(len(ids))
            return get_many(ids, **kw)

        monkeypatch.setattr(c.store, "get_many", counted_get_many)
        monkeypatch.setattr(c.store, "get_at", lambda *_: pytest.fail("read one by one"))
        c.projector.catch_up()
        assert read == []  # every LoRA began in the batch that projected it
        assert c.read_model.list_loras(LoraFilter(), 1).total_size == BIG
        import_catalog(c, tuple(changed(r) for r in records[:5]), "some")
        c.projector.catch_up()
        # One bulk read each: the handler's of the five that change, then the projector's of
        # their versions before the batch.
        assert read == [5, 5]
        views = {v.source_id: v for v in c.read_model.all_views()}
        assert all(views[r.source_id].version == 2 for r in records[:5])
        assert all(views[r.source_id].version == 1 for r in records[5:])
        assert views[records[0].source_id].metadata.description.endswith("(new)")

    def test_the_projector_applies_a_batch_atomically(
        self, c: Container, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import_catalog(c, catalog(50), "first")
        start = c.read_model.position()
        original = read_model_module._audit_row
        rows = Counter[str]()

        def failing(*args: Any) -> Any:
            rows["audit"] += 1
            if rows["audit"] == 30:
                raise RuntimeError("disk full")
            return original(*args)

        monkeypatch.setattr(read_model_module, "_audit_row", failing)
        with pytest.raises(RuntimeError):
            c.projector.catch_up()
        # Nothing of the batch landed: no LoRA, no audit row, the tracking position unmoved.
        assert c.read_model.position() == start
        assert c.read_model.list_loras(LoraFilter(), 1).total_size == 0
        assert c.read_model.events(EventFilter(), 100).items == ()
        monkeypatch.setattr(read_model_module, "_audit_row", original)
        c.projector.catch_up()
        assert c.read_model.list_loras(LoraFilter(), 1).total_size == 50
        assert len(c.read_model.events(EventFilter(), 100).items) == 50

    def test_search_sees_a_batch_the_index_has_only_queued(self, c: Container) -> None:
        record = dataclasses.replace(
            catalog(1)[0], name="Zanzibar ink", trigger_words=("zanzibarink",)
        )
        import_catalog(c, (record,), "first")
        c.projector.catch_up()
        assert c.recommender.queued == 1  # projected, visible, not indexed yet
        found = c.recommender.search("zanzibarink", None, 5)
        assert [r.lora.source_id for r in found] == [record.source_id]
        assert c.recommender.queued == 0


class TestSQLite(BulkImportContract):
    @pytest.fixture
    def url(self, tmp_path: Path) -> str:
        return sqlite_url(tmp_path)


@pytest.mark.postgres
class TestPostgres(BulkImportContract):
    @pytest.fixture
    def url(self, tmp_path: Path) -> Iterator[str]:
        with postgres_schema() as url:
            yield url


def test_fingerprints_match_those_stored_before() -> None:
    """Records stored by earlier versions were fingerprinted through dataclasses.asdict."""
    command = ImportLoRACatalogCommand(records=catalog(20))
    text = json.dumps(
        [type(command).__name__, dataclasses.asdict(command)], sort_keys=True, default=str
    )
    assert fingerprint(command) == hashlib.sha256(text.encode()).hexdigest()
