"""Keeps the recommendation engine in step with the catalog: loaded from the read models at
start, then fed each projected batch. Implements the application's Recommender port."""

from __future__ import annotations

import logging
import time

from server.application.ports import LoraReadModel
from server.domain.models import Architecture, LoraKind, resolve_architecture
from server.domain.recommend.engine import RecommendationEngine, Scored
from server.domain.recommendation import LoRARecommendation
from server.infrastructure.read_model import ProjectedChange

log = logging.getLogger("loracle.recommender")


class CatalogRecommender:
    def __init__(self, engine: RecommendationEngine, read_model: LoraReadModel) -> None:
        self.engine = engine
        self._read_model = read_model

    def load(self) -> None:
        start = time.perf_counter()
        for view in self._read_model.all_views():
            if view.kind is LoraKind.LORA:
                self.engine.upsert(view)
        past = 0
        for entry in self._read_model.history():
            self.engine.record_generation(entry.prompt, entry.lora_ids)
            past += 1
        log.info(
            "recommendation index: %d LoRAs, %d past generations in %.2fs",
            len(self.engine),
            past,
            time.perf_counter() - start,
        )

    def on_change(self, change: ProjectedChange) -> None:
        for view in change.upserts:
            if view.kind is LoraKind.LORA:
                self.engine.upsert(view)
            else:  # embeddings are named in prompts, never recommended as LoRAs
                self.engine.remove(view.id)
        for lora_id in change.deletes:
            self.engine.remove(lora_id)
        for entry in change.history:
            self.engine.record_generation(entry.prompt, entry.lora_ids)

    def recommend(
        self,
        prompt: str,
        base_model: str,
        *,
        max_loras: int,
        min_confidence: float | None,
        include_unavailable: bool,
    ) -> list[LoRARecommendation]:
        found = self.engine.recommend(
            prompt,
            resolve_architecture(base_model),
            max_loras=max_loras,
            min_confidence=min_confidence,
            include_unavailable=include_unavailable,
        )
        return [_recommendation(s) for s in found]

    def search(
        self, query: str, architecture: Architecture | None, limit: int
    ) -> list[LoRARecommendation]:
        return [_recommendation(s) for s in self.engine.search(query, architecture, limit=limit)]


def _recommendation(s: Scored) -> LoRARecommendation:
    return LoRARecommendation(s.lora, round(s.confidence, 4), s.weight, s.trigger_words, s.reasons)
