"""Configured limits through a real server: request rate and open streams per principal
(RESOURCE_EXHAUSTED with RetryInfo) and the maxima of a generation request."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from client import InvalidArgument, LoracleClient, ResourceExhausted
from loracle.v1 import types_pb2
from server.devtools.local_server import RunningServer, start_server, wait_for_models


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data = tmp_path_factory.mktemp("limited")
    settings = data / "settings.toml"
    settings.write_text(
        "rate_limit_per_second = 20\nmax_streams_per_principal = 1\nmax_prompt_chars = 100\n"
    )
    running = start_server(data, "--config", str(settings))
    yield running
    running.stop()


def test_over_the_request_rate(limited: RunningServer) -> None:
    refused: list[ResourceExhausted] = []
    with LoracleClient(limited.address) as client:
        for _ in range(120):
            try:
                client.list_loras()
            except ResourceExhausted as err:
                refused.append(err)
    assert refused, "120 calls at full speed never hit a 20/s limit with a burst of 40"
    assert all(e.retry_after is not None and 0 < e.retry_after <= 1 for e in refused)
    time.sleep(1.0)
    with LoracleClient(limited.address) as client:
        client.list_loras()  # the bucket refills


def test_one_open_stream_per_principal_and_request_maxima(limited: RunningServer) -> None:
    time.sleep(2.5)  # a full bucket, whatever the test before did
    with LoracleClient(limited.address) as client:
        wait_for_models(client, timeout=120)
        with pytest.raises(InvalidArgument) as long_prompt:
            list(client.generate_image(types_pb2.GenerationSpec(prompt="x" * 101)))
        assert long_prompt.value.field_violations[0] == ("spec.prompt", "at most 100 characters")
        slow = client.generate_image(
            types_pb2.GenerationSpec(prompt="slow", steps=150, width=128, height=128)
        )
        next(slow)  # queued: the stream is open
        with pytest.raises(ResourceExhausted) as second:
            list(client.generate_image(types_pb2.GenerationSpec(prompt="second", steps=1)))
        assert "1 streams open" in second.value.message
        cancel = getattr(slow, "close", None)
        assert cancel is not None
        cancel()
        deadline = time.monotonic() + 30
        while True:  # the slot comes back once the server sees the cancellation
            try:
                events = list(client.generate_image(types_pb2.GenerationSpec(prompt="p", steps=1)))
                break
            except ResourceExhausted:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert events[-1].HasField("completed")


def test_settings_file_is_documented() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for key in ("rate_limit_per_second", "max_streams_per_principal", "max_prompt_chars"):
        assert f"`{key}`" in readme


def test_connections_that_never_handshake_are_closed(tmp_path: Path) -> None:
    """`handshake_timeout_seconds` reaches grpc core (grpc.server_handshake_timeout_ms): raw
    sockets that never send the HTTP/2 preface are closed, and a normal client still works."""
    settings = tmp_path / "settings.toml"
    settings.write_text("handshake_timeout_seconds = 1\n")
    running = start_server(tmp_path, "--config", str(settings), "--no-embedded-model")
    host, port = running.address.rsplit(":", 1)
    sockets = [socket.create_connection((host, int(port)), timeout=10) for _ in range(20)]
    try:
        start = time.monotonic()
        for sock in sockets:
            try:
                data = sock.recv(1 << 16)
                while data:  # the server's own SETTINGS frame may come first
                    data = sock.recv(1 << 16)
            except ConnectionResetError:
                pass
        assert time.monotonic() - start < 8, "silent connections were not closed"
        with LoracleClient(running.address) as client:
            assert client.list_loras().total_size == 0
    finally:
        for sock in sockets:
            sock.close()
        running.stop()
