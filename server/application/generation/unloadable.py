"""LoRA files that failed to load on a model, so QuickGenerate does not pick them again.
Kept in memory, per process and per model (a restart forgets them, and each replica learns
on its own): a file that cannot load fails fast and is then remembered, so forgetting costs one
retried pick, while persisting it would need an event and a projection for a cache."""

from __future__ import annotations

import threading


class UnloadableLoras:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_model: dict[str, set[str]] = {}

    def remember(self, model: str, sha256: str) -> None:
        with self._lock:
            self._by_model.setdefault(model, set()).add(sha256)

    def of(self, model: str) -> frozenset[str]:
        """The SHA-256 of every file that failed to load on `model`."""
        with self._lock:
            return frozenset(self._by_model.get(model, ()))
