"""Keeps the recommendation engine in step with the catalog: loaded from the read models at
start, then fed each projected batch. Implements the application's Recommender port.

Indexing a LoRA costs about half a millisecond (tokenizing its text, BM25 postings), far more
than projecting it, so the projector only queues each batch here: a batch is visible to
ListLoras and GetLora without waiting for the index. The queue is indexed, in order, by
whichever comes first: the next recommendation or search (which indexes what is queued before
it answers, so it never misses a LoRA the read model shows), or a background thread once the
catalog has been quiet for `settle` seconds. Answered recommendations (the feedback the
projector linked, server.domain.recommend.feedback) are applied in log order with history.

With a snapshot file, the same thread also saves the index's state with the projection
position it reflects, at most every `snapshot_interval` seconds while the catalog changes
(and once more at stop), and `load()` restores it and replays only the batches after that
position, built again from the event log. A missing, unreadable or outdated snapshot falls
back to indexing the whole catalog from the read models."""

from __future__ import annotations

import gc
import heapq
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from server.application.ports import LoraReadModel
from server.domain.models import Architecture, HistoryEntry, LoraKind, resolve_architecture
from server.domain.recommend.engine import RecommendationEngine, Scored
from server.domain.recommend.feedback import Feedback
from server.domain.recommendation import LoRARecommendation
from server.infrastructure.read_model import ProjectedChange
from server.infrastructure.recommend_snapshot import SnapshotFile

log = logging.getLogger("loracle.recommender")

Replay = Callable[[int, int], Iterable[ProjectedChange]]
"""The projected batches between two positions (Projector.changes)."""


class CatalogRecommender:
    def __init__(
        self,
        engine: RecommendationEngine,
        read_model: LoraReadModel,
        *,
        settle: float = 2.0,
        snapshot: SnapshotFile | None = None,
        replay: Replay | None = None,
        snapshot_interval: float = 30.0,
    ) -> None:
        self.engine = engine
        self._read_model = read_model
        self._settle = settle
        self._snapshot = snapshot if replay is not None else None
        self._replay = replay
        self._snapshot_interval = snapshot_interval
        self._position = 0  # of the last batch the engine has seen
        self._saved_position: int | None = None  # of the snapshot on disk
        self._saved_at = 0.0
        self._loaded = False
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
        """Stops the thread; saves a last snapshot when the index moved on since the last."""
        self._stop.set()
        self._queued.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._snapshot is not None and self._stale():
            try:
                self.save_snapshot()
            except Exception:
                log.exception("saving the recommendation index snapshot failed")

    def load(self) -> None:
        """Restores the index from its snapshot and replays the batches after it, or indexes
        the whole catalog from the read models. Batches queued before are in the read models
        already, so they are dropped rather than applied twice."""
        with self._index_lock:
            with self._queue_lock:
                self._queue.clear()
            position = self._read_model.position()
            if not self._restore(position):
                self.engine.clear()
                self._load()
            self._position = position
            self._loaded = True
        if self._stale():
            self._queued.set()  # the background thread saves a snapshot once it is quiet

    def save_snapshot(self) -> None:
        """Saves the index's state with its position (off the request path: the background
        thread and stop() call it). Batches wait while the state is copied out, not while
        it is written."""
        if self._snapshot is None:
            return
        started = time.perf_counter()
        with self._index_lock:
            arrays = self.engine.state()
            position = self._position
        size = self._snapshot.save(arrays, position)
        self._saved_position = position
        self._saved_at = time.monotonic()
        log.info(
            "recommendation index: snapshot at position %d, %d LoRAs, %.1f MiB in %.2fs",
            position,
            len(self.engine),
            size / 2**20,
            time.perf_counter() - started,
        )

    def _stale(self) -> bool:
        return (
            self._loaded and self._snapshot is not None and self._saved_position != self._position
        )

    def _restore(self, position: int) -> bool:
        if self._snapshot is None or self._replay is None:
            return False
        started = time.perf_counter()
        found = self._snapshot.load()
        if found is None:
            return False
        if found.position > position:
            log.warning(
                "recommendation index: snapshot at position %d is ahead of the read models "
                "(%d), rebuilding",
                found.position,
                position,
            )
            return False
        try:
            with _collector_paused():
                self.engine.restore(found.arrays)
        except (ValueError, KeyError, IndexError) as exc:
            log.warning("recommendation index: snapshot not restored (%s), rebuilding", exc)
            return False
        self._saved_position = found.position
        self._saved_at = time.monotonic()
        batches = 0
        for change in self._replay(found.position, position):
            self._apply(change)
            batches += 1
        log.info(
            "recommendation index: %d LoRAs restored from the snapshot at position %d and "
            "%d batches up to %d replayed in %.2fs; arrays %d bytes",
            len(self.engine),
            found.position,
            batches,
            position,
            time.perf_counter() - started,
            self.engine.nbytes(),
        )
        return True

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
            "recommendations in %.2fs; arrays %d bytes",
            len(self.engine),
            past,
            answered,
            time.perf_counter() - start,
            self.engine.nbytes(),
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
                self._position = change.position

    def _snapshot_due(self) -> float | None:
        """Seconds until a snapshot is due, None while the one on disk is current."""
        if not self._stale():
            return None
        return max(0.0, self._saved_at + self._snapshot_interval - time.monotonic())

    def _run(self) -> None:
        while not self._stop.is_set():
            self._queued.wait(self._snapshot_due())
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
                continue
            if self._snapshot_due() == 0.0:
                try:
                    self.save_snapshot()
                except Exception:  # the index is intact; the next restart rebuilds
                    log.exception("saving the recommendation index snapshot failed")
                    self._saved_at = time.monotonic()

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


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Without it, the cyclic garbage collector walks the whole heap again and again while a
    restore allocates its lists and dicts (none of which form cycles): 3x slower."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _in_log_order(
    history: Iterable[HistoryEntry], feedback: Iterable[Feedback]
) -> Iterator[HistoryEntry | Feedback]:
    def position(entry: HistoryEntry | Feedback) -> int:
        return entry.position

    both: tuple[Iterable[HistoryEntry | Feedback], ...] = (history, feedback)
    return heapq.merge(*both, key=position)


def _recommendation(s: Scored) -> LoRARecommendation:
    return LoRARecommendation(s.lora, round(s.confidence, 4), s.weight, s.trigger_words, s.reasons)
