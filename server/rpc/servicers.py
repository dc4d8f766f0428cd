"""gRPC servicers: translate messages to bus dispatches and results back. No decisions here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from loracle.v1 import command_service_pb2 as cmd_pb
from loracle.v1 import command_service_pb2_grpc as cmd_grpc
from loracle.v1 import query_service_pb2 as qry_pb
from loracle.v1 import query_service_pb2_grpc as qry_grpc
from server.application.commands import (
    CancelGenerationCommand,
    DeleteLoRACommand,
    FilterConfidentRecommendationsCommand,
    GenerateImageCommand,
    ImportLoRACatalogCommand,
    ImportLoRAsCommand,
    QuickGenerateCommand,
    RecommendLoRAsCommand,
    RecommendTopLoRACommand,
    RegisterLoRACommand,
    SubmitGenerationCommand,
    UpdateLoRACommand,
    UpscaleImageCommand,
)
from server.application.queries import (
    GetAllLoRAsQuery,
    GetGenerationQuery,
    GetLoRAByIdQuery,
    GetLoRAsByBaseModelQuery,
    ListBaseModelsQuery,
    ListEventsQuery,
    ListGenerationsQuery,
    SearchLoRAsByPromptQuery,
    WatchGenerationQuery,
)
from server.domain.generation import GenerationView
from server.domain.models import AuditEntry, LoraView, Page
from server.domain.recommendation import LoRARecommendation
from server.rpc.dispatch import Dispatcher
from server.rpc.mapping import (
    STATE_NAMES,
    audit_to_proto,
    catalog_record_from_proto,
    generation_event_to_proto,
    generation_request_from_proto,
    generation_to_proto,
    import_update_to_proto,
    kind_filter_from_proto,
    lora_to_proto,
    model_listing_to_proto,
    recommendation_to_proto,
    time_bound_from_proto,
    token_for,
    upscale_request_from_proto,
)

Ctx = grpc.aio.ServicerContext[Any, Any]


class CommandServicer(cmd_grpc.CommandServiceServicer):
    def __init__(self, dispatcher: Dispatcher) -> None:
        self._d = dispatcher

    async def RegisterLora(
        self, request: cmd_pb.RegisterLoraRequest, context: Ctx
    ) -> cmd_pb.RegisterLoraResponse:
        result, position = await self._d.command(
            context, RegisterLoRACommand(path=request.path), request.request_id
        )
        return cmd_pb.RegisterLoraResponse(
            lora=lora_to_proto(result.lora),
            created=result.created,
            consistency_token=token_for(position, self._d.tokens),
        )

    async def ImportLoras(
        self, request: cmd_pb.ImportLorasRequest, context: Ctx
    ) -> AsyncIterator[cmd_pb.ImportLorasResponse]:
        command = ImportLoRAsCommand(directory=request.directory)
        async for update in self._d.stream_command(context, command, request.request_id):
            yield import_update_to_proto(update, self._d.tokens)

    async def ImportLoraCatalog(
        self, request: cmd_pb.ImportLoraCatalogRequest, context: Ctx
    ) -> cmd_pb.ImportLoraCatalogResponse:
        command = ImportLoRACatalogCommand(
            records=tuple(catalog_record_from_proto(r) for r in request.records)
        )
        result, position = await self._d.command(context, command, request.request_id)
        return cmd_pb.ImportLoraCatalogResponse(
            created=result.created,
            updated=result.updated,
            unchanged=result.unchanged,
            errors=[
                cmd_pb.CatalogRecordError(index=e.index, source_id=e.source_id, error=e.error)
                for e in result.errors
            ],
            consistency_token=token_for(position, self._d.tokens),
        )

    async def UpdateLora(
        self, request: cmd_pb.UpdateLoraRequest, context: Ctx
    ) -> cmd_pb.UpdateLoraResponse:
        changes: dict[str, Any] = {}
        for path in request.update_mask.paths:
            if path in ("trigger_words", "tags"):
                changes[path] = list(getattr(request.lora, path))
            elif path == "preferred_weight":
                has = request.lora.HasField("preferred_weight")
                changes[path] = request.lora.preferred_weight if has else None
            elif path in ("name", "description"):
                changes[path] = getattr(request.lora, path)
            else:
                changes[path] = None  # refused by validation with the editable list
        command = UpdateLoRACommand(lora_id=request.lora.id, changes=changes)
        view, position = await self._d.command(context, command, request.request_id)
        return cmd_pb.UpdateLoraResponse(
            lora=lora_to_proto(view), consistency_token=token_for(position, self._d.tokens)
        )

    async def DeleteLora(
        self, request: cmd_pb.DeleteLoraRequest, context: Ctx
    ) -> cmd_pb.DeleteLoraResponse:
        _, position = await self._d.command(
            context, DeleteLoRACommand(lora_id=request.id), request.request_id
        )
        return cmd_pb.DeleteLoraResponse(consistency_token=token_for(position, self._d.tokens))

    async def RecommendLoras(
        self, request: cmd_pb.RecommendLorasRequest, context: Ctx
    ) -> cmd_pb.RecommendLorasResponse:
        command = RecommendLoRAsCommand(
            prompt=request.prompt,
            base_model=request.base_model,
            max_loras=request.max_loras or 3,
            min_confidence=(request.min_confidence if request.HasField("min_confidence") else None),
            include_unavailable=request.include_unavailable,
        )
        recs, position = await self._d.command(context, command, request.request_id)
        return cmd_pb.RecommendLorasResponse(
            recommendation_id=recs.recommendation_id,
            recommendations=[recommendation_to_proto(r) for r in recs],
            consistency_token=token_for(position, self._d.tokens),
        )

    async def RecommendTopLora(
        self, request: cmd_pb.RecommendTopLoraRequest, context: Ctx
    ) -> cmd_pb.RecommendTopLoraResponse:
        command = RecommendTopLoRACommand(
            prompt=request.prompt,
            base_model=request.base_model,
            min_confidence=(request.min_confidence if request.HasField("min_confidence") else None),
            include_unavailable=request.include_unavailable,
        )
        top, position = await self._d.command(context, command, request.request_id)
        response = cmd_pb.RecommendTopLoraResponse(
            recommendation_id=top.recommendation_id,
            none_reason=top.none_reason,
            consistency_token=token_for(position, self._d.tokens),
        )
        if top.recommendation is not None:
            response.recommendation.CopyFrom(recommendation_to_proto(top.recommendation))
        return response

    async def FilterConfidentRecommendations(
        self, request: cmd_pb.FilterConfidentRecommendationsRequest, context: Ctx
    ) -> cmd_pb.FilterConfidentRecommendationsResponse:
        command = FilterConfidentRecommendationsCommand(
            recommendation_id=request.recommendation_id, min_confidence=request.min_confidence
        )
        recs, _ = await self._d.command(context, command, request.request_id)
        return cmd_pb.FilterConfidentRecommendationsResponse(
            recommendations=[recommendation_to_proto(r) for r in recs]
        )

    async def GenerateImage(
        self, request: cmd_pb.GenerateImageRequest, context: Ctx
    ) -> AsyncIterator[cmd_pb.GenerateImageResponse]:
        command = GenerateImageCommand(request=generation_request_from_proto(request.spec))
        async for event in self._d.stream_command(context, command, request.request_id):
            yield cmd_pb.GenerateImageResponse(event=generation_event_to_proto(event))

    async def UpscaleImage(
        self, request: cmd_pb.UpscaleImageRequest, context: Ctx
    ) -> AsyncIterator[cmd_pb.UpscaleImageResponse]:
        command = UpscaleImageCommand(request=upscale_request_from_proto(request))
        async for event in self._d.stream_command(context, command, request.request_id):
            yield cmd_pb.UpscaleImageResponse(event=generation_event_to_proto(event))

    async def QuickGenerate(
        self, request: cmd_pb.QuickGenerateRequest, context: Ctx
    ) -> AsyncIterator[cmd_pb.QuickGenerateResponse]:
        command = QuickGenerateCommand(
            prompt=request.prompt,
            model=request.model,
            seed=request.seed if request.HasField("seed") else None,
        )
        async for event in self._d.stream_command(context, command, request.request_id):
            yield cmd_pb.QuickGenerateResponse(event=generation_event_to_proto(event))

    async def SubmitGeneration(
        self, request: cmd_pb.SubmitGenerationRequest, context: Ctx
    ) -> cmd_pb.SubmitGenerationResponse:
        command = SubmitGenerationCommand(request=generation_request_from_proto(request.spec))
        (generation_id, queue_position), position = await self._d.command(
            context, command, request.request_id
        )
        return cmd_pb.SubmitGenerationResponse(
            generation_id=generation_id,
            queue_position=queue_position,
            consistency_token=token_for(position, self._d.tokens),
        )

    async def CancelGeneration(
        self, request: cmd_pb.CancelGenerationRequest, context: Ctx
    ) -> cmd_pb.CancelGenerationResponse:
        command = CancelGenerationCommand(generation_id=request.generation_id)
        view, position = await self._d.command(context, command, request.request_id)
        response = cmd_pb.CancelGenerationResponse(
            consistency_token=token_for(position, self._d.tokens)
        )
        if view is not None:
            response.generation.CopyFrom(generation_to_proto(view))
        return response


class QueryServicer(qry_grpc.QueryServiceServicer):
    def __init__(self, dispatcher: Dispatcher) -> None:
        self._d = dispatcher

    async def GetLora(self, request: qry_pb.GetLoraRequest, context: Ctx) -> qry_pb.GetLoraResponse:
        return await self._d.respond(
            context, GetLoRAByIdQuery(lora_id=request.id), _lora_response, request.consistency_token
        )

    async def ListLoras(
        self, request: qry_pb.ListLorasRequest, context: Ctx
    ) -> qry_pb.ListLorasResponse:
        query: GetAllLoRAsQuery | GetLoRAsByBaseModelQuery
        if request.base_model:
            query = GetLoRAsByBaseModelQuery(
                base_model=request.base_model,
                page_size=request.page_size,
                page_token=request.page_token,
                tag=request.tag,
                available_only=request.available_only,
                kind=kind_filter_from_proto(request.kind),
            )
        else:
            query = GetAllLoRAsQuery(
                page_size=request.page_size,
                page_token=request.page_token,
                tag=request.tag,
                available_only=request.available_only,
                kind=kind_filter_from_proto(request.kind),
            )
        return await self._d.respond(context, query, _loras_response, request.consistency_token)

    async def SearchLoras(
        self, request: qry_pb.SearchLorasRequest, context: Ctx
    ) -> qry_pb.SearchLorasResponse:
        query = SearchLoRAsByPromptQuery(
            prompt=request.query,
            base_model=request.base_model,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return await self._d.respond(context, query, _search_response, request.consistency_token)

    async def ListBaseModels(
        self, request: qry_pb.ListBaseModelsRequest, context: Ctx
    ) -> qry_pb.ListBaseModelsResponse:
        return await self._d.respond(context, ListBaseModelsQuery(), model_listing_to_proto)

    async def GetGeneration(
        self, request: qry_pb.GetGenerationRequest, context: Ctx
    ) -> qry_pb.GetGenerationResponse:
        query = GetGenerationQuery(generation_id=request.id)
        return await self._d.respond(
            context, query, _generation_response, request.consistency_token
        )

    async def ListGenerations(
        self, request: qry_pb.ListGenerationsRequest, context: Ctx
    ) -> qry_pb.ListGenerationsResponse:
        query = ListGenerationsQuery(
            page_size=request.page_size,
            page_token=request.page_token,
            state=STATE_NAMES.get(request.state, ""),
            all_owners=request.all_owners,
            owner=request.owner,
        )
        return await self._d.respond(
            context, query, _generations_response, request.consistency_token
        )

    async def WatchGeneration(
        self, request: qry_pb.WatchGenerationRequest, context: Ctx
    ) -> AsyncIterator[qry_pb.WatchGenerationResponse]:
        query = WatchGenerationQuery(
            generation_id=request.generation_id, after_sequence=request.after_sequence
        )
        async for event in self._d.stream_query(context, query):
            yield qry_pb.WatchGenerationResponse(event=generation_event_to_proto(event))

    async def ListEvents(
        self, request: qry_pb.ListEventsRequest, context: Ctx
    ) -> qry_pb.ListEventsResponse:
        query = ListEventsQuery(
            page_size=request.page_size,
            page_token=request.page_token,
            aggregate_id=request.aggregate_id,
            type=request.type,
            principal=request.principal,
            start_time=_time(request.start_time, request.HasField("start_time")),
            end_time=_time(request.end_time, request.HasField("end_time")),
        )
        return await self._d.respond(context, query, _events_response, request.consistency_token)


def _time(value: timestamp_pb2.Timestamp, present: bool) -> datetime | None:
    return time_bound_from_proto(value) if present else None


# Response builders for Dispatcher.respond: module-level, so each is one object, and part of
# the query cache's key; the cache keeps what they build.


def _lora_response(view: LoraView) -> qry_pb.GetLoraResponse:
    return qry_pb.GetLoraResponse(lora=lora_to_proto(view))


def _loras_response(page: Page[LoraView]) -> qry_pb.ListLorasResponse:
    return qry_pb.ListLorasResponse(
        loras=[lora_to_proto(v) for v in page.items],
        next_page_token=page.next_page_token,
        total_size=page.total_size,
    )


def _search_response(page: Page[LoRARecommendation]) -> qry_pb.SearchLorasResponse:
    return qry_pb.SearchLorasResponse(
        results=[
            qry_pb.LoraSearchResult(
                lora=lora_to_proto(hit.lora), score=hit.confidence, reasons=hit.reasons
            )
            for hit in page.items
        ],
        next_page_token=page.next_page_token,
    )


def _generation_response(view: GenerationView) -> qry_pb.GetGenerationResponse:
    return qry_pb.GetGenerationResponse(generation=generation_to_proto(view))


def _generations_response(page: Page[GenerationView]) -> qry_pb.ListGenerationsResponse:
    return qry_pb.ListGenerationsResponse(
        generations=[generation_to_proto(v) for v in page.items],
        next_page_token=page.next_page_token,
    )


def _events_response(page: Page[AuditEntry]) -> qry_pb.ListEventsResponse:
    return qry_pb.ListEventsResponse(
        events=[audit_to_proto(e) for e in page.items], next_page_token=page.next_page_token
    )
