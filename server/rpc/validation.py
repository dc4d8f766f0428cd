"""Checks every request of our services before a servicer sees it, in the order a client
should learn of them: a frame over the method's size limit (RESOURCE_EXHAUSTED
REQUEST_TOO_LARGE), bytes that do not parse as the method's message (INVALID_ARGUMENT
UNDECODABLE_REQUEST), a field over its limit (server/rpc/field_limits.py), an enum field
holding a number its enum does not define (proto3 keeps unknown numbers), and an id field that
is empty or not a UUID (MALFORMED_ID); violations name the field by its path
(`spec.output_format`, `records[3].name`). Walking the descriptors covers a new field or RPC
without a line here. Nothing is raised here: the finding is raised by the bus after
authentication and authorization (RejectedRequestMiddleware), so a caller without the right
learns nothing about its request."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import aclosing
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from server.domain.errors import (
    DomainError,
    FieldViolation,
    InvalidTokenError,
    Reason,
    RequestTooLargeError,
    UndecodableRequestError,
    ValidationError,
)
from server.domain.models import is_uuid
from server.rpc.errors import Answered
from server.rpc.field_limits import MIB, Limit, limit_violations, limits, request_types
from server.rpc.interceptors import Continuation, Handler, edge_rejection

log = logging.getLogger("loracle.rpc")

# Only our own services: health and reflection validate their own requests.
PACKAGE_PREFIX = "/loracle.v1."


def enum_violations(message: Message, prefix: str = "") -> list[FieldViolation]:
    """Every set enum field of `message` (recursively, through repeated fields, maps and
    nested messages) whose number its enum does not define."""
    return list(_walk(message, prefix))


def _walk(message: Message, prefix: str) -> Iterator[FieldViolation]:
    for field, value in message.ListFields():
        entry = field.message_type
        if entry is not None and not _has_enums(entry):
            continue  # (a catalog import's records: thousands of messages, no enum in them)
        path = f"{prefix}{field.name}"
        if entry is not None and entry.GetOptions().map_entry:
            value_field = entry.fields_by_name["value"]
            for key, item in value.items():
                yield from _value(value_field, item, f"{path}[{key!r}]")
        elif field.is_repeated:
            for index, item in enumerate(value):
                yield from _value(field, item, f"{path}[{index}]")
        else:
            yield from _value(field, value, path)


@functools.cache
def _has_enums(message: Descriptor) -> bool:
    """Whether `message` has an enum field, directly or in a message inside it."""
    return _enums_within(message, frozenset())


def _enums_within(message: Descriptor, seen: frozenset[str]) -> bool:
    if message.full_name in seen:
        return False
    seen = seen | {message.full_name}
    return any(
        field.enum_type is not None
        or (field.message_type is not None and _enums_within(field.message_type, seen))
        for field in message.fields
    )


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
        *parents, leaf = path.split(".")
        for name in parents:
            if not value.HasField(name):  # an id inside an unset message is not asked for
                break
            value = getattr(value, name)
        else:
            value = getattr(value, leaf)
        if value is message or not isinstance(value, str):
            continue
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


# Requests are small except a catalog import and generations with input images: every
# other method takes at most this much.
SMALL_REQUEST_BYTES = 1 * MIB
LARGE_REQUEST_METHODS = frozenset(
    {
        "/loracle.v1.CommandService/ImportLoraCatalog",
        "/loracle.v1.CommandService/GenerateImage",
        "/loracle.v1.CommandService/SubmitGeneration",
        "/loracle.v1.CommandService/UpscaleImage",
    }
)


def method_limits(max_message_bytes: int) -> dict[str, int]:
    """Each RPC's request size limit in bytes: `max_message_bytes` for a catalog import and
    the generations that may carry images, SMALL_REQUEST_BYTES (or less, when
    `max_message_bytes` is lower) for the rest."""
    return {
        method: (
            max_message_bytes
            if method in LARGE_REQUEST_METHODS
            else min(SMALL_REQUEST_BYTES, max_message_bytes)
        )
        for method in request_types()
    }


class RequestValidationInterceptor(grpc.aio.ServerInterceptor):
    """Wraps the request deserializer of each method of our services: the size is checked
    before parsing, a parse error becomes an empty request of the method's type (instead of
    grpc's UNKNOWN with Python's exception text and a logged traceback per frame), and a
    parsed request is checked (`check_request`). The finding goes into a context variable:
    grpc.aio deserializes and runs the handler in the call's one task, so the Dispatcher reads
    it there (`request_error`). Installed by LoracleServer."""

    def __init__(
        self,
        max_message_bytes: int = 16 * MIB,
        table: dict[str, Limit] | None = None,
    ) -> None:
        self._sizes = method_limits(max_message_bytes)
        self._table = table if table is not None else limits()
        # Per method: the handler the service gave and its wrapped version.
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(PACKAGE_PREFIX):
            return handler
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: Handler) -> Handler:
        """`handler` with the checking deserializer; made once per method (the servicer's
        handlers are made once), not once per call."""
        parse: Any = handler.request_deserializer
        if parse is None:
            return handler
        deserialize = self._deserializer(method, parse)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _answering_unary(handler.unary_unary), deserialize, handler.response_serializer
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _answering_stream(handler.unary_stream), deserialize, handler.response_serializer
            )
        return handler

    def _deserializer(self, method: str, parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
        input_type = request_types().get(method)
        limit = self._sizes.get(method, SMALL_REQUEST_BYTES)
        rpc_name = method.rsplit("/", 1)[-1]
        table = self._table

        def deserialize(raw: bytes) -> Any:
            # A refused frame becomes parse(b""): the method's own type, every field unset.
            if len(raw) > limit:
                edge_rejection.set(RequestTooLargeError(rpc_name, len(raw), limit))
                return parse(b"")
            try:
                request = parse(raw)
            except Exception:  # DecodeError, or a UnicodeDecodeError on some runtimes
                name = input_type.name if input_type is not None else rpc_name
                edge_rejection.set(UndecodableRequestError(name))
                return parse(b"")
            edge_rejection.set(check_request(request, table))
            return request

        return deserialize


def _answering_unary(behavior: Any) -> Any:
    """A handler that ends with `Answered` (its status set) returns no response instead."""

    async def call(request: Any, context: Any) -> Any:
        try:
            return await behavior(request, context)
        except Answered:
            return None

    return call


def _answering_stream(behavior: Any) -> Any:
    """A stream that ends with `Answered` (its status set) just ends."""

    async def call(request: Any, context: Any) -> Any:
        async with aclosing(behavior(request, context)) as responses:
            try:
                async for response in responses:
                    yield response
            except Answered:
                return

    return call


_DEFAULT_TABLE = limits()


def check_request(message: Message, table: dict[str, Limit] | None = None) -> DomainError | None:
    """What is wrong with a parsed request, or None: field limits first (a 20 MB query is
    not walked further), then enum numbers, then ids."""
    if violations := limit_violations(message, _DEFAULT_TABLE if table is None else table):
        return _token_error(violations) or ValidationError(violations)
    if violations := enum_violations(message):
        return ValidationError(violations)
    if violations := id_violations(message):
        return ValidationError(violations, reason=Reason.MALFORMED_ID)
    return None


def _token_error(violations: list[FieldViolation]) -> InvalidTokenError | None:
    """An over-long token is a token this server did not issue: the same answer (and
    reason) as any other forged token, so a client handles one case."""
    fields = {violation.field for violation in violations}
    if "page_token" in fields:
        return InvalidTokenError.page()
    if "consistency_token" in fields:
        return InvalidTokenError.consistency()
    return None


def request_error() -> DomainError | None:
    """What the interceptor found wrong with this call's request, or None. The Dispatcher
    puts it on the DispatchContext; the bus raises it after authorization."""
    return edge_rejection.get()


FRAME_REASONS = frozenset({Reason.UNDECODABLE_REQUEST, Reason.REQUEST_TOO_LARGE})


class RejectionLog:
    """Logs undecodable and oversized frames at most once per principal per `period`: a
    client sending garbage in a loop must not fill the log (nor write a traceback per
    frame); the metric `loracle_rejected_requests_total` counts every one."""

    def __init__(self, period: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._period = period
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def note(self, rejection: DomainError | None, principal: str, method: str) -> None:
        if rejection is None or rejection.reason not in FRAME_REASONS:
            return
        now = self._clock()
        with self._lock:
            last = self._last.get(principal)
            if last is not None and now - last < self._period:
                self._suppressed[principal] = self._suppressed.get(principal, 0) + 1
                return
            if len(self._last) > 10_000:  # bounded: forget principals quiet for a period
                self._last = {p: t for p, t in self._last.items() if now - t < self._period}
            self._last[principal] = now
            suppressed = self._suppressed.pop(principal, 0)
        more = f" (and {suppressed} more since the last report)" if suppressed else ""
        log.warning(
            "refused %s from principal=%s: %s (%s)%s",
            method,
            principal,
            rejection.message,
            rejection.reason,
            more,
        )
