"""The LoRA aggregate. Its events are the catalog's source of truth and its audit trail; every
event carries the principal and request_id of the command that caused it."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

from eventsourcing.domain import Aggregate, event

from server.domain.models import (
    BaseModelRef,
    LoraFile,
    LoraKind,
    LoraMetadata,
    LoraSource,
    LoraView,
    aware,
)

NAMESPACE = uuid.UUID("6f1b0d3e-54a4-4f0e-9d55-6c8f4a1d2b7e")

EDITABLE_FIELDS = frozenset({"name", "trigger_words", "tags", "description", "preferred_weight"})


def lora_id_for_file(sha256: str) -> uuid.UUID:
    """Identical content registered twice, even concurrently, maps to one aggregate."""
    return uuid.uuid5(NAMESPACE, f"sha256:{sha256}")


def lora_id_for_source(source_id: str) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, f"source:{source_id}")


def metadata_to_dict(m: LoraMetadata) -> dict[str, Any]:
    """The metadata as events carry it. `kind` only for embeddings, so a LoRA's metadata is
    what it was before kinds existed (re-reading an old LoRA is not a change)."""
    out: dict[str, Any] = {
        "name": m.name,
        "architecture": m.base_model.architecture.value,
        "lineage": m.base_model.lineage,
        "file_name": m.file_name,
        "trigger_words": list(m.trigger_words),
        "tags": list(m.tags),
        "description": m.description,
        "preferred_weight": m.preferred_weight,
        "training_tags": [[t, c] for t, c in m.training_tags],
        "rank": m.rank,
        "downloads": m.downloads,
    }
    if m.kind is not LoraKind.LORA:
        out["kind"] = m.kind.value
    return out


def metadata_from_dict(d: dict[str, Any]) -> LoraMetadata:
    from server.domain.models import Architecture

    weight = d.get("preferred_weight")
    return LoraMetadata(
        name=str(d.get("name", "")),
        base_model=BaseModelRef(
            Architecture(d.get("architecture", "UNSPECIFIED")), str(d.get("lineage", ""))
        ),
        file_name=str(d.get("file_name", "")),
        trigger_words=tuple(d.get("trigger_words", ())),
        tags=tuple(d.get("tags", ())),
        description=str(d.get("description", "")),
        preferred_weight=None if weight is None else float(weight),
        training_tags=tuple((str(t), int(c)) for t, c in d.get("training_tags", ())),
        rank=int(d.get("rank", 0)),
        downloads=int(d.get("downloads", 0)),
        # Events from before kinds were recorded are all LoRAs.
        kind=LoraKind(d.get("kind", LoraKind.LORA.value)),
    )


def file_to_dict(f: LoraFile) -> dict[str, Any]:
    return {
        "path": f.path,
        "size_bytes": f.size_bytes,
        "sha256": f.sha256,
        "modified_time": f.modified_time.isoformat(),
    }


def file_from_dict(d: dict[str, Any]) -> LoraFile:
    return LoraFile(
        path=str(d["path"]),
        size_bytes=int(d["size_bytes"]),
        sha256=str(d["sha256"]),
        modified_time=datetime.fromisoformat(str(d["modified_time"])),
    )


class Lora(Aggregate):
    """A catalog entry: a file-backed LoRA or a metadata-only record."""

    @staticmethod
    def create_id(key: str) -> uuid.UUID:
        return uuid.uuid5(NAMESPACE, key)

    @event("Registered")
    def __init__(
        self,
        key: str,
        source: str,
        source_id: str,
        metadata: dict[str, Any],
        file: dict[str, Any] | None,
        principal: str,
        request_id: str,
    ) -> None:
        self.key = key
        self.source = source
        self.source_id = source_id
        self.metadata = metadata
        self.file = file
        self.available = file is not None
        self.deleted = False

    @event("FileChanged")
    def change_file(
        self, metadata: dict[str, Any], file: dict[str, Any], principal: str, request_id: str
    ) -> None:
        """The file at the LoRA's path changed, or a missing file came back."""
        self.metadata = metadata
        self.file = file
        self.available = True
        self.deleted = False

    @event("RecordUpdated")
    def update_record(self, metadata: dict[str, Any], principal: str, request_id: str) -> None:
        """New metadata from the source; also brings back a deleted record."""
        self.metadata = metadata
        self.deleted = False

    @event("Edited")
    def edit(self, changes: dict[str, Any], principal: str, request_id: str) -> None:
        self.metadata = {**self.metadata, **changes}

    @event("MarkedUnavailable")
    def mark_unavailable(self, reason: str, principal: str, request_id: str) -> None:
        self.available = False

    @event("Deleted")
    def delete(self, principal: str, request_id: str) -> None:
        self.deleted = True
        self.available = False

    def view(self) -> LoraView:
        return LoraView(
            id=str(self.id),
            metadata=metadata_from_dict(self.metadata),
            source=LoraSource(self.source),
            source_id=self.source_id,
            file=None if self.file is None else file_from_dict(self.file),
            available=self.available,
            create_time=aware(self.created_on),
            update_time=aware(self.modified_on),
            version=self.version,
        )


def command_record_id(principal: str, request_id: str) -> uuid.UUID:
    """Idempotency keys are per principal: another caller's `request_id` is its own request.
    JSON keeps the pair unambiguous whatever characters either holds."""
    return uuid.uuid5(NAMESPACE, "request:" + json.dumps([principal, request_id]))


def legacy_command_record_id(request_id: str) -> uuid.UUID:
    """The key of records stored before keys were per principal (request_id alone)."""
    return uuid.uuid5(NAMESPACE, f"request:{request_id}")


class CommandRecord(Aggregate):
    """Remembers a command's answer under (principal, request_id). Saved in the same
    transaction as the command's events, so a retry either finds both or neither; `result`
    holds what the first answer said, and `position` (recorded just after, see `answered`)
    the log position its consistency token carried (0: not known, a record of an earlier
    version or one whose answer was interrupted)."""

    @staticmethod
    def create_id(principal: str, request_id: str) -> uuid.UUID:
        return command_record_id(principal, request_id)

    @event("Recorded")
    def __init__(
        self,
        request_id: str,
        command: str,
        fingerprint: str,
        result: dict[str, Any],
        principal: str,
    ) -> None:
        self.request_id = request_id
        self.command = command
        self.fingerprint = fingerprint
        self.result = result
        self.principal = principal
        self.position = 0

    @event("Answered")
    def answered(self, position: int) -> None:
        """The position of the first answer: only known once the Recorded event is saved."""
        self.position = position
