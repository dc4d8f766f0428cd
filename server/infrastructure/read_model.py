"""Read models: denormalised tables projected from the event log, in the same database.
One SQLAlchemy Core implementation serves SQLite and PostgreSQL alike."""

from __future__ import annotations

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
from server.domain.lora import file_from_dict, file_to_dict, metadata_from_dict, metadata_to_dict
from server.domain.models import (
    Architecture,
    AuditEntry,
    EventFilter,
    FileEntry,
    HistoryEntry,
    LoraFilter,
    LoraKind,
    LoraSource,
    LoraView,
    Page,
    aware,
)
from server.domain.recommend.feedback import Feedback, MadeRecommendation
from server.domain.tokens import TokenSigner, typed
from server.infrastructure.storage_url import POSTGRES_TCP, StorageUrl

metadata = sa.MetaData()

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
    sa.Column("view_json", sa.Text, nullable=False),
    sa.Index("rm_loras_order", "name_key", "id"),
    sa.Index("rm_loras_arch", "architecture", "name_key", "id"),
    sa.Index("rm_loras_kind", "kind", "name_key", "id"),
    sa.Index("rm_loras_sha", "sha256"),
    sa.Index("rm_loras_path", "file_path"),
    sa.Index("rm_loras_file_name", "file_name_key"),
)

lora_tags = sa.Table(
    "rm_lora_tags",
    metadata,
    sa.Column("lora_id", sa.String(36), nullable=False),
    sa.Column("tag_key", sa.String(256), nullable=False),
    sa.PrimaryKeyConstraint("tag_key", "lora_id"),
    sa.Index("rm_lora_tags_lora", "lora_id"),
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
SCHEMA_VERSION = 4  # 3: rm_loras.kind; 4: rm_recommendation_feedback
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


def view_to_json(view: LoraView) -> str:
    return json.dumps(
        {
            "id": view.id,
            "metadata": metadata_to_dict(view.metadata),
            "source": view.source.value,
            "source_id": view.source_id,
            "file": None if view.file is None else file_to_dict(view.file),
            "available": view.available,
            "create_time": view.create_time.isoformat() if view.create_time else None,
            "update_time": view.update_time.isoformat() if view.update_time else None,
            "version": view.version,
        },
        separators=(",", ":"),
    )


def view_from_json(text: str) -> LoraView:
    d = json.loads(text)
    return LoraView(
        id=d["id"],
        metadata=metadata_from_dict(d["metadata"]),
        source=LoraSource(d["source"]),
        source_id=d["source_id"],
        file=None if d["file"] is None else file_from_dict(d["file"]),
        available=bool(d["available"]),
        create_time=datetime.fromisoformat(d["create_time"]) if d["create_time"] else None,
        update_time=datetime.fromisoformat(d["update_time"]) if d["update_time"] else None,
        version=int(d["version"]),
    )


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


class SqlReadModel:
    def __init__(self, url: StorageUrl, tokens: TokenSigner) -> None:
        self.engine: Engine = read_model_engine(url)
        self._tokens = tokens
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
                conn.execute(loras.insert(), [_lora_row(v) for v in change.upserts])
                tag_rows = [
                    {"lora_id": v.id, "tag_key": tag}
                    for v in change.upserts
                    for tag in sorted({t.casefold() for t in v.metadata.tags})
                ]
                if tag_rows:
                    conn.execute(lora_tags.insert(), tag_rows)
            if change.audit:
                owners = {g.id: g.owner for g in change.generations}
                conn.execute(
                    audit_events.insert(),
                    [_audit_row(a, owners, change.catalog) for a in change.audit],
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

    # -- reads ---------------------------------------------------------------------------

    def position(self) -> int:
        with self._connect() as conn:
            value = conn.execute(
                sa.select(tracking.c.position).where(tracking.c.name == TRACKING_NAME)
            ).scalar()
        return int(value or 0)

    def get(self, lora_id: str) -> LoraView | None:
        with self._connect() as conn:
            text = conn.execute(sa.select(loras.c.view_json).where(loras.c.id == lora_id)).scalar()
        return None if text is None else view_from_json(text)

    def lora_metadata(self, lora_ids: Sequence[str]) -> dict[str, tuple[int, dict[str, Any]]]:
        """(version, metadata as events carry it) of each LoRA among `lora_ids` the read
        model holds, a thousand per query."""
        out: dict[str, tuple[int, dict[str, Any]]] = {}
        with self._connect() as conn:
            for start in range(0, len(lora_ids), 1000):
                rows = conn.execute(
                    sa.select(loras.c.id, loras.c.version, loras.c.view_json).where(
                        loras.c.id.in_(lora_ids[start : start + 1000])
                    )
                ).all()
                for lora_id, version, text in rows:
                    out[lora_id] = (int(version), json.loads(text)["metadata"])
        return out

    def find_by_sha256(self, sha256: str) -> LoraView | None:
        with self._connect() as conn:
            text = conn.execute(
                sa.select(loras.c.view_json).where(loras.c.sha256 == sha256).limit(1)
            ).scalar()
        return None if text is None else view_from_json(text)

    def find_by_path(self, path: str) -> LoraView | None:
        with self._connect() as conn:
            text = conn.execute(
                sa.select(loras.c.view_json)
                .where(loras.c.file_path == path)
                .where(loras.c.source == LoraSource.FILE.value)
                .limit(1)
            ).scalar()
        return None if text is None else view_from_json(text)

    def find_by_file_name(self, file_name: str) -> list[LoraView]:
        return self._find(loras.c.file_name_key, file_name)

    def find_by_name(self, name: str) -> list[LoraView]:
        """LoRAs whose display name (the one `loras list` shows) is `name`, case aside."""
        return self._find(loras.c.name_key, name)

    def embeddings(self, architecture: Architecture) -> list[LoraView]:
        """The available textual-inversion embeddings of `architecture` (a prompt may name
        any of them)."""
        with self._connect() as conn:
            rows = (
                conn.execute(
                    sa.select(loras.c.view_json)
                    .where(loras.c.kind == LoraKind.EMBEDDING.value)
                    .where(loras.c.architecture == architecture.value)
                    .where(loras.c.available.is_(True))
                    .order_by(loras.c.id)
                )
                .scalars()
                .all()
            )
        return [view_from_json(t) for t in rows]

    def _find(self, key: sa.Column[str], value: str) -> list[LoraView]:
        """LoRAs whose case-folded `key` column equals `value`, those with a file first."""
        with self._connect() as conn:
            rows = (
                conn.execute(
                    sa.select(loras.c.view_json)
                    .where(key == value.casefold())
                    .order_by(loras.c.available.desc(), loras.c.id)
                )
                .scalars()
                .all()
            )
        return [view_from_json(t) for t in rows]

    def list_loras(self, flt: LoraFilter, page_size: int, page_token: str = "") -> Page[LoraView]:
        filter_key = f"{flt.architecture}|{flt.tag.casefold()}|{flt.available_only}"
        if flt.kind is not None:  # (the key of a listing of every kind is unchanged)
            filter_key += f"|{flt.kind}"
        where = []
        if flt.architecture is not None:
            where.append(loras.c.architecture == flt.architecture.value)
        if flt.kind is not None:
            where.append(loras.c.kind == flt.kind.value)
        if flt.available_only:
            where.append(loras.c.available.is_(True))
        if flt.tag:
            where.append(
                loras.c.id.in_(
                    sa.select(lora_tags.c.lora_id).where(lora_tags.c.tag_key == flt.tag.casefold())
                )
            )
        page_where = list(where)
        if page_token:
            name_key, lora_id = self._tokens.page_position(page_token, filter_key, _after_lora)
            page_where.append(
                sa.tuple_(loras.c.name_key, loras.c.id)
                > sa.tuple_(sa.literal(name_key), sa.literal(lora_id))
            )
        with self._connect() as conn:
            total = conn.execute(
                sa.select(sa.func.count()).select_from(loras).where(*where)
            ).scalar_one()
            rows = conn.execute(
                sa.select(loras.c.name_key, loras.c.id, loras.c.view_json)
                .where(*page_where)
                .order_by(loras.c.name_key, loras.c.id)
                .limit(page_size + 1)
            ).all()
        more = len(rows) > page_size
        rows = rows[:page_size]
        token = self._tokens.page_token(filter_key, n=rows[-1][0], i=rows[-1][1]) if more else ""
        return Page(tuple(view_from_json(r[2]) for r in rows), token, int(total))

    def all_views(self, batch: int = 2000) -> Iterable[LoraView]:
        """Every catalogued LoRA, streamed in id order (for indexes that follow the catalog)."""
        last = ""
        while True:
            with self._connect() as conn:
                rows = conn.execute(
                    sa.select(loras.c.id, loras.c.view_json)
                    .where(loras.c.id > last)
                    .order_by(loras.c.id)
                    .limit(batch)
                ).all()
            if not rows:
                return
            for row in rows:
                yield view_from_json(row[1])
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

    def feedback(self, batch: int = 5000) -> Iterable[Feedback]:
        """Every answered recommendation's feedback, oldest first."""
        last = 0
        while True:
            with self._connect() as conn:
                rows = (
                    conn.execute(
                        sa.select(recommendation_feedback)
                        .where(recommendation_feedback.c.position > last)
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
        query = sa.select(loras.c.view_json).where(loras.c.source == LoraSource.FILE.value)
        if root_prefix:
            prefix = root_prefix.rstrip("/") + "/"
            query = query.where(loras.c.file_path.startswith(prefix, autoescape=True))
        with self._connect() as conn:
            texts = conn.execute(query).scalars().all()
        entries = []
        for text in texts:
            view = view_from_json(text)
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
    return {
        "id": v.id,
        "name_key": v.metadata.name.casefold(),
        "architecture": v.metadata.base_model.architecture.value,
        "kind": v.metadata.kind.value,
        "available": v.available,
        "source": v.source.value,
        "source_id": v.source_id,
        "sha256": v.file.sha256 if v.file else "",
        "file_path": v.file.path if v.file else "",
        "file_name_key": v.metadata.file_name.casefold(),
        "version": v.version,
        "view_json": view_to_json(v),
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
