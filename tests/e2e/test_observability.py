"""A real server process with `--metrics-listen` and `--log-format json`: /metrics over HTTP
counts the calls made, generations feed the stage and batch metrics, and the correlation id
of an error's ErrorInfo finds its line in the JSON log."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
import uuid
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from client import LoracleClient, NotFound
from loracle.v1 import types_pb2
from server.devtools.local_server import RunningServer, start_server, wait_for_models

GENERATE = "/loracle.v1.CommandService/GenerateImage"
GET_LORA = "/loracle.v1.QueryService/GetLora"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, str]]:
    metrics = f"127.0.0.1:{free_port()}"
    running = start_server(
        tmp_path_factory.mktemp("observed"), "--metrics-listen", metrics, "--log-format", "json"
    )
    with LoracleClient(running.address) as client:
        wait_for_models(client, timeout=120)
    yield running, f"http://{metrics}/metrics"
    running.stop()


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_and_json_logs(observed: tuple[RunningServer, str]) -> None:
    server, url = observed
    with LoracleClient(server.address) as client:
        events = list(client.generate_image(types_pb2.GenerationSpec(prompt="a fox", steps=2)))
        assert events[-1].HasField("completed")
        # A minute-long job abandoned after its first event: the server sees CANCELLED.
        slow = types_pb2.GenerationSpec(prompt="slow", steps=150, width=128, height=128)
        for _ in client.generate_image(slow):
            break
        with pytest.raises(NotFound) as missing:
            client.get_lora(str(uuid.uuid4()))
    correlation_id = missing.value.correlation_id
    assert correlation_id

    deadline = time.monotonic() + 30
    while True:  # the cancellation and the projection arrive asynchronously
        samples = scrape(url)
        if (
            value(samples, "loracle_rpc_requests_total", method=GENERATE, code="CANCELLED")
            and value(samples, "loracle_generations_total", state="CANCELLED")
        ) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    requests = "loracle_rpc_requests_total"
    assert value(samples, requests, method=GENERATE, code="OK") == 1
    assert value(samples, requests, method=GENERATE, code="CANCELLED") == 1
    assert value(samples, requests, method=GET_LORA, code="NOT_FOUND") == 1
    assert value(samples, "loracle_rpc_stream_messages_sent_total", method=GENERATE) >= len(events)
    assert value(samples, "loracle_generations_total", state="SUCCEEDED") == 1
    assert value(samples, "loracle_generations_total", state="CANCELLED") == 1
    for stage in ("queue", "text_encoding", "denoising", "decoding"):
        assert value(samples, "loracle_generation_stage_seconds_count", stage=stage) == 1
    assert value(samples, "loracle_generation_batch_size_count") >= 1
    assert value(samples, "loracle_generation_batch_size_sum") >= 1
    assert value(samples, "loracle_generation_images_total") >= 1

    assert server.stop() == 0
    lines = [json.loads(line) for line in server.log().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    assert any(line.get("correlation_id") == correlation_id for line in lines), correlation_id
    assert any(line.get("method") == GET_LORA for line in lines)
