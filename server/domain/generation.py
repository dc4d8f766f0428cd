"""What a generation stream carries, independent of gRPC and torch."""

from __future__ import annotations

from dataclasses import dataclass, field


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
class ImageChunk:
    image_index: int
    offset: int
    data: bytes
    last: bool


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


@dataclass(frozen=True, slots=True)
class Completed:
    timings: Timings


@dataclass(frozen=True, slots=True)
class Failed:
    error: str


@dataclass(frozen=True, slots=True)
class Cancelled:
    pass


Payload = Queued | Started | Progress | ImageChunk | ImageComplete | Completed | Failed | Cancelled
TERMINAL = (Completed, Failed, Cancelled)


@dataclass(frozen=True, slots=True)
class GenerationEvent:
    generation_id: str
    sequence: int
    payload: Payload = field(default_factory=Cancelled)
