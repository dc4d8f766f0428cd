"""An in-memory device executor for unit tests of the generation path: jobs wait until the
test runs or fails them, so every state a handler can meet is reachable without torch."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from server.domain.errors import Reason, ResourceExhaustedError
from server.domain.generation_events import (
    TERMINAL,
    Cancelled,
    Completed,
    Failed,
    GenerationEvent,
    ImageComplete,
    Payload,
    Queued,
    Started,
    Timings,
)
from server.domain.generation_job import GenerationJob
from server.domain.models import (
    BaseModelConfig,
    BaseModelInfo,
    ControlNetInfo,
    UpscalerModelInfo,
)


@dataclass
class FakeStats:
    batches: int = 0
    images: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    model_loads: int = 0
    model_evictions: int = 0
    out_of_memory: int = 0
    mixed_batches: int = 0
    distinct_loras: list[int] = field(default_factory=list)
    adapter_wait_seconds: float = 0.0
    adapters: FakeAdapterStats = field(default_factory=lambda: FakeAdapterStats())


@dataclass
class FakeAdapterStats:
    loads: int = 0
    evictions: int = 0
    prefetched: int = 0


class FakeJob:
    """A JobStream: events are published by the test (run/fail) or by cancel()."""

    def __init__(self, job: GenerationJob) -> None:
        self.job = job
        self.images: list[ImageComplete] = []
        self._events: list[GenerationEvent] = []
        self._listeners: list[Callable[[Any, Payload], None]] = []
        self._cond = threading.Condition()

    @property
    def generation_id(self) -> str:
        return self.job.generation_id

    @property
    def owner(self) -> str:
        return self.job.owner

    @property
    def finished(self) -> bool:
        with self._cond:
            return any(isinstance(e.payload, TERMINAL) for e in self._events)

    @property
    def last_sequence(self) -> int:
        with self._cond:
            return len(self._events)

    def last_payload(self) -> Payload | None:
        with self._cond:
            return self._events[-1].payload if self._events else None

    def on_transition(self, listener: Callable[[Any, Payload], None]) -> None:
        self._listeners.append(listener)

    def publish(self, payload: Payload) -> None:
        with self._cond:
            if any(isinstance(e.payload, TERMINAL) for e in self._events):
                return
            if isinstance(payload, ImageComplete):
                self.images.append(payload)
            self._events.append(GenerationEvent(self.generation_id, len(self._events) + 1, payload))
            self._cond.notify_all()
        if isinstance(payload, (Started, *TERMINAL)):
            for listener in self._listeners:
                listener(self, payload)

    def events(
        self, after: int = 0, poll: float = 0.05, stop: Callable[[], bool] | None = None
    ) -> Iterator[GenerationEvent]:
        seen = after
        while True:
            with self._cond:
                ended = any(isinstance(e.payload, TERMINAL) for e in self._events)
                if seen >= len(self._events) and ended:
                    return
                if len(self._events) <= seen:
                    if stop is not None and stop():
                        return
                    self._cond.wait(poll)
                fresh = self._events[seen:]
            for event in fresh:
                yield event
                if isinstance(event.payload, TERMINAL):
                    return
            seen += len(fresh)

    def cancel(self) -> None:
        self.publish(Cancelled())


class FakeExecutor:
    """Satisfies bootstrap's DeviceExecutor; `max_queue` jobs may wait, as in the real one."""

    def __init__(self, max_queue: int = 4) -> None:
        self.max_queue = max_queue
        self.jobs: dict[str, FakeJob] = {}
        self.stats = FakeStats()
        self.running: list[FakeJob] = []
        self.started = False

    def start(self) -> None:
        self.started = True

    def stop(self, timeout: float = 30.0) -> None:
        self.started = False

    def submit(self, job: GenerationJob, on_accept: Callable[[int], None] | None = None) -> FakeJob:
        if self.queue_depth() >= self.max_queue:
            raise ResourceExhaustedError("the generation queue is full", 1.0)
        handle = FakeJob(job)
        position = self.queue_depth() + 1
        if on_accept is not None:
            on_accept(position)
        self.jobs[job.generation_id] = handle
        handle.publish(Queued(position))
        return handle

    def handle(self, generation_id: str) -> FakeJob | None:
        return self.jobs.get(generation_id)

    def queue_depth(self) -> int:
        return sum(1 for j in self.jobs.values() if not j.finished)

    def run(self, generation_id: str) -> None:
        """Runs a waiting job to success, with one image record per requested image."""
        handle = self.jobs[generation_id]
        handle.publish(Started(1))
        for i in range(handle.job.num_images):
            handle.publish(ImageComplete(i, f"{i:064x}", 10, "image/png", handle.job.seed + i))
        self.stats.batches += 1
        self.stats.batch_sizes.append(1)
        handle.publish(Completed(Timings(0.5, 0.25, 2.0, 0.125)))

    def fail(
        self,
        generation_id: str,
        error: str,
        reason: str = Reason.GENERATION_FAILED,
        lora_sha256: str = "",
    ) -> None:
        handle = self.jobs[generation_id]
        handle.publish(Started(1))
        handle.publish(Failed(error, reason, lora_sha256))


class FakeModels:
    def __init__(self, *infos: BaseModelInfo, controlnets: tuple[ControlNetInfo, ...] = ()) -> None:
        self.infos = list(infos)
        self.controlnet_infos = list(controlnets)

    def statuses(self) -> list[BaseModelInfo]:
        return list(self.infos)

    def controlnets(self) -> list[ControlNetInfo]:
        return list(self.controlnet_infos)

    def upscaler_models(self) -> list[UpscalerModelInfo]:
        return []


def ready_model(name: str = "tiny", **config: Any) -> BaseModelInfo:
    from pathlib import Path

    from server.domain.models import Architecture

    return BaseModelInfo(BaseModelConfig(name, Architecture.SD1, Path("/nowhere"), **config), True)
