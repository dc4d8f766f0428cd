"""What a generation stream carries (queued, progress, previews, image chunks, the final
event), independent of gRPC and torch: live from the executor or replayed from the broker."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields

from server.domain.errors import (
    DomainError,
    GenerationFailedError,
    PreconditionError,
    Reason,
    ResourceExhaustedError,
    UnavailableError,
)


@dataclass(frozen=True, slots=True)
class Queued:
    position: int
    # What this server measured for such a job (0: no estimate yet), and a warning for a
    # person when it will take long.
    estimated_seconds: float = 0.0
    warning: str = ""


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


# The reasons a generation fails with (`Failed.reason`, the ErrorInfo reason of the status
# that ends a GenerateImage or QuickGenerate stream after its `failed` event).
FAILURE_REASONS = frozenset(
    {
        Reason.GENERATION_FAILED,
        Reason.OUT_OF_DEVICE_MEMORY,
        Reason.LORA_LOAD_FAILED,
        Reason.MODEL_LOAD_FAILED,
        Reason.CONTROLNET_LOAD_FAILED,
        Reason.SERVER_SHUTTING_DOWN,
        Reason.WORKER_LOST,
        Reason.WORKER_REFUSED,
    }
)


@dataclass(frozen=True, slots=True)
class Failed:
    error: str  # one plain sentence for the client
    reason: str = Reason.GENERATION_FAILED  # one of FAILURE_REASONS
    lora_sha256: str = ""  # LORA_LOAD_FAILED: the file that would not load

    def as_error(self) -> DomainError:
        """The error a GenerateImage or QuickGenerate stream ends with after this event (a
        watch still ends OK: watching worked)."""
        metadata = {"lora_sha256": self.lora_sha256} if self.lora_sha256 else None
        reason = Reason(self.reason) if self.reason in FAILURE_REASONS else None
        match reason:
            case Reason.OUT_OF_DEVICE_MEMORY:
                return ResourceExhaustedError(self.error, 5.0, reason=reason)
            case Reason.SERVER_SHUTTING_DOWN | Reason.WORKER_LOST:
                return UnavailableError(self.error, retry_after_seconds=5.0, reason=reason)
            case (
                Reason.LORA_LOAD_FAILED
                | Reason.MODEL_LOAD_FAILED
                | Reason.CONTROLNET_LOAD_FAILED
                | Reason.WORKER_REFUSED
            ):
                return PreconditionError(self.error, reason=reason, metadata=metadata)
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
