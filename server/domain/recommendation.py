"""Recommendations as values, and the recorded recommendations and past generations the
engine learns from."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from eventsourcing.domain import Aggregate, event

from server.domain.models import LoraView


@dataclass(frozen=True, slots=True)
class LoRARecommendation:
    lora: LoraView
    confidence: float
    weight: float
    trigger_words: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()


class Recommendation(Aggregate):
    """What was recommended, for whom and for which prompt; FilterConfidentRecommendations
    reads it back, and later ranking work can learn from what was accepted."""

    @event("Made")
    def __init__(
        self,
        prompt: str,
        base_model: str,
        items: list[dict[str, Any]],
        principal: str,
        request_id: str,
    ) -> None:
        self.prompt = prompt
        self.base_model = base_model
        self.items = items


class PastGeneration(Aggregate):
    """A prompt and the LoRAs an image was generated with. The generation executor records
    one per finished generation; `make eval-recommend HISTORY=...` replays real ones."""

    @staticmethod
    def create_id(key: str) -> uuid.UUID:
        return uuid.uuid5(uuid.UUID("0b6f5f8e-2b8e-4b52-9d3e-5a3c1f5c9e21"), key)

    @event("Recorded")
    def __init__(
        self, key: str, prompt: str, lora_ids: list[str], principal: str, request_id: str
    ) -> None:
        self.prompt = prompt
        self.lora_ids = lora_ids
