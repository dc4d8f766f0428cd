"""`loracle-worker` / `python -m server.worker`: one GPU worker of a cluster. It takes jobs
from the broker, runs them on this machine's device and publishes their events; it needs the
broker, the models and the LoRA files, but no database (docs/deploy.md)."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Sequence

from server.bootstrap import cluster_worker, connect_broker, device_executor
from server.config import load_settings
from server.domain.errors import DomainError
from server.infrastructure.broker.worker import default_worker_name
from server.infrastructure.diffusion.footprint import DeviceMemory
from server.infrastructure.diffusion.registry import ModelRegistry
from server.infrastructure.logs import configure_logging
from server.infrastructure.lora_files import LoraFileReader
from server.infrastructure.metrics import MetricsHttpServer, worker_registry

log = logging.getLogger("loracle.worker")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(argv, prog="loracle-worker")
        configure_logging(settings.log_level, settings.log_format)
    except (DomainError, ValueError) as exc:
        print(f"loracle-worker: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    if not settings.broker_url:
        print("loracle-worker: broker_url (or --broker-url) is required", file=sys.stderr)
        return 2
    name = settings.worker_name or default_worker_name()
    models = ModelRegistry(
        settings.models,
        data_dir=settings.data_dir.resolve(),
        controlnets=settings.controlnets,
        upscalers=settings.upscalers,
        device_memory=DeviceMemory.probe(settings.device_budget_gb),
    )
    if settings.embedded_model:
        models.ensure_embedded(wait=True)
    # The local queue holds one fetched batch and the next; the cluster's queue is the broker.
    executor = device_executor(settings, max(settings.max_batch, 1) * 2)
    try:
        broker = connect_broker(settings, f"loracle-worker {name}")
    except DomainError as exc:
        log.error("cannot start: %s", exc.message)
        return 1
    worker = cluster_worker(
        settings.model_copy(update={"worker_name": name}),
        broker,
        executor,
        models,
        LoraFileReader(settings.resolved_lora_roots),
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    metrics: MetricsHttpServer | None = None
    if settings.metrics_listen:
        metrics = MetricsHttpServer(worker_registry(executor))
        metrics.start(settings.metrics_listen)
        print(f"loracle-worker metrics on http://{metrics.address}/metrics", flush=True)
    executor.start()
    worker.advertise()
    worker.start()
    served = ", ".join(m.config.name for m in models.statuses() if m.ready) or "none ready"
    print(f"loracle-worker {name} ready (models: {served})", flush=True)
    stop.wait()
    log.info(
        "stopping: held jobs may finish for %gs, then go back", settings.shutdown_grace_seconds
    )
    worker.stop(settings.shutdown_grace_seconds)  # held jobs finish or go back
    executor.stop()
    broker.close()
    models.close()
    if metrics is not None:
        metrics.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
