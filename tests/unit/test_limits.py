"""Per-principal back-pressure: the token bucket and the open-stream cap, on the real buses."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import cast

import pytest

from server.application.commands import CommandBus
from server.application.commands.base import IStreamCommand, IStreamCommandHandler
from server.application.context import SYSTEM_CONTEXT, DispatchContext
from server.application.limits import LimitsMiddleware, RateLimiter
from server.application.middleware import default_middlewares
from server.domain.errors import ResourceExhaustedError


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_bursts_then_the_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=2.0, burst=4.0, clock=clock)
    assert [limiter.take("a") for _ in range(4)] == [0.0] * 4
    assert limiter.take("a") == pytest.approx(0.5)  # one token comes back every 0.5 s
    assert limiter.take("b") == 0.0  # per principal
    clock.now += 0.5
    assert limiter.take("a") == 0.0
    assert limiter.take("a") > 0


@dataclass(frozen=True)
class Count(IStreamCommand[int]):
    n: int


class CountHandler(IStreamCommandHandler[Count, int]):
    def handle(self, command: Count) -> Iterator[int]:
        yield from range(command.n)


def bus(limits: LimitsMiddleware) -> CommandBus:
    b = CommandBus(default_middlewares(None, limits))
    b.register(Count, CountHandler())
    return b


def test_open_streams_are_capped_per_principal_and_released_when_they_end() -> None:
    limits = LimitsMiddleware(max_streams=2)
    b = bus(limits)
    alice = DispatchContext(principal="alice")
    first, second = b.stream(Count(n=3), alice), b.stream(Count(n=3), alice)
    assert (next(first), next(second)) == (0, 0)  # both streaming
    with pytest.raises(ResourceExhaustedError) as err:
        next(b.stream(Count(n=3), alice))
    assert err.value.retry_after_seconds > 0
    assert list(b.stream(Count(n=1), DispatchContext(principal="bob"))) == [0]
    assert list(first) == [1, 2]  # finished: its slot is free again
    assert limits.open_streams("alice") == 1
    third = b.stream(Count(n=2), alice)
    assert next(third) == 0
    cast(Generator[int, None, None], second).close()  # a client leaving frees its slot too
    assert list(third) == [1]
    assert limits.open_streams("alice") == 0
    unstarted = b.stream(Count(n=1), alice)  # never iterated: holds no slot
    assert limits.open_streams("alice") == 0
    del unstarted
    for _ in range(5):  # the server's own work is never limited
        assert list(b.stream(Count(n=1), SYSTEM_CONTEXT)) == [0]


def test_over_the_rate_is_resource_exhausted_with_the_wait() -> None:
    clock = Clock()
    b = bus(LimitsMiddleware(rate=RateLimiter(1.0, 1.0, clock=clock)))
    ctx = DispatchContext(principal="alice")
    assert list(b.stream(Count(n=1), ctx)) == [0]
    with pytest.raises(ResourceExhaustedError) as err:
        b.stream(Count(n=1), ctx)  # the rate is checked at dispatch
    assert err.value.retry_after_seconds == pytest.approx(1.0)
    clock.now += 1.0
    assert list(b.stream(Count(n=1), ctx)) == [0]
