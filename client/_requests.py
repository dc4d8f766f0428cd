"""Request building and response merging shared by the sync and the async client.

Both clients only differ in how they wait for a call; everything that decides *what* is sent
(idempotency keys, field masks, catalog batching) lives here so the two cannot drift apart.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Literal

import grpc
from google.protobuf import field_mask_pb2, timestamp_pb2

from loracle.v1 import command_service_pb2, query_service_pb2, types_pb2

DEFAULT_TARGET: Final = "127.0.0.1:50051"
MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024
CHANNEL_OPTIONS: Final[list[tuple[str, Any]]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
DEFAULT_CATALOG_BATCH_SIZE: Final = 2000

# on_batch(records_seen, batch_response) of import_lora_catalog, for progress display.
CatalogProgress = Callable[[int, command_service_pb2.ImportLoraCatalogResponse], None]

# The order the server documents for UpdateLoraRequest.update_mask.
UPDATABLE_FIELDS: Final = ("name", "trigger_words", "tags", "description", "preferred_weight")


def request_id_or_new(request_id: str | None) -> str:
    """A fresh key per call unless the caller passes one to make a retry idempotent."""
    return request_id if request_id is not None else str(uuid.uuid4())


def metadata_tuple(
    metadata: Sequence[tuple[str, str]], token: str | None = None
) -> tuple[tuple[str, str], ...]:
    pairs = tuple((str(k), str(v)) for k, v in metadata)
    return (*pairs, ("authorization", f"Bearer {token}")) if token else pairs


@dataclass(frozen=True, slots=True)
class Tls:
    """PEM bytes for a TLS channel: the CA to trust (None: the system's), and for mutual TLS
    the client's certificate chain and key."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None

    @staticmethod
    def from_files(ca: str | None = None, cert: str | None = None, key: str | None = None) -> Tls:
        def read(path: str | None) -> bytes | None:
            if path is None:
                return None
            with open(path, "rb") as f:
                return f.read()

        return Tls(read(ca), read(cert), read(key))

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            self.root_certificates, self.private_key, self.certificate_chain
        )


# --- commands -----------------------------------------------------------------------------


def register_lora(path: str, request_id: str | None) -> command_service_pb2.RegisterLoraRequest:
    return command_service_pb2.RegisterLoraRequest(
        request_id=request_id_or_new(request_id), path=path
    )


def import_loras(directory: str, request_id: str | None) -> command_service_pb2.ImportLorasRequest:
    return command_service_pb2.ImportLorasRequest(
        request_id=request_id_or_new(request_id), directory=directory
    )


def update_lora(
    lora_id: str,
    *,
    name: str | None,
    trigger_words: Sequence[str] | None,
    tags: Sequence[str] | None,
    description: str | None,
    preferred_weight: float | None,
    request_id: str | None,
) -> command_service_pb2.UpdateLoraRequest:
    """None means "leave unchanged"; an empty list or string is a real value (it clears)."""
    lora = types_pb2.Lora(id=lora_id)
    paths: list[str] = []
    if name is not None:
        lora.name = name
        paths.append("name")
    if trigger_words is not None:
        lora.trigger_words.extend(_str_list(trigger_words, "trigger_words"))
        paths.append("trigger_words")
    if tags is not None:
        lora.tags.extend(_str_list(tags, "tags"))
        paths.append("tags")
    if description is not None:
        lora.description = description
        paths.append("description")
    if preferred_weight is not None:
        lora.preferred_weight = float(preferred_weight)
        paths.append("preferred_weight")
    if not paths:
        raise ValueError("update_lora needs at least one field to change")
    return command_service_pb2.UpdateLoraRequest(
        request_id=request_id_or_new(request_id),
        lora=lora,
        update_mask=field_mask_pb2.FieldMask(paths=paths),
    )


def _str_list(values: Sequence[str], what: str) -> list[str]:
    # A bare string is a Sequence[str] too; iterating it would send one value per character.
    if isinstance(values, str):
        raise TypeError(f"{what} must be a list of strings, not a string")
    return [str(v) for v in values]


def delete_lora(lora_id: str, request_id: str | None) -> command_service_pb2.DeleteLoraRequest:
    return command_service_pb2.DeleteLoraRequest(
        request_id=request_id_or_new(request_id), id=lora_id
    )


def recommend_loras(
    prompt: str,
    base_model: str,
    *,
    max_loras: int,
    min_confidence: float | None,
    include_unavailable: bool,
    request_id: str | None,
) -> command_service_pb2.RecommendLorasRequest:
    request = command_service_pb2.RecommendLorasRequest(
        request_id=request_id_or_new(request_id),
        prompt=prompt,
        base_model=base_model,
        max_loras=max_loras,
        include_unavailable=include_unavailable,
    )
    if min_confidence is not None:
        request.min_confidence = min_confidence
    return request


def recommend_top_lora(
    prompt: str,
    base_model: str,
    *,
    min_confidence: float | None,
    include_unavailable: bool,
    request_id: str | None,
) -> command_service_pb2.RecommendTopLoraRequest:
    request = command_service_pb2.RecommendTopLoraRequest(
        request_id=request_id_or_new(request_id),
        prompt=prompt,
        base_model=base_model,
        include_unavailable=include_unavailable,
    )
    if min_confidence is not None:
        request.min_confidence = min_confidence
    return request


def filter_confident_recommendations(
    recommendation_id: str, min_confidence: float, request_id: str | None
) -> command_service_pb2.FilterConfidentRecommendationsRequest:
    return command_service_pb2.FilterConfidentRecommendationsRequest(
        request_id=request_id_or_new(request_id),
        recommendation_id=recommendation_id,
        min_confidence=min_confidence,
    )


def upscale_image(
    image: types_pb2.InputImage,
    upscaler: str,
    scale: float,
    output_format: types_pb2.ImageFormat.ValueType,
    request_id: str | None,
) -> command_service_pb2.UpscaleImageRequest:
    return command_service_pb2.UpscaleImageRequest(
        request_id=request_id_or_new(request_id),
        image=image,
        upscaler=upscaler,
        scale=scale,
        output_format=output_format,
    )


def generate_image(
    spec: types_pb2.GenerationSpec, request_id: str | None
) -> command_service_pb2.GenerateImageRequest:
    return command_service_pb2.GenerateImageRequest(
        request_id=request_id_or_new(request_id), spec=spec
    )


def quick_generate(
    prompt: str, model: str, seed: int | None, request_id: str | None
) -> command_service_pb2.QuickGenerateRequest:
    request = command_service_pb2.QuickGenerateRequest(
        request_id=request_id_or_new(request_id), prompt=prompt, model=model
    )
    if seed is not None:
        request.seed = seed
    return request


def submit_generation(
    spec: types_pb2.GenerationSpec, request_id: str | None
) -> command_service_pb2.SubmitGenerationRequest:
    return command_service_pb2.SubmitGenerationRequest(
        request_id=request_id_or_new(request_id), spec=spec
    )


def cancel_generation(
    generation_id: str, request_id: str | None
) -> command_service_pb2.CancelGenerationRequest:
    return command_service_pb2.CancelGenerationRequest(
        request_id=request_id_or_new(request_id), generation_id=generation_id
    )


# --- catalog import -----------------------------------------------------------------------

_CATALOG_STR_FIELDS: Final = ("source_id", "name", "base_model", "file_name", "description")
_CATALOG_LIST_FIELDS: Final = ("tags", "trigger_words")


def catalog_record(
    record: command_service_pb2.CatalogRecord | Mapping[str, Any],
) -> command_service_pb2.CatalogRecord:
    """Converts one JSON Lines object; unknown keys are ignored and null means the default.

    Raises ValueError naming the field when a value has the wrong JSON type, so one bad line
    is reported like a server-side refusal instead of aborting a long import.
    """
    if isinstance(record, command_service_pb2.CatalogRecord):
        return record
    if not isinstance(record, Mapping):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    out = command_service_pb2.CatalogRecord()
    for key in _CATALOG_STR_FIELDS:
        value = record.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a string, got {type(value).__name__}")
        setattr(out, key, value)
    for key in _CATALOG_LIST_FIELDS:
        values = record.get(key)
        if values is None:
            continue
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ValueError(f"{key}: expected a list of strings")
        getattr(out, key).extend(values)
    downloads = record.get("downloads")
    if downloads is not None:
        if isinstance(downloads, float) and downloads.is_integer():
            downloads = int(downloads)
        if isinstance(downloads, bool) or not isinstance(downloads, int):
            raise ValueError(f"downloads: expected an integer, got {downloads!r}")
        out.downloads = downloads
    return out


@dataclass(slots=True)
class CatalogBatch:
    """One ImportLoraCatalog call; `indices[i]` is the input position of `request.records[i]`."""

    number: int
    request: command_service_pb2.ImportLoraCatalogRequest
    indices: list[int]


@dataclass(slots=True)
class CatalogImport:
    """Splits records into batches and folds the batch responses into one response.

    Batch n is sent with request_id f"{request_id}:{n}" (n from 0), so re-running the same
    import with the same request_id replays the batches the server already applied.
    """

    records: Iterable[command_service_pb2.CatalogRecord | Mapping[str, Any]]
    batch_size: int = DEFAULT_CATALOG_BATCH_SIZE
    request_id: str | None = None
    records_seen: int = 0
    _errors: list[command_service_pb2.CatalogRecordError] = field(default_factory=list)
    _totals: command_service_pb2.ImportLoraCatalogResponse = field(
        default_factory=command_service_pb2.ImportLoraCatalogResponse
    )

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.request_id = request_id_or_new(self.request_id)

    def batches(self) -> Iterator[CatalogBatch]:
        number = 0
        pending: list[command_service_pb2.CatalogRecord] = []
        indices: list[int] = []
        for index, raw in enumerate(self.records):
            self.records_seen = index + 1
            try:
                pending.append(catalog_record(raw))
            except ValueError as exc:
                self._errors.append(self._local_error(index, raw, str(exc)))
                continue
            indices.append(index)
            if len(pending) >= self.batch_size:
                yield self._batch(number, pending, indices)
                number += 1
                pending, indices = [], []
        if pending:
            yield self._batch(number, pending, indices)

    def _batch(
        self, number: int, records: list[command_service_pb2.CatalogRecord], indices: list[int]
    ) -> CatalogBatch:
        request = command_service_pb2.ImportLoraCatalogRequest(
            request_id=f"{self.request_id}:{number}", records=records
        )
        return CatalogBatch(number=number, request=request, indices=indices)

    @staticmethod
    def _local_error(
        index: int, raw: object, message: str
    ) -> command_service_pb2.CatalogRecordError:
        source_id = raw.get("source_id") if isinstance(raw, Mapping) else None
        return command_service_pb2.CatalogRecordError(
            index=index,
            source_id=source_id if isinstance(source_id, str) else "",
            error=message,
        )

    def add(
        self, batch: CatalogBatch, response: command_service_pb2.ImportLoraCatalogResponse
    ) -> None:
        totals = self._totals
        totals.created += response.created
        totals.updated += response.updated
        totals.unchanged += response.unchanged
        for error in response.errors:
            shifted = command_service_pb2.CatalogRecordError()
            shifted.CopyFrom(error)
            if 0 <= error.index < len(batch.indices):
                shifted.index = batch.indices[error.index]
            self._errors.append(shifted)
        if response.consistency_token:
            totals.consistency_token = response.consistency_token

    def result(self) -> command_service_pb2.ImportLoraCatalogResponse:
        merged = command_service_pb2.ImportLoraCatalogResponse()
        merged.CopyFrom(self._totals)
        merged.errors.extend(sorted(self._errors, key=lambda e: e.index))
        return merged


# --- queries ------------------------------------------------------------------------------


def get_lora(lora_id: str, consistency_token: str) -> query_service_pb2.GetLoraRequest:
    return query_service_pb2.GetLoraRequest(id=lora_id, consistency_token=consistency_token)


# `kind` of list_loras: LoRAs, textual-inversion embeddings, or "" for both.
LoraKindName = Literal["", "lora", "embedding"]
LORA_KINDS: Final[dict[str, types_pb2.LoraKind.ValueType]] = {
    "": types_pb2.LORA_KIND_UNSPECIFIED,
    "lora": types_pb2.LORA_KIND_LORA,
    "embedding": types_pb2.LORA_KIND_EMBEDDING,
}


def list_loras(
    *,
    base_model: str,
    tag: str,
    available_only: bool,
    page_size: int,
    page_token: str,
    consistency_token: str,
    kind: LoraKindName = "",
) -> query_service_pb2.ListLorasRequest:
    if kind not in LORA_KINDS:
        raise ValueError(f"kind must be one of {sorted(LORA_KINDS)}, not {kind!r}")
    return query_service_pb2.ListLorasRequest(
        base_model=base_model,
        tag=tag,
        available_only=available_only,
        page_size=page_size,
        page_token=page_token,
        consistency_token=consistency_token,
        kind=LORA_KINDS[kind],
    )


def search_loras(
    query: str, *, base_model: str, page_size: int, page_token: str, consistency_token: str
) -> query_service_pb2.SearchLorasRequest:
    return query_service_pb2.SearchLorasRequest(
        query=query,
        base_model=base_model,
        page_size=page_size,
        page_token=page_token,
        consistency_token=consistency_token,
    )


def list_events(
    *,
    aggregate_id: str,
    type: str,
    principal: str,
    page_size: int,
    page_token: str,
    start_time: datetime | None,
    end_time: datetime | None,
    consistency_token: str = "",
) -> query_service_pb2.ListEventsRequest:
    request = query_service_pb2.ListEventsRequest(
        consistency_token=consistency_token,
        aggregate_id=aggregate_id,
        type=type,
        principal=principal,
        page_size=page_size,
        page_token=page_token,
    )
    if start_time is not None:
        request.start_time.CopyFrom(_timestamp(start_time))
    if end_time is not None:
        request.end_time.CopyFrom(_timestamp(end_time))
    return request


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def get_generation(
    generation_id: str, consistency_token: str
) -> query_service_pb2.GetGenerationRequest:
    return query_service_pb2.GetGenerationRequest(
        id=generation_id, consistency_token=consistency_token
    )


def list_generations(
    *,
    state: types_pb2.GenerationState.ValueType,
    page_size: int,
    page_token: str,
    consistency_token: str,
    all_owners: bool = False,
    owner: str = "",
) -> query_service_pb2.ListGenerationsRequest:
    return query_service_pb2.ListGenerationsRequest(
        state=state,
        page_size=page_size,
        page_token=page_token,
        consistency_token=consistency_token,
        all_owners=all_owners,
        owner=owner,
    )


def watch_generation(
    generation_id: str, after_sequence: int
) -> query_service_pb2.WatchGenerationRequest:
    return query_service_pb2.WatchGenerationRequest(
        generation_id=generation_id, after_sequence=after_sequence
    )


def next_page_token(token: str, page_len: int, previous: str) -> str | None:
    """The token to fetch next, or None when paging is over.

    An empty page or a token that does not move is treated as the end, so a server bug cannot
    turn an iterator into an endless loop.
    """
    if not token or page_len == 0 or token == previous:
        return None
    return token
