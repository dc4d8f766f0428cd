"""Recommendation commands. The engine behind them (the Recommender port) arrives with the
recommendation issue; until one is wired in, the bus answers UNIMPLEMENTED for these."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from server.application.commands.base import CommandResult, ICommand, ICommandHandler
from server.domain.errors import FieldViolation
from server.domain.models import LoraView


@dataclass(frozen=True, slots=True)
class LoRARecommendation:
    lora: LoraView
    confidence: float
    weight: float
    trigger_words: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()


class Recommender(Protocol):
    def recommend(
        self,
        prompt: str,
        base_model: str,
        *,
        max_loras: int,
        min_confidence: float | None,
        include_unavailable: bool,
    ) -> list[LoRARecommendation]: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class RecommendLoRAsCommand(ICommand[list[LoRARecommendation]]):
    prompt: str
    base_model: str
    max_loras: int = 3
    min_confidence: float | None = None
    include_unavailable: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class RecommendTopLoRACommand(ICommand[LoRARecommendation | None]):
    prompt: str
    base_model: str
    min_confidence: float | None = None
    include_unavailable: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class FilterConfidentRecommendationsCommand(ICommand[list[LoRARecommendation]]):
    recommendation_id: str
    min_confidence: float


def _validate(
    prompt: str, base_model: str, max_loras: int, min_confidence: float | None
) -> list[FieldViolation]:
    out = []
    if not prompt.strip():
        out.append(FieldViolation("prompt", "must not be empty"))
    if not base_model.strip():
        out.append(FieldViolation("base_model", "must not be empty"))
    if not 1 <= max_loras <= 20:
        out.append(FieldViolation("max_loras", "must be between 1 and 20"))
    if min_confidence is not None and not 0.0 <= min_confidence <= 1.0:
        out.append(FieldViolation("min_confidence", "must be in [0, 1]"))
    return out


class RecommendLoRAsHandler(ICommandHandler[RecommendLoRAsCommand, list[LoRARecommendation]]):
    def __init__(self, recommender: Recommender) -> None:
        self._recommender = recommender

    def handle(self, command: RecommendLoRAsCommand) -> CommandResult[list[LoRARecommendation]]:
        violations = _validate(
            command.prompt, command.base_model, command.max_loras, command.min_confidence
        )
        if violations:
            return CommandResult.validation_error(violations)
        return CommandResult.success(
            self._recommender.recommend(
                command.prompt,
                command.base_model,
                max_loras=command.max_loras,
                min_confidence=command.min_confidence,
                include_unavailable=command.include_unavailable,
            )
        )


class RecommendTopLoRAHandler(ICommandHandler[RecommendTopLoRACommand, LoRARecommendation | None]):
    def __init__(self, recommender: Recommender) -> None:
        self._recommender = recommender

    def handle(self, command: RecommendTopLoRACommand) -> CommandResult[LoRARecommendation | None]:
        violations = _validate(command.prompt, command.base_model, 1, command.min_confidence)
        if violations:
            return CommandResult.validation_error(violations)
        found = self._recommender.recommend(
            command.prompt,
            command.base_model,
            max_loras=1,
            min_confidence=command.min_confidence,
            include_unavailable=command.include_unavailable,
        )
        return CommandResult.success(found[0] if found else None)
