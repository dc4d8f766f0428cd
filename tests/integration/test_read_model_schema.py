"""The read model's schema version: a database whose rm_* tables predate the generations'
owner columns (as written by the code before them) has its read models dropped and rebuilt
from the event log, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from server.application.commands import CatalogRecordInput, ImportLoRACatalogCommand
from server.application.context import DispatchContext
from server.application.queries import ListEventsQuery, ListGenerationsQuery
from server.domain.generation import Generation
from server.domain.models import Architecture, LoraFilter
from server.infrastructure.read_model import SCHEMA_VERSION
from tests.support import POSTGRES_URL, make_container, postgres_schema, sqlite_url

ALICE = DispatchContext(principal="alice", scopes=frozenset({"read"}))
BOB = DispatchContext(principal="bob", scopes=frozenset({"read"}))

# The two tables as the code before owners created them.
OLD_TABLES = [
    """CREATE TABLE rm_generations (
        id VARCHAR(36) PRIMARY KEY, state VARCHAR(16) NOT NULL,
        created_at TIMESTAMP WITH TIME ZONE NOT NULL, view_json TEXT NOT NULL)""",
    """CREATE TABLE rm_audit_events (
        position BIGINT PRIMARY KEY, aggregate_id VARCHAR(36) NOT NULL,
        aggregate_version INTEGER NOT NULL, type VARCHAR(128) NOT NULL,
        principal VARCHAR(256) NOT NULL, request_id VARCHAR(256) NOT NULL,
        occurred_at TIMESTAMP WITH TIME ZONE NOT NULL, data_json TEXT NOT NULL)""",
]


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield sqlite_url(tmp_path)
        return
    if not POSTGRES_URL:
        pytest.skip("LORACLE_TEST_POSTGRES_URL is not set")
    with postgres_schema() as found:
        yield found


def test_an_old_read_model_is_dropped_and_rebuilt_with_owners(tmp_path: Path, url: str) -> None:
    c = make_container(tmp_path, url)
    gid = str(uuid.uuid4())
    c.store.save(Generation(generation_id=gid, spec={}, principal="alice", request_id=""))
    position = c.store.max_position()
    engine = c.read_model.engine
    c.projector.wait_for(position, 5.0)
    c.projector.stop()
    # Back to the old schema: no rm_schema, the old tables, everything already projected.
    with engine.begin() as conn:
        for table in ("rm_schema", "rm_generations", "rm_audit_events"):
            conn.execute(sa.text(f"DROP TABLE {table}"))
        for ddl in OLD_TABLES:
            conn.execute(sa.text(ddl))
        conn.execute(
            sa.text(
                "INSERT INTO rm_generations VALUES ('stale', 'QUEUED', CURRENT_TIMESTAMP, '{}')"
            )
        )
    c.close()

    reopened = make_container(tmp_path, url)
    try:
        assert reopened.read_model.rebuilt
        reopened.projector.wait_for(reopened.store.max_position(), 10.0)
        mine = reopened.queries.dispatch(ListGenerationsQuery(), ALICE).data
        assert [(v.id, v.owner) for v in mine.items] == [(gid, "alice")]
        assert reopened.queries.dispatch(ListGenerationsQuery(), BOB).data.items == ()
        events = reopened.queries.dispatch(ListEventsQuery(aggregate_id=gid), ALICE).data
        # (Its Failed follows: the restart marks the interrupted generation failed.)
        assert events.items[0].type == "GenerationSubmitted"
        assert reopened.queries.dispatch(ListEventsQuery(aggregate_id=gid), BOB).data.items == ()
        with reopened.read_model.engine.connect() as conn:
            version = conn.execute(sa.text("SELECT version FROM rm_schema")).scalar()
        assert version == SCHEMA_VERSION
    finally:
        reopened.close()
    # At the current version, a restart keeps what it has.
    again = make_container(tmp_path, url)
    try:
        assert not again.read_model.rebuilt
        assert again.read_model.position() >= position
    finally:
        again.close()


# rm_loras and rm_lora_tags as schema 3 created them: the view as one JSON document per row.
SCHEMA_3_LORA_TABLES = [
    """CREATE TABLE rm_loras (
        id VARCHAR(36) PRIMARY KEY, name_key VARCHAR(512) NOT NULL,
        architecture VARCHAR(16) NOT NULL, kind VARCHAR(16) NOT NULL, available BOOLEAN NOT NULL,
        source VARCHAR(16) NOT NULL, source_id VARCHAR(256) NOT NULL, sha256 VARCHAR(64) NOT NULL,
        file_path VARCHAR(4096) NOT NULL, file_name_key VARCHAR(512) NOT NULL,
        version INTEGER NOT NULL, view_json TEXT NOT NULL)""",
    """CREATE TABLE rm_lora_tags (
        lora_id VARCHAR(36) NOT NULL, tag_key VARCHAR(256) NOT NULL,
        PRIMARY KEY (tag_key, lora_id))""",
]


def test_a_schema_3_catalog_is_rebuilt_into_columns(tmp_path: Path, url: str) -> None:
    c = make_container(tmp_path, url)
    records = tuple(
        CatalogRecordInput(
            source_id=f"civitai:{i}", name=f"LoRA {i}", base_model="SDXL 1.0", tags=("Style",)
        )
        for i in range(12)
    )
    result = c.commands.dispatch(
        ImportLoRACatalogCommand(records=records), DispatchContext(request_id="r")
    )
    c.projector.wait_for(result.position, 5.0)
    before = sorted(c.read_model.all_views(), key=lambda v: v.id)
    c.projector.stop()
    with c.read_model.engine.begin() as conn:
        for table in ("rm_loras", "rm_lora_tags"):
            conn.execute(sa.text(f"DROP TABLE {table}"))
        for ddl in SCHEMA_3_LORA_TABLES:
            conn.execute(sa.text(ddl))
        conn.execute(sa.text("UPDATE rm_schema SET version = 3"))
    c.close()

    reopened = make_container(tmp_path, url)
    try:
        assert reopened.read_model.rebuilt
        reopened.projector.wait_for(reopened.store.max_position(), 10.0)
        assert sorted(reopened.read_model.all_views(), key=lambda v: v.id) == before
        page = reopened.read_model.list_loras(LoraFilter(Architecture.SDXL, "style"), 5)
        assert page.total_size == 12
        assert [v.name for v in page.items] == sorted(v.name for v in before)[:5]
    finally:
        reopened.close()
