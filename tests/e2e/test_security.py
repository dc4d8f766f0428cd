"""Who may do what, against a real server: every RPC of both services (read from the service
descriptors, so a new RPC cannot ship unprotected) times every credential; TLS and mutual TLS
from certificate files; and the refusal to listen beyond loopback unprotected."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2

from client import LoracleClient, PermissionDenied, Tls, Unauthenticated, Unavailable
from loracle.v1 import command_service_pb2, query_service_pb2
from server.application.security import token_sha256
from server.devtools.local_server import RunningServer, start_server
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


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data = tmp_path_factory.mktemp("secured")
    running = start_server(data, "--config", str(write_settings(data)), "--no-embedded-model")
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
    assert checked == len(EXPECTED_SCOPE) * len(CREDENTIALS) == 120


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
