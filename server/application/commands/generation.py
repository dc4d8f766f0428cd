"""Generation commands and the request they carry (handlers: generate.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.application.commands.base import ICommand, IStreamCommand
from server.domain.generation import GenerationEvent
from server.domain.generation_job import GenerationView


@dataclass(frozen=True, slots=True)
class LoraChoice:
    lora: str
    weight: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationRequest:
    model: str = ""
    prompt: str
    negative_prompt: str = ""
    width: int = 0
    height: int = 0
    steps: int = 0
    guidance_scale: float | None = None
    seed: int | None = None
    num_images: int = 1
    scheduler: str = ""
    loras: tuple[LoraChoice, ...] = field(default_factory=tuple)
    output_format: str = "png"
    preview_every_n_steps: int = 0
    chunk_size_bytes: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerateImageCommand(IStreamCommand[GenerationEvent]):
    request: GenerationRequest


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
