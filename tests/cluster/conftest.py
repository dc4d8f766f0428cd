"""One cluster for the module: a private nats-server with JetStream (so a test may restart
it), a schema of its own in the shared PostgreSQL, two API replicas and two workers, all
real processes on loopback, started by the same launcher as `make cluster`."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from client import LoracleClient
from loracle.v1 import types_pb2
from server.devtools.cluster import Cluster, NatsServer, postgres_schema, start_cluster
from server.infrastructure.broker.nats_broker import NatsBroker
from tests.support import POSTGRES_URL

LEASE_SECONDS = 3.0
MAX_ATTEMPTS = 2
NAMESPACE = f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="package")
def nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path_factory.mktemp("nats") / "store").start()
    yield server
    server.stop()


@pytest.fixture(scope="package")
def storage_url() -> Iterator[str]:
    with postgres_schema(POSTGRES_URL.replace("postgresql+psycopg", "postgresql")) as url:
        yield url


@pytest.fixture(scope="package")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, nats: NatsServer, storage_url: str
) -> Iterator[Cluster]:
    running = start_cluster(
        tmp_path_factory.mktemp("cluster"),
        broker_url=nats.url,
        storage_url=storage_url,
        broker_namespace=NAMESPACE,
        job_lease_seconds=LEASE_SECONDS,
        job_max_attempts=MAX_ATTEMPTS,
        batch_wait_ms=50,
        metrics_listen="127.0.0.1:0",
    )
    yield running
    running.stop()


@pytest.fixture(scope="package")
def broker(nats: NatsServer, cluster: Cluster) -> Iterator[NatsBroker]:
    """The test's own view of the broker: claims say which worker ran which attempt."""
    link = NatsBroker(nats.url, namespace=NAMESPACE, lease_seconds=LEASE_SECONDS)
    yield link
    link.close()


def wait_until(condition: Callable[[], bool], timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.1)


def final_generation(
    client: LoracleClient, generation_id: str, timeout: float = 60.0
) -> types_pb2.Generation:
    """The generation once its outcome is recorded (any replica may record it)."""
    finals = {
        types_pb2.GENERATION_STATE_SUCCEEDED,
        types_pb2.GENERATION_STATE_FAILED,
        types_pb2.GENERATION_STATE_CANCELLED,
    }
    found: list[types_pb2.Generation] = []

    def done() -> bool:
        found[:] = [client.get_generation(generation_id)]
        return found[0].state in finals

    wait_until(done, timeout, f"generation {generation_id} to finish")
    return found[0]


def worker_dir(cluster: Cluster) -> Path:
    return cluster.base / cluster.workers[0].name
