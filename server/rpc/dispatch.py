"""Runs bus dispatches off the event loop and turns failures into statuses. Servicers use
only this, so every RPC gets the same context, deadline and error handling."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, NoReturn, TypeVar, cast

import grpc

from server.application.commands import CommandBus, CommandResult, ICommand, IStreamCommand
from server.application.context import DispatchContext
from server.application.queries import IQuery, IStreamQuery, QueryBus, QueryResult
from server.application.security import TokenAuthenticator
from server.domain.errors import DomainError, FieldViolation, ValidationError
from server.domain.tokens import TokenSigner, new_key
from server.infrastructure.logs import rpc_method
from server.rpc.errors import Answered, to_status
from server.rpc.mapping import position_from_token
from server.rpc.validation import RejectionLog, request_error

T = TypeVar("T")
R = TypeVar("R")
_STREAM_WINDOW = 32
MAX_REQUEST_ID = 128


class Dispatcher:
    def __init__(
        self,
        commands: CommandBus,
        queries: QueryBus,
        authenticator: TokenAuthenticator | None = None,
        tokens: TokenSigner | None = None,
    ) -> None:
        self.commands = commands
        self.queries = queries
        self.authenticator = authenticator or TokenAuthenticator(())
        self.rejections = RejectionLog()
        # The deployment's signer (the composition root's); a random key serves a test's own.
        self.tokens = tokens or TokenSigner(new_key())

    def context(
        self,
        rpc: grpc.aio.ServicerContext[Any, Any],
        *,
        request_id: str = "",
        consistency_token: str = "",
    ) -> DispatchContext:
        """Only authentication raises here. Everything wrong with the request itself (what
        the validation interceptor found, the request_id, the consistency token) becomes
        `ctx.rejected`, which the bus raises after authorization: a caller without the
        method's scope gets PERMISSION_DENIED whatever it sent."""
        remaining = rpc.time_remaining()
        found = request_error()
        method = rpc_method.get() or "?"
        try:
            principal = self.authenticator.authenticate(_metadata(rpc, "authorization"))
        except DomainError:
            self.rejections.note(found, "unauthenticated", method)
            raise
        self.rejections.note(found, principal.name, method)
        rejected, min_position = found, 0
        if rejected is None:
            try:
                _check_request_id(request_id)
                min_position = position_from_token(consistency_token, self.tokens)
            except DomainError as exc:
                rejected = exc
        return DispatchContext(
            principal=principal.name,
            scopes=principal.scopes,
            # A rejected request's id is not stored, but it is logged: only a clean one.
            request_id=request_id if rejected is None else "",
            correlation_id=correlation_id(rpc),
            deadline=None if remaining is None else time.monotonic() + remaining,
            min_position=min_position,
            rejected=rejected,
        )

    async def command(
        self, rpc: grpc.aio.ServicerContext[Any, Any], command: ICommand[T], request_id: str
    ) -> tuple[T, int]:
        """The command's data and consistency position; aborts the RPC on failure."""
        ctx = await self._context_or_abort(rpc, request_id=request_id)
        try:
            result: CommandResult[T] = await _in_thread(self.commands.dispatch, command, ctx)
            data = result.unwrap()
        except Exception as exc:
            await abort(rpc, exc, ctx.correlation_id)
        return data, result.position

    async def query(
        self, rpc: grpc.aio.ServicerContext[Any, Any], query: IQuery[T], consistency_token: str = ""
    ) -> T:
        ctx = await self._context_or_abort(rpc, consistency_token=consistency_token)
        try:
            result: QueryResult[T] = await _in_thread(self.queries.dispatch, query, ctx)
        except Exception as exc:
            await abort(rpc, exc, ctx.correlation_id)
        return result.data

    async def respond(
        self,
        rpc: grpc.aio.ServicerContext[Any, Any],
        query: IQuery[Any],
        build: Callable[[Any], R],
        consistency_token: str = "",
    ) -> R:
        """`build(data)` of the query's answer: the response message, which the query cache
        keeps (so `build` must be a module-level function, the same object every call, and
        its message is shared: never modify it). A cached answer is given on the event loop,
        through the bus's whole middleware chain; only a miss takes a worker thread."""
        ctx = await self._context_or_abort(rpc, consistency_token=consistency_token)
        try:
            result = self.queries.answer_cached(query, ctx, build)
            if result is None:
                result = await _in_thread(self.queries.dispatch, query, ctx, build)
        except Exception as exc:
            await abort(rpc, exc, ctx.correlation_id)
        return cast(R, result.data)

    async def stream_command(
        self, rpc: grpc.aio.ServicerContext[Any, Any], command: IStreamCommand[T], request_id: str
    ) -> AsyncIterator[T]:
        ctx = await self._context_or_abort(rpc, request_id=request_id)
        async for item in self._drain(rpc, ctx, lambda: self.commands.stream(command, ctx)):
            yield item

    async def stream_query(
        self, rpc: grpc.aio.ServicerContext[Any, Any], query: IStreamQuery[T]
    ) -> AsyncIterator[T]:
        ctx = await self._context_or_abort(rpc)
        async for item in self._drain(rpc, ctx, lambda: self.queries.stream(query, ctx)):
            yield item

    async def _drain(
        self,
        rpc: grpc.aio.ServicerContext[Any, Any],
        ctx: DispatchContext,
        start: Callable[[], Iterator[T]],
    ) -> AsyncIterator[T]:
        """Runs the blocking stream on its own thread, which hands items to the event loop
        (at most `_STREAM_WINDOW` ahead of the client, so a slow reader holds the producer
        back instead of filling memory). One wake-up per item instead of a thread-pool round
        trip per item roughly doubles chunk throughput."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        window = threading.Semaphore(_STREAM_WINDOW)
        stopped = threading.Event()

        def post(kind: str, value: Any) -> None:
            try:
                loop.call_soon_threadsafe(items.put_nowait, (kind, value))
            except RuntimeError:  # the loop is gone (shutdown): nobody is listening
                stopped.set()

        def produce() -> None:
            stream: Iterator[T] | None = None
            try:
                stream = start()
                for item in stream:
                    while not window.acquire(timeout=0.5):
                        if stopped.is_set():
                            return
                    if stopped.is_set():
                        return
                    post("item", item)
                post("done", None)
            except BaseException as exc:  # handed to the loop, which maps it to a status
                if not stopped.is_set():
                    post("error", exc)
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()  # runs the handler's clean-up (e.g. cancelling its job) here

        producer = threading.Thread(target=produce, name="loracle-stream", daemon=True)
        producer.start()
        try:
            while True:
                kind, value = await items.get()
                if kind == "done":
                    return
                if kind == "error":
                    await abort(rpc, value, ctx.correlation_id)
                window.release()
                yield value
        finally:
            # Reached too when the client cancels (the generator is closed): the handler
            # sees ctx.abandoned() and stops, e.g. cancelling its generation job.
            ctx.cancellation.set()
            stopped.set()
            window.release()

    async def _context_or_abort(
        self, rpc: grpc.aio.ServicerContext[Any, Any], **kwargs: str
    ) -> DispatchContext:
        try:
            return self.context(rpc, **kwargs)
        except Exception as exc:
            await abort(rpc, exc, correlation_id(rpc))


def _check_request_id(request_id: str) -> None:
    if len(request_id) > MAX_REQUEST_ID or not request_id.isprintable():
        # It is logged and stored: no control characters (forged log lines), no megabytes.
        raise ValidationError(
            FieldViolation("request_id", f"at most {MAX_REQUEST_ID} printable characters")
        )


async def abort(
    rpc: grpc.aio.ServicerContext[Any, Any], exc: BaseException, correlation_id: str
) -> NoReturn:
    """Answers the call with `exc`'s status. Not gRPC's `abort_with_status`: the AbortError
    it raises stays on the call's state while its traceback holds every frame it passed
    through (with the call's context and request), a cycle only a full garbage collection
    frees, so hostile requests refused in a loop piled up memory (docs/benchmarks.md). The
    answered error's own traceback goes for the same reason."""
    status = to_status(exc, correlation_id)
    exc.__traceback__ = None
    rpc.set_code(status.code)
    rpc.set_details(status.details)
    rpc.set_trailing_metadata(status.trailing_metadata)
    raise Answered


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Torch and the database block; the event loop must not."""
    return await asyncio.to_thread(fn, *args)


def _metadata(rpc: grpc.aio.ServicerContext[Any, Any], key: str) -> str | None:
    for name, value in rpc.invocation_metadata() or ():
        if name == key and isinstance(value, str):
            return value
    return None


def correlation_id(rpc: grpc.aio.ServicerContext[Any, Any]) -> str:
    value = _metadata(rpc, "x-correlation-id")
    return value if value and len(value) <= 64 else uuid.uuid4().hex
