"""Generation and model queries. ListBaseModels is built; the generation queries are declared
with the v1 contract and answered UNIMPLEMENTED until the executor lands."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

from server.application.queries.base import IQuery, IQueryHandler, IStreamQuery, QueryResult
from server.domain.models import BaseModelInfo


@dataclass(frozen=True, slots=True, kw_only=True)
class ListBaseModelsQuery(IQuery[list[BaseModelInfo]]):
    # A model's status changes without events (an embedded model finishes building).
    cacheable: ClassVar[bool] = False


class ModelCatalog(Protocol):
    def statuses(self) -> list[BaseModelInfo]: ...


class ListBaseModelsHandler(IQueryHandler[ListBaseModelsQuery, list[BaseModelInfo]]):
    def __init__(self, models: ModelCatalog) -> None:
        self._models = models

    def handle(self, query: ListBaseModelsQuery) -> QueryResult[list[BaseModelInfo]]:
        return QueryResult.success(self._models.statuses())


@dataclass(frozen=True, slots=True, kw_only=True)
class GetGenerationQuery(IQuery[object]):
    generation_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ListGenerationsQuery(IQuery[object]):
    page_size: int = 0
    page_token: str = ""
    state: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class WatchGenerationQuery(IStreamQuery[object]):
    generation_id: str
    after_sequence: int = 0
