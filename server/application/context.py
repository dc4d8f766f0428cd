"""Who is asking, and within what limits: travels with each dispatch in a context variable."""

from __future__ import annotations

import contextvars
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace


class Cancellation:
    """A flag set once from any thread and polled by handlers: made for every call, so
    cheaper than a `threading.Event` (a lock and a condition each), whose waiting nobody
    here needs."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


@dataclass(frozen=True, slots=True)
class DispatchContext:
    principal: str = "anonymous"
    request_id: str = ""
    correlation_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Monotonic time by which the caller stops waiting; None for no deadline.
    deadline: float | None = None
    # A consistency token's position: queries wait until the read model has reached it.
    min_position: int = 0
    scopes: frozenset[str] = frozenset()
    # Set by the transport when the caller goes away: long streams stop working for nobody.
    cancellation: Cancellation = field(default_factory=lambda: Cancellation(), compare=False)
    # Set by the transport when the request itself is wrong (undecodable or oversized bytes, a
    # field over its limit, an undefined enum number, a malformed id, a bad request_id or
    # consistency token): raised once authorization passed (RejectedRequestMiddleware), so a
    # caller without the right learns nothing about its request first.
    rejected: Exception | None = field(default=None, compare=False)

    def abandoned(self) -> bool:
        """The caller cancelled, or its deadline passed."""
        if self.cancellation.is_set():
            return True
        return self.deadline is not None and time.monotonic() > self.deadline

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def with_request_id(self, request_id: str) -> DispatchContext:
        return replace(self, request_id=request_id)


SYSTEM_CONTEXT = DispatchContext(principal="system", correlation_id="", scopes=frozenset({"admin"}))
_current: contextvars.ContextVar[DispatchContext | None] = contextvars.ContextVar(
    "loracle_dispatch_context", default=None
)


def current_context() -> DispatchContext:
    """The context of the dispatch being handled (a system context outside any dispatch)."""
    return _current.get() or SYSTEM_CONTEXT


@contextmanager
def use_context(ctx: DispatchContext) -> Iterator[DispatchContext]:
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)
