"""Recommendation benchmark: RecommendLoras latency, index build time and server memory, at the
size of the real catalog sample and at a synthetic scale-up of it.

For each catalog size this starts the real server (SQLite in a temporary directory), imports
the catalog through the typed client, waits for the index snapshot the server saves once the
catalog is quiet, and makes sequential RecommendLoras calls (one in flight: the latency one
user sees). It then restarts the server on the same data twice: with the snapshot (the
start-up log line `recommendation index: N LoRAs restored from the snapshot ... in X.XXs`
times its load and the replay of later events) and with the snapshot file deleted (`N LoRAs,
M past generations in X.XXs`: the index rebuilt from the read models, as every start did
before snapshots). Each restart's time to serving and RSS are recorded, and the index's array
bytes per LoRA from the same log line.

The scale-up repeats the real records with deterministic variations (see `scaled_catalog`);
it lives only in memory and in the temporary data directory.

Usage: .venv/bin/python bench/bench_recommend.py [--catalog PATH] [--queries PATH]
                                                  [--scale N] [--calls N] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

from client import LoracleClient, LoracleError
from server.devtools.bench_support import (
    DEFAULT_CATALOG,
    REPO_ROOT,
    START_TIMEOUT,
    SYNTHETIC_RECORDS,
    Child,
    Children,
    load_catalog,
    log,
    raise_system_exit,
)

DEFAULT_QUERIES = REPO_ROOT.parent / "shared" / "eval" / "dev_queries.jsonl"
DEFAULT_SCALE = 100_000
DEFAULT_CALLS = 300
IMPORT_BATCH = 2000
WARMUP_CALLS = 20
BASE_MODEL = "SD 1.5"
MAX_LORAS = 3
SEED = 20240601
CALL_TIMEOUT = 30.0
IMPORT_TIMEOUT = 300.0
VISIBLE_TRIES = 10
# Targets are printed next to the measured p50; the run never fails on them.
P50_TARGETS_MS = ((SYNTHETIC_RECORDS, 10.0), (100_000, 30.0))
INDEX_LINE = re.compile(
    r"recommendation index: (\d+) LoRAs[^\n]* in ([0-9.]+)s(?:; arrays (\d+) bytes)?"
)
RESTORED_LINE = re.compile(r"recommendation index: \d+ LoRAs restored from the snapshot")
SNAPSHOT_LINE = re.compile(
    r"recommendation index: snapshot at position (\d+), (\d+) LoRAs, ([0-9.]+) MiB in ([0-9.]+)s"
)
SNAPSHOT_FILE = "recommend-index.npz"
SNAPSHOT_WAIT = 300.0
# Without the snapshot a start indexes the whole catalog first: minutes at 100k on 2 busy CPUs.
REBUILD_START_TIMEOUT = 900.0


def scaled_catalog(base: Sequence[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """`count` records built from `base`; the first len(base) are `base` itself.

    Record i >= n (n = len(base)) is a variant N = i // n of base record i % n: source_id and
    file_name get an `:sN` / `_sN` suffix and the name a variant number; the tags are a
    shuffled subset of its own plus, sometimes, one tag of another record; the description
    keeps its length but is its own words shuffled with about a fifth replaced by words of
    another record's description. Vocabulary, field lengths, base-model mix and trigger words
    stay those of the real catalog. Seeded, so every run sends the same records.
    """
    n = len(base)
    if count <= n:
        return [dict(r) for r in base[:count]]
    rng = random.Random(SEED)
    out = [dict(r) for r in base]
    for i in range(n, count):
        variant, src = divmod(i, n)
        record = base[src]
        other = base[rng.randrange(n)]
        tags = list(record.get("tags") or ())
        rng.shuffle(tags)
        if len(tags) > 2:
            tags = tags[: rng.randint(len(tags) - 1, len(tags))]
        other_tags = other.get("tags") or ()
        if other_tags and rng.random() < 0.5:
            extra = rng.choice(other_tags)
            if extra not in tags:
                tags.append(extra)
        words = str(record.get("description") or "").split()
        other_words = str(other.get("description") or "").split()
        rng.shuffle(words)
        if other_words:
            for k in range(len(words)):
                if rng.random() < 0.2:
                    words[k] = rng.choice(other_words)
        file_name = str(record.get("file_name") or "")
        out.append(
            {
                "source_id": f"{record['source_id']}:s{variant}",
                "name": f"{record.get('name') or ''} v{variant + 1}",
                "base_model": record.get("base_model"),
                "tags": tags,
                "trigger_words": list(record.get("trigger_words") or ()),
                "file_name": f"{file_name}_s{variant}" if file_name else "",
                "description": " ".join(words),
                "downloads": int(int(record.get("downloads") or 0) * rng.uniform(0.05, 1.0)),
            }
        )
    return out


def load_prompts(
    path: Path, catalog: Sequence[dict[str, Any]], calls: int
) -> tuple[list[str], str]:
    """A deterministic sample of `calls` prompts (with repeats only if there are fewer)."""
    rng = random.Random(SEED)
    prompts: list[str] = []
    source = "shared/eval"
    if path.is_file():
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                if line.strip():
                    prompt = json.loads(line).get("prompt")
                    if isinstance(prompt, str) and prompt.strip():
                        prompts.append(prompt)
    if not prompts:
        log(f"{path} not found or empty: synthesizing prompts from catalog names and tags")
        source = "synthetic"
        for _ in range(max(calls, 1000)):
            record = catalog[rng.randrange(len(catalog))]
            tags = list(record.get("tags") or ())
            picked = rng.sample(tags, min(len(tags), rng.randint(1, 4)))
            prompts.append(
                ", ".join(["masterpiece", "best quality", str(record.get("name") or ""), *picked])
            )
    total = calls + WARMUP_CALLS
    if len(prompts) >= total:
        return rng.sample(prompts, total), source
    return [prompts[rng.randrange(len(prompts))] for _ in range(total)], source


# --- measurement --------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile; 0.0 for no values."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class SizeResult:
    loras: int
    source: str
    import_seconds: float
    records_per_second: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    empty_results: int
    index_build_seconds: float  # index ready at restart, from the snapshot
    index_loras: int
    index_mode: str  # "snapshot" or "rebuilt" (no usable snapshot)
    restart_seconds: float  # process start to serving, with the snapshot
    index_bytes_per_lora: float  # the index's arrays after the restart, per LoRA
    snapshot_mib: float
    snapshot_save_seconds: float
    rebuild_seconds: float  # index rebuilt from the read models (snapshot deleted)
    restart_rebuild_seconds: float  # process start to serving without the snapshot
    rss_mib: float
    rss_after_restart_mib: float
    rss_after_rebuild_mib: float


def start_server(
    children: Children, name: str, data_dir: Path, timeout: float = START_TIMEOUT
) -> tuple[Child, str, float]:
    started = time.perf_counter()
    child = children.start(
        name,
        [
            "-m",
            "server",
            "--no-embedded-model",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(data_dir),
            "--log-level",
            "INFO",
        ],
    )
    address = f"127.0.0.1:{child.wait_for_port(timeout)}"
    return child, address, time.perf_counter() - started


def recommend(client: LoracleClient, prompts: Sequence[str]) -> tuple[list[float], int]:
    """Sequential calls, one in flight; per-call wall latency (ms) and empty answers."""
    latencies: list[float] = []
    empty = 0
    for prompt in prompts:
        sent = time.perf_counter()
        response = client.recommend_loras(
            prompt, BASE_MODEL, max_loras=MAX_LORAS, include_unavailable=True
        )
        latencies.append((time.perf_counter() - sent) * 1000)
        if not response.recommendations:
            empty += 1
    return latencies, empty


def import_catalog(address: str, records: Sequence[dict[str, Any]]) -> float:
    """Imports in batches of IMPORT_BATCH and waits until ListLoras sees every record."""
    with LoracleClient(address, timeout=IMPORT_TIMEOUT) as client:
        done = 0

        def progress(seen: int, _response: Any) -> None:
            nonlocal done
            if seen - done >= 20_000:
                done = seen
                log(f"  {seen} / {len(records)} records sent")

        started = time.perf_counter()
        result = client.import_lora_catalog(
            records,
            batch_size=IMPORT_BATCH,
            request_id=f"bench-{uuid.uuid4()}",
            on_batch=progress,
        )
        if result.errors:
            first = result.errors[0]
            raise RuntimeError(
                f"{len(result.errors)} records refused, first #{first.index}: {first.error}"
            )
        token = result.consistency_token
        total = -1
        for _ in range(VISIBLE_TRIES):
            total = client.list_loras(page_size=1, consistency_token=token).total_size
            if total == len(records):
                return time.perf_counter() - started
            time.sleep(0.5)
        raise RuntimeError(f"ListLoras total_size {total}, expected {len(records)}")


def measure_size(
    workdir: Path,
    records: Sequence[dict[str, Any]],
    source: str,
    prompts: Sequence[str],
    *,
    rebuild: bool = True,
) -> SizeResult:
    size = len(records)
    children = Children(workdir)
    data_dir = workdir / f"data-{size}"
    (data_dir / "loras").mkdir(parents=True)
    warmup, measured = prompts[:WARMUP_CALLS], prompts[WARMUP_CALLS:]
    try:
        server, address, _ = start_server(children, f"loracle-{size}", data_dir)
        log(f"{size} LoRAs ({source}): server on {address}, importing in batches of 2000")
        import_seconds = import_catalog(address, records)
        loras_per_s = size / import_seconds
        log(f"  imported in {import_seconds:.1f} s ({loras_per_s:.0f} records/s)")

        saved = wait_for_snapshot(server, size)
        with LoracleClient(address, timeout=CALL_TIMEOUT) as client:
            recommend(client, warmup)
            rss = server.rss_mib()
            log(f"  {len(measured)} sequential RecommendLoras calls")
            latencies, empty = recommend(client, measured)
        ordered = sorted(latencies)

        server.stop()
        if server.process.returncode not in (0, -signal.SIGTERM):
            log(f"  server exited with {server.process.returncode} on SIGTERM")
        snapshot_mib = (data_dir / SNAPSHOT_FILE).stat().st_size / 2**20
        log(f"  restarting on the same data directory (snapshot {snapshot_mib:.1f} MiB)")
        again, address, restart_seconds = start_server(
            children, f"loracle-{size}-restart", data_dir
        )
        index = again.wait_for_stderr(INDEX_LINE)
        mode = "snapshot" if RESTORED_LINE.search(index.group(0)) else "rebuilt"
        with LoracleClient(address, timeout=CALL_TIMEOUT) as client:
            recommend(client, warmup)
        rss_restart = again.rss_mib()
        again.stop()

        rebuild_seconds = restart_rebuild = rss_rebuild = -1.0
        if rebuild:
            (data_dir / SNAPSHOT_FILE).unlink()
            log("  restarting without the snapshot (index rebuilt from the read models)")
            rebuilt, address, restart_rebuild = start_server(
                children, f"loracle-{size}-rebuild", data_dir, REBUILD_START_TIMEOUT
            )
            rebuild_seconds = float(rebuilt.wait_for_stderr(INDEX_LINE).group(2))
            with LoracleClient(address, timeout=CALL_TIMEOUT) as client:
                recommend(client, warmup)
            rss_rebuild = rebuilt.rss_mib()
    finally:
        children.stop_all()
    index_loras = int(index.group(1))
    return SizeResult(
        loras=size,
        source=source,
        import_seconds=round(import_seconds, 2),
        records_per_second=round(loras_per_s, 1),
        p50_ms=round(percentile(ordered, 50), 3),
        p90_ms=round(percentile(ordered, 90), 3),
        p99_ms=round(percentile(ordered, 99), 3),
        max_ms=round(ordered[-1], 3),
        empty_results=empty,
        index_build_seconds=float(index.group(2)),
        index_loras=index_loras,
        index_mode=mode,
        restart_seconds=round(restart_seconds, 2),
        index_bytes_per_lora=round(int(index.group(3) or 0) / max(index_loras, 1), 1),
        snapshot_mib=round(snapshot_mib, 1),
        snapshot_save_seconds=saved,
        rebuild_seconds=rebuild_seconds,
        restart_rebuild_seconds=round(restart_rebuild, 2),
        rss_mib=round(rss, 1),
        rss_after_restart_mib=round(rss_restart, 1),
        rss_after_rebuild_mib=round(rss_rebuild, 1),
    )


def wait_for_snapshot(server: Child, size: int) -> float:
    """Waits for the snapshot the server saves once the imported catalog is indexed and
    quiet (so no call below is measured while it is written); its save time, or -1."""
    deadline = time.monotonic() + SNAPSHOT_WAIT
    while time.monotonic() < deadline:
        text = server.stderr_path.read_text(errors="replace")
        for match in SNAPSHOT_LINE.finditer(text):
            if int(match.group(2)) == size:
                log(f"  snapshot saved: {match.group(3)} MiB in {match.group(4)} s")
                return float(match.group(4))
        time.sleep(0.5)
    log(f"  no snapshot of {size} LoRAs within {SNAPSHOT_WAIT:.0f} s")
    return -1.0


def p50_target(loras: int) -> float | None:
    """The p50 target of a size near one of the targets' sizes (within 25 %), else None."""
    for size, target in P50_TARGETS_MS:
        if size / 1.25 <= loras <= size * 1.25:
            return target
    return None


def print_table(results: Sequence[SizeResult], args: argparse.Namespace, prompts: str) -> None:
    print(
        f"RecommendLoras: {args.calls} sequential calls after {WARMUP_CALLS} warm-up calls, "
        f"base_model {BASE_MODEL!r}, max_loras={MAX_LORAS}, include_unavailable; prompts from "
        f"{prompts}; {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print()
    header = (
        f"{'LoRAs':>7} {'source':<11}{'import s':>9}{'rec/s':>7}{'p50 ms':>8}{'p50 target':>12}"
        f"{'p90 ms':>8}{'p99 ms':>8}{'RSS MiB':>8}"
    )
    print(header)
    for r in results:
        target = p50_target(r.loras)
        if target is None:
            verdict = "-"
        else:
            verdict = f"<={target:g} " + ("ok" if r.p50_ms <= target else "MISS")
        print(
            f"{r.loras:>7} {r.source:<11}{r.import_seconds:>9.1f}{r.records_per_second:>7.0f}"
            f"{r.p50_ms:>8.2f}{verdict:>12}{r.p90_ms:>8.2f}{r.p99_ms:>8.2f}{r.rss_mib:>8.0f}"
        )
    print()
    print(
        "Restart on the same data: with the index snapshot, and with it deleted (rebuild; "
        "-1: skipped). ratio: index rebuild s / index s."
    )
    print(
        f"{'LoRAs':>7}{'snapshot':>10}{'index s':>9}{'serving s':>11}{'RSS MiB':>9}"
        f"{'rebuild s':>11}{'serving s':>11}{'RSS MiB':>9}{'ratio':>7}{'B/LoRA':>8}{'MiB':>7}"
    )
    for r in results:
        ratio = r.rebuild_seconds / r.index_build_seconds if r.index_build_seconds > 0 else 0.0
        print(
            f"{r.loras:>7}{r.index_mode:>10}{r.index_build_seconds:>9.2f}{r.restart_seconds:>11.2f}"
            f"{r.rss_after_restart_mib:>9.0f}{r.rebuild_seconds:>11.2f}"
            f"{r.restart_rebuild_seconds:>11.2f}{r.rss_after_rebuild_mib:>9.0f}{ratio:>7.1f}"
            f"{r.index_bytes_per_lora:>8.0f}{r.snapshot_mib:>7.1f}"
        )
    if len(results) > 1:
        small, large = results[0], results[-1]
        per_lora = (
            (large.rss_after_restart_mib - small.rss_after_restart_mib)
            * 2**20
            / max(large.loras - small.loras, 1)
        )
        print(
            f"server RSS per added LoRA after restart, {small.loras} -> {large.loras}: "
            f"{per_lora / 1024:.1f} KiB"
        )
    print()
    print(
        "index s: the index restored from its snapshot plus the events after it (server log); "
        "serving s: process start to the port open; rebuild s: the index built from the read "
        "models. RSS MiB: server VmRSS after import + warm-up, and after each restart + 20 "
        "calls. B/LoRA: the index's numpy arrays and packed records per LoRA (server log); "
        "MiB: snapshot file."
    )
    for r in results:
        if r.empty_results:
            print(f"note: {r.empty_results} calls at {r.loras} LoRAs returned no recommendation")
        if r.index_loras != r.loras:
            print(f"note: the index at {r.loras} LoRAs reported {r.index_loras} LoRAs")
    print()


def run(args: argparse.Namespace) -> dict[str, Any]:
    base, source = load_catalog(args.catalog)
    prompts, prompt_source = load_prompts(args.queries, base, args.calls)
    sizes: list[tuple[list[dict[str, Any]], str]] = [] if args.only_scale else [(base, source)]
    if args.scale > len(base):
        sizes.append((scaled_catalog(base, args.scale), "synthetic"))
        log(f"scaled {len(base)} records to {args.scale} in memory")
    elif args.scale < len(base):
        sizes.append((scaled_catalog(base, args.scale), source))
    results = []
    with tempfile.TemporaryDirectory(prefix="loracle-bench-rec-") as tmp:
        for records, size_source in sizes:
            results.append(
                measure_size(Path(tmp), records, size_source, prompts, rebuild=not args.no_rebuild)
            )
            log(f"  {json.dumps(asdict(results[-1]))}")  # kept if a later size fails
    if not args.json:
        print_table(results, args, prompt_source)
    keys = (
        "loras",
        "source",
        "import_seconds",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "index_build_seconds",
        "rss_mib",
    )
    return {
        "sizes": [
            {
                **{k: asdict(r)[k] for k in keys},
                **{k: v for k, v in asdict(r).items() if k not in keys},
            }
            for r in results
        ],
        "calls": args.calls,
        "prompts": prompt_source,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }


def _bounded_int(lower: int, upper: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if not lower <= value <= upper:
            raise argparse.ArgumentTypeError(f"must be in [{lower}, {upper}]")
        return value

    return parse


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="RecommendLoras latency, index build time and server memory at the real "
        "catalog size and at a synthetic scale-up."
    )
    parser.add_argument(
        "--catalog",
        type=Path,
        default=DEFAULT_CATALOG,
        help="JSON Lines catalog (default ../shared/eval/civitai_loras.jsonl; synthetic if absent)",
    )
    parser.add_argument(
        "--queries",
        type=Path,
        default=DEFAULT_QUERIES,
        help="JSON Lines with a 'prompt' field (default ../shared/eval/dev_queries.jsonl; "
        "prompts are synthesized from the catalog if absent)",
    )
    parser.add_argument(
        "--scale",
        type=_bounded_int(1, 1_000_000),
        default=DEFAULT_SCALE,
        help=f"records in the synthetic scale-up (default {DEFAULT_SCALE}; "
        "equal to the catalog size: no second size)",
    )
    parser.add_argument(
        "--calls",
        type=_bounded_int(1, 100_000),
        default=DEFAULT_CALLS,
        help=f"measured calls per size, after {WARMUP_CALLS} warm-up calls "
        f"(default {DEFAULT_CALLS})",
    )
    parser.add_argument(
        "--only-scale", action="store_true", help="measure only the scaled-up catalog"
    )
    parser.add_argument(
        "--no-rebuild",
        action="store_true",
        help="skip the restart without the snapshot (a full index rebuild: minutes at 100k)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print only the JSON line on stdout, no table"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    signal.signal(signal.SIGTERM, raise_system_exit)
    started = time.monotonic()
    try:
        result = run(args)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except (RuntimeError, LoracleError, grpc.RpcError, OSError) as exc:
        log(f"failed: {exc}")
        return 1
    log(f"done in {time.monotonic() - started:.0f} s")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
