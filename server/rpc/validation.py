"""Checks every request of our services against its descriptor before a servicer sees it:
an enum field holding a number its enum does not define (proto3 keeps unknown numbers) is
refused with INVALID_ARGUMENT and a BadRequest violation naming the field by its path
(`spec.output_format`, `loras[2].weight_mode`). Walking the descriptors covers a new enum
field, or a new RPC, without a line here."""

from __future__ import annotations

import inspect
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from server.domain.errors import FieldViolation, ValidationError
from server.rpc.dispatch import abort, correlation_id
from server.rpc.interceptors import Context, Continuation, Handler

# Only our own services: health and reflection validate their own requests.
PACKAGE_PREFIX = "/loracle.v1."


def enum_violations(message: Message, prefix: str = "") -> list[FieldViolation]:
    """Every set enum field of `message` (recursively, through repeated fields, maps and
    nested messages) whose number its enum does not define."""
    return list(_walk(message, prefix))


def _walk(message: Message, prefix: str) -> Iterator[FieldViolation]:
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            value_field = entry.fields_by_name["value"]
            for key, item in value.items():
                yield from _value(value_field, item, f"{path}[{key!r}]")
        elif field.is_repeated:
            for index, item in enumerate(value):
                yield from _value(field, item, f"{path}[{index}]")
        else:
            yield from _value(field, value, path)


def _value(field: FieldDescriptor, value: Any, path: str) -> Iterator[FieldViolation]:
    enum = field.enum_type
    if enum is not None:
        if value not in enum.values_by_number:
            yield FieldViolation(
                path,
                f"{value} is not a {enum.name} value; use one of "
                + ", ".join(v.name for v in enum.values if v.number != 0),
            )
    elif field.message_type is not None:
        yield from _walk(value, f"{path}.")


class RequestValidationInterceptor(grpc.aio.ServerInterceptor):
    """Refuses a request with undefined enum numbers before its servicer runs. Installed by
    LoracleServer innermost, so metrics count the refusal like any other status."""

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(PACKAGE_PREFIX):
            return handler
        unary: Any = handler.unary_unary
        stream: Any = handler.unary_stream
        if unary is not None and inspect.iscoroutinefunction(unary):
            return grpc.unary_unary_rpc_method_handler(
                _checked_unary(unary),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if stream is not None and inspect.isasyncgenfunction(stream):
            return grpc.unary_stream_rpc_method_handler(
                _checked_stream(stream),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return handler


async def _check(request: Any, context: Context) -> None:
    if isinstance(request, Message):
        violations = enum_violations(request)
        if violations:
            await abort(context, ValidationError(violations), correlation_id(context))


def _checked_unary(
    behavior: Callable[[Any, Context], Awaitable[Any]],
) -> Callable[[Any, Context], Awaitable[Any]]:
    async def call(request: Any, context: Context) -> Any:
        await _check(request, context)
        return await behavior(request, context)

    return call


def _checked_stream(
    behavior: Callable[[Any, Context], AsyncGenerator[Any, None]],
) -> Callable[[Any, Context], AsyncIterator[Any]]:
    async def call(request: Any, context: Context) -> AsyncIterator[Any]:
        await _check(request, context)
        async with aclosing(behavior(request, context)) as responses:
            async for response in responses:
                yield response

    return call
