"""The chain every dispatch runs through, commands, queries and streams alike."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from threading import Lock
from typing import Any, Protocol

from server.application.context import DispatchContext
from server.domain.errors import DomainError, Reason

Next = Callable[[object, DispatchContext], Any]

log = logging.getLogger("loracle.bus")
# Frames the transport could not use: it logs them itself, at most once per principal a
# minute (server/rpc/validation.py RejectionLog), so a garbage flood writes no line per frame.
QUIET_REJECTIONS = frozenset({Reason.UNDECODABLE_REQUEST, Reason.REQUEST_TOO_LARGE})
audit_log = logging.getLogger("loracle.audit")


class Middleware(Protocol):
    def __call__(self, message: object, ctx: DispatchContext, next_: Next) -> Any: ...


def build_chain(middlewares: list[Middleware], handler: Next) -> Next:
    """Composes once at registration time, so a dispatch pays no per-call assembly."""
    chain = handler
    for middleware in reversed(middlewares):
        chain = _bind(middleware, chain)
    return chain


def _bind(middleware: Middleware, next_: Next) -> Next:
    def call(message: object, ctx: DispatchContext) -> Any:
        return middleware(message, ctx, next_)

    return call


def _on_finish(result: Any, done: Callable[[str], None]) -> Any:
    """Calls `done(outcome)` when a unary result returns or a streamed result is exhausted."""
    if isinstance(result, Iterator):
        return _watch_stream(result, done)
    outcome = "ok" if getattr(result, "is_success", True) else result.error.reason
    done(outcome)
    return result


def _watch_stream(stream: Iterator[Any], done: Callable[[str], None]) -> Iterator[Any]:
    outcome = "cancelled"
    try:
        yield from stream
        outcome = "ok"
    except DomainError as exc:
        outcome = exc.reason
        raise
    except Exception:
        outcome = "error"
        raise
    finally:
        done(outcome)


class LoggingMiddleware:
    def __call__(self, message: object, ctx: DispatchContext, next_: Next) -> Any:
        name = type(message).__name__
        log.debug(
            "dispatch %s principal=%s correlation_id=%s", name, ctx.principal, ctx.correlation_id
        )
        try:
            result = next_(message, ctx)
        except DomainError as exc:
            if not (exc is ctx.rejected and exc.reason in QUIET_REJECTIONS):
                log.info("%s refused: %s (%s)", name, exc.reason, exc.message)
            raise
        except Exception:
            log.exception("%s failed correlation_id=%s", name, ctx.correlation_id)
            raise
        return _on_finish(result, lambda outcome: log.debug("%s -> %s", name, outcome))


@dataclass
class Timing:
    count: int = 0
    total_seconds: float = 0.0
    max_seconds: float = 0.0


@dataclass
class TimingMiddleware:
    """Per-message-type call counts and durations (streams are timed to their end)."""

    stats: dict[str, Timing] = field(default_factory=dict)
    _lock: Lock = field(default_factory=Lock)

    def __call__(self, message: object, ctx: DispatchContext, next_: Next) -> Any:
        name = type(message).__name__
        start = time.perf_counter()

        def record(_outcome: str) -> None:
            elapsed = time.perf_counter() - start
            with self._lock:
                timing = self.stats.setdefault(name, Timing())
                timing.count += 1
                timing.total_seconds += elapsed
                timing.max_seconds = max(timing.max_seconds, elapsed)

        try:
            result = next_(message, ctx)
        except Exception:
            record("error")
            raise
        return _on_finish(result, record)


class Authorizer(Protocol):
    def authorize(self, message: object, ctx: DispatchContext) -> None:
        """Raises a DomainError when `ctx` may not dispatch `message`."""


class AllowAll:
    def authorize(self, message: object, ctx: DispatchContext) -> None:
        return None


@dataclass
class AuthorizationMiddleware:
    """Where scopes are enforced for every command and query (server/application/security.py)."""

    authorizer: Authorizer = field(default_factory=AllowAll)

    def __call__(self, message: object, ctx: DispatchContext, next_: Next) -> Any:
        self.authorizer.authorize(message, ctx)
        return next_(message, ctx)


class RejectedRequestMiddleware:
    """Raises what the transport found wrong with the request (`ctx.rejected`), after
    authentication and authorization, before any handler runs."""

    def __call__(self, message: object, ctx: DispatchContext, next_: Next) -> Any:
        if ctx.rejected is not None:
            raise ctx.rejected
        return next_(message, ctx)


class AuditMiddleware:
    """Logs who dispatched what with which outcome. State changes themselves are audited by
    the event log; this also covers refused and read-only requests."""

    def __call__(self, message: object, ctx: DispatchContext, next_: Next) -> Any:
        name = type(message).__name__

        def record(outcome: str) -> None:
            audit_log.info(
                "%s principal=%s request_id=%s correlation_id=%s outcome=%s",
                name,
                ctx.principal,
                ctx.request_id,
                ctx.correlation_id,
                outcome,
            )

        try:
            result = next_(message, ctx)
        except DomainError as exc:
            record(exc.reason)
            raise
        return _on_finish(result, record)


def default_middlewares(
    authorizer: Authorizer | None = None, limits: Middleware | None = None
) -> list[Middleware]:
    chain: list[Middleware] = [
        LoggingMiddleware(),
        TimingMiddleware(),
        AuditMiddleware(),  # before authorization and limits: refusals are audited too
    ]
    if limits is not None:
        chain.append(limits)
    chain.append(AuthorizationMiddleware(authorizer or AllowAll()))
    chain.append(RejectedRequestMiddleware())
    return chain
