"""The jobs waiting for the device: a bounded queue with announced positions, from which a
cancelled job leaves at once, and from which the worker takes the next batch by the shared
batching policy (server.domain.batching)."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from server.domain.batching import Batch, batch_key, why_apart
from server.domain.errors import Reason, ResourceExhaustedError, UnavailableError
from server.domain.generation_events import Cancelled, Queued
from server.infrastructure.diffusion.handles import JobHandle

log = logging.getLogger("loracle.executor")


class JobQueue:
    """Thread-safe: requests put and withdraw jobs, the executor's worker takes batches."""

    def __init__(self, *, max_queue: int, max_batch: int, batch_wait: float) -> None:
        self._max_queue = max_queue
        self._max_batch = max_batch
        self._batch_wait = batch_wait
        self._lock = threading.Condition()
        self._waiting: deque[JobHandle] = deque()
        self._running: list[JobHandle] = []
        self._closed = False

    @property
    def running(self) -> list[JobHandle]:
        """The batch on the device now (empty between batches)."""
        return self._running

    def depth(self) -> int:
        """Jobs waiting for the device (not counting the running batch)."""
        with self._lock:
            return len(self._waiting)

    def idle(self) -> bool:
        with self._lock:
            return not self._waiting and not self._running

    def put(
        self,
        handle: JobHandle,
        on_accept: Callable[[int], None] | None = None,
        estimate: tuple[float, str] = (0.0, ""),
    ) -> None:
        """Queues a job. `on_accept(position)` runs once the queue has room and before the job
        can start; if it raises, nothing is queued. The first Queued event carries
        `estimate` (seconds, warning)."""
        with self._lock:
            if self._closed:
                raise UnavailableError(
                    "the server is shutting down; submit the generation again",
                    retry_after_seconds=5.0,
                    reason=Reason.SERVER_SHUTTING_DOWN,
                )
            if len(self._waiting) >= self._max_queue:
                raise ResourceExhaustedError(
                    f"the generation queue is full ({self._max_queue} jobs waiting)", 2.0
                )
            position = len(self._waiting) + (1 if self._running else 0)
            if on_accept is not None:
                on_accept(position)
            handle.publish(Queued(position, *estimate))
            self._waiting.append(handle)
            self._lock.notify_all()

    def withdraw(self, handle: JobHandle) -> None:
        """A cancelled job that has not started leaves the queue now; the ones behind it
        hear their new positions."""
        with self._lock:
            if handle not in self._waiting:
                return
            self._waiting.remove(handle)
            handle.publish(Cancelled())
            self._announce_positions()

    def close(self) -> tuple[list[JobHandle], list[JobHandle]]:
        """Refuses new jobs and wakes the worker; returns (the waiting jobs, now removed, and
        the running batch)."""
        with self._lock:
            self._closed = True
            waiting = list(self._waiting)
            self._waiting.clear()
            running = list(self._running)
            self._lock.notify_all()
        return waiting, running

    def next_batch(self) -> list[JobHandle] | None:
        """The oldest job plus compatible ones behind it, up to `max_batch` images; waits up
        to `batch_wait` for more to arrive while the batch has room. None once closed."""
        with self._lock:
            while not self._waiting and not self._closed:
                self._lock.wait()
            if self._closed:
                return None
            first = self._waiting.popleft()
            batch: Batch[JobHandle] = Batch(self._max_batch)
            batch.offer(first, batch_key(first.job), first.job.num_images)
            self._running = batch.members
            deadline = time.monotonic() + self._batch_wait
            while not batch.full and not self._closed:
                for waiting in list(self._waiting):
                    key = batch_key(waiting.job)
                    if batch.offer(waiting, key, waiting.job.num_images):
                        self._waiting.remove(waiting)
                    elif batch.key is not None and key != batch.key:
                        log.debug(
                            "generation %s waits for a later batch: it differs in %s",
                            waiting.job.generation_id,
                            ", ".join(why_apart(batch.key, key)),
                        )
                remaining = deadline - time.monotonic()
                if batch.full or remaining <= 0:
                    break
                self._lock.wait(remaining)
            self._announce_positions()
            return batch.members

    def batch_done(self) -> None:
        """The running batch has left the device: everyone waiting moves up one."""
        with self._lock:
            self._running = []
            self._announce_positions()

    def _announce_positions(self) -> None:
        ahead = 1 if self._running else 0
        for place, waiting in enumerate(self._waiting, start=ahead):
            waiting.publish(Queued(place))
