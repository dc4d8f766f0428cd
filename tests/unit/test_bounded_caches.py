"""Every cache hostile input can fill is bounded, by entries and by bytes: the query cache
(its keys are request strings), the rate limiter's buckets and the open-stream counters."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import grpc
import pytest

from server.application.context import DispatchContext
from server.application.limits import LimitsMiddleware, RateLimiter
from server.application.queries.base import (
    IQuery,
    IQueryHandler,
    IStreamQuery,
    IStreamQueryHandler,
    QueryBus,
    QueryCache,
    QueryResult,
    approx_size,
)
from server.application.security import Credential, TokenAuthenticator, token_sha256
from server.rpc.dispatch import Dispatcher
from server.rpc.errors import Answered

TOPICS = frozenset({"loras"})


@dataclass(frozen=True, kw_only=True)
class Echo(IQuery[str]):
    reads: ClassVar[frozenset[str]] = TOPICS
    text: str


class EchoHandler(IQueryHandler[Echo, str]):
    def __init__(self) -> None:
        self.calls = 0

    def handle(self, query: Echo) -> QueryResult[str]:
        self.calls += 1
        return QueryResult.success(query.text)


def test_the_query_cache_is_bounded_by_bytes_as_well_as_entries() -> None:
    cache = QueryCache(max_entries=10_000, max_bytes=1_000_000)
    for i in range(2000):  # 2000 distinct 10 kB keys: 20 MB unbounded
        cache.put(("q", str(i) * 10_000), TOPICS, cache.generation(TOPICS), "v")
    assert cache.bytes <= 1_000_000
    assert 0 < len(cache) < 100
    cache.invalidate({"loras"})
    assert (len(cache), cache.bytes) == (0, 0)


def test_the_query_cache_is_still_bounded_by_entries() -> None:
    cache = QueryCache(max_entries=5)
    for i in range(50):
        cache.put(i, TOPICS, cache.generation(TOPICS), i)
    assert len(cache) == 5
    assert cache.get(49) == (True, 49)
    assert cache.get(0) == (False, None)


def test_an_entry_too_big_for_the_cache_is_not_kept() -> None:
    cache = QueryCache(max_bytes=16 * 1024 * 1024)  # entries up to 1 MiB
    cache.put("small", TOPICS, cache.generation(TOPICS), "v")
    cache.put("huge", TOPICS, cache.generation(TOPICS), "x" * 2_000_000)
    assert cache.get("huge") == (False, None)
    assert cache.get("small") == (True, "v")  # and it evicted nothing


def test_a_megabyte_query_runs_every_time_instead_of_filling_the_cache() -> None:
    handler = EchoHandler()
    bus = QueryBus([], cache=QueryCache(max_bytes=8 * 1024 * 1024))
    bus.register(Echo, handler)
    for _ in range(3):
        bus.dispatch(Echo(text="x" * 1_000_000))
    assert handler.calls == 3
    assert len(bus.cache) == 0
    bus.dispatch(Echo(text="small"))
    bus.dispatch(Echo(text="small"))
    assert handler.calls == 4


def test_size_estimates_see_into_dataclasses_and_containers() -> None:
    @dataclass(frozen=True)
    class Page:
        items: tuple[dict[str, Any], ...]

    page = Page(tuple({"name": "n" * 1000, "tags": ["t" * 100] * 5} for _ in range(100)))
    assert approx_size(page) > 100 * 1500
    assert approx_size(page) < 10 * 100 * 1500  # an over-estimate, not a wild one


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_buckets_are_bounded_and_refilled_ones_go_first() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=1.0, burst=2.0, clock=clock, max_principals=100)
    limiter.take("busy")
    limiter.take("busy")
    assert limiter.take("busy") > 0  # over its rate
    for i in range(10_000):
        limiter.take(f"p{i}")
        clock.now += 0.001
    assert limiter.principals() <= 100
    clock.now += 5.0  # every bucket but a busy one refills
    limiter.take("busy")
    for _ in range(2):
        limiter.take("busy")
    for i in range(50):  # room is made by dropping the refilled buckets, not the busy one
        limiter.take(f"q{i}")
    assert limiter.principals() <= 100
    assert limiter.take("busy") > 0  # its empty bucket was kept, not forgotten for a burst


@dataclass(frozen=True)
class Watch(IStreamQuery[int]):
    n: int


class WatchHandler(IStreamQueryHandler[Watch, int]):
    def handle(self, query: Watch) -> Iterator[int]:
        yield from range(query.n)


def test_stream_counters_hold_nothing_once_streams_close() -> None:
    limits = LimitsMiddleware(max_streams=2)
    bus = QueryBus([limits])
    bus.register(Watch, WatchHandler())
    for i in range(1000):
        assert list(bus.stream(Watch(2), DispatchContext(principal=f"p{i}"))) == [0, 1]
    assert limits._open == {}


class FakeRpc:
    def __init__(self, token: str) -> None:
        self.token = token

    def time_remaining(self) -> float | None:
        return None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)

    def set_code(self, code: grpc.StatusCode) -> None:
        pass

    def set_details(self, details: str) -> None:
        pass

    def set_trailing_metadata(self, metadata: object) -> None:
        pass


def test_unknown_tokens_create_no_per_principal_state() -> None:
    limiter = RateLimiter(rate=100.0, burst=200.0)
    bus = QueryBus([LimitsMiddleware(limiter)])
    bus.register(Echo, EchoHandler())
    auth = TokenAuthenticator([Credential("ci", token_sha256("s3cret"), frozenset({"read"}))])
    dispatcher = Dispatcher(bus_commands(), bus, auth)

    async def call(token: str) -> None:
        rpc = cast("grpc.aio.ServicerContext[Any, Any]", FakeRpc(token))
        await dispatcher.query(rpc, Echo(text="x"))

    for i in range(200):
        with pytest.raises(Answered):
            asyncio.run(call(f"forged-{i}"))
    assert limiter.principals() == 0
    asyncio.run(call("s3cret"))
    assert limiter.principals() == 1


def bus_commands() -> Any:
    from server.application.commands import CommandBus

    return CommandBus([])
