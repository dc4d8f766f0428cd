"""`loracle-server` / `python -m server`: settings -> bootstrap -> serve."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from collections.abc import Sequence

from server.bootstrap import bootstrap
from server.config import load_settings
from server.domain.errors import DomainError
from server.infrastructure.logs import configure_logging
from server.infrastructure.metrics import MetricsHttpServer
from server.rpc.interceptors import server_interceptors
from server.rpc.server import ExposureError, LoracleServer


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except DomainError as exc:
        print(f"loracle-server: {exc.message}", file=sys.stderr)
        return 2
    try:
        configure_logging(settings.log_level, settings.log_format)
    except ValueError as exc:
        print(f"loracle-server: {exc}", file=sys.stderr)
        return 2
    try:
        container = bootstrap(settings)
    except DomainError as exc:
        logging.getLogger("loracle").error("cannot start: %s", exc.message)
        return 1
    # What start-up built (modules, the container, the recommendation index) lives as long as
    # the process: frozen, full collections stop rescanning it. And a catalog import allocates
    # millions of short-lived objects: at the default threshold (700) the young generation
    # was collected about 650 times for the 7,955-record sample, 20,000 makes that 17. Both
    # together took the collector's share of that import from a quarter to about 3 %.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)

    async def run() -> None:
        metrics_http: MetricsHttpServer | None = None
        metrics = container.metrics() if settings.metrics_listen else None
        interceptors = server_interceptors(metrics.rpc if metrics is not None else None)
        if metrics is not None:
            metrics_http = MetricsHttpServer(metrics.registry)
            metrics_http.start(settings.metrics_listen)
            print(f"loracle-server metrics on http://{metrics_http.address}/metrics", flush=True)
        try:
            server = LoracleServer(container, interceptors)
            await server.start(settings.listen)
            print(f"loracle-server listening on {settings.listen} (port {server.port})", flush=True)
            await server.serve_until_signal()
        finally:
            if metrics_http is not None:
                metrics_http.stop()

    try:
        asyncio.run(run())
    except ExposureError as exc:
        logging.getLogger("loracle").error("cannot serve: %s", exc)
        container.close()
        return 2
    except OSError as exc:
        logging.getLogger("loracle").error("cannot serve: %s", exc)
        container.close()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
