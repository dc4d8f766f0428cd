"""Request-id idempotency: a retried command returns the first answer and writes nothing twice.

Keys are per principal: a `request_id` another principal already used is a new request."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from eventsourcing.domain import Aggregate

from server.application.context import current_context
from server.application.ports import CatalogRepository
from server.domain.errors import DomainError, FieldViolation, Reason, ValidationError
from server.domain.lora import CommandRecord

log = logging.getLogger("loracle.idempotency")

MAX_REQUEST_ID_LENGTH = 128


@dataclass(frozen=True, slots=True)
class Replay:
    """What the first call of a request answered: its stored result and the log position
    its consistency token carried (today's position for a record that does not know it)."""

    result: dict[str, Any]
    position: int


def fingerprint(command: object) -> str:
    payload = _plain(command) if is_dataclass(command) and not isinstance(command, type) else {}
    text = json.dumps([type(command).__name__, payload], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}
_SCALARS = frozenset({str, int, float, bool, type(None)})


def _plain(value: Any) -> Any:
    """What `dataclasses.asdict` gives, as JSON writes it (the stored fingerprints were made
    with it), without its deep copies: a 2,000-record import in a third of the time."""
    if type(value) in _SCALARS:
        return value
    if is_dataclass(value) and not isinstance(value, type):
        names = _FIELD_NAMES.get(type(value))
        if names is None:
            names = _FIELD_NAMES[type(value)] = tuple(f.name for f in fields(value))
        return {name: _plain(getattr(value, name)) for name in names}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    return value


def request_id() -> str:
    rid = current_context().request_id
    if len(rid) > MAX_REQUEST_ID_LENGTH:
        raise ValidationError(
            FieldViolation("request_id", f"at most {MAX_REQUEST_ID_LENGTH} characters")
        )
    return rid


def replay(catalog: CatalogRepository, command: object) -> Replay | None:
    """The first answer of an earlier call of this principal with this request_id, if any.
    Reusing an id for a different request is refused: silently returning the other result
    would lie."""
    rid = request_id()
    if not rid:
        return None
    record = catalog.find_command(current_context().principal, rid)
    if record is None:
        return None
    if record.fingerprint != fingerprint(command):
        raise ValidationError(
            FieldViolation(
                "request_id", f"already used for a different request ({record.command})"
            ),
            reason=Reason.IDEMPOTENCY_KEY_REUSED,
        )
    position = int(getattr(record, "position", 0)) or catalog.max_position()
    return Replay(dict(record.result), position)


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


def save_answered(
    catalog: CatalogRepository,
    command: object,
    result: dict[str, Any],
    aggregates: Sequence[Aggregate] = (),
) -> int:
    """Saves the command's aggregates with its record in one transaction, then the record's
    position; returns that position, the one the answer (and every retry) carries."""
    record = record_for(command, result)
    pending = [*aggregates, *([record] if record is not None else [])]
    position = catalog.save(*pending) if pending else catalog.max_position()
    if record is not None:
        note_answer(catalog, record, position)
    return position


def note_answer(catalog: CatalogRepository, record: CommandRecord | None, position: int) -> None:
    """Records the first answer's log position on its saved record. Best effort: the command
    is done either way, and a retry of a record without it carries today's position."""
    if record is None:
        return
    record.answered(position=position)
    try:
        catalog.save(record)
    except DomainError as exc:
        log.warning("could not record the answer position of %s: %s", record.request_id, exc)
