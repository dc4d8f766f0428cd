"""Signed tokens through a real server: what this server issued pages on; anything else
(forged JSON the unsigned build parsed, a deep "[" nest, a 1e30 position, a token of one
listing replayed against another's filter, the older build's decimal positions) is
INVALID_ARGUMENT with the token's reason, one plain sentence."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Iterator

import grpc
import pytest

from client import InvalidArgument, LoracleClient
from server.devtools.local_server import RunningServer
from tests.e2e.reflection_client import run_grpcurl_line


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


FORGED = {
    "listing only": "eyJmIjogIk5vbmV8fEZhbHNlIn0",  # {"f": "None||False"}
    "mistyped keys": _b64(json.dumps({"f": "None||False", "n": 1, "i": None}).encode()),
    "1e30 position": _b64(json.dumps({"f": "||||", "p": 1e30}).encode()),
    "deep nest": _b64(("[" * 5000).encode()),
    "garbage": "%%%not-a-token%%%",
    "too long": "A" * 100_000,
}


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[LoracleClient]:
    with LoracleClient(server.address) as c:
        token = list(c.import_loras())[-1].consistency_token
        c.list_loras(consistency_token=token)  # projected
        yield c


def _refused(call: Callable[[], object], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        call()
    error = info.value
    assert error.reason == (
        "INVALID_PAGE_TOKEN" if field == "page_token" else "INVALID_CONSISTENCY_TOKEN"
    )
    assert [f for f, _ in error.field_violations] == [field]
    assert f"{field} is not a token this server issued" in error.message
    assert "Error" not in error.message


@pytest.mark.parametrize("name", FORGED)
def test_forged_page_tokens_are_invalid_argument(client: LoracleClient, name: str) -> None:
    token = FORGED[name]
    _refused(lambda: client.list_loras(page_size=1, page_token=token), "page_token")
    _refused(lambda: client.list_events(page_size=1, page_token=token), "page_token")
    _refused(lambda: client.list_generations(page_size=1, page_token=token), "page_token")
    _refused(lambda: client.search_loras("style", page_size=1, page_token=token), "page_token")
    # A well-formed id, so the token is the only thing wrong with the request.
    _refused(
        lambda: client.get_lora(str(uuid.uuid4()), consistency_token=token), "consistency_token"
    )


def test_the_briefs_grpcurl_line_is_invalid_argument(server: RunningServer) -> None:
    line = (
        'grpcurl -plaintext -d \'{"page_token":"eyJmIjogIk5vbmV8fEZhbHNlIn0"}\' ADDR '
        "loracle.v1.QueryService/ListLoras"
    )
    with pytest.raises(grpc.RpcError) as info:
        run_grpcurl_line(line, server.address)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_issued_tokens_page_but_not_another_listing(client: LoracleClient) -> None:
    first = client.list_loras(page_size=1)
    assert first.next_page_token
    assert client.list_loras(page_size=1, page_token=first.next_page_token).loras
    tag = first.loras[0].tags[0] if first.loras[0].tags else "style"
    _refused(
        lambda: client.list_loras(page_size=1, page_token=first.next_page_token, tag=tag),
        "page_token",
    )
    events = client.list_events(page_size=1)
    assert events.next_page_token
    _refused(  # a ListEvents token against ListLoras, and against another event filter
        lambda: client.list_loras(page_size=1, page_token=events.next_page_token), "page_token"
    )
    _refused(
        lambda: client.list_events(
            page_size=1, page_token=events.next_page_token, type="LoraRegistered"
        ),
        "page_token",
    )
    search = client.search_loras("style", page_size=1)
    if search.next_page_token:
        _refused(
            lambda: client.search_loras("castle", page_size=1, page_token=search.next_page_token),
            "page_token",
        )
    # A consistency token is not a page token, nor a page token a consistency token.
    written = list(client.import_loras())[-1].consistency_token
    assert written
    assert client.get_lora(first.loras[0].id, consistency_token=written)
    _refused(lambda: client.list_loras(page_token=written), "page_token")
    _refused(
        lambda: client.get_lora(first.loras[0].id, consistency_token=first.next_page_token),
        "consistency_token",
    )
    _refused(lambda: client.get_lora(first.loras[0].id, consistency_token="1"), "consistency_token")
