"""Memory soak: does hostile input make the server grow without bound?

Starts the real server (server/devtools/local_server.py, SQLite in a temporary directory),
imports the demo LoRAs, then sends rounds of hostile requests: megabyte-scale filter strings,
forged page and consistency tokens, and many distinct queries (each a new query-cache key).
After each round it prints the server process's RSS; at the end, the ratio of the last
round's RSS to the RSS after the warm-up rounds (caches and allocator pools filled once).

With the server's default query cache (2,048 answers, 64 MiB) these requests take about 29
rounds of 500 to fill it, so RSS rises for that long and then stays within the bound;
`--cache-entries 256 --cache-mib 8` fills it within the warm-up, so the rounds after it show
whether anything else grows.

Usage: .venv/bin/python bench/bench_soak_rss.py [--rounds N] [--requests N] [--warmup N]
    [--cache-entries N] [--cache-mib M] [--json]
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from client import LoracleClient, LoracleError
from server.devtools.local_server import RunningServer, start_server
from server.devtools.synthetic_loras import write_demo_loras


def rss_bytes(pid: int) -> int:
    """VmRSS of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def hostile_calls(client: LoracleClient, rng: random.Random) -> list[Callable[[], object]]:
    """One of each hostile request, with fresh random parts (so each is a new cache key)."""
    big = "".join(rng.choices("abcdefghij", k=200_000))
    word = uuid.uuid4().hex
    forged = [
        "eyJmIjogIk5vbmV8fEZhbHNlIn0",
        _b64(json.dumps({"f": "||||", "p": 1e30}).encode()),
        _b64(("[" * 5000).encode()),
        _b64(rng.randbytes(48)),
    ]
    return [
        lambda: client.list_loras(page_size=1, tag=big + word),
        lambda: client.list_events(page_size=1, principal=big + word),
        lambda: client.list_events(page_size=1, type=word),
        lambda: client.search_loras(f"{word} {big[:9000]}", page_size=1),
        lambda: client.search_loras(f"watercolor {word}", page_size=1),
        lambda: client.get_lora(str(uuid.uuid4())),
        lambda: client.get_lora(word, consistency_token=rng.choice(forged)),
        lambda: client.list_loras(page_size=1, page_token=rng.choice(forged)),
        lambda: client.list_generations(page_size=1, page_token=rng.choice(forged)),
        lambda: client.search_loras("style", page_token=rng.choice(forged)),
    ]


@dataclass(frozen=True, slots=True)
class SoakResult:
    rss: list[int]  # after each round
    warmup: int
    errors: int

    @property
    def ratio(self) -> float:
        """The last round's RSS over the RSS after the warm-up rounds."""
        return self.rss[-1] / self.rss[self.warmup - 1]


def soak(
    server: RunningServer,
    rounds: int,
    requests: int,
    warmup: int,
    report: Callable[[int, int], None] = lambda r, b: None,
) -> SoakResult:
    rng = random.Random(13)
    rss: list[int] = []
    errors = 0
    with LoracleClient(server.address) as client:
        token = list(client.import_loras())[-1].consistency_token
        client.list_loras(consistency_token=token)
        for r in range(rounds):
            sent = 0
            while sent < requests:
                for call in hostile_calls(client, rng):
                    try:
                        call()
                    except LoracleError:
                        errors += 1
                    sent += 1
            rss.append(rss_bytes(server.process.pid))
            report(r + 1, rss[-1])
    return SoakResult(rss, max(1, min(warmup, rounds)), errors)


def cache_flags(entries: int, mib: float) -> list[str]:
    """Server flags bounding the query cache (none: the server's defaults)."""
    flags = ["--query-cache-entries", str(entries)] if entries else []
    return flags + (["--query-cache-mib", str(mib)] if mib else [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--requests", type=int, default=500, help="hostile requests per round")
    parser.add_argument("--warmup", type=int, default=2, help="rounds before the baseline")
    parser.add_argument(
        "--cache-entries",
        type=int,
        default=0,
        help="the server's query_cache_entries (default: the server's); a small cache fills "
        "within the warm-up, so what comes after shows growth beyond the caches' bounds",
    )
    parser.add_argument("--cache-mib", type=float, default=0.0, help="its query_cache_mib")
    parser.add_argument("--json", action="store_true", help="only the JSON line on stdout")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="loracle-soak-") as tmp:
        data_dir = Path(tmp)
        write_demo_loras(data_dir / "loras")
        server = start_server(data_dir, *cache_flags(args.cache_entries, args.cache_mib))
        try:

            def report(round_: int, rss: int) -> None:
                if not args.json:
                    print(f"round {round_:>3}: RSS {rss / 2**20:8.1f} MiB", flush=True)

            result = soak(server, args.rounds, args.requests, args.warmup, report)
        finally:
            server.stop()
    line = {
        "cache_entries": args.cache_entries or "default",
        "cache_mib": args.cache_mib or "default",
        "rounds": args.rounds,
        "requests_per_round": args.requests,
        "warmup_rounds": result.warmup,
        "rss_mib": [round(b / 2**20, 1) for b in result.rss],
        "ratio_last_over_warm": round(result.ratio, 3),
        "refused_requests": result.errors,
    }
    if not args.json:
        print(f"last / after warm-up: {result.ratio:.3f}")
    print(json.dumps(line), file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
