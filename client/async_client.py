"""asyncio client for services that already run an event loop.

The blocking client (client/sync_client.py) is generated from this file by scripts/unasync.py:
edit here, then rerun the script.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import Message

from client import _requests as rq
from client.errors import from_rpc_error
from loracle.v1 import (
    command_service_pb2,
    command_service_pb2_grpc,
    query_service_pb2,
    query_service_pb2_grpc,
    types_pb2,
)

__all__ = ["AsyncLoracleClient"]

_Req = TypeVar("_Req", bound=Message)
_Resp = TypeVar("_Resp", bound=Message)


class AsyncLoracleClient:
    """Wraps both services of one server; every failure surfaces as a client.errors class.

    `timeout` is the deadline of unary calls. Streaming calls (imports, generation) can run
    far longer than any sensible unary deadline, so they use `stream_timeout` (default: none).
    A channel passed in stays owned by the caller and is not closed by `close()`. `token` is
    sent as `authorization: Bearer <token>`; `tls` makes the channel a TLS one.
    """

    def __init__(
        self,
        target: str = rq.DEFAULT_TARGET,
        *,
        timeout: float | None = 30.0,
        metadata: Sequence[tuple[str, str]] = (),
        channel: grpc.aio.Channel | None = None,
        stream_timeout: float | None = None,
        token: str | None = None,
        tls: rq.Tls | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self._metadata = rq.metadata_tuple(metadata, token)
        self._owns_channel = channel is None
        self._channel = (
            channel
            if channel is not None
            else grpc.aio.insecure_channel(target, options=rq.CHANNEL_OPTIONS)
            if tls is None
            else grpc.aio.secure_channel(target, tls.credentials(), options=rq.CHANNEL_OPTIONS)
        )
        self._commands = command_service_pb2_grpc.CommandServiceStub(self._channel)
        self._queries = query_service_pb2_grpc.QueryServiceStub(self._channel)

    async def close(self) -> None:
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- plumbing --------------------------------------------------------------------------

    async def _unary(
        self, method: grpc.aio.UnaryUnaryMultiCallable[_Req, _Resp], request: _Req
    ) -> _Resp:
        try:
            return await method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    async def _stream(
        self, method: grpc.aio.UnaryStreamMultiCallable[_Req, _Resp], request: _Req
    ) -> AsyncIterator[_Resp]:
        call = method(request, timeout=self.stream_timeout, metadata=self._metadata)
        try:
            async for response in call:
                yield response
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            # Stops the server-side work when the caller abandons the iterator early.
            call.cancel()

    # --- commands --------------------------------------------------------------------------

    async def register_lora(
        self, path: str, *, request_id: str | None = None
    ) -> command_service_pb2.RegisterLoraResponse:
        return await self._unary(self._commands.RegisterLora, rq.register_lora(path, request_id))

    def import_loras(
        self, directory: str = "", *, request_id: str | None = None
    ) -> AsyncIterator[command_service_pb2.ImportLorasResponse]:
        return self._stream(self._commands.ImportLoras, rq.import_loras(directory, request_id))

    async def import_lora_catalog(
        self,
        records: Iterable[command_service_pb2.CatalogRecord | Mapping[str, Any]],
        *,
        batch_size: int = rq.DEFAULT_CATALOG_BATCH_SIZE,
        request_id: str | None = None,
        on_batch: rq.CatalogProgress | None = None,
    ) -> command_service_pb2.ImportLoraCatalogResponse:
        """Sends records in batches and returns one response summed over them.

        Error indices refer to positions in `records`. `on_batch(records_seen, response)` is
        called after each batch, for progress display.
        """
        job = rq.CatalogImport(records, batch_size, request_id)
        for batch in job.batches():
            response = await self._unary(self._commands.ImportLoraCatalog, batch.request)
            job.add(batch, response)
            if on_batch is not None:
                on_batch(job.records_seen, response)
        return job.result()

    async def update_lora(
        self,
        lora_id: str,
        *,
        name: str | None = None,
        trigger_words: Sequence[str] | None = None,
        tags: Sequence[str] | None = None,
        description: str | None = None,
        preferred_weight: float | None = None,
        request_id: str | None = None,
    ) -> command_service_pb2.UpdateLoraResponse:
        request = rq.update_lora(
            lora_id,
            name=name,
            trigger_words=trigger_words,
            tags=tags,
            description=description,
            preferred_weight=preferred_weight,
            request_id=request_id,
        )
        return await self._unary(self._commands.UpdateLora, request)

    async def delete_lora(
        self, lora_id: str, *, request_id: str | None = None
    ) -> command_service_pb2.DeleteLoraResponse:
        return await self._unary(self._commands.DeleteLora, rq.delete_lora(lora_id, request_id))

    async def recommend_loras(
        self,
        prompt: str,
        base_model: str,
        *,
        max_loras: int = 3,
        min_confidence: float | None = None,
        include_unavailable: bool = False,
        request_id: str | None = None,
    ) -> command_service_pb2.RecommendLorasResponse:
        request = rq.recommend_loras(
            prompt,
            base_model,
            max_loras=max_loras,
            min_confidence=min_confidence,
            include_unavailable=include_unavailable,
            request_id=request_id,
        )
        return await self._unary(self._commands.RecommendLoras, request)

    async def recommend_top_lora(
        self,
        prompt: str,
        base_model: str,
        *,
        min_confidence: float | None = None,
        include_unavailable: bool = False,
        request_id: str | None = None,
    ) -> command_service_pb2.RecommendTopLoraResponse:
        request = rq.recommend_top_lora(
            prompt,
            base_model,
            min_confidence=min_confidence,
            include_unavailable=include_unavailable,
            request_id=request_id,
        )
        return await self._unary(self._commands.RecommendTopLora, request)

    async def filter_confident_recommendations(
        self, recommendation_id: str, min_confidence: float, *, request_id: str | None = None
    ) -> command_service_pb2.FilterConfidentRecommendationsResponse:
        request = rq.filter_confident_recommendations(recommendation_id, min_confidence, request_id)
        return await self._unary(self._commands.FilterConfidentRecommendations, request)

    def generate_image(
        self, spec: types_pb2.GenerationSpec, *, request_id: str | None = None
    ) -> AsyncIterator[types_pb2.GenerationEvent]:
        """The job's events. A job that fails yields its `failed` event, then raises the
        status the stream ended with as a LoracleError (its `reason` says why, e.g.
        LORA_LOAD_FAILED; `retry_after` is set when waiting helps, e.g. out of memory)."""
        stream = self._stream(self._commands.GenerateImage, rq.generate_image(spec, request_id))
        return _events(stream)

    def upscale_image(
        self,
        image: types_pb2.InputImage,
        upscaler: str,
        *,
        scale: float = 0.0,
        output_format: types_pb2.ImageFormat.ValueType = types_pb2.IMAGE_FORMAT_PNG,
        request_id: str | None = None,
    ) -> AsyncIterator[types_pb2.GenerationEvent]:
        """An upscale's events (progress counts tiles), as `generate_image`'s: a failure
        yields `failed`, then raises its LoracleError."""
        request = rq.upscale_image(image, upscaler, scale, output_format, request_id)
        stream = self._stream(self._commands.UpscaleImage, request)
        return _events(stream)

    def quick_generate(
        self,
        prompt: str,
        *,
        model: str = "",
        seed: int | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[types_pb2.GenerationEvent]:
        """As `generate_image`: a failed job yields `failed`, then raises its LoracleError."""
        request = rq.quick_generate(prompt, model, seed, request_id)
        stream = self._stream(self._commands.QuickGenerate, request)
        return _events(stream)

    async def submit_generation(
        self, spec: types_pb2.GenerationSpec, *, request_id: str | None = None
    ) -> command_service_pb2.SubmitGenerationResponse:
        request = rq.submit_generation(spec, request_id)
        return await self._unary(self._commands.SubmitGeneration, request)

    async def cancel_generation(
        self, generation_id: str, *, request_id: str | None = None
    ) -> command_service_pb2.CancelGenerationResponse:
        request = rq.cancel_generation(generation_id, request_id)
        return await self._unary(self._commands.CancelGeneration, request)

    # --- queries ---------------------------------------------------------------------------

    async def get_lora(self, lora_id: str, *, consistency_token: str = "") -> types_pb2.Lora:
        request = rq.get_lora(lora_id, consistency_token)
        response = await self._unary(self._queries.GetLora, request)
        return response.lora

    async def list_loras(
        self,
        *,
        base_model: str = "",
        tag: str = "",
        available_only: bool = False,
        page_size: int = 50,
        page_token: str = "",
        consistency_token: str = "",
        kind: rq.LoraKindName = "",
    ) -> query_service_pb2.ListLorasResponse:
        """`kind`: "lora" or "embedding" (textual inversion); "" lists both."""
        request = rq.list_loras(
            base_model=base_model,
            tag=tag,
            available_only=available_only,
            page_size=page_size,
            page_token=page_token,
            consistency_token=consistency_token,
            kind=kind,
        )
        return await self._unary(self._queries.ListLoras, request)

    async def iter_loras(
        self,
        *,
        base_model: str = "",
        tag: str = "",
        available_only: bool = False,
        page_size: int = 200,
        page_token: str = "",
        consistency_token: str = "",
        kind: rq.LoraKindName = "",
    ) -> AsyncIterator[types_pb2.Lora]:
        token: str | None = page_token
        while token is not None:
            page = await self.list_loras(
                base_model=base_model,
                tag=tag,
                available_only=available_only,
                page_size=page_size,
                page_token=token,
                consistency_token=consistency_token,
                kind=kind,
            )
            for lora in page.loras:
                yield lora
            token = rq.next_page_token(page.next_page_token, len(page.loras), token)

    async def search_loras(
        self,
        query: str,
        *,
        base_model: str = "",
        page_size: int = 20,
        page_token: str = "",
        consistency_token: str = "",
    ) -> query_service_pb2.SearchLorasResponse:
        request = rq.search_loras(
            query,
            base_model=base_model,
            page_size=page_size,
            page_token=page_token,
            consistency_token=consistency_token,
        )
        return await self._unary(self._queries.SearchLoras, request)

    async def list_base_models(self) -> list[types_pb2.BaseModel]:
        request = query_service_pb2.ListBaseModelsRequest()
        response = await self._unary(self._queries.ListBaseModels, request)
        return list(response.models)

    async def model_listing(self) -> query_service_pb2.ListBaseModelsResponse:
        """Base models, ControlNets and hires upscalers: what a generation can name."""
        request = query_service_pb2.ListBaseModelsRequest()
        response: query_service_pb2.ListBaseModelsResponse = await self._unary(
            self._queries.ListBaseModels, request
        )
        return response

    async def list_events(
        self,
        *,
        aggregate_id: str = "",
        type: str = "",
        principal: str = "",
        page_size: int = 100,
        page_token: str = "",
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        consistency_token: str = "",
    ) -> query_service_pb2.ListEventsResponse:
        request = rq.list_events(
            aggregate_id=aggregate_id,
            type=type,
            principal=principal,
            page_size=page_size,
            page_token=page_token,
            start_time=start_time,
            end_time=end_time,
            consistency_token=consistency_token,
        )
        return await self._unary(self._queries.ListEvents, request)

    async def iter_events(
        self,
        *,
        aggregate_id: str = "",
        type: str = "",
        principal: str = "",
        page_size: int = 100,
        page_token: str = "",
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        consistency_token: str = "",
    ) -> AsyncIterator[types_pb2.AuditEvent]:
        token: str | None = page_token
        while token is not None:
            page = await self.list_events(
                aggregate_id=aggregate_id,
                type=type,
                principal=principal,
                page_size=page_size,
                page_token=token,
                start_time=start_time,
                end_time=end_time,
                consistency_token=consistency_token,
            )
            for event in page.events:
                yield event
            token = rq.next_page_token(page.next_page_token, len(page.events), token)

    async def get_generation(
        self, generation_id: str, *, consistency_token: str = ""
    ) -> types_pb2.Generation:
        request = rq.get_generation(generation_id, consistency_token)
        response = await self._unary(self._queries.GetGeneration, request)
        return response.generation

    async def list_generations(
        self,
        *,
        state: types_pb2.GenerationState.ValueType = types_pb2.GENERATION_STATE_UNSPECIFIED,
        page_size: int = 50,
        page_token: str = "",
        consistency_token: str = "",
        all_owners: bool = False,
        owner: str = "",
    ) -> query_service_pb2.ListGenerationsResponse:
        """The caller's own generations, newest first; `all_owners` (everyone's) and another
        principal's `owner` need the admin scope."""
        request = rq.list_generations(
            state=state,
            page_size=page_size,
            page_token=page_token,
            consistency_token=consistency_token,
            all_owners=all_owners,
            owner=owner,
        )
        return await self._unary(self._queries.ListGenerations, request)

    def watch_generation(
        self, generation_id: str, after_sequence: int = 0
    ) -> AsyncIterator[types_pb2.GenerationEvent]:
        """A generation's events. Watching a job that failed ends normally after its `failed`
        event (the watch worked); only a failed watch raises."""
        request = rq.watch_generation(generation_id, after_sequence)
        stream = self._stream(self._queries.WatchGeneration, request)
        return _events(stream)


async def _events(
    responses: AsyncIterator[
        command_service_pb2.GenerateImageResponse
        | command_service_pb2.QuickGenerateResponse
        | command_service_pb2.UpscaleImageResponse
        | query_service_pb2.WatchGenerationResponse
    ],
) -> AsyncIterator[types_pb2.GenerationEvent]:
    async for response in responses:
        yield response.event
