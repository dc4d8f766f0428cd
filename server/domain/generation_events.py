"""What a generation stream carries (queued, progress, previews, image chunks, the final
event), independent of gRPC and torch: live from the executor or replayed from the broker."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields


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
