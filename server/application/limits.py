"""Per-principal back-pressure in the bus: a token bucket of requests per second and a cap on
open streams. Beyond either, RESOURCE_EXHAUSTED with the time to wait (RetryInfo), so
well-behaved clients back off instead of timing out."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from server.application.commands.base import IStreamCommand
from server.application.context import DispatchContext
from server.application.middleware import Next
from server.application.queries.base import IStreamQuery
from server.domain.errors import Reason, ResourceExhaustedError


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class RateLimiter:
    """`rate` requests per second per principal, with bursts of `burst`. Principals are
    authenticated before they get here (an unknown token never creates a bucket), so their
    number is the configured tokens'; `max_principals` bounds the buckets anyway. Beyond it
    the buckets that have refilled go first (forgetting one changes nothing), then the least
    recently used (which gets a fresh burst: lenient, never wrong the other way)."""

    rate: float
    burst: float
    clock: Callable[[], float] = time.monotonic
    max_principals: int = 10_000
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, principal: str) -> float:
        """0 when a request may go ahead now, else the seconds until it could."""
        now = self.clock()
        with self._lock:
            bucket = self._buckets.get(principal)
            if bucket is None:
                if len(self._buckets) >= self.max_principals:
                    self._forget(now)
                bucket = self._buckets[principal] = _Bucket(self.burst, now)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self.rate

    def principals(self) -> int:
        """Buckets held (not `__len__`: an empty limiter must stay truthy)."""
        with self._lock:
            return len(self._buckets)

    def _forget(self, now: float) -> None:
        full = now - self.burst / self.rate
        for name in [n for n, b in self._buckets.items() if b.updated <= full]:
            del self._buckets[name]
        if len(self._buckets) >= self.max_principals:
            oldest = min(self._buckets, key=lambda n: self._buckets[n].updated)
            del self._buckets[oldest]


@dataclass
class LimitsMiddleware:
    """Open streams are counted per principal only while open (an entry goes with its last
    stream), so the counters are bounded by the streams open now."""

    rate: RateLimiter | None = None
    max_streams: int = 0
    _open: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, message: object, ctx: DispatchContext, next_: Next) -> Any:
        if ctx.principal == "system":  # the server's own follow-up work
            return next_(message, ctx)
        if self.rate is not None:
            wait = self.rate.take(ctx.principal)
            if wait > 0:
                raise ResourceExhaustedError(
                    f"{ctx.principal!r} is over its request rate; retry in {wait:.2f} s",
                    retry_after_seconds=wait,
                    reason=Reason.RATE_LIMITED,
                )
        if not self.max_streams or not isinstance(message, IStreamCommand | IStreamQuery):
            return next_(message, ctx)
        return self._counted(message, ctx, next_)

    def open_streams(self, principal: str) -> int:
        with self._lock:
            return self._open.get(principal, 0)

    def _counted(self, message: object, ctx: DispatchContext, next_: Next) -> Iterator[Any]:
        """Takes the slot when the stream starts (like other stream errors, the refusal
        surfaces at the first item), so a stream never iterated holds nothing."""
        with self._lock:
            if self._open.get(ctx.principal, 0) >= self.max_streams:
                raise ResourceExhaustedError(
                    f"{ctx.principal!r} already has {self.max_streams} streams open",
                    retry_after_seconds=1.0,
                    reason=Reason.TOO_MANY_STREAMS,
                )
            self._open[ctx.principal] = self._open.get(ctx.principal, 0) + 1
        try:
            yield from next_(message, ctx)
        finally:
            self._release(ctx.principal)

    def _release(self, principal: str) -> None:
        with self._lock:
            self._open[principal] -= 1
            if not self._open[principal]:
                del self._open[principal]
