"""One cluster for the module: a private nats-server with JetStream (so a test may restart
it), a schema of its own in the shared PostgreSQL, two API replicas and two workers, all
real processes on loopback, started by the same launcher as `make cluster`."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Generator, Iterator
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


FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        item.stash[FAILED] = True
    return report


@pytest.fixture(autouse=True)
def logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """A failed cluster test shows what each process logged (CI keeps no files): the
    Loracle lines of every replica's and worker's log, the last 20 of each. Only for tests
    of the shared cluster: one that starts its own does not start this one too."""
    yield
    if not request.node.stash.get(FAILED, False) or "cluster" not in request.fixturenames:
        return
    cluster: Cluster = request.getfixturevalue("cluster")
    for path in sorted(cluster.base.rglob("*.log"), key=lambda p: p.stat().st_mtime):
        lines = [x for x in path.read_text(errors="replace").splitlines() if x[:4].isdigit()]
        print(f"--- {path.relative_to(cluster.base)}", *lines[-20:], sep="\n")


def wait_until(
    condition: Callable[[], bool], timeout: float = 60.0, what: str | Callable[[], str] = ""
) -> None:
    """`what` may be a callable, to say what was seen last when the wait fails."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            said = what() if callable(what) else what
            raise AssertionError(f"timed out waiting for {said or condition}")
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
