"""Token decode cost: median time to check a good token against forged ones, side by side.

A forged token must be refused before anything parses it (length cap, base64, MAC), so it
costs no more than a good one whatever its bytes: the unsigned build parsed a deep "[" nest
or a huge JSON payload first. In-process, on the signer itself (no RPC).

Usage: .venv/bin/python bench/bench_tokens.py [--repeat N] [--json]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from server.domain.errors import InvalidTokenError
from server.domain.tokens import TokenSigner, new_key, typed


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _after_lora(p: dict[str, Any]) -> tuple[str, str]:
    return typed(p, "n", str), typed(p, "i", str)


def _median_us(check: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter_ns()
        with contextlib.suppress(InvalidTokenError):
            check()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2000)
    parser.add_argument("--json", action="store_true", help="only the JSON line on stdout")
    args = parser.parse_args(argv)
    signer = TokenSigner(new_key())
    listing = "None||False"
    good = signer.page_token(listing, n="a watercolor style", i="0" * 36)
    cases: dict[str, str] = {
        "good page token": good,
        "forged: listing only (JSON)": "eyJmIjogIk5vbmV8fEZhbHNlIn0",
        "forged: 1e30 position": _b64(json.dumps({"f": listing, "p": 1e30}).encode()),
        'forged: "[" * 5000': _b64(("[" * 5000).encode()),
        "forged: good token, one bit flipped": good[:-2]
        + ("A" if good[-2] != "A" else "B")
        + good[-1],
        "forged: 3 KB of base64": _b64(b"x" * 3000),
        "forged: 100,000 characters": "A" * 100_000,
    }
    results = {
        name: _median_us(
            functools.partial(signer.page_position, token, listing, _after_lora), args.repeat
        )
        for name, token in cases.items()
    }
    consistency = signer.consistency_token(123456)
    results["good consistency token"] = _median_us(
        lambda: signer.consistency_position(consistency), args.repeat
    )
    results["forged consistency token"] = _median_us(
        lambda: signer.consistency_position("9" * 18), args.repeat
    )
    if not args.json:
        print(f"{'token':<40} {'median µs':>10}")
        for name, us in results.items():
            print(f"{name:<40} {us:>10.2f}")
    print(json.dumps({"repeat": args.repeat, "median_us": results}), file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
