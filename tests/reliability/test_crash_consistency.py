"""Crash consistency: the server is killed with SIGKILL again and again while several clients
import catalog records. Clients retry every unanswered request with its request_id until it is
acknowledged. After the last restart every acknowledged command is present exactly once, a
retry returns the first answer, and the projections catch up. Run on SQLite and PostgreSQL.
(A generation running at the kill is marked failed: tests/e2e/test_generate.py.)"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from client import LoracleClient, LoracleError
from server.devtools.local_server import RunningServer, start_server
from tests.support import postgres_schema

ROUNDS = int(os.environ.get("LORACLE_CRASH_ROUNDS", "3"))
CLIENTS = 4


@dataclass
class Ledger:
    """What the clients were told: request_id -> (source ids, created count)."""

    acknowledged: dict[str, tuple[tuple[str, ...], int]] = field(default_factory=dict)
    attempted: set[str] = field(default_factory=set)
    # Requests that failed at least once (the server died under them) and were then answered.
    retried: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class Writers:
    """Client threads that keep importing; each request is retried until acknowledged."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.address = ""
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(CLIENTS)
        ]

    def start(self, address: str) -> None:
        self.address = address
        for thread in self.threads:
            thread.start()

    def _run(self, worker: int) -> None:
        n = 0
        while not self.stop.is_set():
            request_id = f"w{worker}-{n}-{uuid.uuid4().hex[:6]}"
            sources = tuple(f"crash:{request_id}:{k}" for k in range(3))
            records = [{"source_id": s, "name": s, "base_model": "SD 1.5"} for s in sources]
            with self.ledger.lock:
                self.ledger.attempted.update(sources)
            failures = 0
            while not self.stop.is_set():
                try:
                    with LoracleClient(self.address, timeout=5) as client:
                        reply = client.import_lora_catalog(records, request_id=request_id)
                except LoracleError:
                    failures += 1
                    time.sleep(0.05)  # the server is down or restarting: same id again
                    continue
                with self.ledger.lock:
                    self.ledger.acknowledged[request_id] = (sources, reply.created)
                    self.ledger.retried += failures > 0
                break
            n += 1


def restart(data: Path, storage: list[str]) -> RunningServer:
    return start_server(data, *storage, "--no-embedded-model")


def run_storm(tmp_path: Path, storage: list[str]) -> None:
    ledger = Ledger()
    writers = Writers(ledger)
    server = restart(tmp_path, storage)
    writers.start(server.address)
    survived = 0
    try:
        for _ in range(ROUNDS):
            time.sleep(1.0)
            server.stop(signal.SIGKILL)
            before = len(ledger.acknowledged)
            server = restart(tmp_path, storage)
            writers.address = server.address  # clients reconnect to the new port
            survived += 1
            deadline = time.monotonic() + 30
            while len(ledger.acknowledged) <= before:  # writes resume after the restart
                assert time.monotonic() < deadline, "no write was acknowledged after a restart"
                time.sleep(0.05)
        writers.stop.set()
        for thread in writers.threads:
            thread.join(30)
        check(server, ledger)
    finally:
        writers.stop.set()
        server.stop()
    assert survived == ROUNDS
    # The kills landed on requests in flight, which were retried and answered once.
    assert ledger.retried >= 1
    print(
        f"kill -9 rounds {survived}, acknowledged requests {len(ledger.acknowledged)}, "
        f"retried across a kill {ledger.retried}"
    )


def check(server: RunningServer, ledger: Ledger) -> None:
    assert len(ledger.acknowledged) >= ROUNDS
    with LoracleClient(server.address, timeout=30) as client:
        # Retrying any acknowledged request returns its first answer and writes nothing.
        position = ""
        for request_id, (sources, created) in ledger.acknowledged.items():
            records = [{"source_id": s, "name": s, "base_model": "SD 1.5"} for s in sources]
            again = client.import_lora_catalog(records, request_id=request_id)
            assert again.created == created, request_id
            position = again.consistency_token or position
        seen: dict[str, int] = {}
        token = ""
        while True:
            page = client.list_loras(page_size=1000, page_token=token, consistency_token=position)
            for lora in page.loras:
                seen[lora.source_id] = seen.get(lora.source_id, 0) + 1
            token = page.next_page_token
            if not token:
                break
    acknowledged = {s for sources, _ in ledger.acknowledged.values() for s in sources}
    assert acknowledged <= set(seen), "an acknowledged record is missing"
    assert all(count == 1 for count in seen.values()), "a record is catalogued twice"
    assert set(seen) <= ledger.attempted  # nothing that nobody sent


def test_sqlite_survives_kill_9_with_nothing_acknowledged_lost(tmp_path: Path) -> None:
    run_storm(tmp_path, [])


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with postgres_schema() as url:
        yield url


def test_postgres_survives_kill_9_with_nothing_acknowledged_lost(
    tmp_path: Path, postgres_url: str
) -> None:
    run_storm(tmp_path, ["--storage-url", postgres_url])
