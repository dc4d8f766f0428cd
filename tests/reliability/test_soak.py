"""Memory, not timing: rounds of hostile requests (megabyte filters, forged tokens, endless
distinct queries) against a real server must not make its RSS keep growing once the caches
have filled. Light by default; LORACLE_SOAK_ROUNDS sets a heavy run (make bench-reliability)."""

from __future__ import annotations

import os
from pathlib import Path

from bench.bench_soak_rss import cache_flags, soak
from server.devtools.local_server import start_server
from server.devtools.synthetic_loras import write_demo_loras

ROUNDS = int(os.environ.get("LORACLE_SOAK_ROUNDS", "0") or 0)
HEAVY = ROUNDS > 0
# A query cache of 256 answers and 8 MiB fills within the warm-up of a heavy run, so what
# follows shows growth beyond the caches' bounds (none since answered errors stopped leaving
# reference cycles: docs/benchmarks.md).
CACHE_ENTRIES, CACHE_MIB = 256, 8.0
# The light run's rounds are short enough for the start-up (models load in the background)
# to show: it only bounds growth; the heavy run's warm-up covers it.
MAX_GROWTH_BYTES = (16 if HEAVY else 96) * 2**20


def test_rss_stops_growing_under_hostile_requests(tmp_path: Path) -> None:
    write_demo_loras(tmp_path / "loras")
    server = start_server(tmp_path, *cache_flags(CACHE_ENTRIES, CACHE_MIB))
    try:
        result = soak(
            server,
            rounds=ROUNDS if HEAVY else 4,
            requests=500 if HEAVY else 60,
            warmup=3 if HEAVY else 2,
        )
    finally:
        server.stop()
    baseline = result.rss[result.warmup - 1]
    growth = max(result.rss[result.warmup :], default=baseline) - baseline
    print(f"soak RSS MiB: {[round(b / 2**20, 1) for b in result.rss]}, growth {growth / 2**20:.1f}")
    assert result.errors > 0  # the forged tokens were refused, as they must be
    assert growth < MAX_GROWTH_BYTES, [round(b / 2**20, 1) for b in result.rss]
