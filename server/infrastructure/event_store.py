"""The append-only event store, on the eventsourcing library (SQLite, PostgreSQL or memory)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any, TypeVar, cast

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import (
    AggregateRecorder,
    IntegrityError,
    Notification,
    OperationalError,
    PersistenceError,
    StoredEvent,
)
from eventsourcing.postgres import PostgresAggregateRecorder
from eventsourcing.sqlite import SQLiteAggregateRecorder
from psycopg.sql import SQL, Identifier

from server.domain.errors import ConflictError, UnavailableError
from server.domain.lora import CommandRecord, Lora, legacy_command_record_id
from server.infrastructure.storage_url import StorageUrl

T = TypeVar("T")

# Aggregates read per query by `get_many` (SQLite allows 32,766 parameters per statement).
BULK_READ_CHUNK = 1000


class LoracleEvents(Application[uuid.UUID]):
    name = "loracle"


class EventStore:
    """Implements the application's CatalogRepository port. Store outages surface as
    UnavailableError (retryable), write races as ConflictError; nothing else leaks out."""

    def __init__(self, url: StorageUrl) -> None:
        try:
            self.app = LoracleEvents(env=url.eventsourcing_env())
        except (OperationalError, PersistenceError, OSError) as exc:
            raise UnavailableError(f"event store unreachable: {exc}") from None
        self._listeners: list[Callable[[int], None]] = []
        self._lock = threading.Lock()

    def on_saved(self, listener: Callable[[int], None]) -> None:
        """Called with the new log position after each save (wakes the projector)."""
        self._listeners.append(listener)

    def get_lora(self, lora_id: uuid.UUID) -> Lora | None:
        return cast(Lora | None, self._get(lora_id, Lora))

    def get(self, aggregate_id: uuid.UUID) -> Aggregate | None:
        return cast(Aggregate | None, self._get(aggregate_id, Aggregate))

    def find_command(self, principal: str, request_id: str) -> CommandRecord | None:
        """The principal's record of this request_id. A record stored before keys were per
        principal (keyed by the request_id alone) still answers, but only its own principal."""
        found = self._get(CommandRecord.create_id(principal, request_id), CommandRecord)
        if found is None:
            legacy = self._get(legacy_command_record_id(request_id), CommandRecord)
            if legacy is not None and legacy.principal == principal:
                found = legacy
        return cast(CommandRecord | None, found)

    def get_loras(self, lora_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, Lora]:
        """The LoRAs among `lora_ids` that exist, read in a few queries rather than one each."""
        found = self.get_many(lora_ids)
        return {i: a for i, a in found.items() if isinstance(a, Lora)}

    def get_many(
        self,
        aggregate_ids: Iterable[uuid.UUID],
        *,
        versions: Mapping[uuid.UUID, int] | None = None,
    ) -> dict[uuid.UUID, Aggregate]:
        """The aggregates among `aggregate_ids` that exist, each rebuilt from its events, which
        are read `BULK_READ_CHUNK` aggregates per query. With `versions`, an aggregate listed
        there is rebuilt only up to that version."""
        ids = list(dict.fromkeys(aggregate_ids))
        out: dict[uuid.UUID, Aggregate] = {}
        for start in range(0, len(ids), BULK_READ_CHUNK):
            chunk = ids[start : start + BULK_READ_CHUNK]
            stored = self._guard(partial(_select_events_of, self.app.recorder, chunk))
            by_id: dict[uuid.UUID, list[Any]] = {}
            for record in stored:
                aggregate_id = uuid.UUID(str(record.originator_id))
                if versions is not None and record.originator_version > versions.get(
                    aggregate_id, record.originator_version
                ):
                    continue
                by_id.setdefault(aggregate_id, []).append(self.app.mapper.to_domain_event(record))
            for aggregate_id, events in by_id.items():
                out[aggregate_id] = fold(events)
        return out

    def versions(self, aggregate_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, int]:
        """The current version of each aggregate among `aggregate_ids` that exists, read
        `BULK_READ_CHUNK` aggregates per query without decoding any event."""
        ids = list(dict.fromkeys(aggregate_ids))
        out: dict[uuid.UUID, int] = {}
        for start in range(0, len(ids), BULK_READ_CHUNK):
            chunk = ids[start : start + BULK_READ_CHUNK]
            out.update(self._guard(partial(_select_versions_of, self.app.recorder, chunk)))
        return out

    def get_at(self, aggregate_id: uuid.UUID, version: int) -> Aggregate:
        return cast(
            Aggregate, self._guard(lambda: self.app.repository.get(aggregate_id, version=version))
        )

    def save(self, *aggregates: Aggregate) -> int:
        """Appends the aggregates' pending events atomically; returns the last position."""

        def save() -> int:
            # The library's Application.save checks every aggregate against two runtime
            # Protocols (a fifth of a 2,000-record import); this application has no snapshots,
            # repository cache or followers for it to serve, so the events go straight in.
            events = [e for aggregate in aggregates for e in aggregate.collect_events()]
            recordings = self.app.events.put(events)
            return max((r.notification.id for r in recordings), default=0)

        try:
            position = self._guard(save)
        except IntegrityError:
            raise ConflictError("a concurrent write changed the same entity; retry") from None
        for listener in self._listeners:
            listener(position)
        return position

    def max_position(self) -> int:
        return self._guard(lambda: int(self.app.recorder.max_notification_id() or 0))

    def notifications(self, after: int, limit: int) -> Sequence[Notification]:
        return self._guard(
            lambda: self.app.recorder.select_notifications(after, limit, inclusive_of_start=False)
        )

    def decode(self, notification: Notification) -> Any:
        return self.app.mapper.to_domain_event(notification)

    def close(self) -> None:
        self.app.close()

    def _get(self, aggregate_id: uuid.UUID, kind: type[Any]) -> Any:
        def get() -> Any:
            try:
                found: Any = self.app.repository.get(aggregate_id)
            except AggregateNotFoundError:
                return None
            return found if isinstance(found, kind) else None

        return self._guard(get)

    @staticmethod
    def _guard(work: Callable[[], T]) -> T:
        try:
            return work()
        except IntegrityError:
            raise
        except (OperationalError, PersistenceError) as exc:
            raise UnavailableError(f"event store unavailable: {type(exc).__name__}") from None


def fold(events: Iterable[Any]) -> Aggregate:
    """The aggregate its events make, oldest first. The library's `project_aggregate` does
    the same, but checks each event against a runtime Protocol, which costs more than the
    mutation itself."""
    aggregate: Any = None
    for event in events:
        aggregate = event.mutate(aggregate)
    return cast(Aggregate, aggregate)


def _select_events_of(
    recorder: AggregateRecorder, aggregate_ids: Sequence[uuid.UUID]
) -> list[StoredEvent]:
    """The stored events of every aggregate in `aggregate_ids`, each aggregate's in version
    order, in one query (the library reads one aggregate per query)."""
    if not aggregate_ids:
        return []
    if isinstance(recorder, SQLiteAggregateRecorder):
        marks = ",".join("?" * len(aggregate_ids))
        statement = (
            f"SELECT * FROM {recorder.events_table_name} WHERE originator_id IN ({marks}) "
            "ORDER BY originator_id, originator_version"
        )
        with recorder.datastore.transaction(commit=False) as c:
            c.execute(statement, [i.hex for i in aggregate_ids])
            return [
                StoredEvent(
                    originator_id=recorder.convert_originator_id(row["originator_id"]),
                    originator_version=row["originator_version"],
                    topic=row["topic"],
                    state=row["state"],
                )
                for row in c.fetchall()
            ]
    if isinstance(recorder, PostgresAggregateRecorder):
        query = SQL(
            "SELECT * FROM {schema}.{table} WHERE originator_id = ANY(%s) "
            "ORDER BY originator_id, originator_version"
        ).format(
            schema=Identifier(recorder.datastore.schema),
            table=Identifier(recorder.events_table_name),
        )
        with recorder.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(query, [list(aggregate_ids)])
            return [
                StoredEvent(
                    originator_id=row["originator_id"],
                    originator_version=row["originator_version"],
                    topic=row["topic"],
                    state=bytes(row["state"]),
                )
                for row in curs.fetchall()
            ]
    # The in-memory store: one aggregate at a time is as fast as it gets.
    return [e for i in aggregate_ids for e in recorder.select_events(i)]


def _select_versions_of(
    recorder: AggregateRecorder, aggregate_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, int]:
    if not aggregate_ids:
        return {}
    if isinstance(recorder, SQLiteAggregateRecorder):
        marks = ",".join("?" * len(aggregate_ids))
        statement = (
            f"SELECT originator_id, MAX(originator_version) FROM {recorder.events_table_name} "
            f"WHERE originator_id IN ({marks}) GROUP BY originator_id"
        )
        with recorder.datastore.transaction(commit=False) as c:
            c.execute(statement, [i.hex for i in aggregate_ids])
            return {uuid.UUID(row[0]): int(row[1]) for row in c.fetchall()}
    if isinstance(recorder, PostgresAggregateRecorder):
        query = SQL(
            "SELECT originator_id, MAX(originator_version) AS version FROM {schema}.{table} "
            "WHERE originator_id = ANY(%s) GROUP BY originator_id"
        ).format(
            schema=Identifier(recorder.datastore.schema),
            table=Identifier(recorder.events_table_name),
        )
        with recorder.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(query, [list(aggregate_ids)])
            return {
                uuid.UUID(str(row["originator_id"])): int(row["version"]) for row in curs.fetchall()
            }
    out = {}
    for i in aggregate_ids:
        last = recorder.select_events(i, desc=True, limit=1)
        if last:
            out[i] = last[0].originator_version
    return out
