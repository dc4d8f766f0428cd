"""The append-only event store, on the eventsourcing library (SQLite, PostgreSQL or memory)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import (
    IntegrityError,
    Notification,
    OperationalError,
    PersistenceError,
)

from server.domain.errors import ConflictError, UnavailableError
from server.domain.lora import CommandRecord, Lora, legacy_command_record_id
from server.infrastructure.storage_url import StorageUrl

T = TypeVar("T")


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

    def get_at(self, aggregate_id: uuid.UUID, version: int) -> Aggregate:
        return cast(
            Aggregate, self._guard(lambda: self.app.repository.get(aggregate_id, version=version))
        )

    def save(self, *aggregates: Aggregate) -> int:
        """Appends the aggregates' pending events atomically; returns the last position."""

        def save() -> int:
            recordings = self.app.save(*aggregates)
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
