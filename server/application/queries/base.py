"""Queries read projections and change nothing, so their results can be cached. A cached
result is dropped when a projected event touches what the query reads (its `reads` topics)."""

from __future__ import annotations

import contextvars
import sys
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, fields, is_dataclass
from enum import Enum
from types import FunctionType
from typing import Any, ClassVar, Generic, TypeVar, cast, overload

from server.application.context import DispatchContext, current_context, use_context
from server.application.middleware import Middleware, Next, build_chain, default_middlewares
from server.application.ports import Consistency
from server.domain.errors import DeadlineExceededError, NotImplementedYetError

R = TypeVar("R")
B = TypeVar("B")
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
    appear), so a cache can bound itself by memory: strings, containers, dataclasses, arrays
    (`nbytes`) and messages (`ByteSize()`, their encoded size) to a few levels; deeper parts
    count as one object each."""
    size = sys.getsizeof(obj)
    if depth == 0 or isinstance(obj, _ATOMS):
        return size
    if isinstance(obj, dict):
        return size + sum(
            approx_size(k, depth - 1) + approx_size(v, depth - 1) for k, v in obj.items()
        )
    if isinstance(obj, tuple | list | set | frozenset):
        return size + sum(approx_size(v, depth - 1) for v in obj)
    if is_dataclass(obj):
        return size + sum(approx_size(getattr(obj, f.name), depth - 1) for f in fields(obj))
    nbytes = getattr(obj, "nbytes", None)
    if isinstance(nbytes, int):
        return size + nbytes
    byte_size = getattr(obj, "ByteSize", None)  # a built response message: its wire size
    if callable(byte_size):
        return size + int(byte_size())
    return size


# Sized by sys.getsizeof alone: scalars, and classes and functions (a cache key holds the
# query's type and the answer's builder, shared by every entry).
_ATOMS = (str, bytes, bytearray, int, float, bool, Enum, type, FunctionType)


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
        if self._max <= 0:  # a cache that keeps nothing (query_cache_entries = 0)
            return
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


# What a query's answer becomes before it is cached and returned: the transport's response
# message, built once per cache entry instead of once per call. Module-level functions, so
# equal builders are the same object (the builder is part of the cache key).
Build = Callable[[Any], Any]
# What a dispatch hands to the end of its chain past the middlewares (which pass on only the
# message and the context): the builder, and the cached answer of a dispatch on the loop.
_builder: contextvars.ContextVar[Build | None] = contextvars.ContextVar(
    "loracle_query_builder", default=None
)
_cached_answer: contextvars.ContextVar[QueryResult[Any]] = contextvars.ContextVar(
    "loracle_cached_answer"
)


class QueryBus:
    """Runs queries through the middleware chain. A cached answer can be had without blocking
    (`answer_cached`, for the event loop); anything else blocks (`dispatch`, on a thread)."""

    def __init__(
        self,
        middlewares: list[Middleware] | None = None,
        *,
        cache: QueryCache | None = None,
        consistency: ConsistencyWaiter | None = None,
    ) -> None:
        self._middlewares = default_middlewares() if middlewares is None else middlewares
        self._routes: dict[type[Any], Next] = {}
        # The same chain ending in the cached answer instead of the handler.
        self._cached_routes: dict[type[Any], Next] = {}
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
        unary = cast(IQueryHandler[Any, Any], handler)

        def call(message: Any, ctx: DispatchContext) -> Any:
            with use_context(ctx):
                _check_deadline(ctx)
                if ctx.min_position and self._consistency is not None:
                    self._consistency.wait_for(ctx.min_position, ctx.time_remaining())
                if is_stream:
                    return handler.handle(message)
                build = _builder.get()
                if not message.cacheable:
                    return _built(unary.handle(message), build)
                key = _key(message, build)
                hit, value = self.cache.get(key)
                if hit:
                    return value
                generation = self.cache.generation(message.reads)
                result = _built(unary.handle(message), build)
                self.cache.put(key, message.reads, generation, result)
                return result

        def cached(message: Any, ctx: DispatchContext) -> Any:
            _check_deadline(ctx)
            return _cached_answer.get()

        self._routes[query_type] = build_chain(self._middlewares, call)
        if not is_stream and query_type.cacheable:
            self._cached_routes[query_type] = build_chain(self._middlewares, cached)

    def is_registered(self, query_type: type[Any]) -> bool:
        return query_type in self._routes

    @overload
    def dispatch(self, query: IQuery[R], ctx: DispatchContext | None = None) -> QueryResult[R]: ...

    @overload
    def dispatch(
        self, query: IQuery[R], ctx: DispatchContext | None, build: Callable[[R], B]
    ) -> QueryResult[B]: ...

    def dispatch(
        self, query: IQuery[Any], ctx: DispatchContext | None = None, build: Build | None = None
    ) -> QueryResult[Any]:
        """Runs the query (blocking: the read model, a consistency wait). With `build`, the
        result's data is `build(data)`, and that is what the cache keeps."""
        route = self._routes.get(type(query))
        if route is None:
            raise NotImplementedYetError(f"{type(query).__name__} is not implemented yet")
        token = _builder.set(build)  # None too: a nested dispatch must not inherit one
        try:
            return cast(QueryResult[Any], route(query, ctx or current_context()))
        finally:
            _builder.reset(token)

    def answer_cached(
        self, query: IQuery[Any], ctx: DispatchContext, build: Build | None = None
    ) -> QueryResult[Any] | None:
        """The cached answer to `query` through the whole middleware chain (authorization,
        limits, rejected requests, the deadline, logging, timing and audit, as `dispatch`),
        or None, having run nothing, when answering would block: no cached answer, or a
        consistency position the read models have not reached yet. Never blocks, so the
        transport calls it on its event loop and sends only misses to a thread."""
        route = self._cached_routes.get(type(query))
        if route is None:
            return None
        if ctx.min_position and (
            self._consistency is None or not self._consistency.reached(ctx.min_position)
        ):
            return None
        with use_context(ctx):  # a key may depend on who asks (ListEventsQuery)
            key = _key(query, build)
        hit, value = self.cache.get(key)
        if not hit:
            return None
        token = _cached_answer.set(value)
        try:
            return cast(QueryResult[Any], route(query, ctx))
        finally:
            _cached_answer.reset(token)

    def stream(self, query: IStreamQuery[R], ctx: DispatchContext | None = None) -> Iterator[R]:
        route = self._routes.get(type(query))
        if route is None:
            raise NotImplementedYetError(f"{type(query).__name__} is not implemented yet")
        return cast(Iterator[R], route(query, ctx or current_context()))

    def invalidate(self, topics: set[str] | frozenset[str]) -> None:
        self.cache.invalidate(frozenset(topics))


def _check_deadline(ctx: DispatchContext) -> None:
    remaining = ctx.time_remaining()
    if remaining is not None and remaining <= 0:
        raise DeadlineExceededError("the deadline passed before the query ran")


def _key(query: IQuery[Any], build: Build | None) -> Hashable:
    key = query.cache_key()
    return key if build is None else (key, build)


def _built(result: QueryResult[Any], build: Build | None) -> QueryResult[Any]:
    return result if build is None else QueryResult(build(result.data))
