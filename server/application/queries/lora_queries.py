from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

from server.application.context import current_context
from server.application.ownership import Viewer, events_owner
from server.application.ports import LoraReadModel, LoraSearch
from server.application.queries.base import IQuery, IQueryHandler, QueryResult
from server.domain.errors import FieldViolation, NotFoundError, ValidationError
from server.domain.models import (
    AuditEntry,
    EventFilter,
    LoraFilter,
    LoraKind,
    LoraView,
    Page,
    resolve_architecture,
)
from server.domain.recommendation import LoRARecommendation
from server.domain.tokens import TokenSigner, typed

MAX_PAGE_SIZE = 1000
LORAS = frozenset({"loras"})
HISTORY = frozenset({"history"})
EVENTS = frozenset({"events"})


def page_size(value: int, default: int, maximum: int = MAX_PAGE_SIZE) -> int:
    if value == 0:
        return default
    if not 1 <= value <= maximum:
        raise ValidationError(FieldViolation("page_size", f"must be between 0 and {maximum}"))
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class GetLoRAByIdQuery(IQuery[LoraView]):
    reads: ClassVar[frozenset[str]] = LORAS
    lora_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class GetAllLoRAsQuery(IQuery[Page[LoraView]]):
    reads: ClassVar[frozenset[str]] = LORAS
    page_size: int = 0
    page_token: str = ""
    tag: str = ""
    available_only: bool = False
    kind: LoraKind | None = None  # None: LoRAs and embeddings


@dataclass(frozen=True, slots=True, kw_only=True)
class GetLoRAsByBaseModelQuery(IQuery[Page[LoraView]]):
    reads: ClassVar[frozenset[str]] = LORAS
    base_model: str
    page_size: int = 0
    page_token: str = ""
    tag: str = ""
    available_only: bool = False
    kind: LoraKind | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SearchLoRAsByPromptQuery(IQuery[Page[LoRARecommendation]]):
    """Ranked search for people browsing: the recommendation engine, no side effects."""

    reads: ClassVar[frozenset[str]] = LORAS | HISTORY
    prompt: str
    base_model: str = ""
    page_size: int = 0
    page_token: str = ""


MAX_SEARCH_RESULTS = 100


class SearchLoRAsByPromptHandler(IQueryHandler[SearchLoRAsByPromptQuery, Page[LoRARecommendation]]):
    def __init__(self, search: LoraSearch, tokens: TokenSigner) -> None:
        self._search = search
        self._tokens = tokens

    def handle(self, query: SearchLoRAsByPromptQuery) -> QueryResult[Page[LoRARecommendation]]:
        if not query.prompt.strip():
            raise ValidationError(FieldViolation("query", "must not be empty"))
        size = page_size(query.page_size, 20, maximum=100)
        offset = 0
        listing = f"search|{query.prompt}|{query.base_model}"
        if query.page_token:
            offset = self._tokens.page_position(query.page_token, listing, _search_offset)
        arch = resolve_architecture(query.base_model) if query.base_model else None
        hits = self._search.search(query.prompt, arch, MAX_SEARCH_RESULTS)
        page = hits[offset : offset + size]
        more = offset + size < len(hits)
        token = self._tokens.page_token(listing, o=offset + size) if more else ""
        return QueryResult.success(Page(tuple(page), token, len(hits)))


def _search_offset(payload: dict[str, Any]) -> int:
    offset = typed(payload, "o", int)
    if not 0 <= offset < MAX_SEARCH_RESULTS:
        raise ValueError("offset out of range")
    return offset


@dataclass(frozen=True, slots=True, kw_only=True)
class ListEventsQuery(IQuery[Page[AuditEntry]]):
    """Catalog events and the caller's own generations' (an admin's: all)."""

    reads: ClassVar[frozenset[str]] = EVENTS
    page_size: int = 0
    page_token: str = ""
    aggregate_id: str = ""
    type: str = ""
    principal: str = ""
    start_time: datetime | None = None
    end_time: datetime | None = None

    def cache_key(self) -> Hashable:
        # Per viewer: which generations' events it shows depends on who asks.
        return (type(self), self, Viewer.of(current_context()))


class GetLoRAByIdHandler(IQueryHandler[GetLoRAByIdQuery, LoraView]):
    def __init__(self, read_model: LoraReadModel) -> None:
        self._read_model = read_model

    def handle(self, query: GetLoRAByIdQuery) -> QueryResult[LoraView]:
        view = self._read_model.get(query.lora_id) if query.lora_id else None
        if view is None:
            raise NotFoundError("lora", query.lora_id)
        return QueryResult.success(view)


class GetAllLoRAsHandler(IQueryHandler[GetAllLoRAsQuery, Page[LoraView]]):
    def __init__(self, read_model: LoraReadModel) -> None:
        self._read_model = read_model

    def handle(self, query: GetAllLoRAsQuery) -> QueryResult[Page[LoraView]]:
        flt = LoraFilter(None, query.tag.strip(), query.available_only, query.kind)
        return QueryResult.success(
            self._read_model.list_loras(flt, page_size(query.page_size, 50), query.page_token)
        )


class GetLoRAsByBaseModelHandler(IQueryHandler[GetLoRAsByBaseModelQuery, Page[LoraView]]):
    def __init__(self, read_model: LoraReadModel) -> None:
        self._read_model = read_model

    def handle(self, query: GetLoRAsByBaseModelQuery) -> QueryResult[Page[LoraView]]:
        flt = LoraFilter(
            resolve_architecture(query.base_model),
            query.tag.strip(),
            query.available_only,
            query.kind,
        )
        return QueryResult.success(
            self._read_model.list_loras(flt, page_size(query.page_size, 50), query.page_token)
        )


class ListEventsHandler(IQueryHandler[ListEventsQuery, Page[AuditEntry]]):
    def __init__(self, read_model: LoraReadModel) -> None:
        self._read_model = read_model

    def handle(self, query: ListEventsQuery) -> QueryResult[Page[AuditEntry]]:
        if query.start_time and query.end_time and query.end_time <= query.start_time:
            raise ValidationError(FieldViolation("end_time", "must be after start_time"))
        flt = EventFilter(
            query.aggregate_id, query.type, query.principal, query.start_time, query.end_time
        )
        size = page_size(query.page_size, 100)
        owner = events_owner(current_context())
        return QueryResult.success(
            self._read_model.events(flt, size, query.page_token, owner=owner)
        )
