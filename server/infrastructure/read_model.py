"""Read models: denormalised tables projected from the event log, in the same database.
One SQLAlchemy Core implementation serves SQLite and PostgreSQL alike."""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from server.domain.errors import UnavailableError
from server.domain.generation import GenerationState, GenerationView, ImageRecord
from server.domain.lora import metadata_to_dict
from server.domain.models import (
    Architecture,
    AuditEntry,
    BaseModelRef,
    EventFilter,
    FileEntry,
    HistoryEntry,
    LoraFile,
    LoraFilter,
    LoraKind,
    LoraMetadata,
    LoraSource,
    LoraView,
    Page,
    aware,
)
from server.domain.recommend.feedback import Feedback, MadeRecommendation
from server.domain.tokens import TokenSigner, typed
from server.infrastructure.storage_url import POSTGRES_TCP, StorageUrl

metadata = sa.MetaData()

# One column per field of a LoraView, so rows become views without decoding a document per
# row (the lists are short JSON arrays, "[]" mostly); times are ISO 8601 text, which keeps
# their offset on SQLite too. Listings are keyset-paged on (name_key, id): each filter
# ListLoras offers has an index that leads with it and ends in that order, so a page is read
# in order and stops after page_size + 1 rows, and its count reads only the index.
loras = sa.Table(
    "rm_loras",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("name_key", sa.String(512), nullable=False),
    sa.Column("architecture", sa.String(16), nullable=False),
    # LORA or EMBEDDING (domain.models.LoraKind).
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("available", sa.Boolean, nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("source_id", sa.String(256), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("file_path", sa.String(4096), nullable=False),
    sa.Column("file_name_key", sa.String(512), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("lineage", sa.Text, nullable=False),
    sa.Column("file_name", sa.Text, nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("trigger_words", sa.Text, nullable=False),  # JSON array of strings
    sa.Column("tags", sa.Text, nullable=False),  # JSON array of strings, as written
    sa.Column("training_tags", sa.Text, nullable=False),  # JSON array of [tag, count]
    sa.Column("preferred_weight", sa.Float, nullable=True),
    sa.Column("rank", sa.Integer, nullable=False),
    sa.Column("downloads", sa.BigInteger, nullable=False),
    # The file's size and modification time; NULL for a LoRA without a file.
    sa.Column("file_size", sa.BigInteger, nullable=True),
    sa.Column("file_modified", sa.String(64), nullable=True),
    sa.Column("create_time", sa.String(64), nullable=True),
    sa.Column("update_time", sa.String(64), nullable=True),
    sa.Index("rm_loras_order", "name_key", "id"),
    sa.Index("rm_loras_arch", "architecture", "name_key", "id"),
    sa.Index("rm_loras_kind", "kind", "name_key", "id"),
    sa.Index("rm_loras_available", "available", "name_key", "id"),
    sa.Index("rm_loras_sha", "sha256"),
    sa.Index("rm_loras_path", "file_path"),
    sa.Index("rm_loras_file_name", "file_name_key"),
)

# A LoRA's case-folded tags, with its name_key: a tag's listing is read in page order from
# the primary key alone, joined to rm_loras only for the page's rows. The key is the page
# order (a LoRA has one name_key, so (tag_key, lora_id) stays unique) and, on SQLite, the
# table itself (WITHOUT ROWID): two B-trees per row instead of four, the costliest insert of
# an import.
lora_tags = sa.Table(
    "rm_lora_tags",
    metadata,
    sa.Column("lora_id", sa.String(36), nullable=False),
    sa.Column("tag_key", sa.String(256), nullable=False),
    sa.Column("name_key", sa.String(512), nullable=False),
    sa.PrimaryKeyConstraint("tag_key", "name_key", "lora_id", name="rm_lora_tags_page"),
    sa.Index("rm_lora_tags_lora", "lora_id"),
    sqlite_with_rowid=False,
)

audit_events = sa.Table(
    "rm_audit_events",
    metadata,
    sa.Column("position", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("aggregate_id", sa.String(36), nullable=False),
    sa.Column("aggregate_version", sa.Integer, nullable=False),
    sa.Column("type", sa.String(128), nullable=False),
    sa.Column("principal", sa.String(256), nullable=False),
    sa.Column("request_id", sa.String(256), nullable=False),
    sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("data_json", sa.Text, nullable=False),
    # Who may see it: "" for the catalog's events (everyone), a generation's owner for its
    # events, and the actor for the rest (recommendations, the server's prompt history).
    sa.Column("owner", sa.String(256), nullable=False),
    sa.Index("rm_audit_aggregate", "aggregate_id", "position"),
    sa.Index("rm_audit_type", "type", "position"),
    sa.Index("rm_audit_principal", "principal", "position"),
    # A principal's recent recommendations, for linking generations to them (projector).
    sa.Index("rm_audit_principal_type", "principal", "type", "position"),
    sa.Index("rm_audit_time", "occurred_at"),
    sa.Index("rm_audit_owner", "owner", "position"),
)

generation_history = sa.Table(
    "rm_generation_history",
    metadata,
    sa.Column("position", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("prompt", sa.Text, nullable=False),
    sa.Column("lora_ids", sa.Text, nullable=False),
)

# What answered recommendations taught (server.domain.recommend.feedback), one row per
# recommendation, at the position of the generation's history record that answered it.
recommendation_feedback = sa.Table(
    "rm_recommendation_feedback",
    metadata,
    sa.Column("position", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("recommendation_id", sa.String(36), nullable=False, unique=True),
    sa.Column("prompt", sa.Text, nullable=False),
    sa.Column("accepted", sa.Text, nullable=False),
    sa.Column("skipped", sa.Text, nullable=False),
)

generations = sa.Table(
    "rm_generations",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("view_json", sa.Text, nullable=False),
    sa.Column("owner", sa.String(256), nullable=False),
    sa.Index("rm_generations_order", "created_at", "id"),
    sa.Index("rm_generations_state", "state", "created_at", "id"),
    sa.Index("rm_generations_owner", "owner", "created_at", "id"),
)

tracking = sa.Table(
    "rm_tracking",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("position", sa.BigInteger, nullable=False),
)

schema = sa.Table(
    "rm_schema",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
)

TRACKING_NAME = "catalog"
# Bump when an rm_* table changes: a database at another version has its read models dropped
# and rebuilt from the event log (they are projections; there is nothing to migrate).
SCHEMA_VERSION = 5  # 3: rm_loras.kind; 4: a column per view field, the paging keys;
# 5: rm_recommendation_feedback
SCHEMA_NAME = "read_model"


@dataclass(frozen=True, slots=True)
class ProjectedChange:
    """One projected batch: LoRAs to upsert or delete and audit rows, from the event after
    `after` up to `position`."""

    after: int
    position: int
    upserts: Sequence[LoraView] = ()
    deletes: Sequence[str] = ()
    audit: Sequence[AuditEntry] = ()
    history: Sequence[HistoryEntry] = ()
    generations: Sequence[GenerationView] = ()
    feedback: Sequence[Feedback] = ()
    # Aggregates of the catalog (LoRAs): their audit events are everyone's to see.
    catalog: frozenset[str] = frozenset()


# The columns a LoraView is read from, in the order `_view` takes them.
VIEW_COLUMNS = (
    loras.c.id,
    loras.c.name,
    loras.c.architecture,
    loras.c.lineage,
    loras.c.file_name,
    loras.c.trigger_words,
    loras.c.tags,
    loras.c.description,
    loras.c.preferred_weight,
    loras.c.training_tags,
    loras.c.rank,
    loras.c.downloads,
    loras.c.kind,
    loras.c.source,
    loras.c.source_id,
    loras.c.file_path,
    loras.c.file_size,
    loras.c.sha256,
    loras.c.file_modified,
    loras.c.available,
    loras.c.create_time,
    loras.c.update_time,
    loras.c.version,
)
_ARCHITECTURES = {a.value: a for a in Architecture}
_KINDS = {k.value: k for k in LoraKind}
_SOURCES = {s.value: s for s in LoraSource}


def _view(row: Sequence[Any]) -> LoraView:
    """A LoraView from a row of VIEW_COLUMNS."""
    (
        lora_id,
        name,
        architecture,
        lineage,
        file_name,
        trigger_words,
        tags,
        description,
        preferred_weight,
        training_tags,
        rank,
        downloads,
        kind,
        source,
        source_id,
        file_path,
        file_size,
        sha256,
        file_modified,
        available,
        create_time,
        update_time,
        version,
    ) = row
    return LoraView(
        id=lora_id,
        metadata=LoraMetadata(
            name=name,
            base_model=BaseModelRef(_ARCHITECTURES[architecture], lineage),
            file_name=file_name,
            trigger_words=_strings(trigger_words),
            tags=_strings(tags),
            description=description,
            preferred_weight=None if preferred_weight is None else float(preferred_weight),
            training_tags=(
                ()
                if training_tags == "[]"
                else tuple((str(t), int(c)) for t, c in json.loads(training_tags))
            ),
            rank=int(rank),
            downloads=int(downloads),
            kind=_KINDS[kind],
        ),
        source=_SOURCES[source],
        source_id=source_id,
        file=(
            None
            if file_size is None
            else LoraFile(file_path, int(file_size), sha256, _time(file_modified))
        ),
        available=bool(available),
        create_time=None if create_time is None else _time(create_time),
        update_time=None if update_time is None else _time(update_time),
        version=int(version),
    )


_GET = sa.select(*VIEW_COLUMNS).where(loras.c.id == sa.bindparam("lora_id"))


@functools.cache
def _listing(
    architecture: bool, kind: bool, available: bool, tag: bool, after: bool
) -> tuple[sa.Select[Any], sa.Select[Any]]:
    """The count and the page statements of a listing with these filters, made once per
    combination with bound parameters (architecture, kind, tag, after_name, after_id, limit):
    building a 23-column select per call cost four times its execution on SQLite.

    A tag's listing walks rm_lora_tags in page order (its own copy of name_key), any other
    one rm_loras through the index of its first filter; the count reads the same index."""
    where: list[sa.ColumnElement[bool]] = []
    if architecture:
        where.append(loras.c.architecture == sa.bindparam("architecture"))
    if kind:
        where.append(loras.c.kind == sa.bindparam("kind"))
    if available:
        where.append(loras.c.available == sa.true())  # `IS` would not use the index
    source: sa.FromClause = loras
    name_key, lora_id = loras.c.name_key, loras.c.id
    if tag:
        name_key, lora_id = lora_tags.c.name_key, lora_tags.c.lora_id
        where.append(lora_tags.c.tag_key == sa.bindparam("tag"))
        source = lora_tags.join(loras, loras.c.id == lora_tags.c.lora_id)
    # A tag alone is counted from its index, without the join.
    counted = lora_tags if tag and len(where) == 1 else source
    count = sa.select(sa.func.count()).select_from(counted).where(*where)
    page_where = list(where)
    if after:
        bound = sa.tuple_(sa.bindparam("after_name"), sa.bindparam("after_id"))
        page_where.append(sa.tuple_(name_key, lora_id) > bound)
    page = (
        sa.select(*VIEW_COLUMNS)
        .select_from(source)
        .where(*page_where)
        .order_by(name_key, lora_id)
        .limit(sa.bindparam("limit"))
    )
    return count, page


def _strings(text: str) -> tuple[str, ...]:
    return () if text == "[]" else tuple(json.loads(text))


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _after_lora(p: dict[str, Any]) -> tuple[str, str]:
    return typed(p, "n", str), typed(p, "i", str)


def _after_event(p: dict[str, Any]) -> int:
    position = typed(p, "p", int)
    if not 0 <= position < 2**63:
        raise ValueError("position out of range")
    return position


def _after_generation(p: dict[str, Any]) -> tuple[datetime, str]:
    created = datetime.fromisoformat(typed(p, "t", str))
    if created.tzinfo is None:
        raise ValueError("naive time")
    return created, typed(p, "i", str)


def read_model_engine(url: StorageUrl) -> Engine:
    """An engine on the read models' database (also where the token key is kept)."""
    kwargs: dict[str, Any] = {"future": True}
    if url.kind == "memory":
        kwargs["poolclass"] = sa.StaticPool
        kwargs["connect_args"] = {"check_same_thread": False}
    elif url.kind == "sqlite":
        kwargs["connect_args"] = {"timeout": 10, "check_same_thread": False}
    else:
        kwargs["pool_pre_ping"] = True
        kwargs["connect_args"] = {
            **POSTGRES_TCP,
            "connect_timeout": 2,
            "options": f"-c search_path={url.schema}",
        }
    engine = sa.create_engine(url.sqlalchemy_url(), **kwargs)
    if url.kind == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    return engine


class _BulkInsert:
    """A table's INSERT compiled once for the engine's dialect and run as one executemany,
    each value passed through its column's bind processor: SQLAlchemy's per-row parameter
    building cost a third as much as SQLite's own inserts on a 2,000-record import batch."""

    def __init__(self, table: sa.Table, dialect: sa.Dialect) -> None:
        compiled = table.insert().compile(dialect=dialect)
        self.sql = compiled.string
        self.names = tuple(compiled.positiontup or ()) if compiled.positional else ()
        if not self.names:
            self.names = tuple(c.name for c in table.columns)
        self.positional = compiled.positional
        processors = {c.name: c.type.bind_processor(dialect) for c in table.columns}
        self.processors = [(name, p) for name, p in processors.items() if p is not None]

    def run(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            return
        for name, process in self.processors:
            for row in rows:
                row[name] = process(row[name])
        if self.positional:
            names = self.names
            conn.exec_driver_sql(self.sql, [tuple(row[n] for n in names) for row in rows])
        else:
            conn.exec_driver_sql(self.sql, list(rows))


class _Totals:
    """ListLoras' `total_size` per filter, counted once per catalog change rather than on
    every page: counting reads every matching index entry, which at a million LoRAs costs more
    than the page. A count that began before a change finished is not kept (the generation
    moved on while it ran)."""

    MAX_FILTERS = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._generation = 0
        self._counts: dict[tuple[str, bool], int] = {}

    def get(self, key: tuple[str, bool]) -> tuple[int | None, int]:
        with self._lock:
            return self._counts.get(key), self._generation

    def put(self, key: tuple[str, bool], total: int, generation: int) -> None:
        with self._lock:
            if generation != self._generation:
                return
            if len(self._counts) >= self.MAX_FILTERS:  # tags are the caller's: stay bounded
                self._counts.clear()
            self._counts[key] = total

    def forget(self) -> None:
        with self._lock:
            self._generation += 1
            self._counts.clear()


class SqlReadModel:
    def __init__(self, url: StorageUrl, tokens: TokenSigner) -> None:
        self.engine: Engine = read_model_engine(url)
        self._tokens = tokens
        self._totals = _Totals()
        self._inserts = {
            t.name: _BulkInsert(t, self.engine.dialect) for t in (loras, lora_tags, audit_events)
        }
        # The in-memory database is one SQLite connection every thread shares (StaticPool):
        # a read and the projector's commit interleaved on it fail ("cannot rollback - no
        # transaction is active"), so there each use of it holds this lock.
        self._serial: AbstractContextManager[Any] = (
            threading.RLock() if url.kind == "memory" else nullcontext()
        )
        try:
            self.rebuilt = _ensure_schema(self.engine)
        except (OperationalError, DBAPIError) as exc:
            raise UnavailableError(f"read model unavailable: {exc.orig}") from None

    # -- writes (the projector only) ----------------------------------------------------

    def apply(self, change: ProjectedChange) -> bool:
        """Applies the batch with its tracking position in one transaction. Returns False and
        changes nothing when another projector got there first (tracking moved on)."""
        try:
            return self._apply(change)
        finally:  # after the commit, whoever made it: this process's counts are stale now
            if change.upserts or change.deletes:
                self._totals.forget()

    def _apply(self, change: ProjectedChange) -> bool:
        with self._begin() as conn:
            current = conn.execute(
                sa.select(tracking.c.position)
                .where(tracking.c.name == TRACKING_NAME)
                .with_for_update()
            ).scalar()
            if int(current or 0) != change.after:
                return False
            ids = [v.id for v in change.upserts] + list(change.deletes)
            if ids:
                conn.execute(lora_tags.delete().where(lora_tags.c.lora_id.in_(ids)))
                conn.execute(loras.delete().where(loras.c.id.in_(ids)))
            if change.upserts:
                self._inserts[loras.name].run(conn, [_lora_row(v) for v in change.upserts])
                tag_rows = sorted(  # in key order: each insert lands next to the last one
                    (
                        {"lora_id": v.id, "tag_key": tag, "name_key": v.metadata.name.casefold()}
                        for v in change.upserts
                        for tag in {t.casefold() for t in v.metadata.tags}
                    ),
                    key=lambda r: (r["tag_key"], r["name_key"], r["lora_id"]),
                )
                self._inserts[lora_tags.name].run(conn, tag_rows)
            if change.audit:
                owners = {g.id: g.owner for g in change.generations}
                self._inserts[audit_events.name].run(
                    conn, [_audit_row(a, owners, change.catalog) for a in change.audit]
                )
            if change.history:
                conn.execute(
                    generation_history.insert(),
                    [
                        {
                            "position": h.position,
                            "prompt": h.prompt,
                            "lora_ids": json.dumps(list(h.lora_ids)),
                        }
                        for h in change.history
                    ],
                )
            if change.feedback:
                conn.execute(
                    recommendation_feedback.insert(),
                    [
                        {
                            "position": f.position,
                            "recommendation_id": f.recommendation_id,
                            "prompt": f.prompt,
                            "accepted": json.dumps(list(f.accepted)),
                            "skipped": json.dumps(list(f.skipped)),
                        }
                        for f in change.feedback
                    ],
                )
            if change.generations:
                ids = [g.id for g in change.generations]
                conn.execute(generations.delete().where(generations.c.id.in_(ids)))
                conn.execute(generations.insert(), [_generation_row(g) for g in change.generations])
            updated = conn.execute(
                tracking.update()
                .where(tracking.c.name == TRACKING_NAME)
                .values(position=change.position)
            )
            if updated.rowcount == 0:
                conn.execute(tracking.insert().values(name=TRACKING_NAME, position=change.position))
        return True

    def reset(self) -> None:
        """Empties every read model so the projector rebuilds them from the event log."""
        with self._begin() as conn:
            for table in (
                lora_tags,
                loras,
                audit_events,
                generation_history,
                recommendation_feedback,
                generations,
                tracking,
            ):
                conn.execute(table.delete())
        self._totals.forget()

    # -- reads ---------------------------------------------------------------------------

    def position(self) -> int:
        with self._connect() as conn:
            value = conn.execute(
                sa.select(tracking.c.position).where(tracking.c.name == TRACKING_NAME)
            ).scalar()
        return int(value or 0)

    def get(self, lora_id: str) -> LoraView | None:
        with self._connect() as conn:
            row = conn.execute(_GET, {"lora_id": lora_id}).first()
        return None if row is None else _view(row)

    def views_by_id(self, lora_ids: Sequence[str]) -> dict[str, LoraView]:
        """The views of those of `lora_ids` the read model holds, in one query (the few a
        recommendation returns: the index keeps no views of its own)."""
        if not lora_ids:
            return {}
        with self._connect() as conn:
            rows = conn.execute(
                sa.select(*VIEW_COLUMNS).where(loras.c.id.in_(list(lora_ids)))
            ).all()
        views = (_view(row) for row in rows)
        return {view.id: view for view in views}

    def lora_metadata(self, lora_ids: Sequence[str]) -> dict[str, tuple[int, dict[str, Any]]]:
        """(version, metadata as events carry it) of each LoRA among `lora_ids` the read
        model holds, a thousand per query."""
        out: dict[str, tuple[int, dict[str, Any]]] = {}
        with self._connect() as conn:
            for start in range(0, len(lora_ids), 1000):
                rows = conn.execute(
                    sa.select(*VIEW_COLUMNS).where(loras.c.id.in_(lora_ids[start : start + 1000]))
                ).all()
                for row in rows:
                    view = _view(row)
                    out[view.id] = (view.version, metadata_to_dict(view.metadata))
        return out

    def find_by_sha256(self, sha256: str) -> LoraView | None:
        with self._connect() as conn:
            row = conn.execute(
                sa.select(*VIEW_COLUMNS).where(loras.c.sha256 == sha256).limit(1)
            ).first()
        return None if row is None else _view(row)

    def find_by_path(self, path: str) -> LoraView | None:
        with self._connect() as conn:
            row = conn.execute(
                sa.select(*VIEW_COLUMNS)
                .where(loras.c.file_path == path)
                .where(loras.c.source == LoraSource.FILE.value)
                .limit(1)
            ).first()
        return None if row is None else _view(row)

    def find_by_file_name(self, file_name: str) -> list[LoraView]:
        return self._find(loras.c.file_name_key, file_name)

    def find_by_name(self, name: str) -> list[LoraView]:
        """LoRAs whose display name (the one `loras list` shows) is `name`, case aside."""
        return self._find(loras.c.name_key, name)

    def embeddings(self, architecture: Architecture) -> list[LoraView]:
        """The available textual-inversion embeddings of `architecture` (a prompt may name
        any of them)."""
        with self._connect() as conn:
            rows = conn.execute(
                sa.select(*VIEW_COLUMNS)
                .where(loras.c.kind == LoraKind.EMBEDDING.value)
                .where(loras.c.architecture == architecture.value)
                .where(loras.c.available.is_(True))
                .order_by(loras.c.id)
            ).all()
        return [_view(r) for r in rows]

    def _find(self, key: sa.Column[str], value: str) -> list[LoraView]:
        """LoRAs whose case-folded `key` column equals `value`, those with a file first."""
        with self._connect() as conn:
            rows = conn.execute(
                sa.select(*VIEW_COLUMNS)
                .where(key == value.casefold())
                .order_by(loras.c.available.desc(), loras.c.id)
            ).all()
        return [_view(r) for r in rows]

    def list_loras(self, flt: LoraFilter, page_size: int, page_token: str = "") -> Page[LoraView]:
        """Keyset-paged on (name_key, id), with the statements of `_listing`."""
        filter_key = f"{flt.architecture}|{flt.tag.casefold()}|{flt.available_only}"
        if flt.kind is not None:  # (the key of a listing of every kind is unchanged)
            filter_key += f"|{flt.kind}"
        params: dict[str, Any] = {"limit": page_size + 1}
        if flt.architecture is not None:
            params["architecture"] = flt.architecture.value
        if flt.kind is not None:
            params["kind"] = flt.kind.value
        if flt.tag:
            params["tag"] = flt.tag.casefold()
        if page_token:
            params["after_name"], params["after_id"] = self._tokens.page_position(
                page_token, filter_key, _after_lora
            )
        count, page = _listing(
            flt.architecture is not None,
            flt.kind is not None,
            flt.available_only,
            bool(flt.tag),
            bool(page_token),
        )
        count_key = (filter_key, flt.available_only)
        total, generation = self._totals.get(count_key)
        with self._connect() as conn:
            if total is None:
                total = int(conn.execute(count, params).scalar_one())
                self._totals.put(count_key, total, generation)
            rows = conn.execute(page, params).all()
        views = tuple(_view(r) for r in rows[:page_size])
        token = ""
        if len(rows) > page_size:  # name_key is the name case-folded (_lora_row)
            last = views[-1]
            token = self._tokens.page_token(filter_key, n=last.name.casefold(), i=last.id)
        return Page(views, token, int(total))

    def all_views(self, batch: int = 2000) -> Iterable[LoraView]:
        """Every catalogued LoRA, streamed in id order (for indexes that follow the catalog)."""
        last = ""
        while True:
            with self._connect() as conn:
                rows = conn.execute(
                    sa.select(*VIEW_COLUMNS)
                    .where(loras.c.id > last)
                    .order_by(loras.c.id)
                    .limit(batch)
                ).all()
            if not rows:
                return
            for row in rows:
                yield _view(row)
            last = rows[-1][0]

    def history(self, batch: int = 5000) -> Iterable[HistoryEntry]:
        """Every recorded generation, oldest first."""
        last = 0
        while True:
            with self._connect() as conn:
                rows = (
                    conn.execute(
                        sa.select(generation_history)
                        .where(generation_history.c.position > last)
                        .order_by(generation_history.c.position)
                        .limit(batch)
                    )
                    .mappings()
                    .all()
                )
            if not rows:
                return
            for row in rows:
                yield HistoryEntry(
                    int(row["position"]), row["prompt"], tuple(json.loads(row["lora_ids"]))
                )
            last = int(rows[-1]["position"])

    def feedback(
        self, batch: int = 5000, *, after: int = 0, until: int | None = None
    ) -> Iterable[Feedback]:
        """Every answered recommendation's feedback linked at a position in (after, until],
        oldest first."""
        last = after
        while True:
            with self._connect() as conn:
                rows = (
                    conn.execute(
                        sa.select(recommendation_feedback)
                        .where(recommendation_feedback.c.position > last)
                        .where(
                            sa.true()
                            if until is None
                            else recommendation_feedback.c.position <= until
                        )
                        .order_by(recommendation_feedback.c.position)
                        .limit(batch)
                    )
                    .mappings()
                    .all()
                )
            if not rows:
                return
            for row in rows:
                yield Feedback(
                    int(row["position"]),
                    row["recommendation_id"],
                    row["prompt"],
                    tuple(json.loads(row["accepted"])),
                    tuple(json.loads(row["skipped"])),
                )
            last = int(rows[-1]["position"])

    def has_recommendations(self) -> bool:
        """Whether any recommendation was projected (linking needs none before the first)."""
        with self._connect() as conn:
            found = conn.execute(
                sa.select(audit_events.c.position)
                .where(audit_events.c.type == RECOMMENDATION_MADE)
                .limit(1)
            ).first()
        return found is not None

    def recent_recommendations(
        self, principal: str, since: datetime, until: datetime, limit: int
    ) -> list[MadeRecommendation]:
        """The principal's recorded recommendations made in [since, until], newest first,
        that no generation has answered yet (what a generation may answer)."""
        answered = sa.select(recommendation_feedback.c.recommendation_id)
        with self._connect() as conn:
            rows = (
                conn.execute(
                    sa.select(audit_events)
                    .where(audit_events.c.principal == principal)
                    .where(audit_events.c.type == RECOMMENDATION_MADE)
                    .where(audit_events.c.occurred_at >= since.astimezone(UTC))
                    .where(audit_events.c.occurred_at <= until.astimezone(UTC))
                    .where(audit_events.c.aggregate_id.not_in(answered))
                    .order_by(audit_events.c.position.desc())
                    .limit(limit)
                )
                .mappings()
                .all()
            )
        return [made_recommendation(_audit_entry(r)) for r in rows]

    def files_under(self, root_prefix: str) -> list[FileEntry]:
        """File-backed LoRAs whose path lies in `root_prefix` ("" for the whole root)."""
        query = sa.select(*VIEW_COLUMNS).where(loras.c.source == LoraSource.FILE.value)
        if root_prefix:
            prefix = root_prefix.rstrip("/") + "/"
            query = query.where(loras.c.file_path.startswith(prefix, autoescape=True))
        with self._connect() as conn:
            rows = conn.execute(query).all()
        entries = []
        for row in rows:
            view = _view(row)
            if view.file is not None:
                entries.append(
                    FileEntry(
                        view.id,
                        view.file.path,
                        view.file.size_bytes,
                        view.file.modified_time,
                        view.file.sha256,
                        view.available,
                    )
                )
        return entries

    def events(
        self,
        flt: EventFilter,
        page_size: int,
        page_token: str = "",
        *,
        owner: str | None = None,
    ) -> Page[AuditEntry]:
        """Oldest first. With `owner`, only the catalog's events and that owner's
        generations' (None: every event)."""
        filter_key = "|".join(
            [flt.aggregate_id, flt.type, flt.principal, str(flt.start_time), str(flt.end_time)]
        )
        where = []
        if flt.aggregate_id:
            where.append(audit_events.c.aggregate_id == flt.aggregate_id)
        if flt.type:
            where.append(audit_events.c.type == flt.type)
        if flt.principal:
            where.append(audit_events.c.principal == flt.principal)
        if flt.start_time is not None:
            where.append(audit_events.c.occurred_at >= flt.start_time.astimezone(UTC))
        if flt.end_time is not None:
            where.append(audit_events.c.occurred_at < flt.end_time.astimezone(UTC))
        if owner is not None:
            where.append(audit_events.c.owner.in_(["", owner]))
        if page_token:
            after = self._tokens.page_position(page_token, filter_key, _after_event)
            where.append(audit_events.c.position > after)
        with self._connect() as conn:
            rows = (
                conn.execute(
                    sa.select(audit_events)
                    .where(*where)
                    .order_by(audit_events.c.position)
                    .limit(page_size + 1)
                )
                .mappings()
                .all()
            )
        more = len(rows) > page_size
        entries = tuple(_audit_entry(r) for r in rows[:page_size])
        token = self._tokens.page_token(filter_key, p=entries[-1].position) if more else ""
        return Page(entries, token, 0)

    def get_generation(self, generation_id: str) -> GenerationView | None:
        with self._connect() as conn:
            row = conn.execute(
                sa.select(generations.c.view_json).where(generations.c.id == generation_id)
            ).first()
        return None if row is None else generation_from_json(row[0])

    def list_generations(
        self,
        states: Sequence[GenerationState] = (),
        page_size: int = 50,
        page_token: str = "",
        *,
        owner: str | None = None,
    ) -> Page[GenerationView]:
        """Newest first; keyset-paged on (submission time, id); only `owner`'s unless None."""
        filter_key = ",".join(sorted(s.value for s in states))
        if owner is not None:
            filter_key += f"|{owner}"
        where: list[sa.ColumnElement[bool]] = (
            [generations.c.state.in_([s.value for s in states])] if states else []
        )
        if owner is not None:
            where.append(generations.c.owner == owner)
        page_where = list(where)
        if page_token:
            created, generation_id = self._tokens.page_position(
                page_token, filter_key, _after_generation
            )
            page_where.append(
                sa.or_(
                    generations.c.created_at < created,
                    sa.and_(generations.c.created_at == created, generations.c.id < generation_id),
                )
            )
        with self._connect() as conn:
            total = conn.execute(
                sa.select(sa.func.count()).select_from(generations).where(*where)
            ).scalar_one()
            rows = conn.execute(
                sa.select(generations.c.created_at, generations.c.id, generations.c.view_json)
                .where(*page_where)
                .order_by(generations.c.created_at.desc(), generations.c.id.desc())
                .limit(page_size + 1)
            ).all()
        more = len(rows) > page_size
        rows = rows[:page_size]
        token = ""
        if more:
            last = aware(rows[-1][0])
            token = self._tokens.page_token(filter_key, t=last.isoformat(), i=rows[-1][1])
        return Page(tuple(generation_from_json(r[2]) for r in rows), token, int(total))

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _connect(self) -> Iterator[Connection]:
        with self._serial:
            try:
                conn = self.engine.connect()
            except (OperationalError, DBAPIError) as exc:
                raise UnavailableError(
                    f"read model unavailable: {type(exc.orig).__name__}"
                ) from None
            with conn:
                yield conn

    @contextmanager
    def _begin(self) -> Iterator[Connection]:
        """A connection in a transaction, committed when the block ends (rolled back when
        it raises)."""
        with self._connect() as conn, conn.begin():
            yield conn


def _ensure_schema(engine: Engine) -> bool:
    """Creates the read models; ones at another schema version (or from before versions were
    kept) are dropped first, and the projector, finding no tracking position, rebuilds them
    from the event log. Returns whether it (re)created them."""
    with engine.begin() as conn:
        stored: int | None = None
        if sa.inspect(conn).has_table(schema.name):
            stored = conn.execute(
                sa.select(schema.c.version).where(schema.c.name == SCHEMA_NAME)
            ).scalar()
        rebuilt = stored != SCHEMA_VERSION
        if rebuilt:
            metadata.drop_all(conn)
            metadata.create_all(conn)
            conn.execute(schema.insert().values(name=SCHEMA_NAME, version=SCHEMA_VERSION))
    return rebuilt


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _lora_row(v: LoraView) -> dict[str, Any]:
    m = v.metadata
    return {
        "id": v.id,
        "name_key": m.name.casefold(),
        "architecture": m.base_model.architecture.value,
        "kind": m.kind.value,
        "available": v.available,
        "source": v.source.value,
        "source_id": v.source_id,
        "sha256": v.file.sha256 if v.file else "",
        "file_path": v.file.path if v.file else "",
        "file_name_key": m.file_name.casefold(),
        "version": v.version,
        "name": m.name,
        "lineage": m.base_model.lineage,
        "file_name": m.file_name,
        "description": m.description,
        "trigger_words": _json(list(m.trigger_words)),
        "tags": _json(list(m.tags)),
        "training_tags": _json([[t, c] for t, c in m.training_tags]),
        "preferred_weight": m.preferred_weight,
        "rank": m.rank,
        "downloads": m.downloads,
        "file_size": v.file.size_bytes if v.file else None,
        "file_modified": v.file.modified_time.isoformat() if v.file else None,
        "create_time": v.create_time.isoformat() if v.create_time else None,
        "update_time": v.update_time.isoformat() if v.update_time else None,
    }


def _audit_row(a: AuditEntry, owners: dict[str, str], catalog: frozenset[str]) -> dict[str, Any]:
    if a.aggregate_id in owners:
        owner = owners[a.aggregate_id]
    elif a.aggregate_id in catalog:
        owner = ""
    else:
        owner = a.principal
    return {
        "owner": owner,
        "position": a.position,
        "aggregate_id": a.aggregate_id,
        "aggregate_version": a.aggregate_version,
        "type": a.type,
        "principal": a.principal,
        "request_id": a.request_id,
        "occurred_at": a.occurred_at,
        "data_json": json.dumps(a.data, default=str, separators=(",", ":")),
    }


RECOMMENDATION_MADE = "RecommendationMade"


def made_recommendation(entry: AuditEntry) -> MadeRecommendation:
    """A RecommendationMade audit entry as linking reads it."""
    items = entry.data.get("items")
    lora_ids = (
        tuple(str(i["lora_id"]) for i in items if isinstance(i, dict) and "lora_id" in i)
        if isinstance(items, list)
        else ()
    )
    return MadeRecommendation(
        entry.aggregate_id,
        entry.principal,
        str(entry.data.get("prompt", "")),
        lora_ids,
        entry.occurred_at,
    )


def _audit_entry(row: Any) -> AuditEntry:
    occurred = row["occurred_at"]
    if occurred.tzinfo is None:
        occurred = occurred.replace(tzinfo=UTC)
    return AuditEntry(
        position=int(row["position"]),
        aggregate_id=row["aggregate_id"],
        aggregate_version=int(row["aggregate_version"]),
        type=row["type"],
        principal=row["principal"],
        request_id=row["request_id"],
        occurred_at=occurred,
        data=json.loads(row["data_json"]),
    )


def generation_to_json(g: GenerationView) -> str:
    return json.dumps(
        {
            "id": g.id,
            "state": g.state.value,
            "spec": g.spec,
            "images": [i.to_dict() for i in g.images],
            "error": g.error,
            "timings": g.timings,
            "create_time": g.create_time.isoformat() if g.create_time else None,
            "end_time": g.end_time.isoformat() if g.end_time else None,
            "version": g.version,
            "owner": g.owner,
        },
        separators=(",", ":"),
        default=str,
    )


def generation_from_json(text: str) -> GenerationView:
    d = json.loads(text)
    return GenerationView(
        id=d["id"],
        state=GenerationState(d["state"]),
        spec=d["spec"],
        images=tuple(ImageRecord.from_dict(i) for i in d["images"]),
        error=d["error"],
        timings={k: float(v) for k, v in d["timings"].items()},
        create_time=datetime.fromisoformat(d["create_time"]) if d["create_time"] else None,
        end_time=datetime.fromisoformat(d["end_time"]) if d["end_time"] else None,
        version=int(d["version"]),
        owner=str(d.get("owner", "")),
    )


def _generation_row(g: GenerationView) -> dict[str, Any]:
    return {
        "id": g.id,
        "state": g.state.value,
        "created_at": g.create_time or datetime.now(UTC),
        "view_json": generation_to_json(g),
        "owner": g.owner,
    }
