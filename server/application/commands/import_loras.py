"""ImportLoras: scan a directory, register new files, update changed ones, mark missing ones
unavailable, and report every bad file without stopping. Each file is saved on its own, so an
interrupted import keeps what it did and a rerun skips it.

Files are read (header and SHA-256) by up to READERS threads, at most READ_AHEAD files ahead
of the one being saved: hashlib lets go of the GIL while it hashes, so a folder of large files
hashes on several cores, while results are still saved and reported in scan order. The whole
handler runs on the stream's own thread, never on the event loop."""

from __future__ import annotations

import enum
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from server.application.commands.base import IStreamCommand, IStreamCommandHandler
from server.application.commands.catalog_ops import upsert_file
from server.application.commands.idempotency import replay, request_id, save_answered
from server.application.context import current_context
from server.application.ports import CatalogRepository, Consistency, LoraFiles, LoraReadModel
from server.domain.errors import BadLoraFileError, DomainError
from server.domain.models import FileEntry, ScannedLora

READERS = 4
READ_AHEAD = 8


class ImportOutcome(enum.Enum):
    REGISTERED = "REGISTERED"
    UPDATED = "UPDATED"
    UNCHANGED = "UNCHANGED"
    FAILED = "FAILED"
    MARKED_UNAVAILABLE = "MARKED_UNAVAILABLE"


@dataclass(frozen=True, slots=True)
class ImportFileResult:
    path: str
    outcome: ImportOutcome
    lora_id: str = ""
    error: str = ""


@dataclass(frozen=True, slots=True)
class ImportTotals:
    files_total: int = 0
    files_done: int = 0
    registered: int = 0
    updated: int = 0
    unchanged: int = 0
    failed: int = 0
    marked_unavailable: int = 0

    def add(self, outcome: ImportOutcome) -> ImportTotals:
        field = outcome.value.lower()
        done = self.files_done + (outcome is not ImportOutcome.MARKED_UNAVAILABLE)
        return replace(self, files_done=done, **{field: getattr(self, field) + 1})


@dataclass(frozen=True, slots=True)
class ImportUpdate:
    """One message of the import stream; the last has `done` and the consistency position."""

    totals: ImportTotals
    file: ImportFileResult | None = None
    done: bool = False
    position: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class ImportLoRAsCommand(IStreamCommand[ImportUpdate]):
    directory: str = ""


class ImportLoRAsHandler(IStreamCommandHandler[ImportLoRAsCommand, ImportUpdate]):
    def __init__(
        self,
        files: LoraFiles,
        catalog: CatalogRepository,
        read_model: LoraReadModel,
        consistency: Consistency,
    ) -> None:
        self._files = files
        self._catalog = catalog
        self._read_model = read_model
        self._consistency = consistency

    def handle(self, command: ImportLoRAsCommand) -> Iterator[ImportUpdate]:
        previous = replay(self._catalog, command)
        if previous is not None:
            # A finished import's retry: its final message again, not the per-file ones.
            yield ImportUpdate(
                ImportTotals(**previous.result), done=True, position=previous.position
            )
            return
        target = command.directory or str(self._files.roots[0])
        root, directory = self._files.resolve(target)
        prefix = "" if directory == root else directory.relative_to(root).as_posix()
        self._consistency.wait_for(self._catalog.max_position(), None)
        known = {e.path: e for e in self._read_model.files_under(prefix)}
        candidates = list(self._files.scan(target))
        totals = ImportTotals(files_total=len(candidates))
        seen: set[str] = set()
        position = 0
        for candidate, read in self._read_ahead(candidates, known):
            result, saved_at = self._import_one(candidate, known, read)
            seen.add(result.path)
            position = max(position, saved_at)
            totals = totals.add(result.outcome)
            yield ImportUpdate(totals, result)
        for path, entry in sorted(known.items()):
            if path in seen or not entry.available:
                continue
            lora = self._catalog.get_lora(uuid.UUID(entry.lora_id))
            if lora is None or lora.deleted or not lora.available:
                continue
            ctx = current_context()
            lora.mark_unavailable(
                reason="file missing", principal=ctx.principal, request_id=ctx.request_id
            )
            position = max(position, self._catalog.save(lora))
            totals = totals.add(ImportOutcome.MARKED_UNAVAILABLE)
            yield ImportUpdate(
                totals, ImportFileResult(path, ImportOutcome.MARKED_UNAVAILABLE, entry.lora_id)
            )
        if request_id():
            position = save_answered(self._catalog, command, asdict(totals))
        yield ImportUpdate(totals, done=True, position=position or self._catalog.max_position())

    def _read_ahead(
        self, candidates: list[Path], known: dict[str, FileEntry]
    ) -> Iterator[tuple[Path, Future[ScannedLora] | None]]:
        """Each candidate with its file being read (None: unchanged since the read model's
        stat), in order, reading up to READ_AHEAD files ahead on READERS threads."""
        pool = ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="loracle-read")
        window: deque[tuple[Path, Future[ScannedLora] | None]] = deque()
        try:
            for candidate in candidates:
                entry = known.get(self._files.relative(candidate))
                unchanged = entry is not None and entry.available and _same_stat(candidate, entry)
                future = None if unchanged else pool.submit(self._files.read, str(candidate))
                window.append((candidate, future))
                if len(window) > READ_AHEAD:
                    yield window.popleft()
            while window:
                yield window.popleft()
        finally:  # a cancelled import stops reading ahead
            pool.shutdown(wait=False, cancel_futures=True)

    def _import_one(
        self, candidate: Path, known: dict[str, FileEntry], read: Future[ScannedLora] | None
    ) -> tuple[ImportFileResult, int]:
        rel = self._files.relative(candidate)
        entry = known.get(rel)
        if read is None and entry is not None:
            return ImportFileResult(rel, ImportOutcome.UNCHANGED, entry.lora_id), 0
        try:
            scanned = read.result() if read is not None else self._files.read(str(candidate))
            change = upsert_file(
                scanned,
                self._catalog,
                self._read_model,
                path_owner=entry.lora_id if entry else None,
            )
            position = self._catalog.save(change.lora) if change.changed else 0
        except BadLoraFileError as exc:
            return ImportFileResult(rel, ImportOutcome.FAILED, error=exc.why), 0
        except DomainError as exc:
            if exc.reason == "UNAVAILABLE":
                raise
            return ImportFileResult(rel, ImportOutcome.FAILED, error=exc.message), 0
        return ImportFileResult(
            rel, ImportOutcome(change.outcome.value), str(change.lora.id)
        ), position


def _same_stat(path: Path, entry: FileEntry) -> bool:
    try:
        stat = path.stat()
    except OSError:
        return False
    mtime = datetime.fromtimestamp(stat.st_mtime, tz=UTC)
    return stat.st_size == entry.size_bytes and mtime == entry.modified_time
