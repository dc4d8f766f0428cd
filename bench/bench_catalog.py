"""Catalog benchmark: import speed, and GetLora/ListLoras throughput relative to a bare echo server.

The development machine is small and noisy, so absolute calls/second mean little from one run
to the next. Each query figure is therefore reported next to a bare grpc.aio "echo" server that
answers the same QueryService methods with a pre-built response of the same size and shape,
measured in the same run and interleaved A/B/A/B. The ratio loracle_qps / echo_qps is the share
of the gRPC + protobuf ceiling that Loracle keeps after its own work (buses, cache, read model,
mapping), and it is the figure worth comparing between runs. Each round also reads the server's
CPU time, so the CPU per call of the two servers can be compared as well.

Reads are measured twice: cached (a few ids, 20 pages, asked over and over) and uncached (the
server restarted on the same data with its query cache off).

Four processes take part so that no two share a GIL: this orchestrator (idle while measuring),
the Loracle server, the echo server and the load generator. The last two are this same file,
started with a hidden first argument (`_echo`, `_load`).

The import is timed twice through the client, each to visibility (the commands answered,
then a ListLoras that waits for the last batch's consistency token): the first import into an
empty catalog, then the same records again under a new request id (every record unchanged).

Usage: .venv/bin/python bench/bench_catalog.py [--catalog PATH] [--seconds S] [--concurrency N]
                                                [--storage-url postgresql://...] [--import-only]
                                                [--json] [--synthetic N]

`--synthetic N` runs the scale benchmark instead (bench/catalog_scale.py): N deterministic
records shaped like the Civitai sample, from import to restart.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from client import LoracleClient
from loracle.v1 import query_service_pb2, query_service_pb2_grpc
from server.devtools.bench_support import (
    DEFAULT_CATALOG,
    START_TIMEOUT,
    Children,
    load_catalog,
    log,
    run_bench,
    serve_echo,
    server_args,
)

IMPORT_BATCH = 2000
LIST_PAGE_SIZE = 50
LIST_PAGES = 20
ROUNDS = 2
WARMUP_SECONDS = 1.0
CALL_TIMEOUT = 10.0
SERVICE = "loracle.v1.QueryService"

# GetLora in the cached phase asks for this many ids over and over (the query cache holds
# 2,048 answers by default, and the warm-up second asks for each of them).
HOT_IDS = 256
# The uncached phase restarts the server on the same data with its query cache off.
NO_CACHE_ENV = {"LORACLE_QUERY_CACHE_ENTRIES": "0"}
PHASES = ("cached", "uncached")

# (workload label in output, RPC method, JSON key, phase)
WORKLOADS = (
    ("GetLora, cached", "GetLora", "get_lora", "cached"),
    (f"ListLoras {LIST_PAGE_SIZE}, cached", "ListLoras", "list_loras_50", "cached"),
    ("GetLora, uncached", "GetLora", "get_lora_uncached", "uncached"),
    (f"ListLoras {LIST_PAGE_SIZE}, uncached", "ListLoras", "list_loras_50_uncached", "uncached"),
)
TARGETS = ("loracle", "echo")


@dataclass(frozen=True)
class ImportRun:
    """One timed import: the batches answered, then visible to queries."""

    label: str
    answered_seconds: float
    visible_seconds: float
    created: int
    updated: int
    unchanged: int

    def as_dict(self, records: int) -> dict[str, Any]:
        return {
            "answered_seconds": round(self.answered_seconds, 3),
            "visible_seconds": round(self.visible_seconds, 3),
            "records_per_second": round(records / self.visible_seconds, 1),
            "created": self.created,
            "updated": self.updated,
            "unchanged": self.unchanged,
        }


@dataclass
class Prepared:
    """What the load phase needs from the imported catalog."""

    records: int
    first: ImportRun
    again: ImportRun
    index_seconds: float
    source: str
    ids: list[str]
    page_tokens: list[str]
    get_response: bytes
    list_response: bytes


def _median_by_size(messages: Sequence[bytes]) -> bytes:
    return sorted(messages, key=len)[len(messages) // 2]


def timed_import(
    client: LoracleClient, records: Sequence[Any], label: str
) -> tuple[ImportRun, str]:
    """Imports `records` under a fresh request id and waits until a query sees the last
    batch; returns the timings and the consistency token."""
    log(f"{label}: {len(records)} records in batches of {IMPORT_BATCH}")
    started = time.perf_counter()
    result = client.import_lora_catalog(
        records, batch_size=IMPORT_BATCH, request_id=f"bench-{uuid.uuid4()}"
    )
    answered = time.perf_counter() - started
    token = result.consistency_token
    total = client.list_loras(page_size=1, consistency_token=token).total_size
    visible = time.perf_counter() - started
    if result.errors:
        first = result.errors[0]
        raise RuntimeError(
            f"{len(result.errors)} records refused, first #{first.index}: {first.error}"
        )
    if total != len(records):
        raise RuntimeError(f"ListLoras total_size {total}, expected {len(records)}")
    run = ImportRun(label, answered, visible, result.created, result.updated, result.unchanged)
    log(
        f"{label}: answered in {answered:.2f} s, visible in {visible:.2f} s "
        f"(created {run.created}, updated {run.updated}, unchanged {run.unchanged})"
    )
    return run, token


def import_and_prepare(address: str, catalog: Path) -> Prepared:
    """Imports the catalog, checks it is all visible, imports it again unchanged, and collects
    ids, tokens and responses."""
    records, source = load_catalog(catalog)
    with LoracleClient(address, timeout=120.0) as client:
        log(f"catalog: {source}")
        first, _ = timed_import(client, records, "import")
        if first.created != len(records):
            raise RuntimeError(f"created {first.created}, expected {len(records)}")
        again, token = timed_import(client, records, "unchanged re-import")
        if again.unchanged != len(records):
            raise RuntimeError(f"unchanged {again.unchanged}, expected {len(records)}")
        # The recommendation index takes projected batches from a queue, indexed by the first
        # search or recommendation (or once the catalog is quiet): this one pays for the
        # import, so that the query measurements below do not share the CPU with it.
        started = time.perf_counter()
        client.search_loras("style", page_size=1, consistency_token=token)
        index_seconds = time.perf_counter() - started
        log(f"first search after the imports (indexes them): {index_seconds:.2f} s")
        loras = list(client.iter_loras(page_size=1000, consistency_token=token))
        ids = [lora.id for lora in loras]
        random.Random(0).shuffle(ids)
        # A typical single LoRA: the median serialized size over the whole catalog.
        get_response = _median_by_size(
            [query_service_pb2.GetLoraResponse(lora=lora).SerializeToString() for lora in loras]
        )
        tokens = [""]
        pages: list[bytes] = []
        for _ in range(LIST_PAGES):
            page = client.list_loras(page_size=LIST_PAGE_SIZE, page_token=tokens[-1])
            pages.append(page.SerializeToString())
            if not page.next_page_token or len(tokens) == LIST_PAGES:
                break
            tokens.append(page.next_page_token)
    return Prepared(
        records=len(records),
        first=first,
        again=again,
        index_seconds=index_seconds,
        source=source,
        ids=ids,
        page_tokens=tokens,
        get_response=get_response,
        list_response=_median_by_size(pages),
    )


# --- echo server (child) ------------------------------------------------------------------


async def _echo_server(blobs: dict[str, str]) -> None:
    """Answers GetLora/ListLoras with fixed messages through the same grpc.aio handler path.

    Requests are deserialized and the responses serialized on every call, as in Loracle, so
    the only thing missing is Loracle's own work between the two.
    """
    get_response = query_service_pb2.GetLoraResponse.FromString(base64.b64decode(blobs["get_lora"]))
    list_response = query_service_pb2.ListLorasResponse.FromString(
        base64.b64decode(blobs["list_loras"])
    )

    async def get_lora(
        _request: query_service_pb2.GetLoraRequest, _context: grpc.aio.ServicerContext[Any, Any]
    ) -> query_service_pb2.GetLoraResponse:
        return get_response

    async def list_loras(
        _request: query_service_pb2.ListLorasRequest, _context: grpc.aio.ServicerContext[Any, Any]
    ) -> query_service_pb2.ListLorasResponse:
        return list_response

    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "GetLora": grpc.unary_unary_rpc_method_handler(
            get_lora,
            request_deserializer=query_service_pb2.GetLoraRequest.FromString,
            response_serializer=query_service_pb2.GetLoraResponse.SerializeToString,
        ),
        "ListLoras": grpc.unary_unary_rpc_method_handler(
            list_loras,
            request_deserializer=query_service_pb2.ListLorasRequest.FromString,
            response_serializer=query_service_pb2.ListLorasResponse.SerializeToString,
        ),
    }
    await serve_echo(SERVICE, handlers)


# --- load generator (child) ---------------------------------------------------------------


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile; 0.0 for no values."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class Measurement:
    target: str
    method: str
    key: str
    round: int
    seconds: float
    latencies_ms: list[float]
    errors: int
    first_error: str
    # CPU seconds the server process used during the measured window (all its threads).
    server_cpu_seconds: float = 0.0

    @property
    def qps(self) -> float:
        return len(self.latencies_ms) / self.seconds


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process `pid` and all its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _measure(
    call: Callable[..., Any],
    requests: Iterator[Any],
    concurrency: int,
    warmup: float,
    seconds: float,
    server_pid: int,
) -> tuple[list[float], int, str, float]:
    """N workers keep one call each in flight; calls completing inside the window count, and
    the server's CPU time is read at the window's start and end."""
    begin = time.perf_counter()
    window_start = begin + warmup
    window_end = window_start + seconds
    latencies: list[float] = []
    errors = 0
    first_error = ""

    async def server_cpu() -> float:
        await asyncio.sleep(window_start - time.perf_counter())
        start = cpu_seconds(server_pid)
        await asyncio.sleep(window_end - time.perf_counter())
        return cpu_seconds(server_pid) - start

    async def worker() -> None:
        nonlocal errors, first_error
        while True:
            sent = time.perf_counter()
            if sent >= window_end:
                return
            try:
                await call(next(requests), timeout=CALL_TIMEOUT)
            except grpc.aio.AioRpcError as err:
                errors += 1
                first_error = first_error or f"{err.code().name}: {err.details()}"
                continue
            done = time.perf_counter()
            if window_start <= done <= window_end:
                latencies.append((done - sent) * 1000)

    cpu = asyncio.create_task(server_cpu())
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors, first_error, await cpu


async def _load(plan: dict[str, Any]) -> list[dict[str, Any]]:
    channels = {name: grpc.aio.insecure_channel(address) for name, address in plan["targets"]}
    try:
        for channel in channels.values():
            await asyncio.wait_for(channel.channel_ready(), timeout=START_TIMEOUT)
        stubs = {name: query_service_pb2_grpc.QueryServiceStub(ch) for name, ch in channels.items()}
        get_requests = [query_service_pb2.GetLoraRequest(id=i) for i in plan["ids"]]
        list_requests = [
            query_service_pb2.ListLorasRequest(page_size=LIST_PAGE_SIZE, page_token=token)
            for token in plan["page_tokens"]
        ]
        results = []
        for target, method, key, round_number in plan["schedule"]:
            stub = stubs[target]
            if method == "GetLora":
                call: Callable[..., Any] = stub.GetLora
                requests: Iterator[Any] = itertools.cycle(get_requests)
            else:
                call, requests = stub.ListLoras, itertools.cycle(list_requests)
            latencies, errors, first_error, cpu = await _measure(
                call,
                requests,
                plan["concurrency"],
                plan["warmup"],
                plan["seconds"],
                plan["pids"][target],
            )
            result = Measurement(
                target,
                method,
                key,
                round_number,
                plan["seconds"],
                latencies,
                errors,
                first_error,
                cpu,
            )
            log(
                f"{key:<22} {target:<7} round {round_number}: {result.qps:8.1f} calls/s, "
                f"{1000 * cpu / max(1, len(latencies)):.3f} server CPU ms per call"
                + (f", {errors} errors ({first_error})" if errors else "")
            )
            results.append(
                {
                    "target": target,
                    "method": method,
                    "key": key,
                    "round": round_number,
                    "seconds": plan["seconds"],
                    "latencies_ms": [round(v, 4) for v in latencies],
                    "errors": errors,
                    "first_error": first_error,
                    "server_cpu_seconds": cpu,
                }
            )
        return results
    finally:
        for channel in channels.values():
            await channel.close()


# --- orchestration ------------------------------------------------------------------------


def schedule(phase: str) -> list[tuple[str, str, str, int]]:
    """A/B/A/B per workload of `phase`: drift over the run lands on both targets alike."""
    return [
        (target, method, key, round_number)
        for _label, method, key, workload_phase in WORKLOADS
        if workload_phase == phase
        for round_number in range(1, ROUNDS + 1)
        for target in TARGETS
    ]


def summarize(measurements: list[Measurement]) -> dict[str, dict[str, float]]:
    summary: dict[str, dict[str, float]] = {}
    for _label, _method, key, _phase in WORKLOADS:
        figures: dict[str, float] = {}
        for target in TARGETS:
            runs = [m for m in measurements if m.target == target and m.key == key]
            calls = sum(len(m.latencies_ms) for m in runs)
            pooled = sorted(v for m in runs for v in m.latencies_ms)
            figures[f"{target}_qps"] = round(calls / sum(m.seconds for m in runs), 1)
            cpu = sum(m.server_cpu_seconds for m in runs)
            figures[f"{target}_cpu_ms_per_call"] = round(1000 * cpu / max(1, calls), 3)
            figures[f"{target}_p50_ms"] = round(percentile(pooled, 50), 3)
            figures[f"{target}_p99_ms"] = round(percentile(pooled, 99), 3)
        echo = figures["echo_qps"]
        ratio = round(figures["loracle_qps"] / echo, 3) if echo else 0.0
        summary[key] = {
            "loracle_qps": figures["loracle_qps"],
            "echo_qps": figures["echo_qps"],
            "ratio": ratio,
            "loracle_p50_ms": figures["loracle_p50_ms"],
            "loracle_p99_ms": figures["loracle_p99_ms"],
            "echo_p50_ms": figures["echo_p50_ms"],
            "echo_p99_ms": figures["echo_p99_ms"],
            "loracle_cpu_ms_per_call": figures["loracle_cpu_ms_per_call"],
            "echo_cpu_ms_per_call": figures["echo_cpu_ms_per_call"],
            # Echo's server CPU per call over Loracle's: the throughput ratio the two would
            # have if each had a core of its own (less sensitive to other load on the machine).
            "cpu_ratio": round(
                figures["echo_cpu_ms_per_call"] / figures["loracle_cpu_ms_per_call"], 3
            )
            if figures["loracle_cpu_ms_per_call"]
            else 0.0,
        }
    return summary


def print_imports(prepared: Prepared, storage: str) -> None:
    print(
        f"Catalog import: {prepared.records} records ({prepared.source}) on {storage}, "
        f"batches of {IMPORT_BATCH}, through the client; ListLoras total_size matches"
    )
    print(f"{'import':<22}{'answered s':>11}{'visible s':>11}{'records/s':>11}")
    for run in (prepared.first, prepared.again):
        rate = prepared.records / run.visible_seconds
        print(
            f"{run.label:<22}{run.answered_seconds:>11.2f}{run.visible_seconds:>11.2f}{rate:>11.0f}"
        )
    print(f"first SearchLoras after the imports (indexes them): {prepared.index_seconds:.2f} s")
    print()


def print_table(
    summary: dict[str, dict[str, float]],
    measurements: list[Measurement],
    args: argparse.Namespace,
) -> None:
    print(
        f"Queries: {args.concurrency} calls in flight, {args.seconds:g} s per measurement after "
        f"{WARMUP_SECONDS:g} s warm-up, {ROUNDS} interleaved rounds per target; "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print()
    print(
        f"{'workload':<24}{'target':<9}{'calls/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'CPU ms':>9}  rounds"
    )
    for label, _method, key, _phase in WORKLOADS:
        figures = summary[key]
        for target in TARGETS:
            rounds = " / ".join(
                f"{m.qps:.0f}" for m in measurements if m.target == target and m.key == key
            )
            print(
                f"{label:<24}{target:<9}{figures[f'{target}_qps']:>10.1f}"
                f"{figures[f'{target}_p50_ms']:>9.2f}{figures[f'{target}_p99_ms']:>9.2f}"
                f"{figures[f'{target}_cpu_ms_per_call']:>9.3f}  {rounds}"
            )
        print(
            f"{'':<24}{'ratio':<9}{figures['ratio']:>10.3f}  (loracle / echo calls/s; "
            f"echo / loracle server CPU per call: {figures['cpu_ratio']:.3f})"
        )
    print()


@contextlib.contextmanager
def storage(url: str) -> Iterator[tuple[list[str], str]]:
    """Server arguments for the store, and its name: SQLite in the data directory, or a
    throwaway schema in the PostgreSQL database `url` names (dropped afterwards)."""
    if not url:
        yield [], "SQLite"
        return
    import psycopg  # only the PostgreSQL run needs it

    base = url.split("?", 1)[0].replace("postgresql+psycopg", "postgresql")
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield ["--storage-url", f"{base}?schema={schema}"], "PostgreSQL"
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.synthetic:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from bench.catalog_scale import run_scale, summary_lines

        with storage(args.storage_url) as (storage_args, storage_name):
            report: dict[str, Any] = run_scale(args, storage_args, storage_name)
        if not args.json:
            print("\n".join(summary_lines(report)))
        return report
    with (
        tempfile.TemporaryDirectory(prefix="loracle-bench-") as tmp,
        storage(args.storage_url) as (storage_args, storage_name),
    ):
        workdir = Path(tmp)
        children = Children(workdir)
        try:
            args_of_server = server_args(workdir, storage_args)
            loracle = children.start("loracle", args_of_server)
            loracle_address = f"127.0.0.1:{loracle.wait_for_port()}"
            log(f"Loracle serving on {loracle_address} ({storage_name})")

            prepared = import_and_prepare(loracle_address, args.catalog)
            if not args.json:
                print_imports(prepared, storage_name)
            if args.import_only:
                return imports_report(prepared, storage_name)
            responses_path = workdir / "responses.json"
            responses_path.write_text(
                json.dumps(
                    {
                        "get_lora": base64.b64encode(prepared.get_response).decode(),
                        "list_loras": base64.b64encode(prepared.list_response).decode(),
                    }
                )
            )
            echo = children.start("echo", [str(Path(__file__).resolve()), "_echo", tmp])
            echo_address = f"127.0.0.1:{echo.wait_for_port()}"
            log(
                f"echo serving on {echo_address} (GetLora {len(prepared.get_response)} B, "
                f"ListLoras {len(prepared.list_response)} B per response)"
            )

            measurements = []
            for phase in PHASES:
                if phase == "uncached":
                    # The same data, served by a server whose query cache keeps nothing.
                    loracle.stop()
                    loracle = children.start("loracle-uncached", args_of_server, env=NO_CACHE_ENV)
                    loracle_address = f"127.0.0.1:{loracle.wait_for_port()}"
                    log(f"Loracle restarted without its query cache on {loracle_address}")
                # Cached: a few ids over and over. Uncached: all of them (no cache either way).
                ids = prepared.ids[:HOT_IDS] if phase == "cached" else prepared.ids
                plan = {
                    "targets": [["loracle", loracle_address], ["echo", echo_address]],
                    "pids": {"loracle": loracle.process.pid, "echo": echo.process.pid},
                    "ids": ids,
                    "page_tokens": prepared.page_tokens,
                    "schedule": schedule(phase),
                    "concurrency": args.concurrency,
                    "warmup": WARMUP_SECONDS,
                    "seconds": args.seconds,
                }
                measurements += measure(children, workdir, phase, plan)
        finally:
            children.stop_all()

    failed = [m for m in measurements if m.errors]
    if failed:
        m = failed[0]
        raise RuntimeError(f"{m.method} on {m.target} had {m.errors} errors: {m.first_error}")
    summary = summarize(measurements)
    if not args.json:
        print_table(summary, measurements, args)
    return {
        **imports_report(prepared, storage_name),
        **summary,
        "concurrency": args.concurrency,
        "seconds": args.seconds,
    }


def measure(
    children: Children, workdir: Path, phase: str, plan: dict[str, Any]
) -> list[Measurement]:
    """Runs the load generator on `plan` in its own process and reads back what it measured."""
    (workdir / "plan.json").write_text(json.dumps(plan))
    load = children.start(
        f"load-{phase}", [str(Path(__file__).resolve()), "_load", str(workdir)], share_stderr=True
    )
    steps = len(plan["schedule"])
    budget = steps * (WARMUP_SECONDS + plan["seconds"] + CALL_TIMEOUT) + START_TIMEOUT
    try:
        code = load.process.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"load generator still running after {budget:.0f} s") from None
    if code != 0:
        raise RuntimeError(f"load generator exited with {code}:\n{load.tail()}")
    return [Measurement(**m) for m in json.loads((workdir / "results.json").read_text())]


def imports_report(prepared: Prepared, storage_name: str) -> dict[str, Any]:
    return {
        "catalog": {
            "records": prepared.records,
            "source": prepared.source,
            "storage": storage_name,
            "batch_size": IMPORT_BATCH,
            "import": prepared.first.as_dict(prepared.records),
            "unchanged_reimport": prepared.again.as_dict(prepared.records),
            "first_search_seconds": round(prepared.index_seconds, 3),
        },
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }


def _positive(kind: Callable[[str], float], upper: float) -> Callable[[str], Any]:
    def parse(text: str) -> float:
        value = kind(text)
        if not 0 < value <= upper:
            raise argparse.ArgumentTypeError(f"must be in (0, {upper:g}]")
        return value

    return parse


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Import a LoRA catalog into a fresh Loracle, then measure GetLora and "
        "ListLoras against a bare gRPC echo server, side by side."
    )
    parser.add_argument(
        "--catalog",
        type=Path,
        default=DEFAULT_CATALOG,
        help="JSON Lines catalog (default ../shared/eval/civitai_loras.jsonl; synthetic if absent)",
    )
    parser.add_argument(
        "--seconds",
        type=_positive(float, 600),
        default=5.0,
        help="measured seconds per run, after 1 s warm-up (default 5)",
    )
    parser.add_argument(
        "--concurrency",
        type=_positive(int, 1024),
        default=16,
        help="calls kept in flight (default 16)",
    )
    parser.add_argument(
        "--storage-url",
        default="",
        help="run the server on PostgreSQL: postgresql://USER@HOST/DB (a throwaway schema "
        "is made there and dropped afterwards); default SQLite in a temporary directory",
    )
    parser.add_argument(
        "--import-only",
        action="store_true",
        help="time the two imports and stop (no GetLora/ListLoras measurement)",
    )
    parser.add_argument(
        "--synthetic",
        type=_positive(int, 10_000_000),
        default=0,
        help="run the scale benchmark on N synthetic records (bench/catalog_scale.py) instead",
    )
    parser.add_argument(
        "--json", action="store_true", help="print only the JSON line on stdout, no table"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_echo"]:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_echo_server(json.loads((Path(argv[1]) / "responses.json").read_text())))
        return 0
    if argv[:1] == ["_load"]:
        workdir = Path(argv[1])
        try:
            results = asyncio.run(_load(json.loads((workdir / "plan.json").read_text())))
        except KeyboardInterrupt:
            return 130
        (workdir / "results.json").write_text(json.dumps(results))
        return 0

    args = parse_args(argv)
    return run_bench(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
