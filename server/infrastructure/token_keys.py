"""The deployment's token key when none is configured: a random one kept in the shared store,
so every replica of a cluster (which share the database) signs and accepts the same tokens.
Its table is not a read model: resetting or rebuilding projections leaves it alone, and
tokens issued before a rebuild stay valid."""

from __future__ import annotations

import time

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, OperationalError

from server.domain.errors import UnavailableError
from server.domain.tokens import new_key
from server.infrastructure.read_model import read_model_engine
from server.infrastructure.storage_url import StorageUrl

TOKEN_KEY_NAME = "token-mac"

keys_metadata = sa.MetaData()
keys = sa.Table(
    "loracle_keys",
    keys_metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.LargeBinary, nullable=False),
)


def shared_key(url: StorageUrl, name: str = TOKEN_KEY_NAME) -> bytes:
    """The key stored under `name`, created first if absent. Race-safe: every replica
    inserts its own candidate, ignoring a conflict, then all read the one that won."""
    engine = read_model_engine(url)
    try:
        _create_table(engine)
        insert = (postgresql.insert if url.kind == "postgresql" else sqlite.insert)(keys)
        with engine.begin() as conn:
            conn.execute(
                insert.values(name=name, value=new_key()).on_conflict_do_nothing(
                    index_elements=[keys.c.name]
                )
            )
        with engine.connect() as conn:
            value = conn.execute(sa.select(keys.c.value).where(keys.c.name == name)).scalar_one()
        return bytes(value)
    except (OperationalError, DBAPIError) as exc:
        raise UnavailableError(f"token key unavailable: {exc.orig}") from None
    finally:
        engine.dispose()


def _create_table(engine: sa.Engine, attempts: int = 5) -> None:
    """CREATE TABLE IF NOT EXISTS, again when replicas starting together collide on it
    (PostgreSQL's catalog refuses the second of two concurrent creations; SQLite is busy)."""
    for attempt in range(attempts):
        try:
            with engine.begin() as conn:
                conn.execute(sa.schema.CreateTable(keys, if_not_exists=True))
            return
        except (OperationalError, DBAPIError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
