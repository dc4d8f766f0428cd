"""Undefined enum numbers in any request, against a real in-process server. The cases come
from the service descriptors: every enum field reachable from every request message of both
services (through nested, repeated and map fields) gets a number its enum does not define,
and that RPC must answer INVALID_ARGUMENT with a BadRequest violation naming the field. A new
enum field, message or RPC is covered without touching this file."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import (
    Descriptor,
    FieldDescriptor,
    MethodDescriptor,
)
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from loracle.v1 import command_service_pb2, query_service_pb2
from server.rpc.server import LoracleServer
from server.rpc.validation import enum_violations
from tests.support import make_container

SERVICES = (
    command_service_pb2.DESCRIPTOR.services_by_name["CommandService"],
    query_service_pb2.DESCRIPTOR.services_by_name["QueryService"],
)


@dataclass(frozen=True)
class Case:
    method: MethodDescriptor
    fields: tuple[FieldDescriptor, ...]  # from the request down to the enum field

    @property
    def path(self) -> str:
        parts = []
        for field in self.fields:
            entry = field.message_type
            if entry is not None and entry.GetOptions().map_entry:
                parts.append(f"{field.name}['k']")
            elif field.is_repeated:
                parts.append(f"{field.name}[0]")
            else:
                parts.append(field.name)
        return ".".join(parts)

    def __str__(self) -> str:
        return f"{self.method.name}:{self.path}"


def enum_paths(
    message: Descriptor, seen: tuple[str, ...] = ()
) -> Iterator[tuple[FieldDescriptor, ...]]:
    for field in message.fields:
        entry = field.message_type
        if field.enum_type is not None:
            yield (field,)
        elif entry is not None and entry.GetOptions().map_entry:
            value = entry.fields_by_name["value"]
            if value.enum_type is not None:
                yield (field,)
            elif value.message_type is not None and value.message_type.full_name not in seen:
                for rest in enum_paths(value.message_type, (*seen, message.full_name)):
                    yield (field, *rest)
        elif entry is not None and entry.full_name not in seen:
            for rest in enum_paths(entry, (*seen, message.full_name)):
                yield (field, *rest)


CASES = [
    Case(method, fields)
    for service in SERVICES
    for method in service.methods
    for fields in enum_paths(method.input_type)
]


def undefined(field: FieldDescriptor) -> int:
    enum = field.enum_type
    if enum is None:  # a map whose values are the enum
        assert field.message_type is not None
        enum = field.message_type.fields_by_name["value"].enum_type
    assert enum is not None
    return max(v.number for v in enum.values) + 77


def request_for(case: Case) -> Message:
    request = message_factory.GetMessageClass(case.method.input_type)()
    target: Message = request
    for field in case.fields[:-1]:
        entry = field.message_type
        container = getattr(target, field.name)
        if entry is not None and entry.GetOptions().map_entry:
            target = container["k"]
        elif field.is_repeated:
            target = container.add()
        else:
            target = container
    last = case.fields[-1]
    container = getattr(target, last.name)
    entry = last.message_type
    if entry is not None and entry.GetOptions().map_entry:
        container["k"] = undefined(last)
    elif last.is_repeated:
        container.append(undefined(last))
    else:
        setattr(target, last.name, undefined(last))
    return request


def test_the_descriptors_yield_the_enum_fields_we_know() -> None:
    names = {str(c) for c in CASES}
    assert {"GenerateImage:spec.output_format", "ListGenerations:state"} <= names
    assert len({c.method.name for c in CASES}) >= 4


@pytest.mark.parametrize("case", CASES, ids=str)
def test_enum_violations_names_the_field(case: Case) -> None:
    violations = enum_violations(request_for(case))
    assert [v.field for v in violations] == [case.path]


@pytest.fixture
async def channel(tmp_path: Path) -> AsyncIterator[grpc.aio.Channel]:
    server = LoracleServer(make_container(tmp_path))
    port = await server.start("127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield ch
    finally:
        await server.stop(0)


@pytest.mark.parametrize("case", CASES, ids=str)
async def test_an_undefined_enum_number_is_invalid_argument_naming_the_field(
    channel: grpc.aio.Channel, case: Case
) -> None:
    service = case.method.containing_service
    path = f"/{service.full_name}/{case.method.name}"
    request = request_for(case)
    output = message_factory.GetMessageClass(case.method.output_type)
    if case.method.server_streaming:
        streaming: grpc.aio.UnaryStreamMultiCallable[Message, Message] = channel.unary_stream(
            path,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=output.FromString,
        )
        stream = streaming(request, timeout=30)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in stream:
                pass
    else:
        once: grpc.aio.UnaryUnaryMultiCallable[Message, Message] = channel.unary_unary(
            path,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=output.FromString,
        )
        unary = once(request, timeout=30)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await unary
    error = raised.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert case.path in (error.details() or "")
    trailer = dict(error.trailing_metadata() or ())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(trailer)
    fields = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    assert fields == [case.path]
