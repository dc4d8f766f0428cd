"""Finished images on disk (<data dir>/generations/<id>/<index>.<ext>), so WatchGeneration
can replay a generation after its in-memory stream is gone, until the retention period ends."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

log = logging.getLogger("loracle.images")

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


class ImageStore:
    def __init__(
        self,
        root: Path,
        *,
        retention_seconds: float = 24 * 3600,
        sweep_interval_seconds: float = 60.0,
    ) -> None:
        self._root = root
        self._retention = retention_seconds
        self._sweep_interval = sweep_interval_seconds
        self._last_sweep = float("-inf")

    def _folder(self, generation_id: str) -> Path:
        # Ids are server-made UUIDs; refuse anything else rather than build a path from it.
        if not generation_id or any(c not in "0123456789abcdef-" for c in generation_id):
            raise ValueError("not a generation id")
        return self._root / generation_id

    def save(self, generation_id: str, index: int, mime_type: str, data: bytes) -> Path:
        folder = self._folder(generation_id)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{index}.{EXTENSIONS[mime_type]}"
        partial = path.with_suffix(".part")
        partial.write_bytes(data)
        partial.replace(path)  # readers never see half an image
        return path

    def read(self, generation_id: str, index: int, mime_type: str) -> bytes | None:
        try:
            return (self._folder(generation_id) / f"{index}.{EXTENSIONS[mime_type]}").read_bytes()
        except (OSError, ValueError, KeyError):
            return None

    def sweep_if_due(self) -> int:
        """Sweeps at most once per interval: listing every kept generation after each batch
        would put directory scans on the worker's path for nothing."""
        now = time.monotonic()
        if now - self._last_sweep < self._sweep_interval:
            return 0
        self._last_sweep = now
        return self.sweep()

    def sweep(self, now: float | None = None) -> int:
        """Deletes generations older than the retention period; returns how many."""
        if not self._root.is_dir():
            return 0
        cutoff = (time.time() if now is None else now) - self._retention
        removed = 0
        for folder in self._root.iterdir():
            try:
                if folder.is_dir() and folder.stat().st_mtime < cutoff:
                    shutil.rmtree(folder)
                    removed += 1
            except OSError:
                log.warning("could not remove expired images in %s", folder)
        return removed
