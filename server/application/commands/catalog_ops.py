"""Shared by RegisterLora and ImportLoras: how a scanned file enters the catalog."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass

from server.application.context import current_context
from server.application.ports import CatalogRepository, LoraReadModel
from server.domain.lora import Lora, file_to_dict, lora_id_for_file, metadata_to_dict
from server.domain.models import LoraSource, ScannedLora


class FileOutcome(enum.Enum):
    REGISTERED = "REGISTERED"
    UPDATED = "UPDATED"
    UNCHANGED = "UNCHANGED"


@dataclass(frozen=True, slots=True)
class FileChange:
    lora: Lora
    outcome: FileOutcome

    @property
    def changed(self) -> bool:
        return self.outcome is not FileOutcome.UNCHANGED


def upsert_file(
    scanned: ScannedLora,
    catalog: CatalogRepository,
    read_model: LoraReadModel,
    *,
    path_owner: str | None,
) -> FileChange:
    """Decides what a scanned file means for the catalog; the caller saves `lora`.

    `path_owner` is the id of the LoRA currently catalogued at the same path (a changed file
    keeps its LoRA's id). Otherwise identical content maps to one LoRA, whatever its path."""
    ctx = current_context()
    metadata = metadata_to_dict(scanned.metadata)
    file = file_to_dict(scanned.file)
    if path_owner is not None:
        owner = catalog.get_lora(uuid.UUID(path_owner))
        if owner is not None:
            return _refresh(owner, metadata, file, ctx.principal, ctx.request_id)
    existing = catalog.get_lora(lora_id_for_file(scanned.file.sha256))
    if existing is not None:
        if existing.available and not existing.deleted:
            # Same bytes already catalogued at another, still present path: one LoRA.
            return FileChange(existing, FileOutcome.UNCHANGED)
        return _refresh(existing, metadata, file, ctx.principal, ctx.request_id)
    lora = Lora(
        key=f"sha256:{scanned.file.sha256}",
        source=LoraSource.FILE.value,
        source_id="",
        metadata=metadata,
        file=file,
        principal=ctx.principal,
        request_id=ctx.request_id,
    )
    return FileChange(lora, FileOutcome.REGISTERED)


def _refresh(
    lora: Lora,
    metadata: dict[str, object],
    file: dict[str, object],
    principal: str,
    request_id: str,
) -> FileChange:
    if lora.available and not lora.deleted and lora.file == file and lora.metadata == metadata:
        return FileChange(lora, FileOutcome.UNCHANGED)
    lora.change_file(metadata=metadata, file=file, principal=principal, request_id=request_id)
    return FileChange(lora, FileOutcome.UPDATED)
