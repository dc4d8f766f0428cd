"""What cluster mode needs from a message broker, so NATS JetStream (the one implemented) can
be joined by another (RabbitMQ: quorum queues for jobs, streams for events, a KV elsewhere)
without touching the replica or worker code."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from server.domain.errors import Reason, UnavailableError


class BrokerUnavailable(UnavailableError):
    """The broker did not answer in time; the client may retry."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"the job broker is unavailable ({what}); retry shortly",
            retry_after_seconds=2.0,
            reason=Reason.BROKER_UNAVAILABLE,
        )


# The events that change a job's recorded state: a broker keeps them apart from the live ones
# (progress, previews, image chunks) so the replicas' recorder reads only these.
STATE_KINDS = frozenset({"started", "completed", "failed", "cancelled"})


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One event of a job as stored in the broker: `meta` holds its fields, `data` the bytes
    of an image chunk or a preview."""

    generation_id: str
    kind: str
    attempt: int
    meta: dict[str, object]
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class Claim:
    """Who holds a job: queued, running (attempt N on worker W), cancelled or done. `revision`
    makes every change a compare-and-set."""

    state: str
    attempt: int = 0
    worker: str = ""
    cancel: bool = False
    revision: int = 0


class Delivery(Protocol):
    """A job handed to a worker: it holds a lease until acked, handed back or expired."""

    @property
    def body(self) -> bytes: ...
    def ack(self) -> None: ...
    def hand_back(self, delay: float = 0.0) -> None: ...
    def extend(self) -> None: ...


class EventSubscription(Protocol):
    def next(self, timeout: float) -> EventRecord | None: ...
    def close(self) -> None: ...


class Broker(Protocol):
    # the queue of jobs
    def queue_depth(self) -> int: ...
    def enqueue(self, generation_id: str, body: bytes) -> None: ...
    def max_message_bytes(self) -> int:
        """The largest message the broker carries (a job with its input images is one)."""
        ...

    def fetch(self, count: int, timeout: float) -> list[Delivery]: ...
    # each job's event log
    def publish(self, event: EventRecord) -> None: ...
    def events(self, generation_id: str) -> EventSubscription: ...
    def fetch_state_events(
        self, count: int, timeout: float
    ) -> list[tuple[EventRecord, Delivery]]: ...
    # claims and cancellation
    def claim(self, generation_id: str) -> Claim | None: ...
    def create_claim(self, generation_id: str, claim: Claim) -> None: ...
    def update_claim(self, generation_id: str, claim: Claim) -> bool: ...
    def signal_cancel(self, generation_id: str) -> None: ...
    def on_cancel(self, listener: Callable[[str], None]) -> None: ...
    # the workers' directory
    def advertise(self, worker: str, document: bytes) -> None: ...
    def workers(self) -> dict[str, bytes]: ...
    def close(self) -> None: ...
