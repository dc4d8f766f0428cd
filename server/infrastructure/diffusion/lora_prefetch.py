"""LoRA files read off the worker's hot path. When a job is queued, a loader thread reads its
LoRA files, checks each against the SHA-256 the catalog recorded and parses it into host
tensors; when the worker later needs the adapter, it takes the parsed tensors instead of
reading the disk, so a batch never waits on a file another request already asked for.
Bounded in bytes (the oldest unclaimed files are dropped first; a dropped file is read by the
worker as before)."""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("loracle.executor")

__all__ = ["LoraPrefetcher", "Prefetched"]


@dataclass(frozen=True, slots=True)
class Prefetched:
    tensors: dict[str, Any]  # the file's tensors on the host, as safetensors parsed them
    size: int


class LoraPrefetcher:
    """Thread-safe: request threads call `want`, the worker `take` and `verified`."""

    def __init__(self, budget_bytes: int) -> None:
        self._budget = budget_bytes
        self._lock = threading.Lock()
        self._ready: OrderedDict[str, Prefetched] = OrderedDict()
        self._pending: set[str] = set()
        self._verified: set[str] = set()
        self._queue: queue.SimpleQueue[tuple[str, Path] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.reads = 0  # files read and parsed by the loader thread

    def start(self) -> None:
        if self._thread is None and self._budget > 0:
            self._thread = threading.Thread(target=self._run, name="loracle-lora-loader")
            self._thread.daemon = True
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    def want(self, sha256: str, path: Path, resident: bool = False) -> None:
        """Reads the file ahead unless it is already read, on its way, or `resident` (loaded
        on the device already)."""
        if self._thread is None or resident:
            return
        with self._lock:
            if sha256 in self._ready or sha256 in self._pending:
                return
            self._pending.add(sha256)
        self._queue.put((sha256, path))

    def take(self, sha256: str) -> Prefetched | None:
        """The file's parsed tensors, if the loader thread has them (each is taken once)."""
        with self._lock:
            return self._ready.pop(sha256, None)

    def verified(self, sha256: str) -> bool:
        """Whether the loader thread found the file's bytes to hash to `sha256`."""
        with self._lock:
            return sha256 in self._verified

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            sha256, path = item
            try:
                self._read(sha256, path)
            except Exception as exc:  # the worker reads it again and reports what is wrong
                log.info("could not read LoRA %s ahead: %s", path.name, exc)
            finally:
                with self._lock:
                    self._pending.discard(sha256)

    def _read(self, sha256: str, path: Path) -> None:
        from safetensors.torch import load as load_safetensors

        if path.stat().st_size > self._budget:
            return  # would not be kept: the worker reads it when it needs it
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            return  # changed since import: the worker's own check says so
        tensors = load_safetensors(data)
        with self._lock:
            self._verified.add(sha256)
            self._ready[sha256] = Prefetched(tensors, len(data))
            self.reads += 1
            while sum(p.size for p in self._ready.values()) > self._budget:
                self._ready.popitem(last=False)
