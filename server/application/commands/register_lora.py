from __future__ import annotations

import uuid
from dataclasses import dataclass

from server.application.commands.answers import lora_from_dict, lora_to_dict
from server.application.commands.base import CommandResult, ICommand, ICommandHandler
from server.application.commands.catalog_ops import FileOutcome, upsert_file
from server.application.commands.idempotency import Replay, replay, save_answered
from server.application.ports import CatalogRepository, Consistency, LoraFiles, LoraReadModel
from server.domain.errors import BadLoraFileError, FieldViolation, NotFoundError
from server.domain.models import LoraView


@dataclass(frozen=True, slots=True)
class RegisterLoRAResult:
    lora: LoraView
    created: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class RegisterLoRACommand(ICommand[RegisterLoRAResult]):
    path: str


class RegisterLoRAHandler(ICommandHandler[RegisterLoRACommand, RegisterLoRAResult]):
    def __init__(
        self,
        files: LoraFiles,
        catalog: CatalogRepository,
        read_model: LoraReadModel,
        consistency: Consistency,
    ) -> None:
        self._files = files
        self._catalog = catalog
        self._read_model = read_model
        self._consistency = consistency

    def handle(self, command: RegisterLoRACommand) -> CommandResult[RegisterLoRAResult]:
        previous = replay(self._catalog, command)
        if previous is not None:
            return self._replay(previous)
        try:
            scanned = self._files.read(command.path)
        except BadLoraFileError as exc:
            return CommandResult.validation_error(FieldViolation("path", exc.message))
        # Path ownership comes from the read model: make sure it has seen every write.
        self._consistency.wait_for(self._catalog.max_position(), None)
        owner = self._read_model.find_by_path(scanned.file.path)
        change = upsert_file(
            scanned, self._catalog, self._read_model, path_owner=owner.id if owner else None
        )
        created = change.outcome is FileOutcome.REGISTERED
        view = change.lora.view()
        position = save_answered(
            self._catalog,
            command,
            {"lora_id": view.id, "created": created, "lora": lora_to_dict(view)},
            [change.lora] if change.changed else [],
        )
        return CommandResult.success(RegisterLoRAResult(view, created), position=position)

    def _replay(self, previous: Replay) -> CommandResult[RegisterLoRAResult]:
        stored = previous.result
        if "lora" in stored:
            view = lora_from_dict(stored["lora"])
        else:  # a record of an earlier version: it kept the id only
            lora = self._catalog.get_lora(uuid.UUID(str(stored["lora_id"])))
            if lora is None:
                raise NotFoundError("lora", str(stored["lora_id"]))
            view = lora.view()
        return CommandResult.success(
            RegisterLoRAResult(view, bool(stored["created"])), position=previous.position
        )
