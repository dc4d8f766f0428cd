"""Refused calls leave nothing for the garbage collector: an answered error's traceback (and
gRPC's AbortError, which the call's state kept) held every frame it passed through, with the
call's context and request, in a reference cycle only a full collection freed; hostile
requests refused in a loop piled them up (docs/benchmarks.md, "Memory under hostile
requests"). Statuses are unchanged (the security, token and fuzz suites check them)."""

from __future__ import annotations

import gc
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from loracle.v1 import query_service_pb2, query_service_pb2_grpc
from server.rpc.server import LoracleServer
from tests.support import make_container

CALLS = 60


@pytest.fixture
async def stub(tmp_path: Path) -> AsyncIterator[Any]:
    server = LoracleServer(make_container(tmp_path))
    port = await server.start("127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            # The generated stubs are typed for the blocking channel; on an aio one they
            # return awaitables.
            yield query_service_pb2_grpc.QueryServiceStub(channel)
    finally:
        await server.stop(0)


async def test_refused_calls_leave_no_reference_cycles(stub: Any) -> None:
    refused: list[Callable[[], Awaitable[object]]] = [
        lambda: stub.ListLoras(query_service_pb2.ListLorasRequest(page_token="forged")),
        lambda: stub.GetLora(query_service_pb2.GetLoraRequest(id="not-an-id")),
        lambda: stub.GetLora(query_service_pb2.GetLoraRequest(id=str(uuid.uuid4()))),
    ]
    with pytest.raises(grpc.aio.AioRpcError):  # warm: the first call builds lasting caches
        await refused[0]()
    gc.collect()
    gc.disable()
    try:
        codes = []
        for i in range(CALLS):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await refused[i % len(refused)]()
            codes.append(err.value.code())
        unreachable = gc.collect()
    finally:
        gc.enable()
    assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
    # Before: about a hundred objects a call (27 frames and their tracebacks, the context,
    # gRPC's call state); gRPC's handler lookup alone leaves a few.
    assert unreachable <= 10 * CALLS, unreachable
