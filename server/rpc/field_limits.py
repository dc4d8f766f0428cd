"""The one table of input bounds: every string, bytes and repeated field of every request
message of our services (walked from each method's input type, through nested messages and
maps) has a maximum here, checked at the edge before any handler work. A string's limit
counts characters, a bytes field's bytes, a repeated field's (or map's) items; a repeated
string has both. tests/unit/test_field_limits.py fails when a request field has no entry, so
a new field cannot ship unbounded. Handlers keep their own, finer rules (`max_prompt_chars`,
`max_loras_per_request`); these only stop absurd inputs (a 20 MB search query) from costing
CPU. README's table is `python -m server.rpc.field_limits`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from loracle.v1 import command_service_pb2, query_service_pb2
from server.domain.errors import FieldViolation
from server.domain.tokens import MAX_TOKEN_CHARS

KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True, slots=True)
class Limit:
    """`size`: characters of a string, bytes of a bytes field (each item's, when repeated);
    `items`: entries of a repeated field or map."""

    size: int | None = None
    items: int | None = None
    why: str = ""


REQUEST_ID = Limit(128, why="idempotency key; logged and stored")
OUR_ID = Limit(36, why="a UUID this server issued")
NAME = Limit(512, why="a name, model or file name")
PATH = Limit(4096, why="a file system path (PATH_MAX)")
# The signer's own bound: a page token after a LoRA with a long non-ASCII name is ~2,800.
TOKEN = Limit(MAX_TOKEN_CHARS, why="an opaque token this server issued")
PROMPT = Limit(10_000, why="a prompt; the handler applies `max_prompt_chars`")
TAG = Limit(256, items=200, why="a list of tags")
TRIGGERS = Limit(1000, items=200, why="a list of trigger phrases")
DESCRIPTION = Limit(20_000, why="free text")
FILTER = Limit(128, why="a filter on the audit trail")
PRINCIPAL = Limit(128, why="a principal's name")

FIELD_LIMITS: dict[str, Limit] = {
    # CommandService
    "loracle.v1.RegisterLoraRequest.request_id": REQUEST_ID,
    "loracle.v1.RegisterLoraRequest.path": PATH,
    "loracle.v1.ImportLorasRequest.request_id": REQUEST_ID,
    "loracle.v1.ImportLorasRequest.directory": PATH,
    "loracle.v1.ImportLoraCatalogRequest.request_id": REQUEST_ID,
    "loracle.v1.ImportLoraCatalogRequest.records": Limit(
        items=10_000, why="catalog records per call; import larger catalogs in parts"
    ),
    "loracle.v1.CatalogRecord.source_id": NAME,
    "loracle.v1.CatalogRecord.name": NAME,
    "loracle.v1.CatalogRecord.base_model": NAME,
    "loracle.v1.CatalogRecord.tags": TAG,
    "loracle.v1.CatalogRecord.trigger_words": TRIGGERS,
    "loracle.v1.CatalogRecord.file_name": NAME,
    "loracle.v1.CatalogRecord.description": DESCRIPTION,
    "loracle.v1.UpdateLoraRequest.request_id": REQUEST_ID,
    "loracle.v1.Lora.id": OUR_ID,
    "loracle.v1.Lora.name": NAME,
    "loracle.v1.BaseModelRef.lineage": NAME,
    "loracle.v1.Lora.trigger_words": TRIGGERS,
    "loracle.v1.Lora.tags": TAG,
    "loracle.v1.Lora.description": DESCRIPTION,
    "loracle.v1.Lora.source_id": NAME,
    "loracle.v1.LoraFile.path": PATH,
    "loracle.v1.LoraFile.sha256": Limit(64, why="hex SHA-256"),
    "loracle.v1.LoraFile.autov2": Limit(64, why="hex hash prefix"),
    "loracle.v1.Lora.file_name": NAME,
    "loracle.v1.Lora.training_tags": Limit(items=1000, why="output only; ignored on update"),
    "loracle.v1.TagCount.tag": TAG,
    "google.protobuf.FieldMask.paths": Limit(128, items=32, why="field paths to change"),
    "loracle.v1.DeleteLoraRequest.request_id": REQUEST_ID,
    "loracle.v1.DeleteLoraRequest.id": OUR_ID,
    "loracle.v1.RecommendLorasRequest.request_id": REQUEST_ID,
    "loracle.v1.RecommendLorasRequest.prompt": PROMPT,
    "loracle.v1.RecommendLorasRequest.base_model": NAME,
    "loracle.v1.RecommendTopLoraRequest.request_id": REQUEST_ID,
    "loracle.v1.RecommendTopLoraRequest.prompt": PROMPT,
    "loracle.v1.RecommendTopLoraRequest.base_model": NAME,
    "loracle.v1.FilterConfidentRecommendationsRequest.request_id": REQUEST_ID,
    "loracle.v1.FilterConfidentRecommendationsRequest.recommendation_id": OUR_ID,
    "loracle.v1.GenerateImageRequest.request_id": REQUEST_ID,
    "loracle.v1.GenerationSpec.model": NAME,
    "loracle.v1.GenerationSpec.prompt": PROMPT,
    "loracle.v1.GenerationSpec.negative_prompt": PROMPT,
    "loracle.v1.GenerationSpec.scheduler": Limit(128, why="a scheduler name"),
    "loracle.v1.GenerationSpec.loras": Limit(
        items=64, why="LoRA choices; the handler applies `max_loras_per_request`"
    ),
    "loracle.v1.LoraSelection.lora": NAME,
    "loracle.v1.InputImage.data": Limit(
        16 * MIB, why="bytes of an input image; the handler applies `max_input_image_bytes`"
    ),
    "loracle.v1.InputImage.sha256": Limit(64, why="output only; ignored"),
    "loracle.v1.GeneratedImage.generation_id": OUR_ID,
    "loracle.v1.HiresFix.upscaler": NAME,
    "loracle.v1.GenerationSpec.controls": Limit(
        items=16, why="ControlNets; the handler applies its limit of 4"
    ),
    "loracle.v1.ControlInput.controlnet": NAME,
    "loracle.v1.UpscaleSpec.upscaler": Limit(512, why="output only; ignored"),
    "loracle.v1.UpscaleImageRequest.request_id": REQUEST_ID,
    "loracle.v1.UpscaleImageRequest.upscaler": NAME,
    "loracle.v1.QuickGenerateRequest.request_id": REQUEST_ID,
    "loracle.v1.QuickGenerateRequest.prompt": PROMPT,
    "loracle.v1.QuickGenerateRequest.model": NAME,
    "loracle.v1.SubmitGenerationRequest.request_id": REQUEST_ID,
    "loracle.v1.CancelGenerationRequest.request_id": REQUEST_ID,
    "loracle.v1.CancelGenerationRequest.generation_id": OUR_ID,
    # QueryService
    "loracle.v1.GetLoraRequest.id": OUR_ID,
    "loracle.v1.GetLoraRequest.consistency_token": TOKEN,
    "loracle.v1.ListLorasRequest.page_token": TOKEN,
    "loracle.v1.ListLorasRequest.base_model": NAME,
    "loracle.v1.ListLorasRequest.tag": TAG,
    "loracle.v1.ListLorasRequest.consistency_token": TOKEN,
    "loracle.v1.SearchLorasRequest.query": Limit(10_000, why="a prompt to search by"),
    "loracle.v1.SearchLorasRequest.base_model": NAME,
    "loracle.v1.SearchLorasRequest.page_token": TOKEN,
    "loracle.v1.SearchLorasRequest.consistency_token": TOKEN,
    "loracle.v1.GetGenerationRequest.id": OUR_ID,
    "loracle.v1.GetGenerationRequest.consistency_token": TOKEN,
    "loracle.v1.ListGenerationsRequest.page_token": TOKEN,
    "loracle.v1.ListGenerationsRequest.consistency_token": TOKEN,
    "loracle.v1.ListGenerationsRequest.owner": PRINCIPAL,
    "loracle.v1.WatchGenerationRequest.generation_id": OUR_ID,
    "loracle.v1.ListEventsRequest.page_token": TOKEN,
    "loracle.v1.ListEventsRequest.aggregate_id": FILTER,
    "loracle.v1.ListEventsRequest.type": FILTER,
    "loracle.v1.ListEventsRequest.principal": FILTER,
    "loracle.v1.ListEventsRequest.consistency_token": TOKEN,
}

# Prompt fields follow `max_prompt_chars` when it is set higher than the table: the edge
# must never refuse what the handler's rule allows.
PROMPT_FIELDS = frozenset(
    name for name, limit in FIELD_LIMITS.items() if limit is PROMPT or name.endswith(".query")
)
LORA_LISTS = frozenset({"loracle.v1.GenerationSpec.loras"})


def limits(max_prompt_chars: int = 0, max_loras_per_request: int = 0) -> dict[str, Limit]:
    """The table, with the prompt and LoRA-list entries raised to the handler settings when
    those are higher."""
    table = dict(FIELD_LIMITS)
    for name in PROMPT_FIELDS:
        size = table[name].size or 0
        if max_prompt_chars > size:
            table[name] = Limit(max_prompt_chars, table[name].items, table[name].why)
    for name in LORA_LISTS:
        items = table[name].items or 0
        if max_loras_per_request > items:
            table[name] = Limit(table[name].size, max_loras_per_request, table[name].why)
    return table


def _is_sized(field: FieldDescriptor) -> bool:
    return field.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES)


def bounded_fields(message: Descriptor, seen: frozenset[str] = frozenset()) -> Iterator[str]:
    """Full names of every field of `message` (recursively) that needs an entry: strings,
    bytes, repeated fields and maps (a map's key and value are checked as its entry's
    fields)."""
    if message.full_name in seen:
        return
    seen = seen | {message.full_name}
    for field in message.fields:
        if _is_sized(field) or field.is_repeated:
            yield field.full_name
        if field.message_type is not None:
            yield from bounded_fields(field.message_type, seen)


def request_types() -> dict[str, Descriptor]:
    """Each RPC's full method path and its input type, for both services."""
    out: dict[str, Descriptor] = {}
    for module in (command_service_pb2, query_service_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                out[f"/{service.full_name}/{method.name}"] = method.input_type
    return out


def limit_violations(message: Message, table: dict[str, Limit]) -> list[FieldViolation]:
    """Every set field of `message` (recursively) over its limit, named by its path
    (`records[3].name`). A field without an entry is unbounded (the unit test keeps that
    from happening for request types)."""
    out: list[FieldViolation] = []
    _walk(message, "", table, out)
    return out


_UNBOUNDED = Limit()


def _walk(
    message: Message, prefix: str, table: dict[str, Limit], out: list[FieldViolation]
) -> None:
    # A plain loop rather than nested generators: a 10,000-record catalog import has about
    # 100,000 set fields, and a generator per field cost more than the import's parsing.
    for field, value in message.ListFields():
        limit = table.get(field.full_name, _UNBOUNDED)
        entry = field.message_type
        if field.is_repeated:
            if limit.items is not None and len(value) > limit.items:
                path = f"{prefix}{field.name}"
                out.append(
                    FieldViolation(path, f"at most {limit.items:,} items, not {len(value):,}")
                )
                continue
            if entry is not None and entry.GetOptions().map_entry:
                for key, item in value.items():
                    _map_entry(entry, key, item, f"{prefix}{field.name}[{key!r}]", table, out)
            elif entry is not None:
                for index, item in enumerate(value):
                    _walk(item, f"{prefix}{field.name}[{index}].", table, out)
            elif limit.size is not None and _is_sized(field):
                for index, item in enumerate(value):
                    if len(item) > limit.size:
                        _too_long(field, f"{prefix}{field.name}[{index}]", limit, out)
        else:
            _item(field, value, f"{prefix}{field.name}", limit, table, out)


def _map_entry(
    entry: Descriptor,
    key: Any,
    value: Any,
    path: str,
    table: dict[str, Limit],
    out: list[FieldViolation],
) -> None:
    key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
    _item(key_field, key, path, table.get(key_field.full_name, _UNBOUNDED), table, out)
    value_limit = table.get(value_field.full_name, _UNBOUNDED)
    _item(value_field, value, path, value_limit, table, out)


def _item(
    field: FieldDescriptor,
    value: Any,
    path: str,
    limit: Limit,
    table: dict[str, Limit],
    out: list[FieldViolation],
) -> None:
    if field.message_type is not None and isinstance(value, Message):
        _walk(value, f"{path}.", table, out)
    elif _is_sized(field) and limit.size is not None and len(value) > limit.size:
        _too_long(field, path, limit, out)


def _too_long(field: FieldDescriptor, path: str, limit: Limit, out: list[FieldViolation]) -> None:
    unit = "characters" if field.type == FieldDescriptor.TYPE_STRING else "bytes"
    out.append(FieldViolation(path, f"at most {limit.size:,} {unit}"))


def limit_table() -> str:
    """README's table of field limits (`python -m server.rpc.field_limits`)."""
    rows = ["| Field | At most | What |", "|---|---|---|"]
    for name, limit in FIELD_LIMITS.items():
        parts = []
        if limit.size is not None:
            parts.append(f"{limit.size:,} {'bytes' if 'bytes' in limit.why else 'characters'}")
        if limit.items is not None:
            parts.append(f"{limit.items:,} items")
        rows.append(f"| `{name.removeprefix('loracle.v1.')}` | {', '.join(parts)} | {limit.why} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(limit_table())
