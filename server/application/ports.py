"""What the use cases need from the outside world, as Protocols. Infrastructure implements
them; unit tests pass in-memory versions through the same bootstrap."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from eventsourcing.domain import Aggregate

from server.domain.generation import GenerationState, GenerationView
from server.domain.generation_events import GenerationEvent, Payload
from server.domain.generation_job import GenerationJob
from server.domain.lora import CommandRecord, Lora
from server.domain.models import (
    Architecture,
    AuditEntry,
    BaseModelInfo,
    ControlNetInfo,
    EventFilter,
    FileEntry,
    HistoryEntry,
    LoraFilter,
    LoraView,
    Page,
    ScannedLora,
    UpscalerModelInfo,
)
from server.domain.recommend.feedback import Feedback
from server.domain.recommendation import LoRARecommendation


class CatalogRepository(Protocol):
    """The write side: aggregates in, events appended atomically."""

    def get_lora(self, lora_id: uuid.UUID) -> Lora | None: ...
    def get_loras(self, lora_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, Lora]:
        """The LoRAs among `lora_ids` that exist, read in bulk (a few queries, not one each)."""
        ...

    def versions(self, aggregate_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, int]:
        """The current version of each existing aggregate among `aggregate_ids`, in bulk."""
        ...

    def get(self, aggregate_id: uuid.UUID) -> Aggregate | None: ...
    def find_command(self, principal: str, request_id: str) -> CommandRecord | None:
        """The principal's idempotency record of `request_id` (another principal's never)."""
        ...

    def save(self, *aggregates: Aggregate) -> int: ...
    def max_position(self) -> int: ...


class LoraReadModel(Protocol):
    def position(self) -> int: ...
    def get(self, lora_id: str) -> LoraView | None: ...
    def views_by_id(self, lora_ids: Sequence[str]) -> dict[str, LoraView]: ...
    def find_by_sha256(self, sha256: str) -> LoraView | None: ...
    def lora_metadata(self, lora_ids: Sequence[str]) -> dict[str, tuple[int, dict[str, Any]]]:
        """(version, metadata dict) of each LoRA among `lora_ids` the read model holds."""
        ...

    def find_by_path(self, path: str) -> LoraView | None: ...
    def find_by_file_name(self, file_name: str) -> list[LoraView]: ...
    def list_loras(
        self, flt: LoraFilter, page_size: int, page_token: str = ""
    ) -> Page[LoraView]: ...
    def all_views(self, batch: int = 2000) -> Iterable[LoraView]: ...
    def history(self, batch: int = 5000) -> Iterable[HistoryEntry]: ...
    def feedback(self, batch: int = 5000) -> Iterable[Feedback]:
        """What answered recommendations taught (server.domain.recommend.feedback)."""
        ...

    def files_under(self, root_prefix: str) -> list[FileEntry]: ...
    def events(
        self, flt: EventFilter, page_size: int, page_token: str = "", *, owner: str | None = ...
    ) -> Page[AuditEntry]:
        """With `owner`, only catalog events and that owner's generations' events."""
        ...


class LoraFiles(Protocol):
    """Reads LoRA files under the configured roots, refusing anything outside them."""

    @property
    def roots(self) -> tuple[Path, ...]: ...
    def resolve(self, path: str) -> tuple[Path, Path]: ...
    def read(self, path: str) -> ScannedLora: ...
    def scan(self, directory: str) -> Iterator[Path]: ...
    def relative(self, absolute: Path) -> str: ...
    def locate(self, relative: str) -> Path | None:
        """The first root holding this catalog-relative file, or None: how a job (on this
        machine or a cluster worker) finds a LoRA the catalog knows."""
        ...


class Consistency(Protocol):
    def wait_for(self, position: int, timeout: float | None) -> None:
        """Returns once the read models have projected `position`; raises
        ConsistencyTimeoutError when `timeout` runs out first."""
        ...

    def reached(self, position: int) -> bool:
        """Whether the read models have projected `position` already (never blocks)."""
        ...


# -- generation ----------------------------------------------------------------------------


class ModelLookup(Protocol):
    """The base models this server (or cluster) can run, with their readiness."""

    def statuses(self) -> list[BaseModelInfo]: ...

    def controlnets(self) -> list[ControlNetInfo]:
        """The configured ControlNets, with their readiness."""
        ...

    def upscaler_models(self) -> list[UpscalerModelInfo]:
        """The configured upscaler models, with their readiness."""
        ...


class LoraLookup(Protocol):
    def get(self, lora_id: str) -> LoraView | None: ...
    def find_by_file_name(self, file_name: str) -> list[LoraView]: ...
    def find_by_name(self, name: str) -> list[LoraView]: ...
    def embeddings(self, architecture: Architecture) -> list[LoraView]:
        """The available textual-inversion embeddings of `architecture`."""
        ...


class JobStream(Protocol):
    """One queued or running job as its callers follow it: live events, cancel, and the
    Started/final transitions the lifecycle recorder saves."""

    @property
    def generation_id(self) -> str: ...
    @property
    def owner(self) -> str:
        """The principal that submitted the job ("" when unknown: visible to admins only)."""
        ...

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
    """Runs jobs: the device executor in one process, the broker in cluster mode.
    `on_accept(position)` runs once the job holds a queue slot and before it can start, so
    the Submitted event is recorded in the same step."""

    def submit(
        self, job: GenerationJob, on_accept: Callable[[int], None] | None = ...
    ) -> JobStream: ...
    def handle(self, generation_id: str) -> JobStream | None: ...


class GenerationOutcomes(Protocol):
    """Tells a waiter when a generation's outcome is projected, wherever it was recorded
    (another replica, in cluster mode), instead of the waiter polling the store."""

    def wait_finished(self, generation_id: str, timeout: float) -> bool: ...


class GenerationReadModel(Protocol):
    def get_generation(self, generation_id: str) -> GenerationView | None: ...
    def list_generations(
        self,
        states: Sequence[GenerationState] = ...,
        page_size: int = ...,
        page_token: str = ...,
        *,
        owner: str | None = ...,
    ) -> Page[GenerationView]:
        """Newest first; only `owner`'s generations unless it is None."""
        ...


class LiveJobs(Protocol):
    def handle(self, generation_id: str) -> JobStream | None: ...


class StoredImages(Protocol):
    def read(self, generation_id: str, index: int, mime_type: str) -> bytes | None: ...


class ImageReader(Protocol):
    """Checks an image a client sent before anything is queued."""

    def measure(self, data: bytes, max_pixels: int) -> tuple[int, int]:
        """(width, height) of a PNG, JPEG or WebP of one frame, at most `max_pixels` pixels
        (checked before its pixels are decoded), that decodes completely; ValueError with
        one plain sentence otherwise."""
        ...

    def blank(self, data: bytes) -> bool:
        """Whether a (measured) mask is black everywhere: it would paint nothing."""
        ...


# -- recommendations -----------------------------------------------------------------------


class Recommender(Protocol):
    def recommend(
        self,
        prompt: str,
        base_model: str,
        *,
        max_loras: int,
        min_confidence: float | None,
        include_unavailable: bool,
    ) -> list[LoRARecommendation]: ...


class LoraSearch(Protocol):
    def search(
        self, query: str, architecture: Architecture | None, limit: int
    ) -> list[LoRARecommendation]: ...
