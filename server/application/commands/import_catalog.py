"""ImportLoraCatalog: metadata records without files, matched on source_id. A batch is saved
in one transaction with its request record, so a retried batch writes nothing twice.

A batch costs a few queries whatever its size: the current versions of its LoRAs from the event
store, their metadata from the read model, and the events of only those LoRAs that may change
(new metadata, a deleted record, or a read model that has not caught up with the store): a
record the read model shows at the store's version with the same metadata is unchanged without
rebuilding its aggregate."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from server.application.commands.base import CommandResult, ICommand, ICommandHandler
from server.application.commands.idempotency import replay, save_answered
from server.application.context import current_context
from server.application.ports import CatalogRepository, LoraReadModel
from server.domain.errors import FieldViolation
from server.domain.lora import Lora, lora_id_for_source, metadata_to_dict
from server.domain.models import BaseModelRef, LoraMetadata, LoraSource, clean_terms

MAX_RECORDS_PER_BATCH = 10_000
MAX_TEXT = 20_000
MAX_ITEMS = 500


@dataclass(frozen=True, slots=True, kw_only=True)
class CatalogRecordInput:
    source_id: str
    name: str
    base_model: str = ""
    tags: tuple[str, ...] = ()
    trigger_words: tuple[str, ...] = ()
    file_name: str = ""
    description: str = ""
    downloads: int = 0


def catalog_record_from_json(row: Mapping[str, Any]) -> CatalogRecordInput:
    """One object of the JSON Lines catalog format (null fields read as empty)."""
    return CatalogRecordInput(
        source_id=str(row.get("source_id") or ""),
        name=str(row.get("name") or ""),
        base_model=str(row.get("base_model") or ""),
        tags=tuple(row.get("tags") or ()),
        trigger_words=tuple(row.get("trigger_words") or ()),
        file_name=str(row.get("file_name") or ""),
        description=str(row.get("description") or ""),
        downloads=int(row.get("downloads") or 0),
    )


@dataclass(frozen=True, slots=True)
class RecordError:
    index: int
    source_id: str
    error: str


@dataclass(frozen=True, slots=True)
class ImportCatalogResult:
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    errors: tuple[RecordError, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ImportLoRACatalogCommand(ICommand[ImportCatalogResult]):
    records: tuple[CatalogRecordInput, ...]


class ImportLoRACatalogHandler(ICommandHandler[ImportLoRACatalogCommand, ImportCatalogResult]):
    def __init__(self, catalog: CatalogRepository, read_model: LoraReadModel) -> None:
        self._catalog = catalog
        self._read_model = read_model

    def handle(self, command: ImportLoRACatalogCommand) -> CommandResult[ImportCatalogResult]:
        if len(command.records) > MAX_RECORDS_PER_BATCH:
            return CommandResult.validation_error(
                FieldViolation("records", f"at most {MAX_RECORDS_PER_BATCH} records per request")
            )
        previous = replay(self._catalog, command)
        if previous is not None:
            return CommandResult.success(_result_from(previous.result), position=previous.position)
        ctx = current_context()
        pending: dict[uuid.UUID, Lora] = {}
        created = updated = unchanged = 0
        errors: list[RecordError] = []
        valid: list[tuple[CatalogRecordInput, uuid.UUID, dict[str, Any]]] = []
        for index, record in enumerate(command.records):
            problem = _problem(record)
            if problem:
                errors.append(RecordError(index, record.source_id, problem))
            else:
                metadata = metadata_to_dict(metadata_from_record(record))
                valid.append((record, lora_id_for_source(record.source_id), metadata))
        current = self._current_metadata([lora_id for _, lora_id, _ in valid])
        # Only LoRAs that may change are rebuilt, in a few queries rather than one each.
        existing = self._catalog.get_loras(
            lora_id
            for _, lora_id, metadata in valid
            if lora_id in current and current[lora_id] != metadata
        )
        for record, lora_id, metadata in valid:
            lora = pending.get(lora_id)
            if lora is None and current.get(lora_id, _UNKNOWN) == metadata:
                unchanged += 1
                continue
            lora = lora or existing.get(lora_id)
            if lora is None:
                lora = Lora(
                    key=f"source:{record.source_id}",
                    source=LoraSource.CATALOG.value,
                    source_id=record.source_id,
                    metadata=metadata,
                    file=None,
                    principal=ctx.principal,
                    request_id=ctx.request_id,
                )
                created += 1
            elif lora.metadata == metadata and not lora.deleted:
                unchanged += 1
                continue
            else:
                lora.update_record(
                    metadata=metadata, principal=ctx.principal, request_id=ctx.request_id
                )
                updated += 1
            pending[lora_id] = lora
        result = ImportCatalogResult(created, updated, unchanged, tuple(errors))
        position = save_answered(self._catalog, command, _result_dict(result), [*pending.values()])
        return CommandResult.success(result, position=position)

    def _current_metadata(self, lora_ids: list[uuid.UUID]) -> dict[uuid.UUID, object]:
        """Each existing LoRA's metadata where the read model shows it at the version the
        store holds (so it is the aggregate's), and _UNKNOWN for the other existing ones (a
        deleted record, or a read model that lags behind)."""
        versions = self._catalog.versions(lora_ids)
        if not versions:
            return {}
        shown = self._read_model.lora_metadata([str(i) for i in versions])
        out: dict[uuid.UUID, object] = {}
        for lora_id, version in versions.items():
            view = shown.get(str(lora_id))
            out[lora_id] = view[1] if view is not None and view[0] == version else _UNKNOWN
        return out


# Compares unequal to any metadata: the aggregate must be read to know.
_UNKNOWN = object()


def _problem(record: CatalogRecordInput) -> str:
    if not record.source_id.strip():
        return "source_id: must not be empty"
    if len(record.source_id) > 256:
        return "source_id: at most 256 characters"
    if not record.name.strip():
        return "name: must not be empty"
    if len(record.name) > 512 or len(record.file_name) > 512:
        return "name and file_name: at most 512 characters"
    if len(record.description) > MAX_TEXT:
        return f"description: at most {MAX_TEXT} characters"
    if len(record.tags) > MAX_ITEMS or len(record.trigger_words) > MAX_ITEMS:
        return f"tags and trigger_words: at most {MAX_ITEMS} each"
    if record.downloads < 0:
        return "downloads: must not be negative"
    return ""


def metadata_from_record(record: CatalogRecordInput) -> LoraMetadata:
    return LoraMetadata(
        name=record.name.strip(),
        base_model=BaseModelRef.parse(record.base_model),
        file_name=record.file_name.strip(),
        trigger_words=clean_terms(record.trigger_words),
        tags=clean_terms(record.tags),
        description=record.description.strip(),
        downloads=record.downloads,
    )


def _result_dict(result: ImportCatalogResult) -> dict[str, object]:
    return {
        "created": result.created,
        "updated": result.updated,
        "unchanged": result.unchanged,
        "errors": [[e.index, e.source_id, e.error] for e in result.errors],
    }


def _result_from(d: dict[str, object]) -> ImportCatalogResult:
    errors = d.get("errors", [])
    assert isinstance(errors, list)
    return ImportCatalogResult(
        int(str(d["created"])),
        int(str(d["updated"])),
        int(str(d["unchanged"])),
        tuple(RecordError(int(i), str(s), str(e)) for i, s, e in errors),
    )
