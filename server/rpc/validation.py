"""Checks every request of our services against its descriptor before a servicer sees it:
an enum field holding a number its enum does not define (proto3 keeps unknown numbers) is
refused with INVALID_ARGUMENT and a BadRequest violation naming the field by its path
(`spec.output_format`, `loras[2].weight_mode`), and so is an id field that is empty or not a
UUID (MALFORMED_ID). Walking the descriptors covers a new enum or id field, or a new RPC,
without a line here."""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from server.domain.errors import FieldViolation, Reason, ValidationError
from server.domain.models import is_uuid
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


# String fields named `id` or `*_id` hold ids this server made (UUIDs), except these: the
# client's idempotency key, a catalog's own record keys, and an audit filter.
NOT_OUR_IDS = frozenset({"request_id", "source_id", "aggregate_id"})


def id_fields(message: Descriptor, prefix: str = "", seen: tuple[str, ...] = ()) -> list[str]:
    """Paths of the id fields of a request type, through singular nested messages."""
    paths = []
    for field in message.fields:
        entry = field.message_type
        if _is_id(field):
            paths.append(f"{prefix}{field.name}")
        elif entry is not None and not field.is_repeated and entry.full_name not in seen:
            paths += id_fields(entry, f"{prefix}{field.name}.", (*seen, message.full_name))
    return paths


def id_violations(message: Message) -> list[FieldViolation]:
    """Every id field (see `id_fields`) that is empty or not a UUID. One rule for every RPC:
    a malformed id is INVALID_ARGUMENT here; a well-formed one that names nothing is
    NOT_FOUND from its handler."""
    violations = []
    descriptor: Any = message.DESCRIPTOR  # the stubs also allow upb's own Descriptor type
    for path in id_fields(descriptor):
        value: Any = message
        for name in path.split("."):
            value = getattr(value, name)
        if not value:
            violations.append(FieldViolation(path, "is required"))
        elif not is_uuid(value):
            violations.append(
                FieldViolation(path, "is not an id this server issued (ids are UUIDs)")
            )
    return violations


def _is_id(field: FieldDescriptor) -> bool:
    return (
        field.type == FieldDescriptor.TYPE_STRING
        and not field.is_repeated
        and (field.name == "id" or field.name.endswith("_id"))
        and field.name not in NOT_OUR_IDS
    )


class RequestValidationInterceptor(grpc.aio.ServerInterceptor):
    """Hands each request of our services to `request_error` (through a context variable:
    grpc.aio runs the interceptor and the handler in one task). The refusal itself comes from
    the bus after authorization, so an unauthenticated caller still gets UNAUTHENTICATED.
    Installed by LoracleServer."""

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


_request: contextvars.ContextVar[Message | None] = contextvars.ContextVar(
    "loracle_request", default=None
)


def request_error(request: Message | None = None) -> ValidationError | None:
    """What is wrong with the call's request (by default the one the interceptor saw in this
    task), or None. The Dispatcher puts it on the DispatchContext; the bus raises it after
    authorization."""
    request = request if request is not None else _request.get()
    if request is None:
        return None
    if violations := enum_violations(request):
        return ValidationError(violations)
    if violations := id_violations(request):
        return ValidationError(violations, reason=Reason.MALFORMED_ID)
    return None


def _checked_unary(
    behavior: Callable[[Any, Context], Awaitable[Any]],
) -> Callable[[Any, Context], Awaitable[Any]]:
    async def call(request: Any, context: Context) -> Any:
        _request.set(request if isinstance(request, Message) else None)
        return await behavior(request, context)

    return call


def _checked_stream(
    behavior: Callable[[Any, Context], AsyncGenerator[Any, None]],
) -> Callable[[Any, Context], AsyncIterator[Any]]:
    async def call(request: Any, context: Context) -> AsyncIterator[Any]:
        _request.set(request if isinstance(request, Message) else None)
        async with aclosing(behavior(request, context)) as responses:
            async for response in responses:
                yield response

    return call
