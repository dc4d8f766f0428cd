"""The recommendation index's state in a file beside the read models, with the projection
position it reflects, so a restart loads it and replays only the events after that position
instead of indexing the whole catalog again.

One uncompressed `.npz` (numpy's zip of named arrays: no pickle, loaded without parsing) is
written to a temporary name, flushed to disk and renamed over the old one, so a reader sees
the previous snapshot or the new one, never half of one. The file is a cache: one that is
missing, unreadable, of another format or taken from another database is ignored (with a
log line) and the index is rebuilt from the read models."""

from __future__ import annotations

import json
import logging
import os
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

log = logging.getLogger("loracle.recommender")

FILE_NAME = "recommend-index.npz"
# Bump when the file's layout (not the engine's state, which carries its own version) changes.
FORMAT = 1
_META = "snapshot.meta"


@dataclass(frozen=True, slots=True)
class Snapshot:
    position: int
    arrays: dict[str, npt.NDArray[np.generic]]


class SnapshotFile:
    """`source` names the database the position refers to (never its password): a snapshot
    taken against another one is not restored."""

    def __init__(self, path: Path, source: str) -> None:
        self.path = path
        self.source = source

    def save(self, arrays: Mapping[str, npt.NDArray[np.generic]], position: int) -> int:
        """Writes the snapshot atomically; returns its size in bytes."""
        meta = {"format": FORMAT, "position": position, "source": self.source}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with temporary.open("wb") as out:
                members: dict[str, Any] = dict(arrays)
                members[_META] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
                np.savez(out, **members)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, self.path)
        finally:
            temporary.unlink(missing_ok=True)
        _fsync_directory(self.path.parent)
        return self.path.stat().st_size

    def load(self) -> Snapshot | None:
        """The snapshot, or None (logged) when there is none usable."""
        if not self.path.is_file():
            log.info("recommendation index: no snapshot at %s", self.path)
            return None
        started = time.perf_counter()
        try:
            with np.load(self.path, allow_pickle=False) as npz:
                meta = json.loads(npz[_META].tobytes())
                if meta.get("format") != FORMAT:
                    log.warning(
                        "recommendation index: snapshot format %s, expected %s: ignored",
                        meta.get("format"),
                        FORMAT,
                    )
                    return None
                if meta.get("source") != self.source:
                    log.warning(
                        "recommendation index: snapshot taken from %s, not %s: ignored",
                        meta.get("source"),
                        self.source,
                    )
                    return None
                arrays = {name: npz[name] for name in npz.files if name != _META}
            position = int(meta["position"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            log.warning(
                "recommendation index: snapshot %s unreadable (%s): ignored", self.path, exc
            )
            return None
        log.info(
            "recommendation index: snapshot at position %d read in %.2fs",
            position,
            time.perf_counter() - started,
        )
        return Snapshot(position, arrays)


def _fsync_directory(directory: Path) -> None:
    """Makes the rename itself durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
