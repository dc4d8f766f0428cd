"""Metrics of a real in-process server: calls through the client, then a scrape of the HTTP
endpoint. The status codes must be those the client saw: OK, the code of an abort, and
CANCELLED for a client that went away."""

from __future__ import annotations

import asyncio
import urllib.request
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client.parser import text_string_to_metric_families

from client import AsyncLoracleClient, InvalidArgument, NotFound
from server.devtools.synthetic_loras import write_demo_loras
from server.infrastructure.metrics import Metrics, MetricsHttpServer
from server.rpc.interceptors import LogContextInterceptor, MetricsInterceptor
from server.rpc.server import LoracleServer
from tests.support import make_container

QUERY = "/loracle.v1.QueryService"
COMMAND = "/loracle.v1.CommandService"


@dataclass
class Served:
    address: str
    metrics: Metrics
    http: MetricsHttpServer

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample served at /metrics, keyed by (name, sorted labels)."""
        with urllib.request.urlopen(f"http://{self.http.address}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    write_demo_loras(tmp_path / "loras")
    container = make_container(tmp_path)
    metrics = container.metrics()
    server = LoracleServer(container, [LogContextInterceptor(), MetricsInterceptor(metrics.rpc)])
    port = await server.start("127.0.0.1:0")
    http = MetricsHttpServer(metrics.registry)
    http.start("127.0.0.1:0")
    try:
        yield Served(f"127.0.0.1:{port}", metrics, http)
    finally:
        http.stop()
        await server.stop(0)


def sample(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def test_rpc_counts_durations_and_codes(served: Served) -> None:
    async with AsyncLoracleClient(served.address, timeout=10) as client:
        imported = [u async for u in client.import_loras()]
        await client.list_loras()
        await client.list_loras()
        with pytest.raises(NotFound):
            await client.get_lora(str(uuid.uuid4()))
        with pytest.raises(InvalidArgument):
            await client.list_loras(page_size=100_000)

    samples = served.scrape()
    requests = "loracle_rpc_requests_total"
    assert sample(samples, requests, method=f"{COMMAND}/ImportLoras", code="OK") == 1
    assert sample(samples, requests, method=f"{QUERY}/ListLoras", code="OK") == 2
    assert sample(samples, requests, method=f"{QUERY}/GetLora", code="NOT_FOUND") == 1
    assert sample(samples, requests, method=f"{QUERY}/ListLoras", code="INVALID_ARGUMENT") == 1
    sent = sample(
        samples, "loracle_rpc_stream_messages_sent_total", method=f"{COMMAND}/ImportLoras"
    )
    assert sent == len(imported) > 0

    durations = "loracle_rpc_duration_seconds"
    assert sample(samples, f"{durations}_count", method=f"{QUERY}/ListLoras") == 3
    assert (sample(samples, f"{durations}_sum", method=f"{COMMAND}/ImportLoras") or 0) > 0
    inf = sample(samples, f"{durations}_bucket", method=f"{QUERY}/GetLora", le="+Inf")
    assert inf == 1


async def test_cancelled_stream_and_health_are_counted(served: Served) -> None:
    async with grpc.aio.insecure_channel(served.address) as channel:
        # Raw multi-callables: the health stubs' type stubs declare no methods.
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        await check(health_pb2.HealthCheckRequest(service=""))
        watch = channel.unary_stream(
            "/grpc.health.v1.Health/Watch",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )(health_pb2.HealthCheckRequest(service=""))
        first = await watch.read()
        assert isinstance(first, health_pb2.HealthCheckResponse)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()

    requests = "loracle_rpc_requests_total"
    watch_method = "/grpc.health.v1.Health/Watch"
    for _ in range(100):  # the server learns of the cancellation asynchronously
        samples = served.scrape()
        if sample(samples, requests, method=watch_method, code="CANCELLED"):
            break
        await asyncio.sleep(0.05)
    assert sample(samples, requests, method=watch_method, code="CANCELLED") == 1
    assert sample(samples, requests, method="/grpc.health.v1.Health/Check", code="OK") == 1


async def test_scrape_time_state(served: Served) -> None:
    async with AsyncLoracleClient(served.address, timeout=10) as client:
        for _ in range(3):
            await client.list_loras()

    samples = served.scrape()
    assert sample(samples, "loracle_generation_queue_depth") == 0
    assert sample(samples, "loracle_generation_running_jobs") == 0
    assert sample(samples, "loracle_generation_batch_size_count") == 0
    lag = sample(samples, "loracle_projection_lag_events")
    assert lag is not None
    assert lag >= 0
    assert sample(samples, "loracle_projection_position") is not None
    hits = sample(samples, "loracle_query_cache_hits_total") or 0
    misses = sample(samples, "loracle_query_cache_misses_total") or 0
    assert hits >= 1
    assert misses >= 1
    assert sample(samples, "loracle_query_cache_hit_ratio") == pytest.approx(hits / (hits + misses))
    # No CUDA in use here: no GPU memory series rather than zeros.
    assert not any(name.startswith("loracle_gpu_memory") for name, _ in samples)
