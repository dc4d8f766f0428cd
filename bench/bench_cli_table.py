"""`loracle loras list --limit 0`: the table against `--json`, on a catalog of ~8,000 LoRAs.

Starts the real server (SQLite in a temporary directory), imports the catalog through the
typed client, then runs the CLI in this process (stdout captured, `COLUMNS` set as a terminal
would) `--repeat` times each way, alternating: `--json`, the table, the table with `--wide`,
and, as the reference for what the table cost before, the same rows through rich's `Table`.
Both CLI runs make the same ListLoras calls, so the ratio table / json is what rendering adds.

Usage: .venv/bin/python bench/bench_cli_table.py [--catalog PATH] [--repeat N] [--columns N]
                                                  [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from client import LoracleClient
from client.cli import main as cli_main
from server.devtools.bench_support import (
    DEFAULT_CATALOG,
    Children,
    load_catalog,
    log,
    run_bench,
)

DEFAULT_REPEAT = 3
DEFAULT_COLUMNS = 160


def _timed(run: Callable[[], None]) -> float:
    began = time.perf_counter()
    run()
    return time.perf_counter() - began


def _cli(argv: list[str]) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli_main(argv)
    if code != 0:
        raise RuntimeError(f"loracle {' '.join(argv)} exited {code}")


def _rich_table(address: str, columns: int) -> None:
    """The rows as the CLI rendered them before (rich Table, cells cut at 40 characters)."""
    with LoracleClient(address, timeout=60) as client:
        loras = list(client.iter_loras(page_size=1000))
    table = Table("id", "name", "base model", "available", "trigger words", "tags")
    for lora in loras:
        words, tags = ", ".join(lora.trigger_words), ", ".join(lora.tags)
        table.add_row(
            lora.id[:8],
            lora.name,
            f"{lora.base_model.lineage}",
            "yes" if lora.available else "no",
            words if len(words) <= 40 else words[:39] + "…",
            tags if len(tags) <= 40 else tags[:39] + "…",
        )
    Console(file=io.StringIO(), width=columns, markup=False, highlight=False).print(table)


def run(options: argparse.Namespace) -> dict[str, Any]:
    records, source = load_catalog(Path(options.catalog))
    os.environ["COLUMNS"] = str(options.columns)
    with tempfile.TemporaryDirectory(prefix="loracle-bench-cli-") as tmp:
        children = Children(Path(tmp))
        try:
            server = children.start(
                "server",
                ["-m", "server", "--listen", "127.0.0.1:0", "--data-dir", tmp,
                 "--no-embedded-model"],
            )  # fmt: skip
            address = f"127.0.0.1:{server.wait_for_port()}"
            log(f"importing {len(records)} records ({source})")
            with LoracleClient(address, timeout=300) as client:
                result = client.import_lora_catalog(records)
                total = client.list_loras(
                    page_size=1, consistency_token=result.consistency_token
                ).total_size
            base = ["--server", address, "--timeout", "120", "loras", "list", "--limit", "0"]
            runs: dict[str, Callable[[], None]] = {
                "json": lambda: _cli([*base, "--json"]),
                "table": lambda: _cli(base),
                "table --wide": lambda: _cli([*base, "--wide"]),
                "rich Table (before)": lambda: _rich_table(address, options.columns),
            }
            times: dict[str, list[float]] = {name: [] for name in runs}
            for round_ in range(options.repeat):
                log(f"round {round_ + 1}/{options.repeat}")
                for name, call in runs.items():
                    times[name].append(_timed(call))
        finally:
            children.stop_all()
    medians = {name: statistics.median(values) for name, values in times.items()}
    summary: dict[str, Any] = {
        "bench": "cli_table",
        "source": source,
        "loras": total,
        "columns": options.columns,
        "repeat": options.repeat,
        "seconds": medians,
        "ratio_to_json": {name: medians[name] / medians["json"] for name in medians},
    }
    if not options.json:
        print(f"loras list --limit 0, {total} LoRAs ({source}), COLUMNS={options.columns}")
        print(f"{'output':<22}{'median s':>10}{'/ json':>9}")
        for name, seconds in medians.items():
            print(f"{name:<22}{seconds:>10.3f}{seconds / medians['json']:>9.2f}")
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--catalog", default=str(DEFAULT_CATALOG), help="JSON Lines catalog")
    parser.add_argument("--repeat", type=int, default=DEFAULT_REPEAT, help="runs of each")
    parser.add_argument("--columns", type=int, default=DEFAULT_COLUMNS, help="terminal width")
    parser.add_argument("--json", action="store_true", help="only the JSON line on stdout")
    options = parser.parse_args()
    return run_bench(lambda: run(options))


if __name__ == "__main__":
    sys.exit(main())
