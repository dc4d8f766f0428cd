"""Generation commands and their handlers: GenerateImage, QuickGenerate, SubmitGeneration,
CancelGeneration. All four take the shared job path (`application/generation/jobs.py`)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from server.application.commands.answers import generation_from_dict, generation_to_dict
from server.application.commands.base import (
    CommandResult,
    ICommand,
    ICommandHandler,
    IStreamCommand,
    IStreamCommandHandler,
)
from server.application.commands.idempotency import replay, save_answered
from server.application.context import current_context
from server.application.generation.jobs import GenerationJobs
from server.application.generation.request import GenerationRequest, LoraChoice, UpscaleRequest
from server.application.ownership import can_see
from server.application.ports import CatalogRepository, Recommender
from server.domain.errors import FieldViolation, ValidationError
from server.domain.generation import Generation, GenerationView
from server.domain.generation_events import Failed, GenerationEvent
from server.domain.models import is_uuid
from server.domain.recommend.prompt import parse_prompt

__all__ = [
    "CancelGenerationCommand",
    "CancelGenerationHandler",
    "GenerateImageCommand",
    "GenerateImageHandler",
    "GenerationRequest",
    "LoraChoice",
    "QuickGenerateCommand",
    "QuickGenerateHandler",
    "SubmitGenerationCommand",
    "SubmitGenerationHandler",
    "UpscaleImageCommand",
    "UpscaleImageHandler",
    "UpscaleRequest",
]

QUICK_MIN_CONFIDENCE = 0.5
# Jobs QuickGenerate starts for one call: its picks, then one without recommended LoRAs.
QUICK_ATTEMPTS = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerateImageCommand(IStreamCommand[GenerationEvent]):
    request: GenerationRequest


@dataclass(frozen=True, slots=True, kw_only=True)
class UpscaleImageCommand(IStreamCommand[GenerationEvent]):
    request: UpscaleRequest


@dataclass(frozen=True, slots=True, kw_only=True)
class QuickGenerateCommand(IStreamCommand[GenerationEvent]):
    prompt: str
    model: str = ""
    seed: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SubmitGenerationCommand(ICommand[tuple[str, int]]):
    """Answers (generation id, queue position)."""

    request: GenerationRequest


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelGenerationCommand(ICommand[GenerationView | None]):
    generation_id: str


class GenerateImageHandler(IStreamCommandHandler[GenerateImageCommand, GenerationEvent]):
    def __init__(self, jobs: GenerationJobs) -> None:
        self._jobs = jobs

    def handle(self, command: GenerateImageCommand) -> Iterator[GenerationEvent]:
        ctx = current_context()
        handle = self._jobs.retried(command)
        if handle is None:
            handle, _, _ = self._jobs.submit(self._jobs.prepare(command.request), command)
        yield from self._jobs.stream(handle, ctx)


class UpscaleImageHandler(IStreamCommandHandler[UpscaleImageCommand, GenerationEvent]):
    """An upscale is a job of the generation path: queued for the device, streamed with the
    same events (progress counts tiles), recorded as a generation of mode `upscale`."""

    def __init__(self, jobs: GenerationJobs) -> None:
        self._jobs = jobs

    def handle(self, command: UpscaleImageCommand) -> Iterator[GenerationEvent]:
        ctx = current_context()
        handle = self._jobs.retried(command)
        if handle is None:
            handle, _, _ = self._jobs.submit(self._jobs.prepare_upscale(command.request), command)
        yield from self._jobs.stream(handle, ctx)


class QuickGenerateHandler(IStreamCommandHandler[QuickGenerateCommand, GenerationEvent]):
    """A prompt alone: the model's defaults plus the LoRAs the recommender is confident
    about, with their trigger words added to the prompt.

    It never fails because of its own pick: it offers only LoRAs of the model's architecture
    that have not failed to load on that model (`GenerationJobs.unloadable`), and when a
    picked file still does not load (the job fails before it starts) it remembers the file and
    starts a new job with the next pick, the last of `QUICK_ATTEMPTS` without recommended
    LoRAs. The stream then goes on with the new job's events (a new generation id; the failed
    one is recorded as failed). A LoRA the prompt names itself (`<lora:…>`) is the user's
    choice: its failure ends the stream like GenerateImage's."""

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
        if handle is not None:
            yield from self._jobs.stream(handle, ctx)
            return
        for attempt in range(QUICK_ATTEMPTS):
            last = attempt == QUICK_ATTEMPTS - 1
            request, picked = self._pick(command, recommend=not last)
            job = self._jobs.prepare(request)
            # Only the first job answers a retry of this request_id.
            handle, _, _ = self._jobs.submit(job, command, idempotent=attempt == 0)
            failed = yield from self._jobs.stream(handle, ctx, swallow=_picked_by(picked))
            if failed is None:
                return
            self._jobs.note_failure(job.model.name, failed)  # cluster mode has no hook

    def request_for(self, command: QuickGenerateCommand) -> GenerationRequest:
        return self._pick(command)[0]

    def _pick(
        self, command: QuickGenerateCommand, *, recommend: bool = True
    ) -> tuple[GenerationRequest, frozenset[str]]:
        """The request, and the SHA-256 of the files it picked itself."""
        model = self._jobs.model(command.model)
        explicit = parse_prompt(command.prompt).lora_tags
        prompt = command.prompt
        loras: list[LoraChoice] = []
        picked: set[str] = set()
        if recommend and not explicit:
            unloadable = self._jobs.unloadable.of(model.config.name)
            recs = self._recommender.recommend(
                command.prompt,
                model.config.architecture.value,
                max_loras=self._max_loras + len(unloadable),
                min_confidence=self._min_confidence,
                include_unavailable=False,
            )
            usable = [
                rec
                for rec in recs
                if rec.lora.file is not None
                and rec.lora.available
                and rec.lora.file.sha256 not in unloadable
                and rec.lora.metadata.base_model.architecture is model.config.architecture
            ]
            lowered = prompt.lower()
            for rec in usable[: self._max_loras]:
                assert rec.lora.file is not None
                loras.append(LoraChoice(rec.lora.id, rec.weight))
                picked.add(rec.lora.file.sha256)
                missing = [w for w in rec.trigger_words if w.lower() not in lowered]
                if missing:
                    prompt = f"{prompt}, {', '.join(missing)}"
        request = GenerationRequest(
            model=model.config.name, prompt=prompt, seed=command.seed, loras=tuple(loras)
        )
        return request, frozenset(picked)


def _picked_by(picked: frozenset[str]) -> Callable[[Failed], bool]:
    """Whether a LoRA load failure is of a file QuickGenerate picked itself."""
    return lambda failed: failed.lora_sha256 in picked


class SubmitGenerationHandler(ICommandHandler[SubmitGenerationCommand, tuple[str, int]]):
    """Returns (generation id, queue position) at once; WatchGeneration follows the job."""

    def __init__(self, jobs: GenerationJobs) -> None:
        self._jobs = jobs

    def handle(self, command: SubmitGenerationCommand) -> CommandResult[tuple[str, int]]:
        previous = self._jobs.replay(command)
        if previous is not None:
            stored = previous.result
            self._jobs.require_visible(str(stored["generation_id"]))
            return CommandResult.success(
                (str(stored["generation_id"]), int(stored["position"])),
                position=previous.position,
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
        previous = replay(self._catalog, command)
        if previous is not None:  # the first cancel's answer, not the generation as it is now
            return CommandResult.success(
                generation_from_dict(previous.result["generation"]), position=previous.position
            )
        generation = self._catalog.get(uuid.UUID(command.generation_id))
        if not isinstance(generation, Generation) or not can_see(
            current_context(), generation.owner
        ):
            # Another principal's generation is as unknown as one that does not exist.
            return CommandResult.not_found("generation", command.generation_id)
        view = self._jobs.cancel(generation)
        position = save_answered(self._catalog, command, {"generation": generation_to_dict(view)})
        return CommandResult.success(view, position=position)
