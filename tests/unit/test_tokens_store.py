"""The token key when none is configured: one random key in the shared store, the same for
every replica on it, kept across a projection rebuild. Real SQLite and PostgreSQL stores."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from server.application.queries import GetAllLoRAsQuery
from server.config import Settings
from server.domain.errors import InvalidTokenError
from server.infrastructure.storage_url import StorageUrl
from server.infrastructure.token_keys import shared_key
from tests.support import POSTGRES_URL, make_container, postgres_schema, sqlite_url


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield sqlite_url(tmp_path)
        return
    if not POSTGRES_URL:
        pytest.skip("LORACLE_TEST_POSTGRES_URL is not set")
    with postgres_schema() as pg:
        yield pg


def test_replicas_racing_for_the_key_all_get_the_same_one(url: str) -> None:
    parsed = StorageUrl.parse(url)
    with ThreadPoolExecutor(8) as pool:
        found = set(pool.map(lambda _: shared_key(parsed), range(16)))
    assert len(found) == 1
    assert len(found.pop()) == 32


def test_a_token_from_one_replica_pages_on_another_and_survives_a_rebuild(
    tmp_path: Path,
) -> None:
    from server.application.commands import ImportLoRACatalogCommand
    from server.application.context import DispatchContext
    from tests.unit.test_catalog_commands import records

    a = make_container(tmp_path)
    b = make_container(tmp_path)
    try:
        written = a.commands.dispatch(
            ImportLoRACatalogCommand(records=records(3)), DispatchContext()
        )
        ctx = DispatchContext(min_position=written.position)
        token = a.queries.dispatch(GetAllLoRAsQuery(page_size=1), ctx).data.next_page_token
        assert b.queries.dispatch(GetAllLoRAsQuery(page_size=1, page_token=token), ctx).data
        b.projector.rebuild()  # empties the rm_* tables, not the key
        assert b.queries.dispatch(GetAllLoRAsQuery(page_size=2, page_token=token), ctx).data
    finally:
        a.close()
        b.close()


def test_a_configured_key_is_used_instead_of_the_stored_one(tmp_path: Path) -> None:
    roots = (tmp_path / "loras",)
    roots[0].mkdir()

    def settings(key: str) -> Settings:
        return Settings(
            data_dir=tmp_path, storage_url=sqlite_url(tmp_path), lora_roots=roots, token_key=key
        )

    from server.bootstrap import bootstrap

    one = bootstrap(settings("ab" * 16), build_embedded_model=False)
    other = bootstrap(settings(""), build_embedded_model=False)
    try:
        token = one.tokens.consistency_token(7)
        assert one.tokens.consistency_position(token) == 7
        with pytest.raises(InvalidTokenError):
            other.tokens.consistency_position(token)
    finally:
        one.close()
        other.close()
