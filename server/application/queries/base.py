"""Queries read projections and change nothing, so their results can be cached. A cached
result is dropped when a projected event touches what the query reads (its `reads` topics)."""

from __future__ import annotations

import sys
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, fields, is_dataclass
from enum import Enum
from typing import Any, ClassVar, Generic, TypeVar, cast

from server.application.context import DispatchContext, current_context, use_context
from server.application.middleware import Middleware, Next, build_chain, default_middlewares
from server.application.ports import Consistency
from server.domain.errors import DeadlineExceededError, NotImplementedYetError

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)
Q = TypeVar("Q", bound="IQuery[Any]")
SQ = TypeVar("SQ", bound="IStreamQuery[Any]")


class IQuery(Generic[R_co]):
    """Base of queries (frozen dataclasses). `reads` names the read models a query depends on;
    `cacheable = False` opts out (e.g. queries whose answer changes without events)."""

    reads: ClassVar[frozenset[str]] = frozenset()
    cacheable: ClassVar[bool] = True

    def cache_key(self) -> Hashable:
        """Equal queries share a cache entry; frozen dataclasses are their own key."""
        return (type(self), self)


class IStreamQuery(Generic[R_co]):
    """A query whose answer is a stream (watching a generation); never cached."""


@dataclass(frozen=True, slots=True)
class QueryResult(Generic[R]):
    """A query either succeeds with data or raises a DomainError."""

    data: R
    is_success: bool = True

    @staticmethod
    def success(data: R) -> QueryResult[R]:
        return QueryResult(data)


class IQueryHandler(ABC, Generic[Q, R]):
    @abstractmethod
    def handle(self, query: Q) -> QueryResult[R]: ...


class IStreamQueryHandler(ABC, Generic[SQ, R]):
    @abstractmethod
    def handle(self, query: SQ) -> Iterator[R]: ...


# The seed's name for the port.
ConsistencyWaiter = Consistency


def approx_size(obj: object, depth: int = 6) -> int:
    """A cheap over-estimate of the bytes `obj` holds (shared objects counted each time they
    appear), so a cache can bound itself by memory: strings, containers, dataclasses and
    arrays (`nbytes`) to a few levels; deeper parts count as one object each."""
    size = sys.getsizeof(obj)
    if depth == 0 or isinstance(obj, str | bytes | bytearray | int | float | bool | Enum):
        return size
    nbytes = getattr(obj, "nbytes", None)
    if isinstance(nbytes, int):
        return size + nbytes
    if isinstance(obj, dict):
        return size + sum(
            approx_size(k, depth - 1) + approx_size(v, depth - 1) for k, v in obj.items()
        )
    if isinstance(obj, tuple | list | set | frozenset):
        return size + sum(approx_size(v, depth - 1) for v in obj)
    if is_dataclass(obj) and not isinstance(obj, type):
        return size + sum(approx_size(getattr(obj, f.name), depth - 1) for f in fields(obj))
    return size


class QueryCache:
    """A bounded LRU keyed by `cache_key()`, invalidated by topic. A result computed while its
    topic changed is not stored, so an invalidation racing a slow query cannot be undone.

    Bounded by entries and by bytes (an estimate of key and value), since hostile requests
    choose the keys (megabyte strings, endless distinct queries) and large pages the values:
    the least recently used go first, and an entry bigger than `max_entry_bytes` is not kept
    at all (it would evict many small ones for one unlikely repeat)."""

    def __init__(
        self,
        max_entries: int = 2048,
        max_bytes: int = 64 * 1024 * 1024,
        max_entry_bytes: int | None = None,
    ) -> None:
        self._max = max_entries
        self._max_bytes = max_bytes
        self._max_entry_bytes = max_bytes // 16 if max_entry_bytes is None else max_entry_bytes
        self._entries: OrderedDict[Hashable, tuple[frozenset[str], Any, int]] = OrderedDict()
        self._generations: dict[str, int] = {}
        self._lock = threading.Lock()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def generation(self, topics: frozenset[str]) -> tuple[int, ...]:
        with self._lock:
            return tuple(self._generations.get(t, 0) for t in sorted(topics))

    def get(self, key: Hashable) -> tuple[bool, Any]:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return False, None
            self._entries.move_to_end(key)
            self.hits += 1
            return True, entry[1]

    def put(
        self, key: Hashable, topics: frozenset[str], generation: tuple[int, ...], value: Any
    ) -> None:
        size = approx_size(key) + approx_size(value)  # outside the lock: it walks the value
        if size > self._max_entry_bytes:
            return
        with self._lock:
            if tuple(self._generations.get(t, 0) for t in sorted(topics)) != generation:
                return
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[2]
            self._entries[key] = (topics, value, size)
            self._bytes += size
            while len(self._entries) > self._max or self._bytes > self._max_bytes:
                _, (_, _, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped

    def invalidate(self, topics: frozenset[str] | set[str]) -> None:
        with self._lock:
            for topic in topics:
                self._generations[topic] = self._generations.get(topic, 0) + 1
            stale = [k for k, (reads, _, _) in self._entries.items() if reads & topics]
            for key in stale:
                self._bytes -= self._entries.pop(key)[2]

    @property
    def bytes(self) -> int:
        """The estimated bytes held (keys and values)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)


class QueryBus:
    def __init__(
        self,
        middlewares: list[Middleware] | None = None,
        *,
        cache: QueryCache | None = None,
        consistency: ConsistencyWaiter | None = None,
    ) -> None:
        self._middlewares = default_middlewares() if middlewares is None else middlewares
        self._routes: dict[type[Any], Next] = {}
        self.cache = cache if cache is not None else QueryCache()
        self._consistency = consistency

    def register(
        self,
        query_type: type[Any],
        handler: IQueryHandler[Any, Any] | IStreamQueryHandler[Any, Any],
    ) -> None:
        from server.application.commands.base import HandlerAlreadyRegisteredError

        if query_type in self._routes:
            raise HandlerAlreadyRegisteredError(f"{query_type.__name__} already has a handler")
        is_stream = issubclass(query_type, IStreamQuery)
        if is_stream != isinstance(handler, IStreamQueryHandler):
            raise TypeError(f"{query_type.__name__}: stream queries need stream handlers")

        def call(message: Any, ctx: DispatchContext) -> Any:
            with use_context(ctx):
                remaining = ctx.time_remaining()
                if remaining is not None and remaining <= 0:
                    raise DeadlineExceededError("the deadline passed before the query ran")
                if ctx.min_position and self._consistency is not None:
                    self._consistency.wait_for(ctx.min_position, ctx.time_remaining())
                if is_stream or not message.cacheable:
                    return handler.handle(message)
                key = message.cache_key()
                hit, value = self.cache.get(key)
                if hit:
                    return value
                generation = self.cache.generation(message.reads)
                result = handler.handle(message)
                self.cache.put(key, message.reads, generation, result)
                return result

        self._routes[query_type] = build_chain(self._middlewares, call)

    def is_registered(self, query_type: type[Any]) -> bool:
        return query_type in self._routes

    def dispatch(self, query: IQuery[R], ctx: DispatchContext | None = None) -> QueryResult[R]:
        route = self._routes.get(type(query))
        if route is None:
            raise NotImplementedYetError(f"{type(query).__name__} is not implemented yet")
        return cast(QueryResult[R], route(query, ctx or current_context()))

    def stream(self, query: IStreamQuery[R], ctx: DispatchContext | None = None) -> Iterator[R]:
        route = self._routes.get(type(query))
        if route is None:
            raise NotImplementedYetError(f"{type(query).__name__} is not implemented yet")
        return cast(Iterator[R], route(query, ctx or current_context()))

    def invalidate(self, topics: set[str] | frozenset[str]) -> None:
        self.cache.invalidate(frozenset(topics))
