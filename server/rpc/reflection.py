"""Server reflection that serves the protos with their comments and resolves every symbol.

grpcio-reflection answers from the runtime descriptor pool, which keeps no source info (so
`grpcurl describe` shows no documentation) and cannot find methods by name (so
`grpcurl describe loracle.v1.CommandService.GenerateImage` says "Symbol not found"). This
servicer answers from `FileDescriptorProto`s instead: ours from the descriptor set that
`scripts/gen_protos.sh` writes with `--include_source_info`, the others' (health, reflection)
copied from the pool, and it indexes every symbol a `.proto` declares, methods and fields too.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from importlib import resources

import grpc
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection_pb2

DESCRIPTOR_SET = "descriptors.binpb"  # beside the generated modules of loracle.v1
REFLECTION = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name


def loracle_descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    """Our protos and their imports, with comments (written by scripts/gen_protos.sh)."""
    data = resources.files("loracle.v1").joinpath(DESCRIPTOR_SET).read_bytes()
    return descriptor_pb2.FileDescriptorSet.FromString(data)


class DescriptorIndex:
    """File descriptors by file name, and the file that declares each fully qualified name."""

    def __init__(self, files: Iterable[descriptor_pb2.FileDescriptorProto]) -> None:
        self._files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        self._symbols: dict[str, str] = {}
        self._extensions: dict[tuple[str, int], str] = {}
        for file in files:
            self.add(file)

    def add(self, file: descriptor_pb2.FileDescriptorProto) -> None:
        if file.name in self._files:
            return
        self._files[file.name] = file
        prefix = f"{file.package}." if file.package else ""
        for name in _declared_names(file, prefix):
            self._symbols.setdefault(name, file.name)
        for extension in _extensions(file):
            self._extensions[(extension.extendee.lstrip("."), extension.number)] = file.name

    def add_compiled(self, compiled: descriptor.FileDescriptor) -> None:
        """Adds a file of the runtime pool (no comments there), and its imports."""
        pending = [compiled]
        while pending:
            file = pending.pop()
            if file.name not in self._files:
                proto = descriptor_pb2.FileDescriptorProto()
                file.CopyToProto(proto)
                self.add(proto)
                pending.extend(file.dependencies)

    def file_by_name(self, name: str) -> list[bytes] | None:
        return self._with_imports(name) if name in self._files else None

    def file_containing_symbol(self, symbol: str) -> list[bytes] | None:
        name = self._symbols.get(symbol.lstrip("."))
        return None if name is None else self._with_imports(name)

    def file_containing_extension(self, extendee: str, number: int) -> list[bytes] | None:
        name = self._extensions.get((extendee, number))
        return None if name is None else self._with_imports(name)

    def extension_numbers(self, extendee: str) -> list[int] | None:
        if self._symbols.get(extendee) is None:
            return None
        return sorted(number for (base, number) in self._extensions if base == extendee)

    def _with_imports(self, name: str) -> list[bytes]:
        """The file first, then every file it imports, transitively (what clients expect)."""
        order: list[str] = []
        pending = [name]
        while pending:
            current = pending.pop()
            if current in order or current not in self._files:
                continue
            order.append(current)
            pending.extend(self._files[current].dependency)
        return [self._files[n].SerializeToString() for n in order]


def _declared_names(file: descriptor_pb2.FileDescriptorProto, prefix: str) -> Iterator[str]:
    for message in file.message_type:
        yield from _message_names(message, prefix)
    for enum in file.enum_type:
        yield from _enum_names(enum, prefix)
    for service in file.service:
        yield prefix + service.name
        for method in service.method:
            yield f"{prefix}{service.name}.{method.name}"
    for extension in file.extension:
        yield prefix + extension.name


def _message_names(message: descriptor_pb2.DescriptorProto, prefix: str) -> Iterator[str]:
    name = prefix + message.name
    yield name
    for field in (*message.field, *message.extension):
        yield f"{name}.{field.name}"
    for oneof in message.oneof_decl:
        yield f"{name}.{oneof.name}"
    for nested in message.nested_type:
        yield from _message_names(nested, f"{name}.")
    for enum in message.enum_type:
        yield from _enum_names(enum, f"{name}.")


def _enum_names(enum: descriptor_pb2.EnumDescriptorProto, prefix: str) -> Iterator[str]:
    yield prefix + enum.name
    for value in enum.value:  # enum values are siblings of their enum, as in C++ scoping
        yield prefix + value.name


def _extensions(
    file: descriptor_pb2.FileDescriptorProto,
) -> Iterator[descriptor_pb2.FieldDescriptorProto]:
    yield from file.extension
    pending = list(file.message_type)
    while pending:
        message = pending.pop()
        yield from message.extension
        pending.extend(message.nested_type)


class ReflectionServicer:
    """grpc.reflection.v1alpha.ServerReflection over a `DescriptorIndex`."""

    def __init__(self, service_names: Iterable[str], index: DescriptorIndex) -> None:
        self._service_names = tuple(sorted(service_names))
        self._index = index

    async def ServerReflectionInfo(
        self,
        request_iterator: AsyncIterable[reflection_pb2.ServerReflectionRequest],
        context: grpc.aio.ServicerContext[
            reflection_pb2.ServerReflectionRequest, reflection_pb2.ServerReflectionResponse
        ],
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        async for request in request_iterator:
            yield self.answer(request)

    def answer(
        self, request: reflection_pb2.ServerReflectionRequest
    ) -> reflection_pb2.ServerReflectionResponse:
        response = reflection_pb2.ServerReflectionResponse(original_request=request)
        kind = request.WhichOneof("message_request")
        files: list[bytes] | None = None
        if kind == "list_services":
            response.list_services_response.service.extend(
                reflection_pb2.ServiceResponse(name=name) for name in self._service_names
            )
            return response
        if kind == "all_extension_numbers_of_type":
            extendee = request.all_extension_numbers_of_type
            numbers = self._index.extension_numbers(extendee)
            if numbers is None:
                return _error(response, grpc.StatusCode.NOT_FOUND, f"type {extendee!r} not found")
            answer = response.all_extension_numbers_response
            answer.base_type_name = extendee
            answer.extension_number.extend(numbers)
            return response
        if kind == "file_by_filename":
            files = self._index.file_by_name(request.file_by_filename)
            missing = f"file {request.file_by_filename!r} not found"
        elif kind == "file_containing_symbol":
            files = self._index.file_containing_symbol(request.file_containing_symbol)
            missing = f"symbol {request.file_containing_symbol!r} not found"
        elif kind == "file_containing_extension":
            ext = request.file_containing_extension
            files = self._index.file_containing_extension(ext.containing_type, ext.extension_number)
            missing = f"extension {ext.extension_number} of {ext.containing_type!r} not found"
        else:
            return _error(response, grpc.StatusCode.INVALID_ARGUMENT, "empty reflection request")
        if files is None:
            return _error(response, grpc.StatusCode.NOT_FOUND, missing)
        response.file_descriptor_response.file_descriptor_proto.extend(files)
        return response


def _error(
    response: reflection_pb2.ServerReflectionResponse, code: grpc.StatusCode, message: str
) -> reflection_pb2.ServerReflectionResponse:
    response.error_response.error_code = code.value[0]
    response.error_response.error_message = message
    return response


def enable_server_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serves reflection for `service_names`: ours with comments, the rest from the pool, and
    the google.rpc error details our errors carry, so grpcurl can print them decoded."""
    names = tuple(service_names)
    index = DescriptorIndex(loracle_descriptor_set().file)
    pool = descriptor_pool.Default()
    for name in names:
        if index.file_containing_symbol(name) is None:
            index.add_compiled(pool.FindFileContainingSymbol(name))
    index.add_compiled(error_details_pb2.DESCRIPTOR)
    servicer = ReflectionServicer(names, index)
    method = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION, {"ServerReflectionInfo": method}),)
    )
