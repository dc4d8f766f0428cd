"""eventsourcing's PostgreSQL recorder, retrying less. The library retries every call ten
times, each waiting up to the pool timeout for a connection: with PostgreSQL down, one
request then blocks for about a minute. A service should instead answer UNAVAILABLE within
seconds and let the client retry (requests carry ids, so retries are safe)."""

from __future__ import annotations

from typing import Any

from eventsourcing.persistence import InterfaceError, OperationalError
from eventsourcing.postgres import PostgresAggregateRecorder, PostgresApplicationRecorder
from eventsourcing.utils import retry

# Two attempts: one stale pooled connection after a restart is replaced without an error.
_retry = retry((InterfaceError, OperationalError), max_attempts=2, wait=0.1)


def _unwrapped(method: Any) -> Any:
    return getattr(method, "__wrapped__", method)


class FailFastApplicationRecorder(PostgresApplicationRecorder):
    insert_events = _retry(_unwrapped(PostgresApplicationRecorder.insert_events))
    select_events = _retry(_unwrapped(PostgresAggregateRecorder.select_events))
    select_notifications = _retry(_unwrapped(PostgresApplicationRecorder.select_notifications))
    max_notification_id = _retry(_unwrapped(PostgresApplicationRecorder.max_notification_id))
