"""What a generation stream carries, independent of gRPC and torch."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from server.domain.models import BaseModelConfig


@dataclass(frozen=True, slots=True)
class Queued:
    position: int


@dataclass(frozen=True, slots=True)
class Started:
    batch_size: int


@dataclass(frozen=True, slots=True)
class Progress:
    step: int
    total_steps: int
    elapsed_seconds: float


@dataclass(frozen=True, slots=True)
class Preview:
    image_index: int
    step: int
    jpeg: bytes


@dataclass(frozen=True, slots=True)
class ImageChunk:
    image_index: int
    offset: int
    data: bytes
    last: bool


def image_chunks(image_index: int, data: bytes, size: int) -> Iterator[ImageChunk]:
    """An encoded image as the stream carries it, live or replayed."""
    for offset in range(0, len(data), size):
        piece = data[offset : offset + size]
        yield ImageChunk(image_index, offset, piece, offset + len(piece) >= len(data))


@dataclass(frozen=True, slots=True)
class ImageComplete:
    image_index: int
    sha256: str
    size_bytes: int
    mime_type: str
    seed: int


@dataclass(frozen=True, slots=True)
class Timings:
    queue_seconds: float = 0.0
    text_encoding_seconds: float = 0.0
    denoising_seconds: float = 0.0
    decoding_seconds: float = 0.0

    def to_dict(self) -> dict[str, float]:
        """As recorded on the Generation aggregate and carried by the broker."""
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}

    @staticmethod
    def from_dict(doc: Mapping[str, object]) -> Timings:
        """Missing or odd values read as zero: records outlive versions."""
        values = {f.name: doc.get(f.name) for f in fields(Timings)}
        return Timings(
            **{k: float(v) if isinstance(v, int | float) else 0.0 for k, v in values.items()}
        )


@dataclass(frozen=True, slots=True)
class Completed:
    timings: Timings


@dataclass(frozen=True, slots=True)
class Failed:
    error: str
    # "RESOURCE_EXHAUSTED" when the device ran out of memory: the stream then ends with that
    # status (and RetryInfo) instead of OK, so clients can back off and retry.
    code: str = ""


@dataclass(frozen=True, slots=True)
class Cancelled:
    pass


Payload = (
    Queued
    | Started
    | Progress
    | Preview
    | ImageChunk
    | ImageComplete
    | Completed
    | Failed
    | Cancelled
)
TERMINAL = (Completed, Failed, Cancelled)


@dataclass(frozen=True, slots=True)
class GenerationEvent:
    generation_id: str
    sequence: int
    payload: Payload = field(default_factory=Cancelled)


@dataclass(frozen=True, slots=True)
class ResolvedLora:
    """A catalogued LoRA as a job applies it: resolved to a file and a weight before queuing."""

    lora_id: str
    name: str
    file_name: str
    sha256: str
    path: Path
    weight: float
    # Relative to a LoRA root: where another machine (a cluster worker) finds the same file.
    file_path: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationJob:
    """Everything that determines a generation, with defaults filled in and LoRAs resolved.
    `prompt` is what the text encoders see (A1111 `<lora:…>` tags removed); `original_prompt`
    is what the client sent, written into the image's parameters."""

    generation_id: str
    model: BaseModelConfig
    prompt: str
    original_prompt: str
    negative_prompt: str = ""
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    num_images: int = 1
    scheduler: str = ""
    loras: tuple[ResolvedLora, ...] = ()
    output_format: str = "png"
    chunk_size: int = 64 * 1024
    preview_every: int = 0

    def batch_key(self) -> tuple[object, ...]:
        """Jobs with equal keys run as one batch: everything the denoising loop shares. The
        presence of a negative prompt is part of it because SDXL zeroes an absent one."""
        return (
            self.model.name,
            tuple(sorted((lora.sha256, lora.weight) for lora in self.loras)),
            self.width,
            self.height,
            self.steps,
            self.scheduler,
            self.guidance_scale,
            bool(self.negative_prompt),
        )

    def spec(self) -> dict[str, object]:
        """The filled-in request as recorded on the Generation aggregate."""
        return {
            "model": self.model.name,
            "prompt": self.original_prompt,
            "negative_prompt": self.negative_prompt,
            "width": self.width,
            "height": self.height,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "seed": self.seed,
            "num_images": self.num_images,
            "scheduler": self.scheduler,
            "loras": [
                {"lora": lora.lora_id, "name": lora.name, "weight": lora.weight}
                for lora in self.loras
            ],
            "output_format": self.output_format,
            "preview_every_n_steps": self.preview_every,
            "chunk_size_bytes": self.chunk_size,
        }
