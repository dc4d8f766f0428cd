"""Server interceptors: per-RPC metrics, and the method name for log lines.

Every call of every service (ours, health, reflection) passes through here, so a call is
counted once with the status the client actually received: OK, the code the call set (our
Dispatcher answers a failed call by setting its status, then raising `Answered`, which the
edge turns into a response-less return), CANCELLED when the
client went away (DEADLINE_EXCEEDED when its deadline passed), UNKNOWN for an escaped
exception."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from typing import Any, TypeAlias

import grpc

from server.domain.errors import DomainError
from server.infrastructure.logs import rpc_method
from server.infrastructure.metrics import RpcMetrics

# Generic only in the type stubs, hence the quotes.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]"
Context = grpc.aio.ServicerContext[Any, Any]
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}

# What the validation interceptor's deserializer found wrong with this call's request (set in
# the call's task, read by the Dispatcher and counted here). Here, not in validation.py, so
# that module can use this one's types without a cycle.
edge_rejection: contextvars.ContextVar[DomainError | None] = contextvars.ContextVar(
    "loracle_edge_rejection", default=None
)


class LogContextInterceptor(grpc.aio.ServerInterceptor):
    """Puts the full method name where log records pick it up. grpc.aio runs interceptors
    and the handler in one task per call, so the value covers exactly that call (and the
    worker threads its dispatches run on, which copy the context)."""

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        rpc_method.set(handler_call_details.method)
        return await continuation(handler_call_details)


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every call by method and final status code. Async behaviours are
    wrapped (all of this server's are); a synchronous one would pass through uncounted."""

    def __init__(self, metrics: RpcMetrics) -> None:
        self._metrics = metrics
        # Per method: the handler below and its counted version.
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:  # no such method: the label would be whatever the client sent
            self._metrics.requests.labels("unknown", "UNIMPLEMENTED").inc()
            return None
        method = handler_call_details.method
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: Handler) -> Handler:
        """`handler`, counted; made once per method (the handlers below are made once, the
        validation interceptor's included), not once per call."""
        wrap = grpc.unary_unary_rpc_method_handler
        behavior: Any = handler.unary_unary
        if handler.unary_stream is not None:
            wrap, behavior = grpc.unary_stream_rpc_method_handler, handler.unary_stream
        elif handler.stream_unary is not None:
            wrap, behavior = grpc.stream_unary_rpc_method_handler, handler.stream_unary
        elif handler.stream_stream is not None:
            wrap, behavior = grpc.stream_stream_rpc_method_handler, handler.stream_stream
        if inspect.isasyncgenfunction(behavior):
            wrapped: Any = self._stream(method, behavior)
        elif inspect.iscoroutinefunction(behavior):
            wrapped = self._unary(method, behavior)
        else:
            return handler
        return wrap(wrapped, handler.request_deserializer, handler.response_serializer)

    def _unary(
        self, method: str, behavior: Callable[[Any, Context], Awaitable[Any]]
    ) -> Callable[[Any, Context], Awaitable[Any]]:
        """Unary responses, and streams written with `context.write` (health's Watch)."""

        async def call(request: Any, context: Context) -> Any:
            async with self._observed(method, context):
                return await behavior(request, context)

        return call

    def _stream(
        self, method: str, behavior: Callable[[Any, Context], AsyncGenerator[Any, None]]
    ) -> Callable[[Any, Context], AsyncIterator[Any]]:
        """Streams from async generators: timed to their end, each message counted."""
        sent = self._metrics.stream_messages.labels(method)

        async def call(request: Any, context: Context) -> AsyncIterator[Any]:
            # aclosing: a client that goes away mid-stream closes the handler now, not
            # whenever the abandoned generator is collected.
            async with (
                self._observed(method, context),
                aclosing(behavior(request, context)) as responses,
            ):
                async for response in responses:
                    sent.inc()
                    yield response

        return call

    @asynccontextmanager
    async def _observed(self, method: str, context: Context) -> AsyncIterator[None]:
        """Times a call and counts it under the status it ended with, and a request the
        validation interceptor refused under its reason (whatever the caller's credentials
        made of it: a flood of garbage frames shows even when it is unauthenticated)."""
        start = time.perf_counter()
        error: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._metrics.finished(method, status_name(context, error), time.perf_counter() - start)
            rejection = edge_rejection.get()
            if rejection is not None:
                self._metrics.rejected.labels(method, rejection.reason).inc()


def status_name(context: Context, error: BaseException | None) -> str:
    """The status code the client receives when the handler ended with `error`."""
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    code: object = context.code()  # set by abort/abort_with_status/set_code
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        return _CODE_NAMES.get(code, "UNKNOWN")
    return "OK" if error is None else "UNKNOWN"


def server_interceptors(rpc_metrics: RpcMetrics | None) -> list[grpc.aio.ServerInterceptor]:
    """Every call gets log context; calls are counted and timed when metrics are served."""
    interceptors: list[grpc.aio.ServerInterceptor] = [LogContextInterceptor()]
    if rpc_metrics is not None:
        interceptors.append(MetricsInterceptor(rpc_metrics))
    return interceptors
