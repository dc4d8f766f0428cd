"""Server reflection as grpcurl uses it, over a real grpc.aio server: the protos come with their
comments (`describe` is the API reference) and every declared name resolves, methods too."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection_pb2

from server.rpc.reflection import REFLECTION, enable_server_reflection, loracle_descriptor_set
from server.rpc.server import SERVICE_NAMES

Request = reflection_pb2.ServerReflectionRequest
Response = reflection_pb2.ServerReflectionResponse
Stub = grpc.aio.StreamStreamMultiCallable[Request, Response]


@pytest.fixture
async def stub() -> AsyncIterator[Stub]:
    server = grpc.aio.server()
    enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, REFLECTION), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel.stream_stream(
                f"/{REFLECTION}/ServerReflectionInfo",
                request_serializer=Request.SerializeToString,
                response_deserializer=Response.FromString,
            )
    finally:
        await server.stop(None)


async def ask(stub: Stub, request: Request) -> Response:
    responses = [response async for response in stub(iter([request]))]
    assert len(responses) == 1
    return responses[0]


def served_files(response: Response) -> list[str]:
    assert not response.HasField("error_response"), response.error_response.error_message
    return [
        descriptor_pb2.FileDescriptorProto.FromString(data).name
        for data in response.file_descriptor_response.file_descriptor_proto
    ]


def documented(
    file: descriptor_pb2.FileDescriptorProto,
) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, source path) of every message, field, enum, value, service and method."""
    prefix = file.package
    for i, message in enumerate(file.message_type):
        yield f"{prefix}.{message.name}", (4, i)
        for j, field in enumerate(message.field):
            yield f"{prefix}.{message.name}.{field.name}", (4, i, 2, j)
    for i, enum in enumerate(file.enum_type):
        yield f"{prefix}.{enum.name}", (5, i)
        for j, value in enumerate(enum.value):
            yield f"{prefix}.{value.name}", (5, i, 2, j)
    for i, service in enumerate(file.service):
        yield f"{prefix}.{service.name}", (6, i)
        for j, method in enumerate(service.method):
            yield f"{prefix}.{service.name}.{method.name}", (6, i, 2, j)


OURS = [f for f in loracle_descriptor_set().file if f.package == "loracle.v1"]


def test_the_descriptor_set_documents_every_declaration() -> None:
    assert {f.name for f in OURS} == {
        "loracle/v1/types.proto",
        "loracle/v1/command_service.proto",
        "loracle/v1/query_service.proto",
    }
    for file in OURS:
        comments = {tuple(loc.path): loc.leading_comments for loc in file.source_code_info.location}
        undocumented = [name for name, path in documented(file) if not comments.get(path)]
        assert not undocumented, f"{file.name}: {undocumented}"


@pytest.mark.parametrize("file", OURS, ids=lambda f: f.name)
async def test_served_files_keep_their_comments(
    stub: Stub, file: descriptor_pb2.FileDescriptorProto
) -> None:
    response = await ask(stub, Request(file_by_filename=file.name))
    served = descriptor_pb2.FileDescriptorProto.FromString(
        response.file_descriptor_response.file_descriptor_proto[0]
    )
    assert served == file  # source info included: every comment protoc saw


async def test_every_declared_name_resolves_to_its_file(
    stub: Stub,
) -> None:
    for file in OURS:
        for name, _ in documented(file):
            files = served_files(await ask(stub, Request(file_containing_symbol=name)))
            assert files[0] == file.name, name
            assert set(file.dependency) <= set(files[1:]), name  # imports come along


@pytest.mark.parametrize(
    ("symbol", "file"),
    [
        ("loracle.v1.CommandService.GenerateImage", "loracle/v1/command_service.proto"),
        ("loracle.v1.Lora.name", "loracle/v1/types.proto"),
        ("grpc.health.v1.Health", "grpc_health/v1/health.proto"),
        ("grpc.health.v1.Health.Check", "grpc_health/v1/health.proto"),
        (f"{REFLECTION}.ServerReflectionInfo", "grpc_reflection/v1alpha/reflection.proto"),
        ("google.protobuf.Timestamp", "google/protobuf/timestamp.proto"),
        ("google.rpc.ErrorInfo", "google/rpc/error_details.proto"),
    ],
)
async def test_methods_and_other_services_resolve(stub: Stub, symbol: str, file: str) -> None:
    assert served_files(await ask(stub, Request(file_containing_symbol=symbol)))[0] == file


async def test_unknown_names_are_not_found(
    stub: Stub,
) -> None:
    for request in (
        Request(file_containing_symbol="loracle.v1.Nope"),
        Request(file_by_filename="x"),
    ):
        response = await ask(stub, request)
        assert response.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


async def test_lists_the_services(stub: Stub) -> None:
    response = await ask(stub, Request(list_services=""))
    assert [s.name for s in response.list_services_response.service] == sorted(
        (*SERVICE_NAMES, health.SERVICE_NAME, REFLECTION)
    )
