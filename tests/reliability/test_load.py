"""Load on loopback for a bounded time: hundreds of concurrent queries plus generation streams
against a real server with a small generation queue. Every call ends (no hang), overflowing
the queue is RESOURCE_EXHAUSTED, nothing is INTERNAL, and the server's memory stays flat.
LORACLE_LOAD_SECONDS and LORACLE_LOAD_QUERIES make it heavier (bench/README.md)."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from client import AsyncLoracleClient, LoracleClient, LoracleError, ResourceExhausted
from loracle.v1 import types_pb2
from server.devtools.local_server import RunningServer, start_server, wait_for_models
from server.devtools.synthetic_loras import write_demo_loras

SECONDS = float(os.environ.get("LORACLE_LOAD_SECONDS", "8"))
QUERIES = int(os.environ.get("LORACLE_LOAD_QUERIES", "200"))
GENERATORS = 8
CALL_TIMEOUT = 60.0


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data = tmp_path_factory.mktemp("load")
    write_demo_loras(data / "loras")
    running = start_server(data, "--max-queue", "2")
    with LoracleClient(running.address) as client:
        token = list(client.import_loras())[-1].consistency_token
        client.list_loras(consistency_token=token)  # projected: reads see all six
        wait_for_models(client, timeout=120)
    yield running
    running.stop()


async def load_round(address: str) -> tuple[list[float], Counter[str]]:
    latencies: list[float] = []
    outcomes: Counter[str] = Counter()
    stop_at = time.monotonic() + SECONDS
    spec = types_pb2.GenerationSpec(prompt="load", steps=2, width=64, height=64)

    async with AsyncLoracleClient(address, timeout=CALL_TIMEOUT) as client:
        loras = (await client.list_loras()).loras
        lora_id = loras[0].id

        async def query(i: int) -> None:
            while time.monotonic() < stop_at:
                began = time.perf_counter()
                try:
                    if i % 3 == 0:
                        await client.get_lora(lora_id)
                    elif i % 3 == 1:
                        await client.list_loras(page_size=5)
                    else:
                        await client.search_loras("pixel art knight")
                    outcomes["query ok"] += 1
                except LoracleError as err:
                    outcomes[f"query {err.code.name}"] += 1
                latencies.append(time.perf_counter() - began)

        async def generate() -> None:
            while time.monotonic() < stop_at:
                try:
                    events = [e async for e in client.generate_image(spec)]
                    outcomes["generation " + (events[-1].WhichOneof("event") or "?")] += 1
                except ResourceExhausted as err:
                    has_retry = err.retry_after is not None and err.retry_after > 0
                    outcomes["generation RESOURCE_EXHAUSTED" + ("" if has_retry else " bare")] += 1
                    await asyncio.sleep(0.05)
                except LoracleError as err:
                    outcomes[f"generation {err.code.name}"] += 1

        tasks = [query(i) for i in range(QUERIES)] + [generate() for _ in range(GENERATORS)]
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=SECONDS + 2 * CALL_TIMEOUT)
    return latencies, outcomes


def test_queries_and_generations_under_load(server: RunningServer) -> None:
    pid = server.process.pid
    asyncio.run(load_round(server.address))  # warm-up: caches, pools, the model
    before = rss_mib(pid)
    latencies, outcomes = asyncio.run(load_round(server.address))
    after = rss_mib(pid)
    latencies.sort()
    p50 = statistics.median(latencies) * 1000
    p99 = latencies[int(len(latencies) * 0.99)] * 1000
    print(
        f"\nload: {QUERIES} query clients + {GENERATORS} generation clients for {SECONDS:g} s: "
        f"{outcomes['query ok'] / SECONDS:.0f} queries/s, p50 {p50:.1f} ms, p99 {p99:.1f} ms; "
        f"{dict(outcomes)}; server RSS {before:.0f} -> {after:.0f} MiB"
    )
    assert not [k for k in outcomes if "INTERNAL" in k or "UNKNOWN" in k], outcomes
    assert "generation RESOURCE_EXHAUSTED bare" not in outcomes  # always with RetryInfo
    assert outcomes["query ok"] > 0
    assert outcomes["generation completed"] > 0
    assert outcomes["generation RESOURCE_EXHAUSTED"] > 0  # the 2-job queue overflowed
    assert after - before < 150, "the server's memory grew across a second identical round"
    with LoracleClient(server.address) as client:  # and it still serves normally
        assert client.list_loras().total_size == 6
