"""eventsourcing's PostgreSQL persistence, failing faster. The library retries every call ten
times, each waiting up to the pool timeout for a connection: with PostgreSQL down, one
request then blocks for about a minute. A service should instead answer UNAVAILABLE within
seconds and let the client retry (requests carry ids, so retries are safe). Its connections
also get the TCP settings the read models use, which the library has no setting for."""

from __future__ import annotations

from typing import Any

from eventsourcing.persistence import InterfaceError, OperationalError
from eventsourcing.postgres import (
    PostgresAggregateRecorder,
    PostgresApplicationRecorder,
    PostgresFactory,
)
from eventsourcing.utils import Environment, EnvType, retry

from server.infrastructure.storage_url import POSTGRES_TCP

# Two attempts: one stale pooled connection after a restart is replaced without an error.
_retry = retry((InterfaceError, OperationalError), max_attempts=2, wait=0.1)


def _unwrapped(method: Any) -> Any:
    return getattr(method, "__wrapped__", method)


class FailFastApplicationRecorder(PostgresApplicationRecorder):
    insert_events = _retry(_unwrapped(PostgresApplicationRecorder.insert_events))
    select_events = _retry(_unwrapped(PostgresAggregateRecorder.select_events))
    select_notifications = _retry(_unwrapped(PostgresApplicationRecorder.select_notifications))
    max_notification_id = _retry(_unwrapped(PostgresApplicationRecorder.max_notification_id))


class FailFastPostgresFactory(PostgresFactory):
    def __init__(self, env: Environment | EnvType | None) -> None:
        super().__init__(env)
        kwargs = self.datastore.pool.kwargs  # read at each connect; the pool is not open yet
        assert isinstance(kwargs, dict)
        kwargs.update(POSTGRES_TCP)
