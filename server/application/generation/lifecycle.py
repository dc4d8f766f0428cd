"""A generation's lifecycle as recorded events: Started and the outcome of each job, saved off
the device's thread, and start-up recovery of jobs a previous process left unfinished."""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from server.application.context import DispatchContext
from server.application.ports import CatalogRepository, JobStream
from server.domain.generation import Generation, GenerationView, ImageRecord
from server.domain.generation_events import Cancelled, Completed, Failed, Payload, Started
from server.domain.generation_job import GenerationJob

log = logging.getLogger("loracle.generation")


@dataclass(frozen=True, slots=True)
class Transition:
    """A job's Started or final event, with what recording it needs."""

    generation_id: str
    payload: Payload
    images: tuple[dict[str, Any], ...]
    principal: str
    request_id: str
    prompt: str
    lora_ids: tuple[str, ...]


class GenerationRecorder:
    """Records Started and the outcome of each job as events, on its own thread so the worker
    that owns the device never waits on the database. Finished generations that used LoRAs
    are also recorded as history the recommendations learn from."""

    def __init__(
        self,
        catalog: CatalogRepository,
        record_history: Callable[[str, tuple[str, ...], str], None] | None = None,
    ) -> None:
        self._catalog = catalog
        self._history = record_history
        self._queue: queue.Queue[Transition | _Flush | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="loracle-recorder", daemon=True)
        self._thread.start()

    def follow(self, handle: JobStream, job: GenerationJob, ctx: DispatchContext) -> None:
        def on_transition(source: Any, payload: Payload) -> None:
            images = tuple(ImageRecord.of(i).to_dict() for i in getattr(source, "images", ()))
            self._queue.put(
                Transition(
                    job.generation_id,
                    payload,
                    images,
                    ctx.principal,
                    ctx.request_id,
                    job.original_prompt,
                    tuple(lora.lora_id for lora in job.loras),
                )
            )

        handle.on_transition(on_transition)

    def flush(self, timeout: float = 10.0) -> None:
        """Waits until every transition queued so far is saved (tests, shutdown)."""
        done = threading.Event()
        self._queue.put(_Flush(done))
        done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def record_now(self, transition: Transition) -> None:
        """Records on the caller's thread, raising if the store fails (cluster mode: the
        broker redelivers what was not recorded)."""
        self._save(transition)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, _Flush):
                item.done.set()
                continue
            try:
                self._save(item)
            except Exception:
                log.exception(
                    "could not record %s of generation %s", item.payload, item.generation_id
                )

    def _save(self, t: Transition) -> None:
        generation = self._catalog.get(uuid.UUID(t.generation_id))
        if not isinstance(generation, Generation) or generation.finished:
            return
        images = list(t.images)
        p = t.payload
        if isinstance(p, Started):
            if generation.state.value != "QUEUED":
                return
            generation.start(p.batch_size, t.principal, t.request_id)
        elif isinstance(p, Completed):
            generation.succeed(images, p.timings.to_dict(), t.principal, t.request_id)
        elif isinstance(p, Failed):
            generation.fail(p.error, images, t.principal, t.request_id)
        elif isinstance(p, Cancelled):
            generation.cancel(images, t.principal, t.request_id)
        else:
            return
        self._catalog.save(generation)
        if isinstance(p, Completed) and t.lora_ids and self._history is not None:
            self._history(t.prompt, t.lora_ids, t.generation_id)


@dataclass(frozen=True, slots=True)
class _Flush:
    done: threading.Event


def fail_interrupted(catalog: CatalogRepository, views: Sequence[GenerationView]) -> int:
    """At start-up: jobs a previous process left queued or running can never finish."""
    failed = 0
    for view in views:
        generation = catalog.get(uuid.UUID(view.id))
        if isinstance(generation, Generation) and not generation.finished:
            generation.fail(
                f"the server restarted while this generation was {view.state.value.lower()}; "
                "submit it again",
                list(generation.images),
                "system",
                "",
            )
            catalog.save(generation)
            failed += 1
    return failed
