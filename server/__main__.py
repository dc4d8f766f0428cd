"""`loracle-server` / `python -m server`: settings -> bootstrap -> serve."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from server.bootstrap import bootstrap
from server.config import load_settings
from server.domain.errors import DomainError
from server.rpc.server import LoracleServer


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except DomainError as exc:
        print(f"loracle-server: {exc.message}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        container = bootstrap(settings)
    except DomainError as exc:
        logging.getLogger("loracle").error("cannot start: %s", exc.message)
        return 1

    async def run() -> None:
        server = LoracleServer(container)
        await server.start(settings.listen)
        print(f"loracle-server listening on {settings.listen} (port {server.port})", flush=True)
        await server.serve_until_signal()

    try:
        asyncio.run(run())
    except OSError as exc:
        logging.getLogger("loracle").error("cannot serve: %s", exc)
        container.close()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
