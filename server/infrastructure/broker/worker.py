"""A GPU worker in cluster mode: takes jobs from the broker and runs them on its own
DiffusionExecutor (which batches them), publishing every event back to the broker.

It pulls only when its device is idle, up to `max_batch` jobs at once; it keeps the first and
those compatible with it and hands the rest straight back, so batching works across the
cluster without one worker sitting on jobs another could run. Each job it takes is one
attempt (counted in the job's claim); the lease is extended while it runs, so a worker that
dies loses its jobs to another after one lease."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from server.application.ports import LoraFiles
from server.domain.batching import Batch
from server.domain.errors import DomainError, Reason
from server.domain.generation_events import (
    TERMINAL,
    Cancelled,
    Failed,
    ImageChunk,
    ImageComplete,
    Queued,
    Started,
)
from server.domain.generation_job import NO_MODEL, GenerationJob, ResolvedLora
from server.domain.models import BaseModelInfo, ControlNetInfo, UpscalerModelInfo
from server.infrastructure.broker.codec import JobMessage, decode_job, to_record
from server.infrastructure.broker.port import Broker, Claim, Delivery
from server.infrastructure.broker.relay import Relay
from server.infrastructure.broker.replica import model_document
from server.infrastructure.diffusion.executor import DiffusionExecutor
from server.infrastructure.diffusion.handles import JobHandle

log = logging.getLogger("loracle.worker")

# Image bytes travel in pieces well under NATS's default 1 MB message limit; relays put
# them back together and re-chunk them to the size each client asked for.
BROKER_CHUNK = 256 * 1024


class ModelSource(Protocol):
    def statuses(self) -> list[BaseModelInfo]: ...

    def controlnets(self) -> list[ControlNetInfo]: ...

    def upscaler_models(self) -> list[UpscalerModelInfo]: ...


@dataclass
class _Held:
    delivery: Delivery
    message: JobMessage
    claim: Claim
    handle: JobHandle | None = None
    extended: float = 0.0


def default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class BrokerWorker:
    def __init__(
        self,
        broker: Broker,
        executor: DiffusionExecutor,
        models: ModelSource,
        files: LoraFiles,
        *,
        name: str = "",
        lease_seconds: float = 30.0,
        max_attempts: int = 3,
        max_batch: int = 8,
        batch_wait: float = 0.01,
    ) -> None:
        self._broker = broker
        self._executor = executor
        self._models = models
        self._files = files
        self.name = name or default_worker_name()
        self._lease = lease_seconds
        self._max_attempts = max_attempts
        self._max_batch = max_batch
        self._batch_wait = batch_wait
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._pumps: list[threading.Thread] = []
        self._handing_back = False
        self.completed = 0
        broker.on_cancel(self._cancel_signal)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        for target, name in (
            (self._pull_loop, "loracle-worker-pull"),
            (self._lease_loop, "loracle-worker-lease"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        """Stops pulling, lets held jobs finish for up to `timeout` seconds (a pod's grace
        period), then hands the rest back: another worker runs them, and the attempt this
        worker began does not count against them."""
        self._stop.set()
        self._idle.wait(timeout)
        with self._lock:
            self._handing_back = True
            held = list(self._held.values())
        for item in held:
            if item.handle is not None:
                item.handle.cancel()
        for thread in [*self._threads, *self._pumps]:
            thread.join(10.0)

    # -- pulling -----------------------------------------------------------------------------

    def _pull_loop(self) -> None:
        while not self._stop.is_set():
            if not self._idle.wait(0.5):
                continue
            if not any(m.ready for m in self._models.statuses()):
                # Still building or loading its models (a replica with run_worker builds
                # the placeholder in the background): a job taken now would fail here.
                self._stop.wait(0.2)
                continue
            try:
                deliveries = self._broker.fetch(self._max_batch, timeout=1.0)
                if deliveries:
                    self._take_batch(deliveries)
            except DomainError as exc:
                log.warning("cannot fetch jobs: %s", exc.message)
                self._stop.wait(1.0)

    def _take_batch(self, deliveries: list[Delivery]) -> None:
        """Keeps the first job and those that batch with it, pulling more for up to
        `batch_wait` while the batch has room (clients whose jobs just finished are still
        sending their next ones); the rest go straight back to the queue. The kept jobs are
        claimed first and handed to the executor together, so they start as one batch."""
        batch: Batch[tuple[Delivery, JobMessage]] = Batch(self._max_batch)
        deadline = time.monotonic() + self._batch_wait
        while True:
            for delivery in deliveries:
                try:
                    message = decode_job(delivery.body)
                except (ValueError, KeyError, TypeError):
                    log.error("dropping an undecodable job message")
                    delivery.ack()
                    continue
                if not batch.offer((delivery, message), message.batch_key, message.num_images):
                    # Another worker (or this one, next) runs it; the short delay (past this
                    # loop's window) keeps this loop from fetching it again.
                    delivery.hand_back(delay=2 * self._batch_wait)
            remaining = deadline - time.monotonic()
            if batch.full or remaining <= 0 or self._stop.is_set():
                break
            deliveries = self._broker.fetch(self._max_batch - batch.images, timeout=remaining)
        claimed: list[tuple[_Held, GenerationJob, dict[int, ImageComplete]]] = []
        for delivery, message in batch.members:
            try:
                taken = self._claim(delivery, message)
            except DomainError as exc:
                log.warning("could not take job %s: %s", message.generation_id, exc.message)
                continue
            if taken is not None:
                claimed.append(taken)
        for held, job, reused in claimed:
            self._start(held, job, reused)

    def _claim(
        self, delivery: Delivery, message: JobMessage
    ) -> tuple[_Held, GenerationJob, dict[int, ImageComplete]] | None:
        """Counts this attempt in the job's claim; None when the job is not to be run here
        (already finished or cancelled, out of attempts, or needing what this worker lacks)."""
        gid = message.generation_id
        while True:
            claim = self._broker.claim(gid) or Claim("queued")
            if claim.state in ("done", "cancelled"):
                delivery.ack()  # its outcome is already published
                return None
            if claim.attempt >= self._max_attempts:
                log.warning("job %s: giving up after %d attempts", gid, claim.attempt)
                self._finish(
                    delivery,
                    message,
                    claim.attempt,
                    Failed(
                        f"gave up after {claim.attempt} attempts: the worker running it "
                        f"stopped before it finished each time (last: {claim.worker or '?'})",
                        Reason.WORKER_LOST,
                    ),
                )
                return None
            mine = Claim("running", claim.attempt + 1, self.name, claim.cancel, claim.revision)
            if claim.revision == 0:  # the claim expired: start a new one
                try:
                    self._broker.create_claim(gid, mine)
                except Exception:  # another worker created it first: read it again
                    continue
                break
            if self._broker.update_claim(gid, mine):
                break
        claim = self._broker.claim(gid) or mine
        log.info("job %s: attempt %d of %d", gid, claim.attempt, self._max_attempts)
        held = _Held(delivery, message, claim)
        try:
            job = self._job(message)
        except _Refused as exc:
            self._finish(delivery, message, claim.attempt, Failed(str(exc), Reason.WORKER_REFUSED))
            return None
        reused = self._earlier_images(gid) if claim.attempt > 1 else {}
        with self._lock:
            self._held[gid] = held
            self._idle.clear()
        return held, job, reused

    def _start(self, held: _Held, job: GenerationJob, reused: dict[int, ImageComplete]) -> None:
        gid = job.generation_id
        try:
            handle = self._executor.submit(job)
        except DomainError as exc:
            log.warning("local queue refused job %s: %s", gid, exc.message)
            self._give_back(held)
            return
        held.handle = handle
        if held.claim.cancel:
            handle.cancel()
        pump = threading.Thread(
            target=self._pump, args=(held, handle, reused), name=f"loracle-pump-{gid[:8]}"
        )
        self._pumps = [t for t in self._pumps if t.is_alive()] + [pump]
        pump.start()

    def _job(self, message: JobMessage) -> GenerationJob:
        if message.is_upscale:
            model: BaseModelInfo | None = BaseModelInfo(NO_MODEL, True)
        else:
            model = next(
                (m for m in self._models.statuses() if m.config.name == message.model), None
            )
        if model is None or not model.ready:
            raise _Refused(f"worker {self.name} does not serve model {message.model!r}")
        ready = {c.config.name: c.config for c in self._models.controlnets() if c.ready}
        for name in message.controlnet_names:
            if name not in ready:
                raise _Refused(f"worker {self.name} has no ready ControlNet {name!r}")
        upscalers = {u.config.name: u.config for u in self._models.upscaler_models() if u.ready}
        if message.upscaler_model and message.upscaler_model not in upscalers:
            raise _Refused(f"worker {self.name} has no ready upscaler {message.upscaler_model!r}")
        return message.job(
            model.config,
            self._located(message.loras, "LoRA"),
            BROKER_CHUNK,
            self._located(message.embeddings, "embedding"),
            ready,
            upscalers,
        )

    def _located(self, files: tuple[ResolvedLora, ...], what: str) -> tuple[ResolvedLora, ...]:
        """The job's LoRA (or embedding) files under this worker's roots."""
        located: list[ResolvedLora] = []
        for lora in files:
            path = self._files.locate(lora.file_path)
            if path is None:
                raise _Refused(
                    f"{what} {lora.name!r}: {lora.file_path!r} is missing under worker "
                    f"{self.name}'s LoRA roots"
                )
            located.append(replace(lora, path=path))
        return tuple(located)

    def _earlier_images(self, gid: str) -> dict[int, ImageComplete]:
        """Images an earlier attempt finished: clients may already hold them, so this
        attempt reuses them instead of sending different bytes under the same index."""
        relay = Relay()
        subscription = self._broker.events(gid)
        try:
            while (record := subscription.next(0.3)) is not None:
                relay.feed(record)
        finally:
            subscription.close()
        return dict(relay.delivered)

    # -- running -----------------------------------------------------------------------------

    def _pump(self, held: _Held, handle: JobHandle, reused: dict[int, ImageComplete]) -> None:
        gid = held.message.generation_id
        attempt = held.claim.attempt
        chunk_size = held.message.chunk_size
        images: dict[int, ImageComplete] = dict(reused)
        final: Any = None
        try:
            for event in handle.events():
                p = event.payload
                if isinstance(p, Queued):
                    continue
                if isinstance(p, (ImageChunk, ImageComplete)) and p.image_index in reused:
                    continue
                if isinstance(p, TERMINAL):
                    final = p
                    break
                who = held.message.who if isinstance(p, Started) else None
                record = to_record(gid, attempt, p, who=who)
                if isinstance(p, ImageComplete):
                    images[p.image_index] = p
                    record.meta["chunk_size"] = chunk_size
                self._broker.publish(record)
        except DomainError as exc:
            log.warning("lost the broker while running %s: %s", gid, exc.message)
            handle.cancel()
            final = None
        handed_back = (
            isinstance(final, Cancelled) and self._handing_back and not self._cancel_asked(gid)
        )
        if handed_back:
            self._give_back(held)
        else:
            if final is not None:
                ordered = [images[i] for i in sorted(images)]
                if isinstance(final, Cancelled) or self._still_mine(gid, held.claim):
                    try:
                        self._finish(held.delivery, held.message, attempt, final, ordered)
                    except DomainError as exc:
                        log.warning("could not publish the outcome of %s: %s", gid, exc.message)
                else:
                    held.delivery.ack()  # another attempt took over; its outcome counts
            self._forget(gid)
        self.completed += 1

    def _give_back(self, held: _Held) -> None:
        """Hands a job back to the queue and forgets it (it was not run to an outcome)."""
        gid = held.message.generation_id
        try:
            self._release(gid)
            held.delivery.hand_back()
        except DomainError as exc:
            log.warning("could not hand back %s (its lease will run out): %s", gid, exc.message)
        self._forget(gid)

    def _forget(self, gid: str) -> None:
        with self._lock:
            self._held.pop(gid, None)
            if not self._held:
                self._idle.set()

    def _release(self, gid: str) -> None:
        """Undoes this worker's claim: the attempt it began does not count."""
        for _ in range(5):
            claim = self._broker.claim(gid)
            if claim is None or claim.state != "running" or claim.worker != self.name:
                return
            queued = Claim("queued", claim.attempt - 1, "", claim.cancel, claim.revision)
            if self._broker.update_claim(gid, queued):
                return

    def _cancel_asked(self, gid: str) -> bool:
        try:
            claim = self._broker.claim(gid)
        except DomainError:
            return False
        return claim is not None and claim.cancel

    def _still_mine(self, gid: str, claim: Claim) -> bool:
        now = self._broker.claim(gid)
        return now is not None and now.attempt == claim.attempt and now.worker == self.name

    def _finish(
        self,
        delivery: Delivery,
        message: JobMessage,
        attempt: int,
        final: Any,
        images: Sequence[ImageComplete] = (),
    ) -> None:
        """Publishes a job's outcome, marks its claim done and acks it, in that order: a
        worker dying in between leaves a job that is redelivered and run again, never one
        without an outcome."""
        gid = message.generation_id
        self._broker.publish(to_record(gid, attempt, final, images=list(images), who=message.who))
        self._mark_done(gid, attempt)
        delivery.ack()

    def _mark_done(self, gid: str, attempt: int) -> None:
        for _ in range(5):
            claim = self._broker.claim(gid)
            if claim is None or claim.state == "done":
                return
            done = Claim("done", attempt, self.name, claim.cancel, claim.revision)
            if self._broker.update_claim(gid, done):
                return

    # -- leases, cancellation and the directory ------------------------------------------------

    def _lease_loop(self) -> None:
        interval = max(0.2, self._lease / 3)
        last_advert = 0.0
        while not self._stop.wait(min(interval, 1.0)):
            now = time.monotonic()
            with self._lock:
                held = list(self._held.values())
            for item in held:
                try:
                    if now - item.extended >= interval:
                        item.delivery.extend()
                        item.extended = now
                    claim = self._broker.claim(item.message.generation_id)
                    if claim is not None and claim.cancel and item.handle is not None:
                        item.handle.cancel()
                except DomainError as exc:
                    log.warning("could not extend a lease: %s", exc.message)
            if now - last_advert >= 5.0:
                try:
                    self.advertise()
                    last_advert = now
                except DomainError as exc:
                    log.warning("could not advertise this worker: %s", exc.message)

    def advertise(self) -> None:
        document = {
            "at": time.time(),
            "models": [model_document(m) for m in self._models.statuses()],
            "running": len(self._held),
        }
        self._broker.advertise(self.name, json.dumps(document).encode())

    def _cancel_signal(self, generation_id: str) -> None:
        with self._lock:
            item = self._held.get(generation_id)
        if item is not None and item.handle is not None:
            item.handle.cancel()


class _Refused(Exception):
    """This worker cannot run the job (a model or LoRA it lacks): the job fails with why."""
