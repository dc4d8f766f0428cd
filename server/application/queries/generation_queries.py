"""Generation and model queries: declared with the v1 contract, handled once the diffusers
executor lands (the bus answers UNIMPLEMENTED until then)."""

from __future__ import annotations

from dataclasses import dataclass

from server.application.queries.base import IQuery, IStreamQuery


@dataclass(frozen=True, slots=True, kw_only=True)
class ListBaseModelsQuery(IQuery[list[object]]):
    pass


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
