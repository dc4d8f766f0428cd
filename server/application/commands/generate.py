"""Generation commands: GenerateImage, QuickGenerate, SubmitGeneration, CancelGeneration.

All four go through `GenerationJobs`, which validates, resolves the model and the LoRAs (with
the architecture check) before anything is queued, records the Submitted event in the same
step that takes a queue slot, and has the job's lifecycle recorded as events."""

from __future__ import annotations

import logging
import queue
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from server.application.commands.base import (
    CommandResult,
    ICommandHandler,
    IStreamCommandHandler,
)
from server.application.commands.generation import (
    CancelGenerationCommand,
    GenerateImageCommand,
    GenerationRequest,
    LoraChoice,
    QuickGenerateCommand,
    SubmitGenerationCommand,
)
from server.application.commands.idempotency import previous_result, record_for
from server.application.commands.recommend import Recommender
from server.application.context import DispatchContext, current_context
from server.application.ports import CatalogRepository
from server.domain.errors import (
    DomainError,
    FieldViolation,
    NotFoundError,
    PreconditionError,
    ResourceExhaustedError,
    ValidationError,
)
from server.domain.generation import (
    TERMINAL,
    Cancelled,
    Completed,
    Failed,
    GenerationEvent,
    GenerationJob,
    Payload,
    ResolvedLora,
    Started,
)
from server.domain.generation_job import Generation, GenerationView, ImageRecord
from server.domain.models import Architecture, BaseModelInfo, LoraView, is_uuid
from server.domain.recommend.prompt import parse_prompt
from server.domain.schedulers import SCHEDULERS

log = logging.getLogger("loracle.generation")


@dataclass(frozen=True, slots=True)
class GenerationLimits:
    """What one request may ask for (settings: max_prompt_chars, max_image_side, ...)."""

    prompt_chars: int = 10_000
    side: int = 2048
    pixels: int = 2048 * 2048
    steps: int = 150
    images: int = 8
    loras: int = 8


DEFAULT_LIMITS = GenerationLimits()
PLACEHOLDER_SIDE = 256
FORMATS = ("png", "jpeg", "webp")
QUICK_MIN_CONFIDENCE = 0.5


class ModelLookup(Protocol):
    def statuses(self) -> list[BaseModelInfo]: ...


class JobStream(Protocol):
    @property
    def generation_id(self) -> str: ...
    @property
    def finished(self) -> bool: ...
    @property
    def last_sequence(self) -> int: ...
    def events(
        self, after: int = ..., poll: float = ..., stop: Callable[[], bool] | None = ...
    ) -> Iterator[GenerationEvent]: ...
    def cancel(self) -> None: ...
    def on_transition(self, listener: Callable[[Any, Payload], None]) -> None: ...


class Executor(Protocol):
    def submit(
        self, job: GenerationJob, on_accept: Callable[[int], None] | None = ...
    ) -> JobStream: ...
    def handle(self, generation_id: str) -> JobStream | None: ...


class LoraLookup(Protocol):
    def get(self, lora_id: str) -> LoraView | None: ...
    def find_by_file_name(self, file_name: str) -> list[LoraView]: ...


def _defaults(model: BaseModelInfo) -> tuple[int, int, float]:
    """(side, steps, guidance) when a request leaves them at zero."""
    if model.config.placeholder:
        return 64, 4, 7.0
    if model.config.architecture is Architecture.SDXL:
        return 1024, 30, 5.0
    return 512, 25, 7.0


def validate(
    request: GenerationRequest, limits: GenerationLimits = DEFAULT_LIMITS
) -> list[FieldViolation]:
    out = []
    if not request.prompt.strip():
        out.append(FieldViolation("spec.prompt", "must not be empty"))
    if max(len(request.prompt), len(request.negative_prompt)) > limits.prompt_chars:
        out.append(FieldViolation("spec.prompt", f"at most {limits.prompt_chars} characters"))
    for name, value in (("width", request.width), ("height", request.height)):
        if value and (value % 8 or not 64 <= value <= limits.side):
            out.append(
                FieldViolation(f"spec.{name}", f"a multiple of 8 from 64 to {limits.side}, or 0")
            )
    if request.width * request.height > limits.pixels:
        out.append(FieldViolation("spec.width", f"width x height at most {limits.pixels} pixels"))
    if not 0 <= request.steps <= limits.steps:
        out.append(FieldViolation("spec.steps", f"from 1 to {limits.steps}, or 0"))
    if request.guidance_scale is not None and not 0.0 <= request.guidance_scale <= 30.0:
        out.append(FieldViolation("spec.guidance_scale", "from 0 to 30"))
    if not 1 <= request.num_images <= limits.images:
        out.append(FieldViolation("spec.num_images", f"from 1 to {limits.images}"))
    # Image i uses seed + i, which must stay a valid int64.
    if request.seed is not None and not 0 <= request.seed <= 2**63 - 1 - limits.images:
        out.append(FieldViolation("spec.seed", f"from 0 to {2**63 - 1 - limits.images}"))
    if request.scheduler and request.scheduler not in SCHEDULERS:
        out.append(FieldViolation("spec.scheduler", f"one of {', '.join(SCHEDULERS)}, or empty"))
    if request.output_format not in FORMATS:
        out.append(FieldViolation("spec.output_format", "png, jpeg or webp"))
    if request.chunk_size_bytes and not 1024 <= request.chunk_size_bytes <= 4 * 1024 * 1024:
        out.append(FieldViolation("spec.chunk_size_bytes", "from 1 KiB to 4 MiB, or 0"))
    if not 0 <= request.preview_every_n_steps <= limits.steps:
        out.append(FieldViolation("spec.preview_every_n_steps", f"from 0 to {limits.steps}"))
    for i, choice in enumerate(request.loras):
        if not choice.lora.strip():
            out.append(FieldViolation(f"spec.loras[{i}].lora", "must not be empty"))
        if choice.weight is not None and not -4.0 <= choice.weight <= 4.0:
            out.append(FieldViolation(f"spec.loras[{i}].weight", "from -4 to 4"))
    return out


class GenerationJobs:
    """The shared path of every generation command."""

    def __init__(
        self,
        *,
        models: ModelLookup,
        executor: Executor,
        catalog: CatalogRepository,
        loras: LoraLookup,
        lora_roots: Sequence[Path],
        recorder: GenerationRecorder,
        limits: GenerationLimits = DEFAULT_LIMITS,
    ) -> None:
        self._models = models
        self._executor = executor
        self._catalog = catalog
        self._loras = loras
        self._roots = tuple(lora_roots)
        self.recorder = recorder
        self.limits = limits

    # -- preparing ---------------------------------------------------------------------------

    def prepare(self, request: GenerationRequest) -> GenerationJob:
        violations = validate(request, self.limits)
        parsed = parse_prompt(request.prompt)
        choices = [*request.loras, *(LoraChoice(t.name, t.weight) for t in parsed.lora_tags)]
        if len(choices) > self.limits.loras:
            violations.append(FieldViolation("spec.loras", f"at most {self.limits.loras} LoRAs"))
        if violations:
            raise ValidationError(violations)
        model = self.model(request.model)
        if model.config.placeholder and max(request.width, request.height) > PLACEHOLDER_SIDE:
            # Its 2x VAE makes large images cost minutes per step, for noise: one such job
            # would hold the queue for everyone.
            raise ValidationError(
                FieldViolation(
                    "spec.width",
                    f"the placeholder model {model.config.name!r} makes images of at most "
                    f"{PLACEHOLDER_SIDE}x{PLACEHOLDER_SIDE}",
                )
            )
        loras = self._resolve_loras(choices, model)
        side, steps, guidance = _defaults(model)
        return GenerationJob(
            generation_id=str(uuid.uuid4()),
            model=model.config,
            prompt=_strip_lora_tags(request.prompt),
            original_prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            width=request.width or side,
            height=request.height or side,
            steps=request.steps or steps,
            guidance_scale=guidance if request.guidance_scale is None else request.guidance_scale,
            seed=request.seed if request.seed is not None else random.randrange(2**31),
            num_images=request.num_images,
            scheduler=request.scheduler,
            loras=loras,
            output_format=request.output_format,
            chunk_size=request.chunk_size_bytes or 64 * 1024,
            preview_every=request.preview_every_n_steps,
        )

    def model(self, name: str) -> BaseModelInfo:
        statuses = self._models.statuses()
        if name:
            found = next((m for m in statuses if m.config.name == name), None)
            if found is None:
                raise NotFoundError("model", name)
        else:
            found = next((m for m in statuses if m.ready), statuses[0] if statuses else None)
            if found is None:
                raise PreconditionError("no base model is configured", reason="NO_MODEL")
        if not found.ready:
            raise PreconditionError(
                f"model {found.config.name!r} is not ready: {found.error}",
                reason="MODEL_NOT_READY",
                metadata={"model": found.config.name},
            )
        return found

    def _resolve_loras(
        self, choices: Sequence[LoraChoice], model: BaseModelInfo
    ) -> tuple[ResolvedLora, ...]:
        resolved: dict[str, ResolvedLora] = {}
        for choice in choices:
            view = self._find_lora(choice.lora)
            if view.file is None or not view.available:
                raise PreconditionError(
                    f"LoRA {view.name!r} has no file on this server (a catalog record only)",
                    reason="LORA_UNAVAILABLE",
                    metadata={"lora": view.id},
                )
            arch = view.metadata.base_model.architecture
            if arch is not model.config.architecture:
                raise PreconditionError(
                    f"LoRA {view.name!r} is for {arch.value} models; "
                    f"{model.config.name!r} is {model.config.architecture.value}",
                    reason="LORA_ARCHITECTURE_MISMATCH",
                    metadata={
                        "lora": view.id,
                        "lora_architecture": arch.value,
                        "model": model.config.name,
                        "model_architecture": model.config.architecture.value,
                    },
                )
            weight = choice.weight
            if weight is None:
                weight = view.metadata.preferred_weight
            resolved[view.id] = ResolvedLora(
                lora_id=view.id,
                name=view.name,
                file_name=view.metadata.file_name,
                sha256=view.file.sha256,
                path=self._locate(view),
                weight=1.0 if weight is None else float(weight),
                file_path=view.file.path,
            )
        return tuple(resolved.values())

    def _find_lora(self, reference: str) -> LoraView:
        view = self._loras.get(reference) if is_uuid(reference) else None
        if view is None:
            matches = [v for v in self._loras.find_by_file_name(reference) if v.available]
            matches = matches or self._loras.find_by_file_name(reference)
            if len(matches) > 1:
                raise ValidationError(
                    FieldViolation(
                        "spec.loras",
                        f"{reference!r} names {len(matches)} LoRAs; use one of their ids: "
                        + ", ".join(m.id for m in matches[:5]),
                    )
                )
            view = matches[0] if matches else None
        if view is None:
            raise NotFoundError("LoRA", reference)
        return view

    def _locate(self, view: LoraView) -> Path:
        assert view.file is not None
        for root in self._roots:
            candidate = root / view.file.path
            if candidate.is_file():
                return candidate
        raise PreconditionError(
            f"LoRA {view.name!r}: its file {view.file.path!r} is missing under the LoRA roots",
            reason="LORA_FILE_MISSING",
            metadata={"lora": view.id},
        )

    # -- queuing -----------------------------------------------------------------------------

    def submit(self, job: GenerationJob, command: object) -> tuple[JobStream, int, int]:
        """Queues the job and records it; returns (stream, queue position, log position)."""
        ctx = current_context()
        accepted: dict[str, int] = {}

        def record(position: int) -> None:
            generation = Generation(
                generation_id=job.generation_id,
                spec=job.spec(),
                principal=ctx.principal,
                request_id=ctx.request_id,
                queue_position=position,
            )
            pending: list[Any] = [generation]
            rec = record_for(command, {"generation_id": job.generation_id, "position": position})
            if rec is not None:
                pending.append(rec)
            accepted["log"] = self._catalog.save(*pending)
            accepted["queue"] = position

        try:
            handle = self._executor.submit(job, record)
        except Exception as exc:
            if "log" in accepted:  # recorded as queued but never queued: say so
                reason = exc.message if isinstance(exc, DomainError) else type(exc).__name__
                self._fail_unqueued(job.generation_id, ctx, reason)
            raise
        self.recorder.follow(handle, job, ctx)
        return handle, accepted["queue"], accepted["log"]

    def _fail_unqueued(self, generation_id: str, ctx: DispatchContext, reason: str) -> None:
        try:
            generation = self._catalog.get(uuid.UUID(generation_id))
            if isinstance(generation, Generation) and not generation.finished:
                generation.fail(
                    f"it could not be queued: {reason}",
                    [],
                    ctx.principal,
                    ctx.request_id,
                )
                self._catalog.save(generation)
        except DomainError:
            log.exception("could not record that generation %s was not queued", generation_id)

    def replay(self, command: object) -> dict[str, Any] | None:
        """The earlier result of a retried request (same request_id), if any."""
        return previous_result(self._catalog, command)

    def retried(self, command: object) -> JobStream | None:
        """The live job of an earlier request with this request_id, so a retry re-attaches
        instead of generating twice; None for a first request."""
        previous = self.replay(command)
        if previous is None:
            return None
        generation_id = str(previous["generation_id"])
        handle = self._executor.handle(generation_id)
        if handle is None:
            raise PreconditionError(
                "this request's generation is no longer streaming here; use "
                "WatchGeneration or GetGeneration with its id",
                reason="GENERATION_NOT_LIVE",
                metadata={"generation_id": generation_id},
            )
        return handle

    @staticmethod
    def stream(
        handle: JobStream, ctx: DispatchContext, after: int = 0
    ) -> Iterator[GenerationEvent]:
        """A job's events for one caller; the caller going away cancels the job. A job that
        ran out of device memory ends the call with RESOURCE_EXHAUSTED after its event."""
        try:
            for event in handle.events(after=after, stop=ctx.abandoned):
                yield event
                if isinstance(event.payload, Failed) and event.payload.code:
                    raise ResourceExhaustedError(event.payload.error, 5.0)
        finally:
            if not handle.finished:
                handle.cancel()

    def handle(self, generation_id: str) -> JobStream | None:
        return self._executor.handle(generation_id)


_LORA_TAG = re.compile(r"<(?:lora|lyco):[^>]*>", re.IGNORECASE)


def _strip_lora_tags(prompt: str) -> str:
    return " ".join(_LORA_TAG.sub(" ", prompt).split())


# -- recording the lifecycle ---------------------------------------------------------------


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
            timings = {
                "queue_seconds": p.timings.queue_seconds,
                "text_encoding_seconds": p.timings.text_encoding_seconds,
                "denoising_seconds": p.timings.denoising_seconds,
                "decoding_seconds": p.timings.decoding_seconds,
            }
            generation.succeed(images, timings, t.principal, t.request_id)
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


# -- handlers ------------------------------------------------------------------------------


class GenerateImageHandler(IStreamCommandHandler[GenerateImageCommand, GenerationEvent]):
    def __init__(self, jobs: GenerationJobs) -> None:
        self._jobs = jobs

    def handle(self, command: GenerateImageCommand) -> Iterator[GenerationEvent]:
        ctx = current_context()
        handle = self._jobs.retried(command)
        if handle is None:
            handle, _, _ = self._jobs.submit(self._jobs.prepare(command.request), command)
        yield from self._jobs.stream(handle, ctx)


class QuickGenerateHandler(IStreamCommandHandler[QuickGenerateCommand, GenerationEvent]):
    """A prompt alone: the model's defaults plus the LoRAs the recommender is confident
    about, with their trigger words added to the prompt."""

    def __init__(
        self,
        jobs: GenerationJobs,
        recommender: Recommender,
        *,
        min_confidence: float = QUICK_MIN_CONFIDENCE,
        max_loras: int = 2,
    ) -> None:
        self._jobs = jobs
        self._recommender = recommender
        self._min_confidence = min_confidence
        self._max_loras = max_loras

    def handle(self, command: QuickGenerateCommand) -> Iterator[GenerationEvent]:
        ctx = current_context()
        if not command.prompt.strip():
            raise ValidationError(FieldViolation("prompt", "must not be empty"))
        handle = self._jobs.retried(command)
        if handle is None:
            job = self._jobs.prepare(self.request_for(command))
            handle, _, _ = self._jobs.submit(job, command)
        yield from self._jobs.stream(handle, ctx)

    def request_for(self, command: QuickGenerateCommand) -> GenerationRequest:
        model = self._jobs.model(command.model)
        explicit = parse_prompt(command.prompt).lora_tags
        prompt = command.prompt
        loras: list[LoraChoice] = []
        if not explicit:
            recs = self._recommender.recommend(
                command.prompt,
                model.config.architecture.value,
                max_loras=self._max_loras,
                min_confidence=self._min_confidence,
                include_unavailable=False,
            )
            lowered = prompt.lower()
            for rec in recs:
                loras.append(LoraChoice(rec.lora.id, rec.weight))
                missing = [w for w in rec.trigger_words if w.lower() not in lowered]
                if missing:
                    prompt = f"{prompt}, {', '.join(missing)}"
        return GenerationRequest(
            model=model.config.name, prompt=prompt, seed=command.seed, loras=tuple(loras)
        )


class SubmitGenerationHandler(ICommandHandler[SubmitGenerationCommand, tuple[str, int]]):
    """Returns (generation id, queue position) at once; WatchGeneration follows the job."""

    def __init__(self, jobs: GenerationJobs) -> None:
        self._jobs = jobs

    def handle(self, command: SubmitGenerationCommand) -> CommandResult[tuple[str, int]]:
        previous = self._jobs.replay(command)
        if previous is not None:
            return CommandResult.success(
                (str(previous["generation_id"]), int(previous["position"])),
                position=0,
            )
        job = self._jobs.prepare(command.request)
        _, position, log_position = self._jobs.submit(job, command)
        return CommandResult.success((job.generation_id, position), position=log_position)


class CancelGenerationHandler(ICommandHandler[CancelGenerationCommand, GenerationView | None]):
    """Cancels a live job (it stops within one denoising step). Cancelling a finished one
    changes nothing and is not an error: the caller's goal already holds or cannot."""

    def __init__(self, jobs: GenerationJobs, catalog: CatalogRepository) -> None:
        self._jobs = jobs
        self._catalog = catalog

    def handle(self, command: CancelGenerationCommand) -> CommandResult[GenerationView | None]:
        if not is_uuid(command.generation_id):
            return CommandResult.validation_error(
                FieldViolation("generation_id", "not a generation id")
            )
        generation = self._catalog.get(uuid.UUID(command.generation_id))
        if not isinstance(generation, Generation):
            return CommandResult.not_found("generation", command.generation_id)
        handle = self._jobs.handle(command.generation_id)
        if handle is not None and not handle.finished:
            handle.cancel()
            for event in handle.events(after=handle.last_sequence, poll=0.1):
                if isinstance(event.payload, TERMINAL):
                    break
            self._jobs.recorder.flush()
        elif not generation.finished:  # not live here (another process died with it)
            ctx = current_context()
            generation.cancel(list(generation.images), ctx.principal, ctx.request_id)
            self._catalog.save(generation)
        fresh = self._catalog.get(uuid.UUID(command.generation_id))
        # In cluster mode another replica may record the outcome a moment after it ended.
        deadline = time.monotonic() + 10.0
        while (
            isinstance(fresh, Generation)
            and not fresh.finished
            and handle is not None
            and handle.finished
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
            fresh = self._catalog.get(uuid.UUID(command.generation_id))
        assert isinstance(fresh, Generation)
        return CommandResult.success(fresh.view(), position=self._catalog.max_position())
