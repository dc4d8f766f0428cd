"""What grpcurl does, in Python: discover services and messages through server reflection and
call methods with JSON bodies, knowing nothing of the protos in advance."""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator
from typing import Any

import grpc
from google.protobuf import descriptor, descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


class ReflectionClient:
    def __init__(self, channel: grpc.Channel) -> None:
        self._channel = channel
        self._db = ProtoReflectionDescriptorDatabase(channel)
        self._pool = descriptor_pool.DescriptorPool(self._db)

    def list_services(self) -> list[str]:
        return sorted(self._db.get_services())

    def describe(self, symbol: str) -> dict[str, list[str]]:
        """Method names of a service, or field names of a message."""
        try:
            service = self._pool.FindServiceByName(symbol)
            return {"methods": [m.name for m in service.methods]}
        except KeyError:
            message = self._pool.FindMessageTypeByName(symbol)
            return {"fields": [f.name for f in message.fields]}

    def invoke(self, full_method: str, body: str) -> Iterator[dict[str, Any]]:
        service_name, method_name = full_method.split("/")
        method: descriptor.MethodDescriptor = self._pool.FindServiceByName(
            service_name
        ).FindMethodByName(method_name)
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        request = json_format.Parse(body or "{}", request_class())
        path = f"/{service_name}/{method_name}"
        if method.server_streaming:
            stream = self._channel.unary_stream(
                path,
                request_serializer=request_class.SerializeToString,
                response_deserializer=response_class.FromString,
            )
            responses: Any = stream(request, timeout=30)
        else:
            unary = self._channel.unary_unary(
                path,
                request_serializer=request_class.SerializeToString,
                response_deserializer=response_class.FromString,
            )
            responses = [unary(request, timeout=30)]
        for response in responses:
            yield json_format.MessageToDict(response, preserving_proto_field_name=True)


def run_grpcurl_line(line: str, address: str) -> Any:
    """Runs one `grpcurl -plaintext [-d JSON] ADDRESS (list | describe X | METHOD)` line."""
    args = shlex.split(line)
    assert args[0] == "grpcurl", line
    body = ""
    rest: list[str] = []
    i = 1
    while i < len(args):
        if args[i] == "-plaintext":
            i += 1
        elif args[i] == "-d":
            body = args[i + 1]
            json.loads(body)  # the doc's JSON must be valid
            i += 2
        else:
            rest.append(args[i])
            i += 1
    _documented_address, *verb = rest
    with grpc.insecure_channel(address) as channel:
        client = ReflectionClient(channel)
        if verb == ["list"]:
            return client.list_services()
        if verb[0] == "describe":
            return client.describe(verb[1])
        return list(client.invoke(verb[0], body))
