"""A whole cluster on loopback: NATS JetStream, PostgreSQL, API replicas and workers as real
processes. `make cluster` runs `main()`; tests/cluster and bench/cluster.py use the same
launcher, so what is tested is what a developer starts."""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from client import LoracleClient
from server.application.security import token_sha256
from server.devtools.local_server import RunningServer, launch, start_server, wait_for_models

DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reachable(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class NatsServer:
    """A nats-server with JetStream on file storage that a test may stop and start again."""

    store: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
        self.store.mkdir(parents=True, exist_ok=True)
        log = (self.store.parent / f"nats-{self.port}.log").open("ab")
        self.process = subprocess.Popen(
            [binary, "-js", "-sd", str(self.store), "-a", "127.0.0.1", "-p", str(self.port)],
            stdout=log,
            stderr=log,
        )
        deadline = time.monotonic() + 20
        while not reachable("127.0.0.1", self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nats-server did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(20)
        self.process = None


@dataclass
class RunningWorker:
    process: subprocess.Popen[str]
    name: str
    log_path: Path
    metrics_address: str = ""  # HOST:PORT when started with metrics_listen

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text()


def write_config(
    path: Path, tokens: Sequence[tuple[str, str, Sequence[str]]] = (), **settings: object
) -> Path:
    """Top-level settings, then one [[tokens]] table per (name, token, scopes): in TOML, keys
    after a table header belong to that table."""
    lines = []
    for key, value in settings.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            lines.append(f"{key} = {value}")
        else:
            lines.append(f'{key} = "{value}"')
    for name, token, scopes in tokens:
        listed = ", ".join(f'"{scope}"' for scope in scopes)
        lines += [
            "[[tokens]]",
            f'name = "{name}"',
            f'sha256 = "{token_sha256(token)}"',
            f"scopes = [{listed}]",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def start_worker(data_dir: Path, config: Path, name: str, *extra: str) -> RunningWorker:
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / f"worker-{name}-{time.monotonic_ns()}.log"
    args = ["server.worker", "--config", str(config), "--data-dir", str(data_dir)]
    process, _, lines = launch([*args, "--worker-name", name, *extra], log_path, " ready ", 120)
    found = [m.group(1) for x in lines if (m := re.search(r"metrics on http://(\S+)/metrics", x))]
    return RunningWorker(process, name, log_path, found[0] if found else "")


@contextmanager
def postgres_schema(base_url: str = DEFAULT_POSTGRES, name: str = "") -> Iterator[str]:
    """A schema of its own in the shared PostgreSQL (dropped afterwards unless named)."""
    schema = name or f"c_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    try:
        yield f"{base_url}?schema={schema}"
    finally:
        if not name:
            with psycopg.connect(base_url, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA {schema} CASCADE")


@dataclass
class Cluster:
    base: Path
    config: Path
    replicas: list[RunningServer]
    workers: list[RunningWorker]
    # With tokens configured: the one the harness itself calls with (a reader's or admin's).
    token: str | None = None

    def client(self, index: int = 0, token: str | None = None) -> LoracleClient:
        return LoracleClient(self.replicas[index].address, token=token or self.token)

    def add_replica(self, listen: str = "127.0.0.1:0", config: Path | None = None) -> RunningServer:
        index = len(self.replicas)
        replica = start_server(
            self.base / f"replica{index}",
            "--config",
            str(config or self.config),
            "--listen",
            listen,
        )
        self.replicas.append(replica)
        # Serving is not yet knowing the workers: a replica's first read of the worker
        # directory can come back empty (seen once in CI, 2026-12-03); callers get a
        # replica that lists a ready model, as start_cluster always waited for.
        with self.client(index) as client:
            wait_for_models(client, timeout=60)
        return replica

    def add_worker(self, name: str = "") -> RunningWorker:
        name = name or f"w{len(self.workers) + 1}"
        worker = start_worker(self.base / name, self.config, name)
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        processes: list[RunningServer | RunningWorker] = [*self.replicas, *self.workers]
        for process in processes:  # all at once: each takes seconds to wind down
            if process.process.poll() is None:
                process.process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.stop(timeout=20)
            except subprocess.TimeoutExpired:
                process.stop(signal.SIGKILL)


def start_cluster(
    base: Path,
    *,
    broker_url: str,
    storage_url: str,
    replicas: int = 2,
    workers: int = 2,
    listens: tuple[str, ...] = (),
    tokens: Sequence[tuple[str, str, Sequence[str]]] = (),
    **settings: object,
) -> Cluster:
    """Replicas and workers share one config; each has a data folder of its own (the
    workers each build the same deterministic placeholder model). `tokens` (name, token,
    scopes) secure the replicas; the harness calls them with an admin's or reader's."""
    base.mkdir(parents=True, exist_ok=True)
    config = write_config(
        base / "cluster.toml",
        tokens,
        broker_url=broker_url,
        storage_url=storage_url,
        lora_roots=str(base / "loras"),
        **settings,
    )
    (base / "loras").mkdir(exist_ok=True)
    harness = next((t for _, t, scopes in tokens if {"admin", "read"} & set(scopes)), None)
    cluster = Cluster(base, config, [], [], harness)
    try:
        for i in range(workers):
            cluster.add_worker(f"w{i + 1}")
        for i in range(replicas):
            cluster.add_replica(listens[i] if i < len(listens) else "127.0.0.1:0")
    except BaseException:
        cluster.stop()
        raise
    return cluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="make cluster", description="Two API replicas and two workers on loopback."
    )
    parser.add_argument("--base", default=".cluster", help="folder for data and logs")
    parser.add_argument("--nats", default="nats://127.0.0.1:4222")
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES)
    parser.add_argument("--schema", default="loracle_cluster")
    parser.add_argument("--ports", default="50061,50062")
    args = parser.parse_args(argv)
    base = Path(args.base).resolve()
    nats: NatsServer | None = None
    host_port = args.nats.removeprefix("nats://")
    host, _, port = host_port.partition(":")
    if not reachable(host, int(port or 4222)):
        print(f"starting nats-server with JetStream on {host_port}", flush=True)
        nats = NatsServer(base / "nats", port=int(port or 4222)).start()
    listens = tuple(f"127.0.0.1:{p}" for p in args.ports.split(","))
    with postgres_schema(args.postgres, args.schema) as storage_url:
        cluster = start_cluster(
            base, broker_url=args.nats, storage_url=storage_url, listens=listens
        )
        print("cluster up:", flush=True)
        for replica in cluster.replicas:
            print(f"  API replica  {replica.address}   log {replica.log_path}")
        for worker in cluster.workers:
            print(f"  worker       {worker.name}   log {worker.log_path}")
        print(f"  broker       {args.nats}\n  store        {storage_url}")
        first, second = (r.address for r in cluster.replicas[:2])
        print(
            "try:\n"
            f"  .venv/bin/loracle --server {first} generate 'a lighthouse' --detach\n"
            f"  .venv/bin/loracle --server {second} watch GENERATION_ID -o out.png\n"
            "Ctrl-C stops everything.",
            flush=True,
        )
        stop = False

        def on_signal(*_: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        while not stop:
            time.sleep(0.5)
        cluster.stop()
    if nats is not None:
        nats.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
