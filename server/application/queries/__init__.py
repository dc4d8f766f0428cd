"""Queries and their handlers; the names of the seed API are kept."""

from server.application.queries.base import (
    ConsistencyWaiter,
    IQuery,
    IQueryHandler,
    IStreamQuery,
    IStreamQueryHandler,
    QueryBus,
    QueryCache,
    QueryResult,
)
from server.application.queries.generation_queries import (
    GetGenerationQuery,
    ListBaseModelsHandler,
    ListBaseModelsQuery,
    ListGenerationsQuery,
    WatchGenerationQuery,
)
from server.application.queries.lora_queries import (
    GetAllLoRAsHandler,
    GetAllLoRAsQuery,
    GetLoRAByIdHandler,
    GetLoRAByIdQuery,
    GetLoRAsByBaseModelHandler,
    GetLoRAsByBaseModelQuery,
    ListEventsHandler,
    ListEventsQuery,
    SearchLoRAsByPromptHandler,
    SearchLoRAsByPromptQuery,
)

__all__ = [
    "ConsistencyWaiter",
    "GetAllLoRAsHandler",
    "GetAllLoRAsQuery",
    "GetGenerationQuery",
    "GetLoRAByIdHandler",
    "GetLoRAByIdQuery",
    "GetLoRAsByBaseModelHandler",
    "GetLoRAsByBaseModelQuery",
    "IQuery",
    "IQueryHandler",
    "IStreamQuery",
    "IStreamQueryHandler",
    "ListBaseModelsHandler",
    "ListBaseModelsQuery",
    "ListEventsHandler",
    "ListEventsQuery",
    "ListGenerationsQuery",
    "QueryBus",
    "QueryCache",
    "QueryResult",
    "SearchLoRAsByPromptHandler",
    "SearchLoRAsByPromptQuery",
    "WatchGenerationQuery",
]
