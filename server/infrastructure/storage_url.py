"""One storage URL selects the back end for both the event store and the read models."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from server.domain.errors import FieldViolation, ValidationError

# libpq settings for every PostgreSQL connection (event store and read models). A database
# host that vanishes without resetting its connections (power loss, a network partition)
# would otherwise hold a query until TCP gives up: about 15 minutes for unacknowledged data,
# two hours and more on an idle read. With these, about 10 and 25 seconds.
POSTGRES_TCP: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,  # milliseconds
}


@dataclass(frozen=True, slots=True)
class StorageUrl:
    """`sqlite:///abs/path.db` or `postgresql://user[:pw]@host[:port]/db[?schema=name]`."""

    kind: str  # "sqlite" | "postgresql" | "memory"
    sqlite_path: Path | None = None
    host: str = "127.0.0.1"
    port: int = 5432
    user: str = "postgres"
    password: str = ""
    database: str = ""
    schema: str = "public"

    @staticmethod
    def parse(url: str) -> StorageUrl:
        parts = urlsplit(url)
        if parts.scheme == "sqlite":
            path = unquote(parts.path)
            if parts.netloc or not path or path == "/":
                raise _bad(url, "expected sqlite:///absolute/path.db")
            return StorageUrl("sqlite", sqlite_path=Path(path))
        if parts.scheme == "memory":
            return StorageUrl("memory")
        if parts.scheme in ("postgres", "postgresql", "postgresql+psycopg"):
            database = parts.path.lstrip("/")
            if not database:
                raise _bad(url, "expected postgresql://user@host:port/database")
            query = parse_qs(parts.query)
            return StorageUrl(
                "postgresql",
                host=parts.hostname or "127.0.0.1",
                port=parts.port or 5432,
                user=unquote(parts.username or "postgres"),
                password=unquote(parts.password or ""),
                database=database,
                schema=query.get("schema", ["public"])[0],
            )
        raise _bad(url, "scheme must be sqlite, postgresql or memory")

    def eventsourcing_env(self) -> dict[str, str]:
        if self.kind == "sqlite":
            assert self.sqlite_path is not None
            return {
                "PERSISTENCE_MODULE": "eventsourcing.sqlite",
                "SQLITE_DBNAME": str(self.sqlite_path),
                "SQLITE_LOCK_TIMEOUT": "10",
            }
        if self.kind == "memory":
            return {"PERSISTENCE_MODULE": "eventsourcing.popo"}
        return {
            "PERSISTENCE_MODULE": "server.infrastructure.pg_recorder:FailFastPostgresFactory",
            "POSTGRES_DBNAME": self.database,
            "POSTGRES_HOST": self.host,
            "POSTGRES_PORT": str(self.port),
            "POSTGRES_USER": self.user,
            "POSTGRES_PASSWORD": self.password,
            "POSTGRES_SCHEMA": self.schema,
            # Also how long a request waits for a pooled connection: with the database
            # down, requests fail within seconds (UNAVAILABLE) instead of queueing up.
            "POSTGRES_CONNECT_TIMEOUT": "2",
            "POSTGRES_PRE_PING": "y",
            "APPLICATION_RECORDER_TOPIC": (
                "server.infrastructure.pg_recorder:FailFastApplicationRecorder"
            ),
            "POSTGRES_LOCK_TIMEOUT": "10",
            "POSTGRES_POOL_SIZE": "4",
        }

    def identity(self) -> str:
        """Which database this is, without credentials (to tell caches of two apart)."""
        if self.kind == "sqlite":
            assert self.sqlite_path is not None
            return f"sqlite:{self.sqlite_path.resolve()}"
        if self.kind == "memory":
            return "memory"
        return (
            f"postgresql://{self.user}@{self.host}:{self.port}/{self.database}?schema={self.schema}"
        )

    def sqlalchemy_url(self) -> str:
        if self.kind == "sqlite":
            return f"sqlite:///{self.sqlite_path}"
        if self.kind == "memory":
            return "sqlite://"
        auth = self.user + (f":{self.password}" if self.password else "")
        return f"postgresql+psycopg://{auth}@{self.host}:{self.port}/{self.database}"


def _bad(url: str, why: str) -> ValidationError:
    return ValidationError(FieldViolation("storage_url", f"{url!r}: {why}"))
