"""Who may do what, against a real server: every RPC of both services (read from the service
descriptors, so a new RPC cannot ship unprotected) times every credential; TLS and mutual TLS
from certificate files; and the refusal to listen beyond loopback unprotected."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status

from client import LoracleClient, PermissionDenied, Tls, Unauthenticated, Unavailable
from loracle.v1 import command_service_pb2, query_service_pb2
from server.application.security import token_sha256
from server.devtools.local_server import RunningServer, start_server
from server.rpc.field_limits import FIELD_LIMITS
from server.rpc.validation import id_fields
from tests.e2e.reflection_client import run_grpcurl_line

# The scope each RPC needs, written here independently of the server's table: an RPC missing
# from this list fails the test until someone decides its scope.
EXPECTED_SCOPE = {
    "loracle.v1.CommandService/RegisterLora": "write",
    "loracle.v1.CommandService/ImportLoras": "write",
    "loracle.v1.CommandService/ImportLoraCatalog": "write",
    "loracle.v1.CommandService/UpdateLora": "write",
    "loracle.v1.CommandService/DeleteLora": "write",
    "loracle.v1.CommandService/RecommendLoras": "generate",
    "loracle.v1.CommandService/RecommendTopLora": "generate",
    "loracle.v1.CommandService/FilterConfidentRecommendations": "generate",
    "loracle.v1.CommandService/GenerateImage": "generate",
    "loracle.v1.CommandService/QuickGenerate": "generate",
    "loracle.v1.CommandService/SubmitGeneration": "generate",
    "loracle.v1.CommandService/CancelGeneration": "generate",
    "loracle.v1.CommandService/UpscaleImage": "generate",
    "loracle.v1.QueryService/GetLora": "read",
    "loracle.v1.QueryService/ListLoras": "read",
    "loracle.v1.QueryService/SearchLoras": "read",
    "loracle.v1.QueryService/ListBaseModels": "read",
    "loracle.v1.QueryService/GetGeneration": "read",
    "loracle.v1.QueryService/ListGenerations": "read",
    "loracle.v1.QueryService/WatchGeneration": "read",
    "loracle.v1.QueryService/ListEvents": "read",
}
TOKENS = {scope: f"test-token-{scope}" for scope in ("read", "write", "generate", "admin")}
CREDENTIALS = [None, "not-a-known-token", *TOKENS]


def rpcs() -> list[tuple[str, bool, type[Message], type[Message]]]:
    out = []
    for module in (command_service_pb2, query_service_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                request = getattr(module, method.input_type.name, None) or _message(method)
                response = getattr(module, method.output_type.name, None) or _message(method)
                out.append(
                    (
                        f"{service.full_name}/{method.name}",
                        method.server_streaming,
                        request,
                        response,
                    )
                )
    return out


def _message(method: object) -> type[Message]:
    raise AssertionError(f"no generated class for {method}")


def write_settings(folder: Path, **tls: Path) -> Path:
    # Top-level keys first: in TOML, keys after a [[tokens]] header belong to that table.
    lines = [f'{key} = "{path}"' for key, path in tls.items()]
    for scope, token in TOKENS.items():
        lines += [
            "[[tokens]]",
            f'name = "{scope}-user"',
            f'sha256 = "{token_sha256(token)}"',
            f'scopes = ["{scope}"]',
        ]
    path = folder / "settings.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data = tmp_path_factory.mktemp("secured")
    running = start_server(
        data,
        "--config",
        str(write_settings(data)),
        "--no-embedded-model",
        "--metrics-listen",
        f"127.0.0.1:{METRICS_PORT}",
    )
    yield running
    running.stop()


def call(
    channel: grpc.Channel,
    name: str,
    streaming: bool,
    request: type[Message],
    response: type[Message],
    token: str | None,
) -> grpc.StatusCode:
    metadata: tuple[tuple[str, str | bytes], ...] = (
        (("authorization", f"Bearer {token}"),) if token else ()
    )
    path = f"/{name}"
    try:
        if streaming:
            stream = channel.unary_stream(
                path,
                request_serializer=request.SerializeToString,
                response_deserializer=response.FromString,
            )(request(), metadata=metadata, timeout=20)
            for _ in stream:
                stream.cancel()  # one message proves the call was let through
                break
        else:
            channel.unary_unary(
                path,
                request_serializer=request.SerializeToString,
                response_deserializer=response.FromString,
            )(request(), metadata=metadata, timeout=20)
    except grpc.RpcError as err:
        code: grpc.StatusCode = err.code()
        return code
    return grpc.StatusCode.OK


def test_every_rpc_of_both_services_has_an_expected_scope() -> None:
    assert sorted(name for name, *_ in rpcs()) == sorted(EXPECTED_SCOPE)


def test_authorization_matrix(secured: RunningServer) -> None:
    refused = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
    checked = 0
    with grpc.insecure_channel(secured.address) as channel:
        for name, streaming, request, response in rpcs():
            for credential in CREDENTIALS:
                token = TOKENS.get(credential or "", credential)
                code = call(channel, name, streaming, request, response, token)
                needed = EXPECTED_SCOPE[name]
                if credential not in TOKENS:
                    expected_ok = False
                    assert code == grpc.StatusCode.UNAUTHENTICATED, (name, credential, code)
                else:
                    expected_ok = credential in (needed, "admin")
                    if expected_ok:
                        assert code not in refused, (name, credential, code)
                    else:
                        assert code == grpc.StatusCode.PERMISSION_DENIED, (name, credential, code)
                assert code != grpc.StatusCode.INTERNAL, (name, credential, expected_ok)
                checked += 1
    assert checked == len(EXPECTED_SCOPE) * len(CREDENTIALS) == 126


# -- Authorization before validation --------------------------------------------------------

TRUNCATED_VARINT = b"\x08\xff"  # field 1, a varint whose continuation bit promises more


def _string_paths(message: Descriptor, prefix: str = "") -> Iterator[tuple[str, FieldDescriptor]]:
    """Singular string fields, through singular nested messages."""
    for field in message.fields:
        if field.is_repeated:
            continue
        if field.type == FieldDescriptor.TYPE_STRING:
            yield f"{prefix}{field.name}", field
        elif field.message_type is not None and not field.message_type.full_name.startswith(
            "google."
        ):
            yield from _string_paths(field.message_type, f"{prefix}{field.name}.")


def _enum_path(message: Descriptor, prefix: str = "") -> str | None:
    for field in message.fields:
        if field.enum_type is not None and not field.is_repeated:
            return f"{prefix}{field.name}"
        if field.message_type is not None and not field.is_repeated:
            found = _enum_path(field.message_type, f"{prefix}{field.name}.")
            if found:
                return found
    return None


def _set(request: Message, path: str, value: object) -> None:
    *parents, name = path.split(".")
    target = request
    for parent in parents:
        target = getattr(target, parent)
    setattr(target, name, value)


def bad_requests(request: type[Message]) -> dict[str, bytes]:
    """Each kind of bad request the method's type allows, serialized; the undecodable one is
    raw bytes no request type parses."""
    descriptor: Any = request.DESCRIPTOR  # the stubs also allow upb's own Descriptor type
    out: dict[str, bytes] = {"undecodable frame": TRUNCATED_VARINT}
    fields = descriptor.fields_by_name
    if "request_id" in fields:
        message = request()
        _set(message, "request_id", "r" * 300)
        out["300-char request_id"] = message.SerializeToString()
    if "consistency_token" in fields:
        message = request()
        _set(message, "consistency_token", "!forged")
        out["bad consistency token"] = message.SerializeToString()
    if (enum := _enum_path(descriptor)) is not None:
        message = request()
        _set(message, enum, 999)
        out["undefined enum number"] = message.SerializeToString()
    if ids := id_fields(descriptor):
        message = request()
        _set(message, ids[0], "not-an-id")
        out["malformed id"] = message.SerializeToString()
    for path, field in _string_paths(descriptor):
        limit = FIELD_LIMITS[field.full_name].size
        assert limit is not None
        message = request()
        _set(message, path, "x" * (limit + 1))
        out["over-long string"] = message.SerializeToString()
        break
    return out


def call_raw(
    channel: grpc.Channel,
    name: str,
    streaming: bool,
    response: type[Message],
    payload: bytes,
    token: str | None,
) -> grpc.RpcError | None:
    """Sends `payload` as the request frame as it is (no serializer)."""
    metadata: tuple[tuple[str, str | bytes], ...] = (
        (("authorization", f"Bearer {token}"),) if token else ()
    )
    try:
        if streaming:
            streamed: Any = channel.unary_stream(
                f"/{name}", response_deserializer=response.FromString
            )
            stream = streamed(payload, metadata=metadata, timeout=20)
            for _ in stream:
                stream.cancel()
                break
        else:
            unary: Any = channel.unary_unary(f"/{name}", response_deserializer=response.FromString)
            unary(payload, metadata=metadata, timeout=20)
    except grpc.RpcError as err:
        return err
    return None


def test_no_caller_without_the_scope_learns_anything_about_its_request(
    secured: RunningServer,
) -> None:
    """Every RPC x every credential lacking its scope x every kind of bad request: only
    UNAUTHENTICATED or PERMISSION_DENIED, never a validation answer."""
    kinds: set[str] = set()
    checked = 0
    with grpc.insecure_channel(secured.address) as channel:
        for name, streaming, request, response in rpcs():
            needed = EXPECTED_SCOPE[name]
            for credential in CREDENTIALS:
                if credential in (needed, "admin"):
                    continue
                token = TOKENS.get(credential or "", credential)
                expected = (
                    grpc.StatusCode.PERMISSION_DENIED
                    if credential in TOKENS
                    else grpc.StatusCode.UNAUTHENTICATED
                )
                for kind, payload in bad_requests(request).items():
                    err = call_raw(channel, name, streaming, response, payload, token)
                    code = None if err is None else err.code()
                    assert code == expected, (name, credential, kind, code, err)
                    kinds.add(kind)
                    checked += 1
    assert kinds == {
        "undecodable frame",
        "300-char request_id",
        "bad consistency token",
        "undefined enum number",
        "malformed id",
        "over-long string",
    }
    assert checked >= 272  # 20 RPCs x 4 credentials x their kinds of bad request


def test_the_same_bad_requests_are_refused_once_authorized(secured: RunningServer) -> None:
    """The control: with the scope, each bad request gets its validation answer."""
    with grpc.insecure_channel(secured.address) as channel:
        for name, streaming, request, response in rpcs():
            for kind, payload in bad_requests(request).items():
                err = call_raw(channel, name, streaming, response, payload, TOKENS["admin"])
                code = None if err is None else err.code()
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, kind, code, err)


def error_info(err: grpc.RpcError) -> tuple[str, error_details_pb2.ErrorInfo, list[str]]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    fields: list[str] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return status.message, info, fields


def _string_tag(request: type[Message]) -> bytes:
    field = next(f for f in request.DESCRIPTOR.fields if f.type == FieldDescriptor.TYPE_STRING)
    return bytes([(field.number << 3) | 2])


def rejected_count(reason: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).read()
    total = 0.0
    for line in text.decode().splitlines():
        if line.startswith("loracle_rejected_requests_total{") and f'reason="{reason}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_undecodable_frames_are_invalid_argument_without_tracebacks(
    secured: RunningServer,
) -> None:
    before = rejected_count("UNDECODABLE_REQUEST")
    search = "loracle.v1.QueryService/SearchLoras"
    frames = {
        "invalid UTF-8": _string_tag(query_service_pb2.SearchLorasRequest) + b"\x02\xff\xfe",
        "truncated varint": TRUNCATED_VARINT,
        "garbage": b"\xff" * 7 + b"\x00\x17\x93",
    }
    with grpc.insecure_channel(secured.address) as channel:
        for _ in range(20):
            for kind, frame in frames.items():
                err = call_raw(
                    channel,
                    search,
                    False,
                    query_service_pb2.SearchLorasResponse,
                    frame,
                    TOKENS["read"],
                )
                assert err is not None, kind
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, kind
                message, info, _ = error_info(err)
                assert message == "the request is not a valid SearchLorasRequest", kind
                assert info.reason == "UNDECODABLE_REQUEST"
        # A stream's frame too, from another principal.
        err = call_raw(
            channel,
            "loracle.v1.CommandService/ImportLoras",
            True,
            command_service_pb2.ImportLorasResponse,
            TRUNCATED_VARINT,
            TOKENS["write"],
        )
        assert err is not None
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(err)[0] == "the request is not a valid ImportLorasRequest"
    log = secured.log()
    assert "Traceback" not in log
    assert "DecodeError" not in log
    for principal in ("read-user", "write-user"):
        lines = [
            line
            for line in log.splitlines()
            if "is not a valid" in line
            and f"principal={principal}" in line
            and "loracle.audit" not in line
        ]
        assert len(lines) <= 1, lines
    assert rejected_count("UNDECODABLE_REQUEST") >= before + 61


def test_field_and_size_limits_through_the_server(secured: RunningServer) -> None:
    with grpc.insecure_channel(secured.address) as channel:
        records = [
            command_service_pb2.CatalogRecord(source_id=f"lim:{i}", name="n") for i in range(5)
        ]
        records[3].name = "x" * 513
        catalog = command_service_pb2.ImportLoraCatalogRequest(records=records)
        err = call_raw(
            channel,
            "loracle.v1.CommandService/ImportLoraCatalog",
            False,
            command_service_pb2.ImportLoraCatalogResponse,
            catalog.SerializeToString(),
            TOKENS["write"],
        )
        assert err is not None
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        message, info, fields = error_info(err)
        assert (info.reason, fields) == ("INVALID_FIELD", ["records[3].name"])
        assert message == "records[3].name: at most 512 characters"
        # A 2 MB search query: over SearchLoras' 1 MiB before it is even parsed.
        big = query_service_pb2.SearchLorasRequest(query="q" * 2_000_000).SerializeToString()
        err = call_raw(
            channel,
            "loracle.v1.QueryService/SearchLoras",
            False,
            query_service_pb2.SearchLorasResponse,
            big,
            TOKENS["read"],
        )
        assert err is not None
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        message, info, _ = error_info(err)
        assert info.reason == "REQUEST_TOO_LARGE"
        assert re.fullmatch(
            r"the request is 2,000,00\d bytes; SearchLoras takes at most 1,048,576", message
        ), message
        # Without the scope, the same is PERMISSION_DENIED.
        err = call_raw(
            channel,
            "loracle.v1.QueryService/SearchLoras",
            False,
            query_service_pb2.SearchLorasResponse,
            big,
            TOKENS["write"],
        )
        assert err is not None
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        # A large catalog import is allowed up to max_message_bytes.
        many = command_service_pb2.ImportLoraCatalogRequest(
            records=[
                command_service_pb2.CatalogRecord(
                    source_id=f"big:{i}",
                    name=f"Big {i}",
                    base_model="SD 1.5",
                    description="d" * 1000,
                )
                for i in range(1500)
            ]
        )
        assert many.ByteSize() > 1024 * 1024
        assert (
            call_raw(
                channel,
                "loracle.v1.CommandService/ImportLoraCatalog",
                False,
                command_service_pb2.ImportLoraCatalogResponse,
                many.SerializeToString(),
                TOKENS[
                    "admin"
                ],  # not write-user: test_events_record_the_principal counts its events,
            )
            is None
        )


def test_health_and_reflection_stay_open(secured: RunningServer) -> None:
    with grpc.insecure_channel(secured.address) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        health = check(health_pb2.HealthCheckRequest(service="loracle.v1.QueryService"), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    listed = run_grpcurl_line("grpcurl -plaintext localhost:50051 list", secured.address)
    assert "loracle.v1.CommandService" in listed


def test_events_record_the_principal(secured: RunningServer) -> None:
    with LoracleClient(secured.address, token=TOKENS["write"]) as writer:
        imported = writer.import_lora_catalog(
            [{"source_id": "sec:1", "name": "Scoped", "base_model": "SD 1.5"}]
        )
    with LoracleClient(secured.address, token=TOKENS["read"]) as reader:
        events = reader.list_events(
            principal="write-user", consistency_token=imported.consistency_token
        )
        assert [e.type for e in events.events] == ["LoraRegistered"]
        with pytest.raises(PermissionDenied) as denied:
            reader.delete_lora(events.events[0].aggregate_id)
        assert "'write'" in denied.value.message
    with LoracleClient(secured.address) as anonymous, pytest.raises(Unauthenticated):
        anonymous.list_loras()


# -- TLS --------------------------------------------------------------------------------------


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        str(d / "ca.key"),
        "-out",
        str(d / "ca.pem"),
    )
    for name, san in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "")):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            str(d / f"{name}.key"),
            "-out",
            str(d / f"{name}.csr"),
        )
        ext = d / f"{name}.ext"
        ext.write_text(san + "\n" if san else "basicConstraints=CA:FALSE\n")
        openssl(
            "x509",
            "-req",
            "-in",
            str(d / f"{name}.csr"),
            "-CA",
            str(d / "ca.pem"),
            "-CAkey",
            str(d / "ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            str(ext),
            "-out",
            str(d / f"{name}.pem"),
        )
    return d


def test_tls_and_mutual_tls(pki: Path, tmp_path: Path) -> None:
    tls = {
        "tls_cert": pki / "server.pem",
        "tls_key": pki / "server.key",
        "tls_client_ca": pki / "ca.pem",
    }
    running = start_server(
        tmp_path, "--config", str(write_settings(tmp_path, **tls)), "--no-embedded-model"
    )
    try:
        trusted = Tls.from_files(
            str(pki / "ca.pem"), str(pki / "client.pem"), str(pki / "client.key")
        )
        with LoracleClient(running.address, token=TOKENS["read"], tls=trusted) as client:
            assert client.list_loras().total_size == 0
        # No client certificate: the handshake fails (mutual TLS).
        no_cert = Tls.from_files(str(pki / "ca.pem"))
        with (
            LoracleClient(running.address, token=TOKENS["read"], tls=no_cert, timeout=5) as c,
            pytest.raises(Unavailable),
        ):
            c.list_loras()
        # Plaintext to a TLS port fails too.
        with (
            LoracleClient(running.address, token=TOKENS["read"], timeout=5) as c,
            pytest.raises(Unavailable),
        ):
            c.list_loras()
    finally:
        running.stop()


def test_no_unprotected_listening_beyond_loopback(tmp_path: Path) -> None:
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "server",
            "--listen",
            "0.0.0.0:0",
            "--data-dir",
            str(tmp_path),
            "--no-embedded-model",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert refused.returncode == 2
    assert "refusing to listen on 0.0.0.0:0 without authentication" in refused.stderr
    allowed = start_server(tmp_path, "--listen", "0.0.0.0:0", "--insecure", "--no-embedded-model")
    try:
        assert "INSECURE: serving on 0.0.0.0:0" in allowed.log()
    finally:
        allowed.stop()
