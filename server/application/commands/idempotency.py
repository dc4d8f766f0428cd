"""Request-id idempotency: a retried command returns the first result and writes nothing twice."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, is_dataclass
from typing import Any

from server.application.context import current_context
from server.application.ports import CatalogRepository
from server.domain.errors import FieldViolation, Reason, ValidationError
from server.domain.lora import CommandRecord

MAX_REQUEST_ID_LENGTH = 128


def fingerprint(command: object) -> str:
    payload = asdict(command) if is_dataclass(command) and not isinstance(command, type) else {}
    text = json.dumps([type(command).__name__, payload], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def request_id() -> str:
    rid = current_context().request_id
    if len(rid) > MAX_REQUEST_ID_LENGTH:
        raise ValidationError(
            FieldViolation("request_id", f"at most {MAX_REQUEST_ID_LENGTH} characters")
        )
    return rid


def previous_result(catalog: CatalogRepository, command: object) -> dict[str, Any] | None:
    """The stored result of an earlier command with this request_id, if any. Reusing an id
    for a different request is refused: silently returning the other result would lie."""
    rid = request_id()
    if not rid:
        return None
    record = catalog.find_command(rid)
    if record is None:
        return None
    if record.fingerprint != fingerprint(command):
        raise ValidationError(
            FieldViolation(
                "request_id", f"already used for a different request ({record.command})"
            ),
            reason=Reason.IDEMPOTENCY_KEY_REUSED,
        )
    return dict(record.result)


def record_for(command: object, result: dict[str, Any]) -> CommandRecord | None:
    """The record to save with the command's events (None when the client sent no id)."""
    rid = request_id()
    if not rid:
        return None
    return CommandRecord(
        request_id=rid,
        command=type(command).__name__,
        fingerprint=fingerprint(command),
        result=result,
        principal=current_context().principal,
    )
