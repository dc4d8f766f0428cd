"""Generation and model queries: base models, generations from their projection, and
WatchGeneration, which follows a live job or replays a finished one."""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

from server.application.context import current_context
from server.application.ownership import Viewer, owners_filter, require_visible
from server.application.ports import (
    GenerationReadModel,
    LiveJobs,
    ModelLookup,
    StoredImages,
)
from server.application.queries.base import (
    IQuery,
    IQueryHandler,
    IStreamQuery,
    IStreamQueryHandler,
    QueryResult,
)
from server.application.queries.lora_queries import page_size
from server.domain.errors import (
    FieldViolation,
    PreconditionError,
    Reason,
    ValidationError,
)
from server.domain.generation import FINAL_STATES, GenerationState, GenerationView
from server.domain.generation_events import (
    Cancelled,
    Completed,
    Failed,
    GenerationEvent,
    ImageComplete,
    Payload,
    Timings,
    image_chunks,
)
from server.domain.models import BaseModelInfo, ControlNetInfo, Page, UpscalerModelInfo
from server.domain.upscalers import UPSCALERS, Upscaler


@dataclass(frozen=True, slots=True)
class ModelListing:
    """What a generation can name: base models, ControlNets and hires upscalers."""

    models: list[BaseModelInfo]
    controlnets: list[ControlNetInfo]
    upscaler_models: list[UpscalerModelInfo] = field(default_factory=list)
    upscalers: tuple[Upscaler, ...] = UPSCALERS  # the built-in ones


@dataclass(frozen=True, slots=True, kw_only=True)
class ListBaseModelsQuery(IQuery[ModelListing]):
    # A model's status changes without events (an embedded model finishes building).
    cacheable: ClassVar[bool] = False


class ListBaseModelsHandler(IQueryHandler[ListBaseModelsQuery, ModelListing]):
    def __init__(self, models: ModelLookup) -> None:
        self._models = models

    def handle(self, query: ListBaseModelsQuery) -> QueryResult[ModelListing]:
        return QueryResult.success(
            ModelListing(
                self._models.statuses(),
                self._models.controlnets(),
                self._models.upscaler_models(),
            )
        )


GENERATIONS = frozenset({"generations"})
LIVE_POLL_SECONDS = 0.5


class _PerViewer:
    """A query whose answer depends on who asks (generations are their owner's): cached per
    viewer, or a second principal would be handed the first one's answer."""

    __slots__ = ()

    def cache_key(self) -> Hashable:
        return (type(self), self, Viewer.of(current_context()))


@dataclass(frozen=True, slots=True, kw_only=True)
class GetGenerationQuery(_PerViewer, IQuery[GenerationView]):
    reads: ClassVar[frozenset[str]] = GENERATIONS
    generation_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ListGenerationsQuery(_PerViewer, IQuery[Page[GenerationView]]):
    """The caller's own generations; `all_owners` (every principal's) and another
    principal's `owner` need the admin scope."""

    reads: ClassVar[frozenset[str]] = GENERATIONS
    page_size: int = 0
    page_token: str = ""
    state: str = ""
    all_owners: bool = False
    owner: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class WatchGenerationQuery(IStreamQuery[GenerationEvent]):
    generation_id: str
    after_sequence: int = 0


class GetGenerationHandler(IQueryHandler[GetGenerationQuery, GenerationView]):
    def __init__(self, read_model: GenerationReadModel) -> None:
        self._read_model = read_model

    def handle(self, query: GetGenerationQuery) -> QueryResult[GenerationView]:
        view = self._read_model.get_generation(query.generation_id)
        require_visible(
            current_context(), query.generation_id, None if view is None else view.owner
        )
        assert view is not None
        return QueryResult.success(view)


class ListGenerationsHandler(IQueryHandler[ListGenerationsQuery, Page[GenerationView]]):
    def __init__(self, read_model: GenerationReadModel) -> None:
        self._read_model = read_model

    def handle(self, query: ListGenerationsQuery) -> QueryResult[Page[GenerationView]]:
        states: tuple[GenerationState, ...] = ()
        if query.state:
            try:
                states = (GenerationState(query.state),)
            except ValueError:
                raise ValidationError(FieldViolation("state", "not a generation state")) from None
        owner = owners_filter(current_context(), all_owners=query.all_owners, owner=query.owner)
        size = page_size(query.page_size, 50)
        return QueryResult.success(
            self._read_model.list_generations(states, size, query.page_token, owner=owner)
        )


class WatchGenerationHandler(IStreamQueryHandler[WatchGenerationQuery, GenerationEvent]):
    """Follows a live job from any connection, replaying what the caller missed. A job no
    longer live here is replayed from its record and stored images: the image chunks, their
    checksums and the outcome (sequence numbers then count that replay)."""

    def __init__(
        self,
        read_model: GenerationReadModel,
        jobs: LiveJobs,
        images: StoredImages,
        chunk_size: int = 64 * 1024,
    ) -> None:
        self._read_model = read_model
        self._jobs = jobs
        self._images = images
        self._chunk_size = chunk_size

    def handle(self, query: WatchGenerationQuery) -> Iterator[GenerationEvent]:
        if query.after_sequence < 0:
            raise ValidationError(FieldViolation("after_sequence", "must not be negative"))
        ctx = current_context()  # captured now: the generator body runs outside the dispatch
        handle = self._jobs.handle(query.generation_id)
        if handle is not None:
            require_visible(ctx, query.generation_id, handle.owner)
            return handle.events(after=query.after_sequence, stop=ctx.abandoned)
        view = self._read_model.get_generation(query.generation_id)
        # Before any stored image is read: another principal's images stay unread.
        require_visible(ctx, query.generation_id, None if view is None else view.owner)
        assert view is not None
        if view.state not in FINAL_STATES:
            raise PreconditionError(
                f"generation {view.id} is {view.state.value.lower()} but not live on this "
                "server; GetGeneration shows its state",
                reason=Reason.GENERATION_NOT_LIVE,
                metadata={"generation_id": view.id},
            )
        return self._replay(view, query.after_sequence)

    def _replay(self, view: GenerationView, after: int) -> Iterator[GenerationEvent]:
        payloads: list[Payload] = []
        for image in view.images:
            data = self._images.read(view.id, image.index, image.mime_type)
            if data is None:
                continue  # past retention: the record still lists its checksum
            payloads.extend(image_chunks(image.index, data, self._chunk_size))
            payloads.append(
                ImageComplete(
                    image.index, image.sha256, image.size_bytes, image.mime_type, image.seed
                )
            )
        final: Payload
        if view.state is GenerationState.SUCCEEDED:
            final = Completed(Timings.from_dict(view.timings))
        elif view.state is GenerationState.CANCELLED:
            final = Cancelled()
        else:
            final = Failed(view.error)
        payloads.append(final)
        for sequence, payload in enumerate(payloads, start=1):
            if sequence > after:
                yield GenerationEvent(view.id, sequence, payload)
