"""The API replica's side of cluster mode: queueing jobs in the broker, relaying any job's
events from any replica, recording outcomes, and the models the workers serve."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from server.application.context import current_context
from server.application.generation.lifecycle import Transition
from server.domain.errors import (
    ConflictError,
    DomainError,
    FieldViolation,
    ResourceExhaustedError,
    ValidationError,
)
from server.domain.generation import ImageRecord
from server.domain.generation_events import TERMINAL, Cancelled, GenerationEvent, Payload, Queued
from server.domain.generation_job import GenerationJob
from server.domain.models import (
    FALLBACK_DEFAULTS,
    BaseModelConfig,
    BaseModelInfo,
    ControlNetInfo,
    GenerationDefaults,
    UpscalerModelInfo,
    resolve_architecture,
)
from server.infrastructure.broker.codec import (
    Who,
    encode_job,
    recorded_images,
    to_payload,
    to_record,
)
from server.infrastructure.broker.port import Broker, Claim, EventRecord
from server.infrastructure.broker.relay import Relay
from server.infrastructure.diffusion.families import family_for

log = logging.getLogger("loracle.cluster")

# How long a replica waits for a job's first record to learn who owns it.
OWNER_READ_SECONDS = 5.0


class RemoteJobStream:
    """A job running somewhere in the cluster, followed through its broker log."""

    def __init__(self, broker: Broker, generation_id: str, owner: str | None = None) -> None:
        self._broker = broker
        self._id = generation_id
        self._owner = owner
        self._finished = False
        self._last = 0

    @property
    def generation_id(self) -> str:
        return self._id

    @property
    def owner(self) -> str:
        """The submitter: known to the replica that queued the job; any other replica reads
        it from the job's first record (Queued carries it), "" (admins only) if unreadable."""
        if self._owner is None:
            self._owner = self._read_owner()
        return self._owner

    def _read_owner(self) -> str:
        try:
            subscription = self._broker.events(self._id)
        except DomainError:
            return ""
        try:
            record = subscription.next(OWNER_READ_SECONDS)
        except DomainError:
            return ""
        finally:
            subscription.close()
        if record is None or record.kind != "queued":
            return ""
        return Who.from_dict(record.meta.get("who")).principal

    @property
    def finished(self) -> bool:
        if not self._finished:
            claim = self._broker.claim(self._id)
            self._finished = claim is None or claim.state in ("done", "cancelled")
        return self._finished

    @property
    def last_sequence(self) -> int:
        return self._last

    def on_transition(self, listener: Callable[[Any, Payload], None]) -> None:
        """Outcomes are recorded by the replicas' shared recorder consumer, not per stream."""

    def events(
        self, after: int = 0, poll: float = 0.5, stop: Callable[[], bool] | None = None
    ) -> Iterator[GenerationEvent]:
        subscription = self._broker.events(self._id)
        relay = Relay()
        sequence = 0
        try:
            while not relay.finished:
                record = subscription.next(poll)
                if record is None:
                    if stop is not None and stop():
                        return
                    continue
                for payload in relay.feed(record):
                    sequence += 1
                    if isinstance(payload, TERMINAL):
                        self._finished = True
                    if sequence > after:
                        self._last = sequence
                        yield GenerationEvent(self._id, sequence, payload)
        finally:
            subscription.close()

    def cancel(self) -> None:
        """A job no worker holds yet is cancelled here; a running one is signalled (its
        worker stops it within a denoising step and publishes the outcome)."""
        for _ in range(10):
            claim = self._broker.claim(self._id)
            if claim is None or claim.state in ("done", "cancelled"):
                return
            if claim.state == "queued":
                cancelled = Claim("cancelled", claim.attempt, "", True, claim.revision)
                if self._broker.update_claim(self._id, cancelled):
                    ctx = current_context()
                    who = Who(ctx.principal, ctx.request_id)
                    self._broker.publish(to_record(self._id, 0, Cancelled(), who=who, images=[]))
                    self._finished = True
                    return
                continue
            if claim.cancel or self._broker.update_claim(
                self._id, Claim(claim.state, claim.attempt, claim.worker, True, claim.revision)
            ):
                self._broker.signal_cancel(self._id)
                return


class BrokerExecutor:
    """The executor port for API replicas: jobs go to the broker's durable queue."""

    def __init__(self, broker: Broker, *, max_queue: int = 16) -> None:
        self._broker = broker
        self._max_queue = max_queue

    def submit(
        self, job: GenerationJob, on_accept: Callable[[int], None] | None = None
    ) -> RemoteJobStream:
        depth = self._broker.queue_depth()
        if depth >= self._max_queue:
            raise ResourceExhaustedError(
                f"the cluster's generation queue is full ({depth} jobs waiting)", 2.0
            )
        ctx = current_context()
        who = Who(
            ctx.principal,
            ctx.request_id,
            job.original_prompt,
            tuple(x.lora_id for x in job.loras),
        )
        body = encode_job(job, who)
        limit = self._broker.max_message_bytes()
        if len(body) > limit:  # only input images make a job this large
            raise ValidationError(
                FieldViolation(
                    "spec.init_image",
                    f"with its mask, makes a job of {len(body):,} bytes; in cluster mode a "
                    f"job travels in one broker message of at most {limit:,} bytes (NATS "
                    "max_payload): send smaller images, or raise max_payload",
                )
            )
        if on_accept is not None:
            on_accept(depth)  # records Submitted; if the store is down nothing is queued
        gid = job.generation_id
        self._broker.create_claim(gid, Claim("queued"))
        # The owner travels in the first record: any replica's handle reads it from there.
        self._broker.publish(to_record(gid, 0, Queued(depth), who=Who(job.owner)))
        self._broker.enqueue(gid, body)
        return RemoteJobStream(self._broker, gid, job.owner)

    def handle(self, generation_id: str) -> RemoteJobStream | None:
        known = self._broker.claim(generation_id) is not None
        return RemoteJobStream(self._broker, generation_id) if known else None


class OutcomeRecorder(Protocol):
    def record_now(self, transition: Transition) -> None: ...


class RecorderFeed:
    """Records job outcomes from the broker's shared `recorder` consumer: whichever replica
    pulls a state event saves it and only then acknowledges it, so an outcome survives the
    death of the replica that took the request, and a store outage only delays it."""

    def __init__(
        self,
        broker: Broker,
        recorder: OutcomeRecorder,
        batch: int = 32,
        retry_delay: float = 1.0,
    ) -> None:
        self._broker = broker
        self._recorder = recorder
        self._batch = batch
        self._retry_delay = retry_delay
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loracle-recorder-feed")
        self._thread.daemon = True
        self.recorded = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                pulled = self._broker.fetch_state_events(self._batch, timeout=1.0)
            except DomainError as exc:
                log.warning("cannot read job outcomes: %s", exc.message)
                self._stop.wait(1.0)
                continue
            for record, delivery in pulled:
                try:
                    self._record(record)
                    delivery.ack()
                    self.recorded += 1
                except Exception as exc:
                    # Back to the broker, for this or another replica, once the store is back.
                    log.warning(
                        "could not record %s of %s: %r", record.kind, record.generation_id, exc
                    )
                    with contextlib.suppress(DomainError):
                        delivery.hand_back(delay=self._retry_delay)

    def _record(self, record: EventRecord) -> None:
        payload = to_payload(record)
        if payload is None:
            return
        who = Who.from_dict(record.meta.get("who"))
        transition = Transition(
            record.generation_id,
            payload,
            tuple(ImageRecord.of(i).to_dict() for i in recorded_images(record)),
            who.principal,
            who.request_id,
            who.prompt,
            who.lora_ids,
        )
        # Two replicas may record a job's Started and its outcome at once: the second save
        # then conflicts on the aggregate's version, and succeeds once it has reloaded.
        for attempt in range(4):
            try:
                self._recorder.record_now(transition)
                return
            except ConflictError:
                if attempt == 3:
                    raise
                time.sleep(0.05 * (attempt + 1))


class ClusterModels:
    """Models as the live workers advertise them. Before any worker is up, the configured
    models are listed as not ready, so generation fails fast instead of queueing for nobody.

    Adverts are remembered until their own age passes `ttl`: a read of the directory can
    miss a key while its worker rewrites it, or time out on a starved broker, and one such
    read must not make a serving cluster look empty or unavailable."""

    def __init__(
        self,
        broker: Broker,
        configured: tuple[BaseModelConfig, ...],
        ttl: float = 15.0,
        *,
        controlnets: list[ControlNetInfo] | None = None,
        upscalers: list[UpscalerModelInfo] | None = None,
    ) -> None:
        self._broker = broker
        self._configured = configured
        self._controlnets = list(controlnets or ())
        self._upscalers = list(upscalers or ())
        self._ttl = ttl
        self._adverts: dict[str, tuple[float, list[BaseModelInfo]]] = {}
        self._cache: tuple[float, list[BaseModelInfo]] = (float("-inf"), [])

    def controlnets(self) -> list[ControlNetInfo]:
        """As this replica's configuration has them: a worker runs a job's ControlNets by
        name from its own `[[controlnets]]` (the same files, as with LoRA roots)."""
        return list(self._controlnets)

    def upscaler_models(self) -> list[UpscalerModelInfo]:
        """As this replica's configuration has them (workers resolve them by name too)."""
        return list(self._upscalers)

    def statuses(self) -> list[BaseModelInfo]:
        now = time.monotonic()
        if now - self._cache[0] < 1.0:
            return self._cache[1]
        try:
            directory = self._broker.workers()
        except DomainError:
            if not any(time.time() - at <= self._ttl for at, _ in self._adverts.values()):
                raise
            log.warning(
                "worker directory unreadable; answering from adverts under %.0f s old", self._ttl
            )
            directory = {}
        for worker, document in directory.items():
            doc = json.loads(document)
            at = float(doc.get("at", 0))
            if at >= self._adverts.get(worker, (0.0, []))[0]:
                self._adverts[worker] = (at, [_model_info(m) for m in doc.get("models", [])])
        found: dict[str, BaseModelInfo] = {}
        for worker, (at, infos) in list(self._adverts.items()):
            if time.time() - at > self._ttl:
                del self._adverts[worker]
                continue
            for info in infos:
                if info.config.name not in found or info.ready:
                    found[info.config.name] = info
        if not found:
            found = {
                c.name: BaseModelInfo(c, False, "no worker is serving this model right now")
                for c in self._configured
            }
        out = sorted(found.values(), key=lambda m: m.config.name)
        self._cache = (now, out)
        return out


def model_document(info: BaseModelInfo) -> dict[str, Any]:
    c, d = info.config, info.defaults
    return {
        "name": c.name,
        "architecture": c.architecture.value,
        "path": str(c.path),
        "scheduler": c.scheduler,
        "dtype": c.dtype,
        "placeholder": c.placeholder,
        "ready": info.ready,
        "error": info.error,
        "resolved_dtype": info.dtype,
        "default_scheduler": info.default_scheduler,
        "batch_fields": list(c.batch_fields),
        "inpainting": info.inpainting,
        "schedulers": list(info.schedulers),
        "takes_negative_prompt": info.takes_negative_prompt,
        "hires_fix": info.hires_fix,
        "latent_hires": info.latent_hires,
        "latent_hires_controlled": info.latent_hires_controlled,
        "controlnet_modes": list(info.controlnet_modes),
        "several_control_images": info.several_control_images,
        "several_controlnets": info.several_controlnets,
        "controlnet_step_range": info.controlnet_step_range,
        "weights_bytes": info.weights_bytes,
        "size_multiple": info.size_multiple,
        "defaults": {
            "width": d.width,
            "height": d.height,
            "steps": d.steps,
            "guidance_scale": d.guidance_scale,
        },
    }


def _model_info(doc: dict[str, Any]) -> BaseModelInfo:
    """A worker's advert read back. One from a worker older than a key gets what that worker
    itself would have used: its model family's defaults and batch fields."""
    architecture = resolve_architecture(str(doc["architecture"]))
    family = family_for(architecture)
    fields = family.batch_fields if family is not None else ()
    fallback = family.defaults if family is not None else FALLBACK_DEFAULTS
    given = doc.get("defaults") or {}
    defaults = GenerationDefaults(
        width=int(given.get("width", fallback.width)),
        height=int(given.get("height", fallback.height)),
        steps=int(given.get("steps", fallback.steps)),
        guidance_scale=float(given.get("guidance_scale", fallback.guidance_scale)),
    )
    config = BaseModelConfig(
        name=str(doc["name"]),
        architecture=architecture,
        path=Path(str(doc["path"])),
        scheduler=str(doc.get("scheduler", "")),
        dtype=str(doc.get("dtype", "auto")),
        placeholder=bool(doc.get("placeholder", False)),
        batch_fields=tuple(str(f) for f in doc.get("batch_fields", fields)),
    )
    return BaseModelInfo(
        config,
        bool(doc.get("ready")),
        str(doc.get("error", "")),
        str(doc.get("resolved_dtype", "")),
        str(doc.get("default_scheduler", "")),
        defaults,
        inpainting=bool(doc.get("inpainting", False)),
        schedulers=tuple(
            str(s) for s in doc.get("schedulers", family.schedulers if family else ())
        ),
        takes_negative_prompt=bool(doc.get("takes_negative_prompt", True)),
        hires_fix=bool(doc.get("hires_fix", True)),
        latent_hires=bool(doc.get("latent_hires", family.latent_hires if family else True)),
        latent_hires_controlled=bool(
            doc.get("latent_hires_controlled", family.latent_hires_controlled if family else True)
        ),
        controlnet_modes=tuple(
            str(m)
            for m in doc.get(
                "controlnet_modes", tuple(family.controlnet_pipelines) if family else ()
            )
        ),
        several_control_images=bool(
            doc.get(
                "several_control_images",
                family is None or family.multi_controlnet_class is not None,
            )
        ),
        several_controlnets=bool(
            doc.get("several_controlnets", family.several_controlnets if family else True)
        ),
        controlnet_step_range=bool(
            doc.get("controlnet_step_range", family.controlnet_step_range if family else True)
        ),
        weights_bytes=int(doc.get("weights_bytes", 0)),
        size_multiple=int(doc.get("size_multiple", family.size_multiple if family else 8)),
    )
