"""Turns a job's broker log into the events a client sees. It is a pure function of the log,
so every replica numbers the same events the same way: a client that resumes on another
replica with `after_sequence` gets exactly the rest.

The log may hold several attempts (a worker died and the job was redelivered). Rules:
- events of an attempt older than the newest started one are dropped (a stalled worker);
- an image is passed on only whole (its chunks are held until its checksum arrives) and only
  once per index, so a half-sent image of a dead attempt never reaches a client;
- the first final event ends the job."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.domain.generation_events import (
    TERMINAL,
    ImageChunk,
    ImageComplete,
    Payload,
    image_chunks,
)
from server.infrastructure.broker.codec import to_payload
from server.infrastructure.broker.port import EventRecord


@dataclass
class Relay:
    chunk_size: int = 64 * 1024
    attempt: int = 0
    finished: bool = False
    delivered: dict[int, ImageComplete] = field(default_factory=dict)
    _pending: dict[tuple[int, int], list[bytes]] = field(default_factory=dict)

    def feed(self, record: EventRecord) -> list[Payload]:
        if self.finished or record.attempt < self.attempt:
            return []
        payload = to_payload(record)
        if payload is None:
            return []
        if record.attempt > self.attempt:
            self.attempt = record.attempt
            self._pending = {k: v for k, v in self._pending.items() if k[0] >= record.attempt}
        if isinstance(payload, ImageChunk):
            if payload.image_index not in self.delivered:
                key = (record.attempt, payload.image_index)
                if payload.offset == 0:
                    self._pending[key] = []
                self._pending.setdefault(key, []).append(payload.data)
            return []
        if isinstance(payload, ImageComplete):
            index = payload.image_index
            pieces = self._pending.pop((record.attempt, index), None)
            if index in self.delivered or pieces is None:
                return []
            data = b"".join(pieces)
            if len(data) != payload.size_bytes:
                return []  # a gap in the log: never pass on a damaged image
            self.delivered[index] = payload
            wanted = record.meta.get("chunk_size")
            size = wanted if isinstance(wanted, int) and wanted > 0 else self.chunk_size
            return [*image_chunks(index, data, size), payload]
        if isinstance(payload, TERMINAL):
            self.finished = True
        return [payload]
