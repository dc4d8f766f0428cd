"""Helpers of the reliability suite: a real server's readiness, health and memory, the RPC
methods of both services, and what counts as a leaked stack trace."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2

from client import LoracleClient
from loracle.v1 import command_service_pb2, query_service_pb2
from server.devtools.local_server import wait_for_models

# A Python stack trace in text a client can see (status message, rich details).
TRACEBACK = re.compile(r'Traceback \(most recent call last\)|File "[^"\n]*", line \d+')

SERVICES = (
    command_service_pb2.DESCRIPTOR.services_by_name["CommandService"],
    query_service_pb2.DESCRIPTOR.services_by_name["QueryService"],
)


@dataclass(frozen=True, slots=True)
class Rpc:
    """One method of a service, callable with raw bytes through a generic channel."""

    method: MethodDescriptor

    @property
    def name(self) -> str:
        return f"{self.method.containing_service.name}.{self.method.name}"

    @property
    def path(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def streaming(self) -> bool:
        return self.method.server_streaming

    @property
    def request_type(self) -> Descriptor:
        return self.method.input_type

    def request_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.method.input_type)

    def response_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.method.output_type)


ALL_RPCS = tuple(Rpc(m) for service in SERVICES for m in service.methods)


def wait_until_ready(address: str, timeout: float = 120.0) -> None:
    """Blocks until every configured base model (the embedded tiny one) is ready."""
    with LoracleClient(address) as client:
        wait_for_models(client, timeout)


def write_embedded_lora(data_dir: Path, lora_root: Path, name: str, seed: int = 0) -> Path:
    """A LoRA fitted to the embedded tiny model (so generation applies it), in `lora_root`."""
    from server.devtools.tiny_loras import write_lora_for_pipeline
    from server.domain.models import Architecture, BaseModelConfig
    from server.infrastructure.diffusion.registry import EMBEDDED_NAME, load_pipeline

    folder = data_dir / "models" / EMBEDDED_NAME
    pipe = load_pipeline(BaseModelConfig(EMBEDDED_NAME, Architecture.SD1, folder))
    path = lora_root / f"{name}.safetensors"
    write_lora_for_pipeline(
        pipe, path, seed=seed, metadata={"ss_base_model_version": "sd_v1", "ss_output_name": name}
    )
    return path


def health_status(channel: grpc.Channel, timeout: float = 5.0) -> int:
    check: grpc.UnaryUnaryMultiCallable[
        health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
    ] = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    return int(check(health_pb2.HealthCheckRequest(service=""), timeout=timeout).status)


SERVING = int(health_pb2.HealthCheckResponse.SERVING)


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def error_code(error: grpc.RpcError) -> grpc.StatusCode:
    code = getattr(error, "code", lambda: None)()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def error_details(error: grpc.RpcError) -> str:
    details = getattr(error, "details", lambda: None)()
    return details if isinstance(details, str) else ""


def leaked_traceback(error: grpc.RpcError, request: bytes = b"") -> str | None:
    """The stack-trace text in an error's message or trailing metadata (the rich details
    travel there), unless the request itself carried that text (validation messages may quote
    the input)."""
    texts = [error_details(error)]
    for key, value in getattr(error, "trailing_metadata", lambda: None)() or ():
        raw = value if isinstance(value, bytes) else str(value).encode()
        texts.append(f"{key}={raw.decode('utf-8', 'replace')}")
    for text in texts:
        match = TRACEBACK.search(text)
        if match and match.group(0).encode() not in request:
            return text[:500]
    return None


# --- fuzz case counting -----------------------------------------------------------------------

FUZZ_COUNTS: Counter[str] = Counter()
# (method, status code name) -> calls: how deep the fuzzing got (OK means past validation).
FUZZ_CODES: Counter[tuple[str, str]] = Counter()


def fuzz_report(counts: Counter[str]) -> dict[str, object]:
    return {"total": sum(counts.values()), "per_method": dict(sorted(counts.items()))}


def write_fuzz_report(path: Path, counts: Counter[str], codes: Counter[tuple[str, str]]) -> None:
    by_method: dict[str, dict[str, int]] = {}
    for (method, code), n in sorted(codes.items()):
        by_method.setdefault(method, {})[code] = n
    report = {**fuzz_report(counts), "status_codes": by_method}
    path.write_text(json.dumps(report, indent=2) + "\n")
