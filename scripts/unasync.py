"""Writes client/sync_client.py from client/async_client.py, as httpcore's scripts/unasync.py does.

The asyncio client is the one written by hand; the blocking one is its mechanical translation,
so no method is written twice. `--check` exits 1 when the committed file is stale (the unit
tests run it, so CI fails on drift).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = Path("client/async_client.py")
TARGET = Path("client/sync_client.py")

DOCSTRING = f'''"""Blocking client for scripts and the CLI.

Generated from {SOURCE} by scripts/unasync.py: edit that file and rerun the script.
"""'''

# Applied in order, each to the whole file. Everything async-specific in the source must be
# spelled so that one of these rewrites it; --check catches a source that grew something new
# only if the result still differs, so read the diff after editing the async client.
SUBS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r'\A""".*?"""', re.DOTALL), DOCSTRING),
    (re.compile(r"^import grpc\.aio\n", re.MULTILINE), ""),
    # A loop that only re-yields is `yield from` in a plain generator (ruff's UP028 asks so).
    (
        re.compile(r"^( *)(?:async )?for (\w+) in (.+):\n *yield \2\n", re.MULTILINE),
        r"\1yield from \3\n",
    ),
    (re.compile(r"\bgrpc\.aio\."), "grpc."),
    (re.compile(r"\bAsyncLoracleClient\b"), "LoracleClient"),
    (re.compile(r"\bAsyncIterator\b"), "Iterator"),
    (re.compile(r"\b__aenter__\b"), "__enter__"),
    (re.compile(r"\b__aexit__\b"), "__exit__"),
    (re.compile(r"\basync (def|for|with) "), r"\1 "),
    (re.compile(r"\bawait "), ""),
]


def unasync(source: str) -> str:
    for pattern, replacement in SUBS:
        source = pattern.sub(replacement, source)
    # Renames reorder imports and shorten lines; ruff puts them the way `make lint` wants.
    source = _ruff(["check", "--fix-only", "--select", "I"], source)
    return _ruff(["format"], source)


def _ruff(args: list[str], source: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "ruff", *args, "--quiet", "--stdin-filename", str(TARGET), "-"],
        input=source,
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    return done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the file is out of date")
    args = parser.parse_args()
    expected = unasync((ROOT / SOURCE).read_text())
    if args.check:
        if (ROOT / TARGET).read_text() != expected:
            print(f"{TARGET} is out of date: run 'python scripts/unasync.py'", file=sys.stderr)
            return 1
        print(f"{TARGET} matches {SOURCE}")
        return 0
    (ROOT / TARGET).write_text(expected)
    return 0


if __name__ == "__main__":
    sys.exit(main())
