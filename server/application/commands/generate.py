"""GenerateImage: validate, resolve the model, queue the job on the executor and stream its
events. The caller going away (cancel, deadline) cancels the job within one step."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from server.application.commands.base import IStreamCommandHandler
from server.application.commands.generation import GenerateImageCommand, GenerationRequest
from server.application.context import current_context
from server.domain.errors import (
    FieldViolation,
    NotFoundError,
    NotImplementedYetError,
    PreconditionError,
    ValidationError,
)
from server.domain.generation import GenerationEvent
from server.domain.models import Architecture, BaseModelInfo
from server.domain.recommend.prompt import parse_prompt

MAX_SIDE = 2048
MAX_STEPS = 150
MAX_IMAGES = 8
MAX_PROMPT = 10_000
FORMATS = ("png", "jpeg", "webp")


class ModelLookup(Protocol):
    def statuses(self) -> list[BaseModelInfo]: ...


class JobStream(Protocol):
    def events(
        self, after: int = ..., poll: float = ..., stop: Callable[[], bool] | None = ...
    ) -> Iterator[GenerationEvent]: ...
    def cancel(self) -> None: ...
    @property
    def finished(self) -> bool: ...


class Executor(Protocol):
    def submit(self, job: Any) -> JobStream: ...


class JobFactory(Protocol):
    def __call__(
        self,
        *,
        generation_id: str,
        model: BaseModelInfo,
        request: GenerationRequest,
        width: int,
        height: int,
        steps: int,
        guidance_scale: float,
        seed: int,
    ) -> Any: ...


def _defaults(model: BaseModelInfo) -> tuple[int, int, float]:
    """(side, steps, guidance) when a request leaves them at zero."""
    if model.config.placeholder:
        return 64, 4, 7.0
    if model.config.architecture is Architecture.SDXL:
        return 1024, 30, 5.0
    return 512, 25, 7.0


def validate(request: GenerationRequest) -> list[FieldViolation]:
    out = []
    if not request.prompt.strip():
        out.append(FieldViolation("spec.prompt", "must not be empty"))
    if len(request.prompt) > MAX_PROMPT or len(request.negative_prompt) > MAX_PROMPT:
        out.append(FieldViolation("spec.prompt", f"at most {MAX_PROMPT} characters"))
    for name, value in (("width", request.width), ("height", request.height)):
        if value and (value % 8 or not 64 <= value <= MAX_SIDE):
            out.append(
                FieldViolation(f"spec.{name}", f"a multiple of 8 from 64 to {MAX_SIDE}, or 0")
            )
    if not 0 <= request.steps <= MAX_STEPS:
        out.append(FieldViolation("spec.steps", f"from 1 to {MAX_STEPS}, or 0"))
    if request.guidance_scale is not None and not 0.0 <= request.guidance_scale <= 30.0:
        out.append(FieldViolation("spec.guidance_scale", "from 0 to 30"))
    if not 1 <= request.num_images <= MAX_IMAGES:
        out.append(FieldViolation("spec.num_images", f"from 1 to {MAX_IMAGES}"))
    if request.seed is not None and not 0 <= request.seed < 2**63:
        out.append(FieldViolation("spec.seed", "must not be negative"))
    if request.output_format not in FORMATS:
        out.append(FieldViolation("spec.output_format", "png, jpeg or webp"))
    if request.chunk_size_bytes and not 1024 <= request.chunk_size_bytes <= 4 * 1024 * 1024:
        out.append(FieldViolation("spec.chunk_size_bytes", "from 1 KiB to 4 MiB, or 0"))
    return out


class GenerateImageHandler(IStreamCommandHandler[GenerateImageCommand, GenerationEvent]):
    def __init__(self, models: ModelLookup, executor: Executor, make_job: JobFactory) -> None:
        self._models = models
        self._executor = executor
        self._make_job = make_job

    def handle(self, command: GenerateImageCommand) -> Iterator[GenerationEvent]:
        request = command.request
        violations = validate(request)
        if violations:
            raise ValidationError(violations)
        if request.loras or parse_prompt(request.prompt).lora_tags:
            raise NotImplementedYetError(
                "applying LoRAs to a generation is not built yet; remove the LoRAs"
            )
        model = self._model(request.model)
        side, steps, guidance = _defaults(model)
        job = self._make_job(
            generation_id=str(uuid.uuid4()),
            model=model,
            request=request,
            width=request.width or side,
            height=request.height or side,
            steps=request.steps or steps,
            guidance_scale=guidance if request.guidance_scale is None else request.guidance_scale,
            seed=request.seed if request.seed is not None else random.randrange(2**31),
        )
        handle = self._executor.submit(job)
        ctx = current_context()
        try:
            yield from handle.events(stop=ctx.abandoned)
        finally:
            if not handle.finished:
                handle.cancel()

    def _model(self, name: str) -> BaseModelInfo:
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
