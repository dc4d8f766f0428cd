"""A job's handle: its events, kept so any number of readers can follow or replay them, and
its cancellation."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

from server.domain.generation_events import (
    TERMINAL,
    GenerationEvent,
    ImageComplete,
    Payload,
    Started,
)
from server.domain.generation_job import GenerationJob

log = logging.getLogger("loracle.executor")

Transition = Callable[["JobHandle", Payload], None]


class JobHandle:
    """A job's events, kept so any number of readers can follow or replay them."""

    def __init__(
        self, job: GenerationJob, on_cancel: Callable[[JobHandle], None] | None = None
    ) -> None:
        self.job = job
        self._on_cancel = on_cancel
        self.submitted = time.monotonic()
        self.finished_at: float | None = None
        self.images: list[ImageComplete] = []
        self._events: list[GenerationEvent] = []
        self._cond = threading.Condition()
        self._cancel = threading.Event()
        self._transitions: list[Transition] = []

    @property
    def generation_id(self) -> str:
        return self.job.generation_id

    @property
    def owner(self) -> str:
        return self.job.owner

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def finished(self) -> bool:
        with self._cond:
            return bool(self._events) and isinstance(self._events[-1].payload, TERMINAL)

    @property
    def last_sequence(self) -> int:
        with self._cond:
            return len(self._events)

    def on_transition(self, listener: Transition) -> None:
        """Called on the publishing thread for Started and the final event (recording)."""
        self._transitions.append(listener)

    def cancel(self) -> None:
        """A running job stops at its next step; a waiting one leaves the queue now."""
        self._cancel.set()
        if self._on_cancel is not None:
            self._on_cancel(self)
        with self._cond:
            self._cond.notify_all()

    def publish(self, payload: Payload) -> bool:
        with self._cond:
            if self._events and isinstance(self._events[-1].payload, TERMINAL):
                return False
            if isinstance(payload, ImageComplete):
                self.images.append(payload)
            if isinstance(payload, TERMINAL):
                self.finished_at = time.monotonic()
            self._events.append(GenerationEvent(self.generation_id, len(self._events) + 1, payload))
            # Under the lock, before readers wake: whoever sees the final event can rely on
            # its transition having been handed over (listeners only enqueue).
            if isinstance(payload, (Started, *TERMINAL)):
                for listener in self._transitions:
                    try:
                        listener(self, payload)
                    except Exception:
                        log.exception("generation transition listener failed")
            self._cond.notify_all()
        return True

    def events(
        self, after: int = 0, poll: float = 0.5, stop: Callable[[], bool] | None = None
    ) -> Iterator[GenerationEvent]:
        """Events with a sequence number above `after`, waiting for new ones until the job
        ends (or `stop()` says the reader went away)."""
        seen = after
        while True:
            with self._cond:
                if seen >= len(self._events) and self._terminal_locked():
                    return
                while len(self._events) <= seen:
                    if stop is not None and stop():
                        return
                    self._cond.wait(poll)
                batch = self._events[seen:]
            for event in batch:
                yield event
                if isinstance(event.payload, TERMINAL):
                    return
            seen += len(batch)

    def _terminal_locked(self) -> bool:
        return bool(self._events) and isinstance(self._events[-1].payload, TERMINAL)
