"""Recommendation commands. Recommending is a command because it records what was
recommended, for whom and for which prompt (a `Recommendation` event)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from server.application.commands.answers import recommendation_from_dict, recommendation_to_dict
from server.application.commands.base import CommandResult, ICommand, ICommandHandler
from server.application.commands.idempotency import Replay, replay, save_answered
from server.application.context import current_context
from server.application.ports import CatalogRepository, LoraReadModel, Recommender
from server.domain.errors import FieldViolation, NotFoundError
from server.domain.models import LoraView
from server.domain.recommendation import LoRARecommendation, Recommendation

__all__ = [
    "FilterConfidentRecommendationsCommand",
    "FilterConfidentRecommendationsHandler",
    "LoRARecommendation",
    "RecommendLoRAsCommand",
    "RecommendLoRAsHandler",
    "RecommendTopLoRACommand",
    "RecommendTopLoRAHandler",
    "RecommendationSet",
    "Recommender",
    "TopRecommendation",
]

DEFAULT_TOP_CONFIDENCE = 0.5


@dataclass(frozen=True, slots=True)
class RecommendationSet:
    """Recommendations, best first, and the id they were recorded under ("" when the handler
    has no store to record to). Iterates like the list the seed API returned."""

    recommendation_id: str
    recommendations: tuple[LoRARecommendation, ...]

    def __len__(self) -> int:
        return len(self.recommendations)

    def __iter__(self) -> Iterator[LoRARecommendation]:
        return iter(self.recommendations)

    def __getitem__(self, index: int) -> LoRARecommendation:
        return self.recommendations[index]


@dataclass(frozen=True, slots=True)
class TopRecommendation:
    recommendation_id: str
    recommendation: LoRARecommendation | None
    none_reason: str = ""

    @property
    def lora(self) -> LoraView | None:
        return None if self.recommendation is None else self.recommendation.lora

    @property
    def confidence(self) -> float:
        return 0.0 if self.recommendation is None else self.recommendation.confidence


@dataclass(frozen=True, slots=True, kw_only=True)
class RecommendLoRAsCommand(ICommand[RecommendationSet]):
    prompt: str
    base_model: str
    max_loras: int = 3
    min_confidence: float | None = None
    include_unavailable: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class RecommendTopLoRACommand(ICommand[TopRecommendation]):
    prompt: str
    base_model: str
    min_confidence: float | None = None
    include_unavailable: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class FilterConfidentRecommendationsCommand(ICommand[RecommendationSet]):
    recommendation_id: str
    min_confidence: float


MAX_PROMPT = 10_000


def _validate(
    prompt: str, base_model: str, max_loras: int, min_confidence: float | None
) -> list[FieldViolation]:
    out = []
    if not prompt.strip():
        out.append(FieldViolation("prompt", "must not be empty"))
    elif len(prompt) > MAX_PROMPT:
        out.append(FieldViolation("prompt", f"at most {MAX_PROMPT} characters"))
    if not base_model.strip():
        out.append(FieldViolation("base_model", "must not be empty"))
    if not 1 <= max_loras <= 20:
        out.append(FieldViolation("max_loras", "must be between 1 and 20"))
    if min_confidence is not None and not 0.0 <= min_confidence <= 1.0:
        out.append(FieldViolation("min_confidence", "must be in [0, 1]"))
    return out


def _item(rec: LoRARecommendation) -> dict[str, Any]:
    return {
        "lora_id": rec.lora.id,
        "confidence": rec.confidence,
        "weight": rec.weight,
        "trigger_words": list(rec.trigger_words),
        "reasons": list(rec.reasons),
    }


class _Recording:
    """Records a recommendation (with the request's idempotency record) and replays it."""

    def __init__(self, catalog: CatalogRepository | None, read_model: LoraReadModel | None) -> None:
        self._catalog = catalog
        self._read_model = read_model

    def replay(self, command: object) -> Replay | None:
        if self._catalog is None:
            return None
        return replay(self._catalog, command)

    def replayed(self, previous: Replay) -> tuple[str, list[LoRARecommendation]]:
        """The recommendation id and the recommendations the first answer carried. A record
        of an earlier version kept the id only: its LoRAs are read as they are now."""
        rec_id = str(previous.result["recommendation_id"])
        stored = previous.result.get("recommendations")
        if stored is None:
            return rec_id, self.load(rec_id)
        return rec_id, [recommendation_from_dict(d) for d in stored]

    def record(
        self,
        command: object,
        prompt: str,
        base_model: str,
        recs: list[LoRARecommendation],
        answer: Callable[[str], dict[str, Any]] | None = None,
    ) -> tuple[str, int]:
        """Records the recommendation and the request's answer (by default its id and the
        recommendations; `answer` builds another from the id)."""
        if self._catalog is None:
            return "", 0
        ctx = current_context()
        made = Recommendation(
            prompt=prompt,
            base_model=base_model,
            items=[_item(r) for r in recs],
            principal=ctx.principal,
            request_id=ctx.request_id,
        )
        rec_id = str(made.id)
        result = answer(rec_id) if answer is not None else _answer(rec_id, recs)
        return rec_id, save_answered(self._catalog, command, result, [made])

    def remember(self, command: object, result: dict[str, Any]) -> None:
        """Records the answer of a request that writes nothing else."""
        if self._catalog is not None:
            save_answered(self._catalog, command, result)

    def load(self, recommendation_id: str) -> list[LoRARecommendation]:
        if self._catalog is None or self._read_model is None:
            raise NotFoundError("recommendation", recommendation_id)
        try:
            key = uuid.UUID(recommendation_id)
        except ValueError:
            raise NotFoundError("recommendation", recommendation_id) from None
        made = self._catalog.get(key)
        if not isinstance(made, Recommendation):
            raise NotFoundError("recommendation", recommendation_id)
        out = []
        for item in made.items:
            view = self._read_model.get(str(item["lora_id"]))
            if view is None:  # deleted since: nothing to recommend any more
                continue
            out.append(
                LoRARecommendation(
                    view,
                    float(item["confidence"]),
                    float(item["weight"]),
                    tuple(item["trigger_words"]),
                    tuple(item["reasons"]),
                )
            )
        return out


class RecommendLoRAsHandler(ICommandHandler[RecommendLoRAsCommand, RecommendationSet]):
    def __init__(
        self,
        recommender: Recommender,
        *,
        catalog: CatalogRepository | None = None,
        read_model: LoraReadModel | None = None,
    ) -> None:
        self._recommender = recommender
        self._recording = _Recording(catalog, read_model)

    def handle(self, command: RecommendLoRAsCommand) -> CommandResult[RecommendationSet]:
        violations = _validate(
            command.prompt, command.base_model, command.max_loras, command.min_confidence
        )
        if violations:
            return CommandResult.validation_error(violations)
        previous = self._recording.replay(command)
        if previous is not None:
            rec_id, recs = self._recording.replayed(previous)
            return CommandResult.success(
                RecommendationSet(rec_id, tuple(recs)), position=previous.position
            )
        recs = self._recommender.recommend(
            command.prompt,
            command.base_model,
            max_loras=command.max_loras,
            min_confidence=command.min_confidence,
            include_unavailable=command.include_unavailable,
        )
        rec_id, position = self._recording.record(command, command.prompt, command.base_model, recs)
        return CommandResult.success(RecommendationSet(rec_id, tuple(recs)), position=position)


class RecommendTopLoRAHandler(ICommandHandler[RecommendTopLoRACommand, TopRecommendation]):
    def __init__(
        self,
        recommender: Recommender,
        *,
        catalog: CatalogRepository | None = None,
        read_model: LoraReadModel | None = None,
        default_min_confidence: float = DEFAULT_TOP_CONFIDENCE,
    ) -> None:
        self._recommender = recommender
        self._recording = _Recording(catalog, read_model)
        self._default = default_min_confidence

    def handle(self, command: RecommendTopLoRACommand) -> CommandResult[TopRecommendation]:
        violations = _validate(command.prompt, command.base_model, 1, command.min_confidence)
        if violations:
            return CommandResult.validation_error(violations)
        threshold = self._default if command.min_confidence is None else command.min_confidence
        previous = self._recording.replay(command)
        if previous is not None:
            if "none_reason" in previous.result:
                return CommandResult.success(_top_from(previous.result), position=previous.position)
            rec_id, recs = self._recording.replayed(previous)
            return CommandResult.success(_top(rec_id, recs, threshold), position=previous.position)
        recs = self._recommender.recommend(
            command.prompt,
            command.base_model,
            max_loras=1,
            min_confidence=threshold,
            include_unavailable=command.include_unavailable,
        )
        rec_id, position = self._recording.record(
            command,
            command.prompt,
            command.base_model,
            recs,
            answer=lambda rec_id: _top_to(_top(rec_id, recs, threshold)),
        )
        return CommandResult.success(_top(rec_id, recs, threshold), position=position)


def _answer(rec_id: str, recs: Sequence[LoRARecommendation]) -> dict[str, Any]:
    return {
        "recommendation_id": rec_id,
        "recommendations": [recommendation_to_dict(r) for r in recs],
    }


def _top_to(top: TopRecommendation) -> dict[str, Any]:
    rec = top.recommendation
    return {
        "recommendation_id": top.recommendation_id,
        "recommendation": None if rec is None else recommendation_to_dict(rec),
        "none_reason": top.none_reason,
    }


def _top_from(d: dict[str, Any]) -> TopRecommendation:
    rec = d.get("recommendation")
    return TopRecommendation(
        str(d["recommendation_id"]),
        None if rec is None else recommendation_from_dict(rec),
        str(d.get("none_reason", "")),
    )


def _top(rec_id: str, recs: list[LoRARecommendation], threshold: float) -> TopRecommendation:
    if recs and recs[0].confidence >= threshold:
        return TopRecommendation(rec_id, recs[0])
    return TopRecommendation(
        rec_id, None, f"no LoRA reaches confidence {threshold:.2f} for this prompt"
    )


class FilterConfidentRecommendationsHandler(
    ICommandHandler[FilterConfidentRecommendationsCommand, RecommendationSet]
):
    """Reads a recorded recommendation back; writes only the request's idempotency record,
    so a retry answers the LoRAs it answered first even if one was deleted since."""

    def __init__(self, catalog: CatalogRepository, read_model: LoraReadModel) -> None:
        self._recording = _Recording(catalog, read_model)

    def handle(
        self, command: FilterConfidentRecommendationsCommand
    ) -> CommandResult[RecommendationSet]:
        if not 0.0 <= command.min_confidence <= 1.0:
            return CommandResult.validation_error(
                FieldViolation("min_confidence", "must be in [0, 1]")
            )
        previous = self._recording.replay(command)
        if previous is not None:
            rec_id, recs = self._recording.replayed(previous)
            return CommandResult.success(RecommendationSet(rec_id, tuple(recs)))
        recs = self._recording.load(command.recommendation_id)
        kept = [r for r in recs if r.confidence >= command.min_confidence]
        self._recording.remember(command, _answer(command.recommendation_id, kept))
        return CommandResult.success(RecommendationSet(command.recommendation_id, tuple(kept)))
