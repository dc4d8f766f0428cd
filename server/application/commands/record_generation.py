"""Records a finished generation's prompt and LoRAs so recommendations learn from use. The
generation executor dispatches it; `make eval-recommend HISTORY=...` replays real history."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from server.application.commands.base import CommandResult, ICommand, ICommandHandler
from server.application.commands.idempotency import replay, save_answered
from server.application.context import current_context
from server.application.ports import CatalogRepository
from server.domain.errors import FieldViolation
from server.domain.models import is_uuid
from server.domain.recommendation import PastGeneration


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordGenerationCommand(ICommand[str]):
    prompt: str
    lora_ids: tuple[str, ...]
    # Identifies the generation, so recording it twice records it once.
    generation_key: str = ""


class RecordGenerationHandler(ICommandHandler[RecordGenerationCommand, str]):
    def __init__(self, catalog: CatalogRepository) -> None:
        self._catalog = catalog

    def handle(self, command: RecordGenerationCommand) -> CommandResult[str]:
        if not command.prompt.strip():
            return CommandResult.validation_error(FieldViolation("prompt", "must not be empty"))
        bad = [i for i in command.lora_ids if not is_uuid(i)]
        if bad:
            return CommandResult.validation_error(
                FieldViolation("lora_ids", f"not LoRA ids: {', '.join(bad[:3])}")
            )
        previous = replay(self._catalog, command)
        if previous is not None:
            return CommandResult.success(str(previous.result["id"]), position=previous.position)
        key = command.generation_key or str(uuid.uuid4())
        if self._catalog.get(PastGeneration.create_id(key)) is not None:
            return CommandResult.success(
                str(PastGeneration.create_id(key)), position=self._catalog.max_position()
            )
        ctx = current_context()
        past = PastGeneration(
            key=key,
            prompt=command.prompt,
            lora_ids=list(command.lora_ids),
            principal=ctx.principal,
            request_id=ctx.request_id,
        )
        position = save_answered(self._catalog, command, {"id": str(past.id)}, [past])
        return CommandResult.success(str(past.id), position=position)
