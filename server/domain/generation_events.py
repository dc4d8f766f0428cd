"""What a generation stream carries (queued, progress, previews, image chunks, the final
event), independent of gRPC and torch: live from the executor or replayed from the broker."""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields

from server.domain.errors import (
    DomainError,
    GenerationFailedError,
    PreconditionError,
    ResourceExhaustedError,
    UnavailableError,
)


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


class FailureReason(enum.StrEnum):
    """Why a generation failed, as the ErrorInfo reason of the status that ends a
    GenerateImage or QuickGenerate stream after its `failed` event (`Failed.as_error`)."""

    GENERATION_FAILED = "GENERATION_FAILED"  # a server bug: INTERNAL
    OUT_OF_DEVICE_MEMORY = "OUT_OF_DEVICE_MEMORY"  # RESOURCE_EXHAUSTED, retry later
    LORA_LOAD_FAILED = "LORA_LOAD_FAILED"  # FAILED_PRECONDITION: the LoRA does not fit
    MODEL_LOAD_FAILED = "MODEL_LOAD_FAILED"  # FAILED_PRECONDITION: the model's files
    SERVER_SHUTTING_DOWN = "SERVER_SHUTTING_DOWN"  # UNAVAILABLE, retry
    WORKER_LOST = "WORKER_LOST"  # UNAVAILABLE: workers kept stopping mid-job
    WORKER_REFUSED = "WORKER_REFUSED"  # FAILED_PRECONDITION: no worker can run it


@dataclass(frozen=True, slots=True)
class Failed:
    error: str  # one plain sentence for the client
    reason: str = FailureReason.GENERATION_FAILED
    lora_sha256: str = ""  # LORA_LOAD_FAILED: the file that would not load

    def as_error(self) -> DomainError:
        """The error a GenerateImage or QuickGenerate stream ends with after this event (a
        watch still ends OK: watching worked)."""
        metadata = {"lora_sha256": self.lora_sha256} if self.lora_sha256 else None
        match self.reason:
            case FailureReason.OUT_OF_DEVICE_MEMORY:
                return ResourceExhaustedError(self.error, 5.0, reason=self.reason)
            case FailureReason.SERVER_SHUTTING_DOWN | FailureReason.WORKER_LOST:
                return UnavailableError(self.error, retry_after_seconds=5.0, reason=self.reason)
            case (
                FailureReason.LORA_LOAD_FAILED
                | FailureReason.MODEL_LOAD_FAILED
                | FailureReason.WORKER_REFUSED
            ):
                return PreconditionError(self.error, reason=self.reason, metadata=metadata)
        return GenerationFailedError(self.error)


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
