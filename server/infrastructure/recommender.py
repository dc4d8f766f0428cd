"""Keeps the recommendation engine in step with the catalog: loaded from the read models at
start, then fed each projected batch. Implements the application's Recommender port.

Indexing a LoRA costs about half a millisecond (tokenizing its text, BM25 postings), far more
than projecting it, so the projector only queues each batch here: a batch is visible to
ListLoras and GetLora without waiting for the index. The queue is indexed, in order, by
whichever comes first: the next recommendation or search (which indexes what is queued before
it answers, so it never misses a LoRA the read model shows), or a background thread once the
catalog has been quiet for `settle` seconds. Answered recommendations (the feedback the
projector linked, server.domain.recommend.feedback) are applied in log order with history."""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator

from server.application.ports import LoraReadModel
from server.domain.models import Architecture, HistoryEntry, LoraKind, resolve_architecture
from server.domain.recommend.engine import RecommendationEngine, Scored
from server.domain.recommend.feedback import Feedback
from server.domain.recommendation import LoRARecommendation
from server.infrastructure.read_model import ProjectedChange

log = logging.getLogger("loracle.recommender")


class CatalogRecommender:
    def __init__(
        self, engine: RecommendationEngine, read_model: LoraReadModel, *, settle: float = 2.0
    ) -> None:
        self.engine = engine
        self._read_model = read_model
        self._settle = settle
        self._queue: deque[ProjectedChange] = deque()
        self._queue_lock = threading.Lock()
        self._index_lock = threading.Lock()  # one thread indexes at a time, in queue order
        self._queued = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def queued(self) -> int:
        """Projected batches not indexed yet."""
        return len(self._queue)

    def start(self) -> None:
        """Starts the thread that indexes queued batches once the catalog is quiet."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name="loracle-recommender", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._queued.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def load(self) -> None:
        """Indexes the whole catalog from the read models. Batches queued before are in the
        read models already, so they are dropped rather than applied twice."""
        with self._index_lock:
            with self._queue_lock:
                self._queue.clear()
            self._load()

    def _load(self) -> None:
        start = time.perf_counter()
        for view in self._read_model.all_views():
            if view.kind is LoraKind.LORA:
                self.engine.upsert(view)
        past = answered = 0
        # In log order, as they were first applied: history is bounded per LoRA and an
        # acceptance clears earlier skips.
        for entry in _in_log_order(self._read_model.history(), self._read_model.feedback()):
            if isinstance(entry, Feedback):
                self.engine.record_feedback(entry.prompt, entry.accepted, entry.skipped)
                answered += 1
            else:
                self.engine.record_generation(entry.prompt, entry.lora_ids)
                past += 1
        log.info(
            "recommendation index: %d LoRAs, %d past generations, %d answered "
            "recommendations in %.2fs",
            len(self.engine),
            past,
            answered,
            time.perf_counter() - start,
        )

    def on_change(self, change: ProjectedChange) -> None:
        """Queues a projected batch for the index (see the module's docstring)."""
        if not (change.upserts or change.deletes or change.history or change.feedback):
            return
        # Only what the index reads: a batch's audit rows (every event's data) would otherwise
        # stay in memory until it is indexed, which during a long import is the whole import.
        slim = ProjectedChange(
            change.after,
            change.position,
            change.upserts,
            change.deletes,
            history=change.history,
            feedback=change.feedback,
        )
        with self._queue_lock:
            self._queue.append(slim)
        self._queued.set()

    def catch_up(self) -> None:
        """Indexes every batch queued so far, oldest first."""
        with self._index_lock:
            while True:
                with self._queue_lock:
                    if not self._queue:
                        return
                    change = self._queue.popleft()
                self._apply(change)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._queued.wait()
            # Wait for a quiet spell: an import in progress keeps the CPU to itself.
            while self._queued.is_set() and not self._stop.is_set():
                self._queued.clear()
                self._stop.wait(self._settle)
            if self._stop.is_set():
                return
            try:
                self.catch_up()
            except Exception:  # the next recommendation retries what is left
                log.exception("indexing queued catalog changes failed")

    def _apply(self, change: ProjectedChange) -> None:
        for view in change.upserts:
            if view.kind is LoraKind.LORA:
                self.engine.upsert(view)
            else:  # embeddings are named in prompts, never recommended as LoRAs
                self.engine.remove(view.id)
        for lora_id in change.deletes:
            self.engine.remove(lora_id)
        # A batch's feedback comes after the history record it was linked at.
        for entry in _in_log_order(change.history, change.feedback):
            if isinstance(entry, Feedback):
                self.engine.record_feedback(entry.prompt, entry.accepted, entry.skipped)
            else:
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
        self.catch_up()
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
        self.catch_up()
        return [_recommendation(s) for s in self.engine.search(query, architecture, limit=limit)]


def _in_log_order(
    history: Iterable[HistoryEntry], feedback: Iterable[Feedback]
) -> Iterator[HistoryEntry | Feedback]:
    def position(entry: HistoryEntry | Feedback) -> int:
        return entry.position

    both: tuple[Iterable[HistoryEntry | Feedback], ...] = (history, feedback)
    return heapq.merge(*both, key=position)


def _recommendation(s: Scored) -> LoRARecommendation:
    return LoRARecommendation(s.lora, round(s.confidence, 4), s.weight, s.trigger_words, s.reasons)
