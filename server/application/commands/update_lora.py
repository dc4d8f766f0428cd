from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from server.application.commands.answers import lora_from_dict, lora_to_dict
from server.application.commands.base import CommandResult, ICommand, ICommandHandler
from server.application.commands.idempotency import replay, save_answered
from server.application.context import current_context
from server.application.ports import CatalogRepository
from server.domain.errors import FieldViolation
from server.domain.lora import EDITABLE_FIELDS, Lora
from server.domain.models import LoraView, clean_terms

MAX_WEIGHT = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateLoRACommand(ICommand[LoraView]):
    lora_id: str
    # Only the fields to change, keyed by the names in EDITABLE_FIELDS.
    changes: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class DeleteLoRACommand(ICommand[None]):
    lora_id: str


def parse_lora_id(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


class UpdateLoRAHandler(ICommandHandler[UpdateLoRACommand, LoraView]):
    def __init__(self, catalog: CatalogRepository) -> None:
        self._catalog = catalog

    def handle(self, command: UpdateLoRACommand) -> CommandResult[LoraView]:
        violations = _validate(command)
        if violations:
            return CommandResult.validation_error(violations)
        previous = replay(self._catalog, command)
        if previous is not None and "lora" in previous.result:
            # The first answer, even if the LoRA changed or was deleted since.
            return CommandResult.success(
                lora_from_dict(previous.result["lora"]), position=previous.position
            )
        lora = self._existing(command.lora_id)
        if lora is None:
            return CommandResult.not_found("lora", command.lora_id)
        if previous is not None:  # a record of an earlier version: it kept the id only
            return CommandResult.success(lora.view(), position=previous.position)
        changes = _normalise(command.changes)
        pending: list[Any] = []
        if {k: lora.metadata.get(k) for k in changes} != changes:
            ctx = current_context()
            lora.edit(changes=changes, principal=ctx.principal, request_id=ctx.request_id)
            pending.append(lora)
        view = lora.view()
        position = save_answered(
            self._catalog, command, {"lora_id": view.id, "lora": lora_to_dict(view)}, pending
        )
        return CommandResult.success(view, position=position)

    def _existing(self, lora_id: str) -> Lora | None:
        parsed = parse_lora_id(lora_id)
        lora = self._catalog.get_lora(parsed) if parsed else None
        return None if lora is None or lora.deleted else lora


class DeleteLoRAHandler(ICommandHandler[DeleteLoRACommand, None]):
    def __init__(self, catalog: CatalogRepository) -> None:
        self._catalog = catalog

    def handle(self, command: DeleteLoRACommand) -> CommandResult[None]:
        parsed = parse_lora_id(command.lora_id)
        if parsed is None:
            return CommandResult.validation_error(FieldViolation("id", "must be a LoRA id (UUID)"))
        previous = replay(self._catalog, command)
        if previous is not None:
            return CommandResult.success(None, position=previous.position)
        lora = self._catalog.get_lora(parsed)
        if lora is None or lora.deleted:
            return CommandResult.not_found("lora", command.lora_id)
        ctx = current_context()
        lora.delete(principal=ctx.principal, request_id=ctx.request_id)
        position = save_answered(self._catalog, command, {"lora_id": str(lora.id)}, [lora])
        return CommandResult.success(None, position=position)


def _validate(command: UpdateLoRACommand) -> list[FieldViolation]:
    out: list[FieldViolation] = []
    if parse_lora_id(command.lora_id) is None:
        out.append(FieldViolation("lora.id", "must be a LoRA id (UUID)"))
    if not command.changes:
        out.append(FieldViolation("update_mask", "name at least one field to change"))
    for key, value in command.changes.items():
        where = f"lora.{key}"
        if key not in EDITABLE_FIELDS:
            out.append(
                FieldViolation(
                    "update_mask",
                    f"{key!r} cannot be changed; editable: {', '.join(sorted(EDITABLE_FIELDS))}",
                )
            )
        elif key == "name" and (
            not isinstance(value, str) or not value.strip() or len(value) > 512
        ):
            out.append(FieldViolation(where, "must be 1 to 512 characters"))
        elif key == "description" and (not isinstance(value, str) or len(value) > 20_000):
            out.append(FieldViolation(where, "must be at most 20000 characters"))
        elif key in ("tags", "trigger_words") and (
            not isinstance(value, list | tuple)
            or len(value) > 500
            or not all(isinstance(v, str) and len(v) <= 256 for v in value)
        ):
            out.append(FieldViolation(where, "at most 500 strings of at most 256 characters"))
        elif (
            key == "preferred_weight"
            and value is not None
            and (
                not isinstance(value, int | float)
                or not math.isfinite(value)
                or abs(value) > MAX_WEIGHT
            )
        ):
            out.append(FieldViolation(where, f"must be a number in [-{MAX_WEIGHT}, {MAX_WEIGHT}]"))
    return out


def _normalise(changes: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in changes.items():
        if key in ("tags", "trigger_words"):
            out[key] = list(clean_terms(value))
        elif isinstance(value, str):
            out[key] = value.strip()
        elif key == "preferred_weight":
            out[key] = None if value is None else float(value)
        else:
            out[key] = value
    return out
