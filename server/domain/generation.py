"""The Generation aggregate: a job's lifecycle as events (submitted, started, then succeeded,
failed or cancelled). GetGeneration, ListGenerations and the audit trail read projections of
these; the executor's in-memory stream carries the fast-moving progress and image bytes."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from eventsourcing.domain import Aggregate, event
from eventsourcing.utils import register_topic

from server.domain.generation_events import ImageComplete
from server.domain.models import aware


class GenerationState(enum.StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


FINAL_STATES = frozenset(
    {GenerationState.SUCCEEDED, GenerationState.FAILED, GenerationState.CANCELLED}
)


@dataclass(frozen=True, slots=True)
class ImageRecord:
    index: int
    sha256: str
    size_bytes: int
    mime_type: str
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "mime_type": self.mime_type,
            "seed": self.seed,
        }

    @staticmethod
    def of(image: ImageComplete) -> ImageRecord:
        """The record of an image a job finished (the stream's event)."""
        return ImageRecord(
            image.image_index, image.sha256, image.size_bytes, image.mime_type, image.seed
        )

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ImageRecord:
        return ImageRecord(
            int(d["index"]),
            str(d["sha256"]),
            int(d["size_bytes"]),
            str(d["mime_type"]),
            int(d["seed"]),
        )


@dataclass(frozen=True, slots=True)
class GenerationView:
    """A generation as queries see it. `spec` holds the request with defaults filled in (the
    keys of GenerationRequest, LoRAs as [{"lora", "weight"}])."""

    id: str
    state: GenerationState
    spec: dict[str, Any]
    images: tuple[ImageRecord, ...] = ()
    error: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    create_time: datetime | None = None
    end_time: datetime | None = None
    version: int = 0
    # The principal that submitted it: only it (and an admin) may see or act on it.
    owner: str = ""


def _event_time(timestamp: datetime | None) -> datetime:
    """The time of the event being applied. eventsourcing passes an event's own `timestamp`
    to an `@event` method that names it (callers leave it out; trigger_event stamps it), and
    does so again when stored events are replayed. `self.modified_on` is no substitute: it is
    updated only after the method returns, so inside it holds the previous event's time."""
    assert timestamp is not None, "eventsourcing passes the event's timestamp"
    return aware(timestamp)


class Generation(Aggregate):
    """One generation job. Its id is the generation id clients see. The final-state methods
    take the event's `timestamp` from eventsourcing (see `_event_time`); callers omit it."""

    @staticmethod
    def create_id(generation_id: str) -> uuid.UUID:
        return uuid.UUID(generation_id)

    @event("Submitted")
    def __init__(
        self,
        generation_id: str,
        spec: dict[str, Any],
        principal: str,
        request_id: str,
        queue_position: int = 0,
    ) -> None:
        # The submitter owns it; stored Submitted events already carry it, so old
        # generations replay with their owner.
        self.owner = principal
        self.spec = spec
        self.state = GenerationState.QUEUED
        self.images: list[dict[str, Any]] = []
        self.error = ""
        self.timings: dict[str, float] = {}
        self.end_time: datetime | None = None

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    @event("Started")
    def start(self, batch_size: int, principal: str, request_id: str) -> None:
        self.state = GenerationState.RUNNING

    @event("Succeeded")
    def succeed(
        self,
        images: list[dict[str, Any]],
        timings: dict[str, float],
        principal: str,
        request_id: str,
        timestamp: datetime | None = None,
    ) -> None:
        self.state = GenerationState.SUCCEEDED
        self.images = images
        self.timings = timings
        self.end_time = _event_time(timestamp)

    @event("Failed")
    def fail(
        self,
        error: str,
        images: list[dict[str, Any]],
        principal: str,
        request_id: str,
        timestamp: datetime | None = None,
    ) -> None:
        self.state = GenerationState.FAILED
        self.error = error
        self.images = images
        self.end_time = _event_time(timestamp)

    @event("Cancelled")
    def cancel(
        self,
        images: list[dict[str, Any]],
        principal: str,
        request_id: str,
        timestamp: datetime | None = None,
    ) -> None:
        """Images finished before the cancellation are kept."""
        self.state = GenerationState.CANCELLED
        self.images = images
        self.end_time = _event_time(timestamp)

    def view(self) -> GenerationView:
        return GenerationView(
            id=str(self.id),
            state=self.state,
            spec=self.spec,
            images=tuple(ImageRecord.from_dict(d) for d in self.images),
            error=self.error,
            timings=dict(self.timings),
            create_time=aware(self.created_on),
            end_time=self.end_time,
            version=self.version,
            owner=self.owner,
        )


# Until 2026-12 the aggregate lived in server.domain.generation_job; stored events name
# that topic, so it keeps resolving to this class.
register_topic("server.domain.generation_job:Generation", Generation)
