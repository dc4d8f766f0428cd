"""Bad input the transport must refuse plainly, against a real in-process server.

Undefined enum numbers: the cases come
from the service descriptors: every enum field reachable from every request message of both
services (through nested, repeated and map fields) gets a number its enum does not define,
and that RPC must answer INVALID_ARGUMENT with a BadRequest violation naming the field. A new
enum field, message or RPC is covered without touching this file.

Bad tokens: every RPC whose request has a `page_token` or `consistency_token` (found the
same way) gets random text, text that is not base64, base64 of garbage and base64 of JSON
that is nearly a token; each must be INVALID_ARGUMENT with one plain sentence, a violation
on that field and ErrorInfo INVALID_PAGE_TOKEN / INVALID_CONSISTENCY_TOKEN."""

from __future__ import annotations

import base64
import json
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from server.rpc.validation import enum_violations, id_fields
from tests.hostile_images import odd_images
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
    error = await call_expecting_error(channel, case.method, request_for(case))
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


TOKEN_REASONS = {
    "page_token": "INVALID_PAGE_TOKEN",
    "consistency_token": "INVALID_CONSISTENCY_TOKEN",
}
TOKEN_CASES = [
    (method, field)
    for service in SERVICES
    for method in service.methods
    for field in TOKEN_REASONS
    if field in method.input_type.fields_by_name
]
_rng = random.Random(12)
BAD_TOKENS = {
    "random text": "".join(chr(_rng.randrange(1, 0x2FFF)) for _ in range(40)),
    "not base64": "!!not*base64%%",
    "base64 of garbage": base64.urlsafe_b64encode(_rng.randbytes(33)).decode(),
    "base64 of a JSON list": base64.urlsafe_b64encode(b"[1, 2, 3]").decode(),
    # Matches an unfiltered listing's key, but no position reads from it.
    "nearly a token": base64.urlsafe_b64encode(
        json.dumps({"f": "", "t": "yesterday", "n": 1, "i": [], "p": "x", "o": -1}).encode()
    ).decode(),
    "a huge number": "9" * 40,
    "a negative number": "-5",
}
# What a decoder's own message would carry into the status.
LEAKS = ("codec", "decode", "base64", "json", "Error", "padding", "utf-8", "Expecting")


def test_the_descriptors_yield_the_token_fields_we_know() -> None:
    names = {f"{m.name}:{f}" for m, f in TOKEN_CASES}
    assert {"ListLoras:page_token", "ListEvents:page_token", "ListGenerations:page_token"} <= names
    assert {"SearchLoras:page_token", "GetLora:consistency_token"} <= names


@pytest.mark.parametrize("bad", list(BAD_TOKENS), ids=str)
@pytest.mark.parametrize("case", TOKEN_CASES, ids=lambda c: f"{c[0].name}:{c[1]}")
async def test_a_token_this_server_did_not_issue_is_refused_plainly(
    channel: grpc.aio.Channel, case: tuple[MethodDescriptor, str], bad: str
) -> None:
    method, field = case
    request = message_factory.GetMessageClass(method.input_type)()
    for path in id_fields(method.input_type):  # well-formed, so the token is what is wrong
        request = with_id(method, path, str(uuid.uuid4()))
    setattr(request, field, BAD_TOKENS[bad])
    if "query" in method.input_type.fields_by_name:
        request.query = "ink"  # type: ignore[attr-defined]  # SearchLoras needs one
    error = await call_expecting_error(channel, method, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    message = error.details() or ""
    assert message.startswith(f"{field} is not a token this server issued")
    assert not any(leak in message for leak in LEAKS), message
    reasons, fields = error_details(error)
    assert reasons == [TOKEN_REASONS[field]]
    assert fields == [field]


async def call_expecting_error(
    channel: grpc.aio.Channel, method: MethodDescriptor, request: Message
) -> grpc.aio.AioRpcError:
    path = f"/{method.containing_service.full_name}/{method.name}"
    output = message_factory.GetMessageClass(method.output_type)

    async def call() -> None:
        if method.server_streaming:
            streaming: grpc.aio.UnaryStreamMultiCallable[Message, Message] = channel.unary_stream(
                path,
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=output.FromString,
            )
            async for _ in streaming(request, timeout=30):
                pass
        else:
            once: grpc.aio.UnaryUnaryMultiCallable[Message, Message] = channel.unary_unary(
                path,
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=output.FromString,
            )
            await once(request, timeout=30)

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call()
    return raised.value


ID_CASES = [
    (method, path)
    for service in SERVICES
    for method in service.methods
    for path in id_fields(method.input_type)
]


def with_id(method: MethodDescriptor, path: str, value: str) -> Message:
    request = message_factory.GetMessageClass(method.input_type)()
    *parents, name = path.split(".")
    target: Any = request
    for parent in parents:
        target = getattr(target, parent)
    setattr(target, name, value)
    if method.name == "UpdateLora":  # a change to make, so the id is what is wrong
        request.update_mask.paths.append("name")  # type: ignore[attr-defined]
        request.lora.name = "renamed"  # type: ignore[attr-defined]
    if path.startswith("spec."):  # a generation otherwise valid, so the id is what is wrong
        spec: Any = request.spec  # type: ignore[attr-defined]
        spec.prompt = "a fox"
        if path.startswith("spec.mask_image."):  # a mask needs an init image
            spec.init_image.data = odd_images()["WebP"]
    if method.name == "UpscaleImage":  # an upscale otherwise valid
        request.upscaler = "Lanczos"  # type: ignore[attr-defined]
    return request


def test_the_descriptors_yield_the_id_fields_we_know() -> None:
    found = {f"{m.name}:{p}" for m, p in ID_CASES}
    assert {"GetLora:id", "UpdateLora:lora.id", "DeleteLora:id", "GetGeneration:id"} <= found
    assert {"WatchGeneration:generation_id", "CancelGeneration:generation_id"} <= found
    assert "FilterConfidentRecommendations:recommendation_id" in found


@pytest.mark.parametrize("value", ["", "not-an-id", "1234", "lora.safetensors"])
@pytest.mark.parametrize("case", ID_CASES, ids=lambda c: f"{c[0].name}:{c[1]}")
async def test_a_malformed_id_is_invalid_argument_on_every_rpc(
    channel: grpc.aio.Channel, case: tuple[MethodDescriptor, str], value: str
) -> None:
    method, path = case
    error = await call_expecting_error(channel, method, with_id(method, path, value))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    reasons, fields = error_details(error)
    assert reasons == ["MALFORMED_ID"]
    assert fields == [path]


@pytest.mark.parametrize("case", ID_CASES, ids=lambda c: f"{c[0].name}:{c[1]}")
async def test_a_well_formed_id_of_nothing_is_not_found_on_every_rpc(
    channel: grpc.aio.Channel, case: tuple[MethodDescriptor, str]
) -> None:
    method, path = case
    error = await call_expecting_error(channel, method, with_id(method, path, str(uuid.uuid4())))
    assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
    reasons, _ = error_details(error)
    assert len(reasons) == 1
    assert reasons[0].endswith("_NOT_FOUND")
    assert reasons[0] != "NOT_FOUND"


def error_details(error: grpc.aio.AioRpcError) -> tuple[list[str], list[str]]:
    """The ErrorInfo reasons and the BadRequest fields of an error's status."""
    status = status_pb2.Status.FromString(
        dict(error.trailing_metadata() or ())["grpc-status-details-bin"]
    )
    reasons, fields = [], []
    for detail in status.details:
        info, bad_request = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        if detail.Unpack(info):
            reasons.append(info.reason)
        elif detail.Unpack(bad_request):
            fields += [v.field for v in bad_request.field_violations]
    return reasons, fields
