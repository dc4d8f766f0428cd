"""`bench_catalog.py --synthetic N`: a catalog of N LoRAs, from import to restart.

Measures, through the client against a server process of its own: the import rate and the time
until every record is visible; the server's memory and the database's size; GetLora and
ListLoras p50/p99 and calls/s under load (page tokens spread over the whole catalog, and each
depth's latency on its own); SearchLoras and RecommendLoras p50; and a restart, to serving and
to the first recommendation answered. Records come from `SyntheticCatalog` (deterministic,
shaped like the Civitai sample) and are streamed, so the benchmark itself holds none of them.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from client import LoracleClient
from server.devtools.bench_support import START_TIMEOUT, Child, Children, log, server_args
from server.devtools.synthetic_catalog import SyntheticCatalog
from server.domain.lora import lora_id_for_source

IMPORT_BATCH = 2000
DEPTHS = 8  # page depths whose ListLoras latency is reported one by one
CALLS_PER_DEPTH = 20
SAMPLE_IDS = 5000
QUERY_CALLS = 60
LIST_PAGE_SIZE = 50


def _ms(values: Sequence[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return round(1000 * ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))], 2)


def _timed(calls: int, call: Callable[[int], object]) -> list[float]:
    out = []
    for i in range(calls):
        started = time.perf_counter()
        call(i)
        out.append(time.perf_counter() - started)
    return out


def _database_bytes(data_dir: Path, storage_args: Sequence[str]) -> int:
    if not storage_args:  # SQLite: the database files in the data directory
        return sum(
            p.stat().st_size for p in data_dir.rglob("*") if p.is_file() and "loras" not in p.parts
        )
    import psycopg

    url = storage_args[-1]
    base, _, query = url.partition("?schema=")
    with psycopg.connect(base) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind IN ('r', 'm')",
            (query,),
        ).fetchone()
    return int(row[0]) if row else 0


def _start(children: Children, name: str, args: list[str]) -> tuple[Child, str, float]:
    started = time.perf_counter()
    child = children.start(name, args)
    address = f"127.0.0.1:{child.wait_for_port(timeout=max(START_TIMEOUT, 900))}"
    return child, address, time.perf_counter() - started


def _prompts(catalog: SyntheticCatalog, rng: random.Random, count: int) -> list[str]:
    """Prompts made of a few words of random records' text, as a user might type them."""
    prompts = []
    for index in rng.sample(range(len(catalog)), count):
        record = next(catalog.records(index, index + 1))
        words = (record["description"].split() or record["name"].split())[:12]
        rng.shuffle(words)
        prompts.append(", ".join(words[:6] + record["tags"][1:3]))
    return prompts


def run_scale(
    args: argparse.Namespace, storage_args: list[str], storage_name: str
) -> dict[str, Any]:
    catalog = SyntheticCatalog(args.synthetic)
    rng = random.Random(0)
    report: dict[str, Any] = {"records": len(catalog), "storage": storage_name}
    with tempfile.TemporaryDirectory(prefix="loracle-scale-") as tmp:
        workdir = Path(tmp)
        data_dir = workdir / "data"
        args_of_server = server_args(workdir, storage_args)
        children = Children(workdir)
        try:
            server, address, start_empty = _start(children, "loracle", args_of_server)
            report["start_empty_seconds"] = round(start_empty, 2)
            log(f"Loracle serving on {address} ({storage_name}) after {start_empty:.1f} s")
            with LoracleClient(address, timeout=600.0) as client:
                report["import"] = _import(client, catalog)
                report["rss_after_import_mib"] = round(server.rss_mib(), 1)
                started = time.perf_counter()
                client.search_loras("style", page_size=1)
                report["first_search_seconds"] = round(time.perf_counter() - started, 2)
                log(f"first search (indexes the import): {report['first_search_seconds']} s")
                report["database_bytes"] = _database_bytes(data_dir, storage_args)
                queries, ids, tokens = _queries(client, catalog, rng)
            queries["under_load"] = _load_phase(
                server.process.pid, workdir, children, address, ids, tokens, args.seconds
            )
            report["queries"] = queries
            report["rss_after_queries_mib"] = round(server.rss_mib(), 1)
            log("restarting the server")
            server.stop(timeout=120)
            children.started.remove(server)
            prompt = _prompts(catalog, rng, 1)[0]
            began = time.perf_counter()
            server, address, restart = _start(children, "loracle-restart", args_of_server)
            with LoracleClient(address, timeout=600.0) as client:
                client.recommend_loras(prompt, "SD 1.5", max_loras=5)
            ready_total = time.perf_counter() - began
            report["restart"] = {
                "serving_seconds": round(restart, 2),
                "first_recommendation_seconds": round(ready_total, 2),
                "rss_mib": round(server.rss_mib(), 1),
            }
            log(f"restart: serving in {restart:.1f} s, first recommendation at {ready_total:.1f} s")
        finally:
            children.stop_all()
    return report


def _import(client: LoracleClient, catalog: SyntheticCatalog) -> dict[str, Any]:
    total = len(catalog)
    step = max(IMPORT_BATCH, total // 20)
    progress = {"next": step}
    started = time.perf_counter()

    def on_batch(seen: int, _response: object) -> None:
        if seen >= progress["next"]:
            progress["next"] += step
            elapsed = time.perf_counter() - started
            log(f"import: {seen} records answered in {elapsed:.1f} s ({seen / elapsed:.0f}/s)")

    result = client.import_lora_catalog(
        catalog, batch_size=IMPORT_BATCH, request_id=f"scale-{uuid.uuid4()}", on_batch=on_batch
    )
    answered = time.perf_counter() - started
    shown = client.list_loras(page_size=1, consistency_token=result.consistency_token).total_size
    visible = time.perf_counter() - started
    if result.errors or result.created != total or shown != total:
        raise RuntimeError(
            f"import: created {result.created}, {len(result.errors)} errors, "
            f"{shown} visible, expected {total}"
        )
    log(f"import: answered in {answered:.1f} s, visible in {visible:.1f} s")
    return {
        "answered_seconds": round(answered, 2),
        "visible_seconds": round(visible, 2),
        "records_per_second": round(total / visible, 1),
    }


def _page_tokens(client: LoracleClient, total: int) -> tuple[list[tuple[int, str]], float]:
    """Tokens of pages at DEPTHS depths spread over the catalog, found by walking it 1,000 at a
    time (a client cannot jump into a keyset order)."""
    wanted = sorted({int(total * k / DEPTHS) // 1000 for k in range(DEPTHS)})
    tokens: list[tuple[int, str]] = []
    token, page = "", 0
    started = time.perf_counter()
    while True:
        if page in wanted:
            tokens.append((page * 1000, token))
        if page >= wanted[-1]:
            break
        response = client.list_loras(page_size=1000, page_token=token)
        if not response.next_page_token:
            break
        token, page = response.next_page_token, page + 1
    return tokens, time.perf_counter() - started


def _queries(
    client: LoracleClient, catalog: SyntheticCatalog, rng: random.Random
) -> tuple[dict[str, Any], list[str], list[str]]:
    total = len(catalog)
    ids = [
        str(lora_id_for_source(f"synthetic:{i}"))
        for i in rng.sample(range(total), min(SAMPLE_IDS, total))
    ]
    out: dict[str, Any] = {}
    get = _timed(min(len(ids), 500), lambda i: client.get_lora(ids[i]))
    out["get_lora"] = {"p50_ms": _ms(get, 50), "p99_ms": _ms(get, 99), "calls": len(get)}
    tokens, walk = _page_tokens(client, total)
    log(f"walked to {len(tokens)} page depths in {walk:.1f} s")
    depths = []
    for depth, token in tokens:

        def page(_i: int, token: str = token) -> object:
            return client.list_loras(page_size=LIST_PAGE_SIZE, page_token=token)

        times = _timed(CALLS_PER_DEPTH, page)
        depths.append({"depth": depth, "p50_ms": _ms(times, 50), "p99_ms": _ms(times, 99)})
    out["list_loras_50"] = {
        "by_depth": depths,
        "worst_p50_ms": max(d["p50_ms"] for d in depths),
        "walk_seconds": round(walk, 1),
    }
    prompts = _prompts(catalog, rng, QUERY_CALLS)
    search = _timed(len(prompts), lambda i: client.search_loras(prompts[i], page_size=20))
    out["search_loras"] = {"p50_ms": _ms(search, 50), "p99_ms": _ms(search, 99)}
    recommend = _timed(
        len(prompts), lambda i: client.recommend_loras(prompts[i], "SD 1.5", max_loras=5)
    )
    out["recommend_loras"] = {"p50_ms": _ms(recommend, 50), "p99_ms": _ms(recommend, 99)}
    log(
        "queries: GetLora p50 {} ms, ListLoras worst depth p50 {} ms, SearchLoras p50 {} ms, "
        "RecommendLoras p50 {} ms".format(
            out["get_lora"]["p50_ms"],
            out["list_loras_50"]["worst_p50_ms"],
            out["search_loras"]["p50_ms"],
            out["recommend_loras"]["p50_ms"],
        )
    )
    return out, ids, [t for _, t in tokens]


def _load_phase(
    pid: int,
    workdir: Path,
    children: Children,
    address: str,
    ids: list[str],
    tokens: list[str],
    seconds: float,
) -> dict[str, Any]:
    """Calls/s with 16 calls in flight from a load-generator process (bench_catalog's `_load`
    child), GetLora over the sampled ids, then ListLoras cycling over every measured depth."""
    plan = {
        "targets": [["loracle", address]],
        "ids": ids,
        "page_tokens": tokens,
        "schedule": [
            ["loracle", "GetLora", "get_lora", 1],
            ["loracle", "ListLoras", "list_loras_50", 1],
        ],
        "pids": {"loracle": pid},
        "concurrency": 16,
        "warmup": 1.0,
        "seconds": seconds,
    }
    (workdir / "plan.json").write_text(json.dumps(plan))
    load = children.start(
        "load", [str(Path(__file__).with_name("bench_catalog.py")), "_load", str(workdir)]
    )
    code = load.process.wait(timeout=2 * (seconds + 30) + START_TIMEOUT)
    if code != 0:
        raise RuntimeError(f"load generator exited with {code}:\n{load.tail()}")
    out: dict[str, Any] = {}
    for m in json.loads((workdir / "results.json").read_text()):
        if m["errors"]:
            raise RuntimeError(f"{m['method']}: {m['errors']} errors ({m['first_error']})")
        latencies = [v / 1000 for v in m["latencies_ms"]]
        out[m["method"]] = {
            "calls_per_second": round(len(latencies) / m["seconds"], 1),
            "p50_ms": _ms(latencies, 50),
            "p99_ms": _ms(latencies, 99),
            "server_cpu_ms_per_call": round(
                1000 * m["server_cpu_seconds"] / max(1, len(latencies)), 3
            ),
        }
    return out


def summary_lines(report: dict[str, Any]) -> list[str]:
    q = report["queries"]
    imp = report["import"]
    return [
        f"{report['records']:,} synthetic LoRAs on {report['storage']}",
        f"import: visible in {imp['visible_seconds']} s "
        f"({imp['records_per_second']:.0f} records/s)",
        f"GetLora p50 {q['get_lora']['p50_ms']} ms, p99 {q['get_lora']['p99_ms']} ms",
        f"ListLoras(50) worst-depth p50 {q['list_loras_50']['worst_p50_ms']} ms",
        f"SearchLoras p50 {q['search_loras']['p50_ms']} ms, "
        f"RecommendLoras p50 {q['recommend_loras']['p50_ms']} ms",
        f"RSS after import {report['rss_after_import_mib']} MiB, after queries "
        f"{report['rss_after_queries_mib']} MiB; "
        f"database {report['database_bytes'] / 2**20:.0f} MiB",
        "under load (16 in flight): GetLora {:.0f} calls/s, ListLoras {:.0f} calls/s".format(
            q["under_load"]["GetLora"]["calls_per_second"],
            q["under_load"]["ListLoras"]["calls_per_second"],
        ),
        f"restart: serving {report['restart']['serving_seconds']} s, first recommendation "
        f"{report['restart']['first_recommendation_seconds']} s, "
        f"RSS {report['restart']['rss_mib']} MiB",
    ]
