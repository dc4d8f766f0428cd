"""Prometheus metrics. Each server gets its own registry (tests run several in one process).

RPC metrics are pushed by the transport's interceptor; everything else is read from existing
state when Prometheus scrapes, so the executor, projector and query cache carry no metrics
code. Per-stage generation times come from the projector's change hook: the recorded
Succeeded event already holds them."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from server.domain.errors import DomainError
from server.domain.generation import FINAL_STATES, GenerationState
from server.infrastructure.diffusion.runtime import device_memory
from server.infrastructure.event_store import EventStore
from server.infrastructure.projector import Projector
from server.infrastructure.read_model import ProjectedChange

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

log = logging.getLogger("loracle.metrics")

# Unary calls take milliseconds; generation streams take seconds to minutes.
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
STAGES = ("queue", "text_encoding", "denoising", "decoding")


class RpcMetrics:
    """What the interceptor records: one count per call by final status code, its duration
    (streams to their end) and the messages a stream sent."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "loracle_rpc_requests",
            "RPCs handled, by full method name and final status code.",
            ("method", "code"),
            registry=registry,
        )
        self.duration = Histogram(
            "loracle_rpc_duration_seconds",
            "RPC handling time; streams are timed to their last message.",
            ("method",),
            buckets=RPC_BUCKETS,
            registry=registry,
        )
        self.stream_messages = Counter(
            "loracle_rpc_stream_messages_sent",
            "Messages sent on server streams.",
            ("method",),
            registry=registry,
        )
        self.rejected = Counter(
            "loracle_rejected_requests",
            "Requests the edge found malformed (undecodable, too large, a field over its "
            "limit, an undefined enum number, a malformed id), by method and reason.",
            ("method", "reason"),
            registry=registry,
        )

    def finished(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.duration.labels(method).observe(seconds)


class GenerationOutcomes:
    """Outcomes and per-stage times of the generations this process ran, taken from each
    projected batch: a job's final state is projected exactly once, and jobs from other
    processes sharing the store are skipped (their handles live elsewhere)."""

    def __init__(self, registry: CollectorRegistry, executor: ExecutorState) -> None:
        self._executor = executor
        self.finished = Counter(
            "loracle_generations",
            "Generations this process ran to a final state, by state.",
            ("state",),
            registry=registry,
        )
        self.stages = Histogram(
            "loracle_generation_stage_seconds",
            "Time a succeeded generation spent in each stage.",
            ("stage",),
            buckets=STAGE_BUCKETS,
            registry=registry,
        )

    def on_change(self, change: ProjectedChange) -> None:
        for view in change.generations:
            if view.state not in FINAL_STATES or self._executor.handle(view.id) is None:
                continue
            self.finished.labels(view.state.value).inc()
            if view.state is GenerationState.SUCCEEDED:
                for stage in STAGES:
                    seconds = view.timings.get(f"{stage}_seconds")
                    if seconds is not None:
                        self.stages.labels(stage).observe(seconds)


class AdapterStatsView(Protocol):
    loads: int
    evictions: int
    prefetched: int


class ExecutorStatsView(Protocol):
    batches: int
    images: int
    batch_sizes: list[int]
    model_loads: int
    model_evictions: int
    out_of_memory: int
    mixed_batches: int
    distinct_loras: list[int]
    adapter_wait_seconds: float

    @property
    def adapters(self) -> AdapterStatsView: ...


class ExecutorState(Protocol):
    """What is read from the device executor at scrape time."""

    @property
    def stats(self) -> ExecutorStatsView: ...
    @property
    def running(self) -> Sequence[object]: ...
    def queue_depth(self) -> int: ...
    def handle(self, generation_id: str) -> object | None: ...


class CacheStats(Protocol):
    hits: int
    misses: int

    def __len__(self) -> int: ...


@dataclass
class _BatchSizes:
    """Folds one of the executor's append-only lists of counts (batch sizes, distinct LoRAs
    per mixed batch) into histogram buckets, each entry once however often it is scraped."""

    name: str = "loracle_generation_batch_size"
    help: str = "Images run together per batch."
    seen: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BATCH_BUCKETS) + 1))
    total: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fold(self, sizes: Sequence[int]) -> HistogramMetricFamily:
        with self.lock:
            fresh = sizes[self.seen : len(sizes)]
            self.seen += len(fresh)
            for size in fresh:
                self.total += size
                index = next(
                    (i for i, b in enumerate(BATCH_BUCKETS) if size <= b), len(BATCH_BUCKETS)
                )
                self.buckets[index] += 1
            cumulative, running = [], 0
            for bound, count in zip((*BATCH_BUCKETS, float("inf")), self.buckets, strict=True):
                running += count
                cumulative.append((_bound(bound), running))
            family = HistogramMetricFamily(self.name, self.help)
            family.add_metric([], cumulative, self.total)
            return family


class RuntimeCollector(Collector):
    """Gauges and counters read at scrape time from the executor, the query cache and the
    projector; GPU memory only where CUDA is in use."""

    def __init__(
        self,
        *,
        executor: ExecutorState,
        cache: CacheStats | None = None,
        store: EventStore | None = None,
        projector: Projector | None = None,
    ) -> None:
        self._executor = executor
        self._cache = cache
        self._store = store
        self._projector = projector
        self._batch_sizes = _BatchSizes()
        self._distinct_loras = _BatchSizes(
            "loracle_generation_distinct_loras", "Distinct LoRA files per mixed batch."
        )

    def collect(self) -> Iterable[Metric]:
        yield from self._executor_metrics()
        if self._cache is not None:  # not on a cluster worker, which has no stores
            yield from self._cache_metrics(self._cache)
        if self._store is not None and self._projector is not None:
            yield from self._projection_metrics(self._store, self._projector)
        yield from _gpu_memory()

    def _executor_metrics(self) -> Iterable[Metric]:
        executor, stats = self._executor, self._executor.stats
        yield _gauge(
            "loracle_generation_queue_depth",
            "Generation jobs waiting for the device.",
            executor.queue_depth(),
        )
        yield _gauge(
            "loracle_generation_running_jobs", "Jobs in the running batch.", len(executor.running)
        )
        for name, help_, value in (
            ("loracle_generation_batches", "Batches run.", stats.batches),
            ("loracle_generation_images", "Images generated.", stats.images),
            ("loracle_model_loads", "Pipelines loaded onto the device.", stats.model_loads),
            ("loracle_model_evictions", "Pipelines unloaded for room.", stats.model_evictions),
            (
                "loracle_generation_out_of_memory",
                "Device out-of-memory errors.",
                stats.out_of_memory,
            ),
            (
                "loracle_generation_mixed_lora_batches",
                "Batches whose rows asked for different LoRAs (per-row deltas).",
                stats.mixed_batches,
            ),
            ("loracle_lora_loads", "LoRA files loaded onto the device.", stats.adapters.loads),
            (
                "loracle_lora_prefetched_loads",
                "LoRA loads from files the loader thread had read ahead.",
                stats.adapters.prefetched,
            ),
            ("loracle_lora_evictions", "LoRAs unloaded for room.", stats.adapters.evictions),
            (
                "loracle_lora_wait_seconds",
                "Time mixed batches waited for their LoRAs to load.",
                stats.adapter_wait_seconds,
            ),
        ):
            yield CounterMetricFamily(name, help_, value=value)
        yield self._batch_sizes.fold(stats.batch_sizes)
        yield self._distinct_loras.fold(stats.distinct_loras)

    def _cache_metrics(self, cache: CacheStats) -> Iterable[Metric]:
        hits, misses = cache.hits, cache.misses
        yield CounterMetricFamily("loracle_query_cache_hits", "Query cache hits.", value=hits)
        yield CounterMetricFamily("loracle_query_cache_misses", "Query cache misses.", value=misses)
        yield _gauge(
            "loracle_query_cache_hit_ratio",
            "Hits over lookups since start (0 before the first lookup).",
            hits / (hits + misses) if hits + misses else 0.0,
        )
        yield _gauge("loracle_query_cache_entries", "Cached query results.", len(cache))

    def _projection_metrics(self, store: EventStore, projector: Projector) -> Iterable[Metric]:
        position = projector.position
        yield _gauge(
            "loracle_projection_position", "Last event applied to the read models.", position
        )
        try:
            head = store.max_position()
        except DomainError as exc:  # the store is down: say so in the log, keep the scrape
            log.warning("projection lag unknown: %s", exc.message)
            return
        yield _gauge(
            "loracle_projection_lag_events",
            "Events recorded but not yet projected into the read models.",
            max(head - position, 0),
        )


@dataclass
class Metrics:
    """One server's registry with its RPC metrics and scrape-time collectors."""

    registry: CollectorRegistry
    rpc: RpcMetrics
    generations: GenerationOutcomes

    @classmethod
    def create(
        cls, *, executor: ExecutorState, cache: CacheStats, store: EventStore, projector: Projector
    ) -> Metrics:
        registry = CollectorRegistry()
        generations = GenerationOutcomes(registry, executor)
        projector.on_change(generations.on_change)
        registry.register(
            RuntimeCollector(executor=executor, cache=cache, store=store, projector=projector)
        )
        return cls(registry, RpcMetrics(registry), generations)


def worker_registry(executor: ExecutorState) -> CollectorRegistry:
    """A cluster worker's metrics: its device, queue, batches and models."""
    registry = CollectorRegistry()
    registry.register(RuntimeCollector(executor=executor))
    return registry


class MetricsHttpServer:
    """Serves a registry at http://HOST:PORT/metrics on daemon threads; stoppable."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.host = ""
        self.port = 0

    def start(self, listen: str) -> int:
        """Binds HOST:PORT (port 0: any free one); returns the port."""
        host, _, port = listen.rpartition(":")
        if not host or not port.isdigit():
            raise OSError(f"metrics address {listen!r} is not HOST:PORT")
        self.host = host.strip("[]")
        try:
            self._httpd, self._thread = start_http_server(
                int(port), self.host, registry=self._registry
            )
        except OSError as exc:
            raise OSError(f"metrics on {listen}: {exc.strerror or exc}") from None
        self.port = int(self._httpd.server_port)
        log.info("metrics on http://%s/metrics", self.address)
        return self.port

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


def _gauge(name: str, help_: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_, value=value)


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else str(float(value))


def _gpu_memory() -> Iterable[Metric]:
    devices = device_memory()
    if not devices:
        return
    allocated = GaugeMetricFamily(
        "loracle_gpu_memory_allocated_bytes", "Device memory held by tensors.", labels=["device"]
    )
    reserved = GaugeMetricFamily(
        "loracle_gpu_memory_reserved_bytes",
        "Device memory reserved by the caching allocator.",
        labels=["device"],
    )
    for index, held, cached in devices:
        allocated.add_metric([str(index)], held)
        reserved.add_metric([str(index)], cached)
    yield allocated
    yield reserved
