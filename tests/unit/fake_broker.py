"""An in-memory `Broker` for unit tests of cluster mode, with the semantics of the NATS one
(server/infrastructure/broker/nats_broker.py) and handles for what tests need to provoke:

- jobs: a work queue with leases. `fetch` leases messages, `ack` removes them, `hand_back`
  makes them available again at once, and `expire_leases()` plays a lease running out (a
  worker that died). A settlement through a delivery whose lease was lost is ignored (and
  counted in `stale`). `queue_depth` counts every job not yet acked, leased or not, as a
  JetStream work-queue stream does; re-enqueueing a generation id is ignored (Nats-Msg-Id).
- events: one append-only log per job. Each record is stored as NATS stores it: `meta`
  through a JSON round trip (tuples become lists, objects `str`). `events()` replays the log
  from the start and then follows it. Records of the state kinds also go to the shared
  `recorder` queue that `fetch_state_events` leases from.
- claims: a KV with one revision counter for the bucket. `create_claim` refuses a key that
  exists; `update_claim` is a compare-and-set against `claim.revision`.
- cancellation signals go to the listeners synchronously, on the caller's thread.
- `fail_next_publish(kind)` makes the next publish of that kind raise BrokerUnavailable
  without storing anything (a broker call that timed out).
- after `close()`, `fetch` and `fetch_state_events` raise BrokerUnavailable at once (so a
  worker's pull loop notices without waiting out its timeout); everything else keeps working.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

from server.infrastructure.broker.port import (
    STATE_KINDS,
    Broker,
    BrokerUnavailable,
    Claim,
    Delivery,
    EventRecord,
)

T = TypeVar("T")


class ClaimExistsError(Exception):
    """create_claim on a key that exists (NATS raises KeyWrongLastSequenceError)."""


@dataclass
class _Message(Generic[T]):
    seq: int
    key: str
    value: T
    token: int = 0  # the lease holding it; 0 while it is available
    deliveries: int = 0
    not_before: float = 0.0  # a hand-back with a delay: redeliverable from this time on


@dataclass
class Settlement:
    """What happened to one delivery of a message."""

    key: str
    delivery: int  # 1 for the first delivery of the message, 2 for the next...
    outcome: str  # "acked", "handed_back" or "expired"


@dataclass
class _Queue(Generic[T]):
    """A work queue with leases; every method is called with the broker's lock held."""

    messages: dict[int, _Message[T]] = field(default_factory=dict)
    settlements: list[Settlement] = field(default_factory=list)
    extends: int = 0
    stale: int = 0

    def put(self, seq: int, key: str, value: T) -> None:
        self.messages[seq] = _Message(seq, key, value)

    def take(self, count: int, tokens: itertools.count[int]) -> list[_Message[T]]:
        taken: list[_Message[T]] = []
        for message in self.messages.values():
            if len(taken) >= count:
                break
            if message.token == 0 and message.not_before <= time.monotonic():
                message.token = next(tokens)
                message.deliveries += 1
                taken.append(message)
        return taken

    def available(self) -> bool:
        now = time.monotonic()
        return any(m.token == 0 and m.not_before <= now for m in self.messages.values())

    def settle(self, seq: int, token: int, outcome: str, delay: float = 0.0) -> None:
        message = self.messages.get(seq)
        if message is None or message.token != token:
            self.stale += 1
            return
        self.settlements.append(Settlement(message.key, message.deliveries, outcome))
        if outcome == "acked":
            del self.messages[seq]
        else:
            message.token = 0
            message.not_before = time.monotonic() + delay

    def extend(self, seq: int, token: int) -> None:
        message = self.messages.get(seq)
        if message is None or message.token != token:
            self.stale += 1
            return
        self.extends += 1

    def expire(self) -> int:
        expired = 0
        for message in self.messages.values():
            if message.token != 0:
                self.settlements.append(Settlement(message.key, message.deliveries, "expired"))
                message.token = 0
                expired += 1
        return expired


class FakeDelivery:
    def __init__(
        self, broker: FakeBroker, queue: _Queue[T], message: _Message[T], body: bytes
    ) -> None:
        self._broker = broker
        self._settle = queue.settle
        self._extend = queue.extend
        self._seq = message.seq
        self._token = message.token
        self._body = body
        self.key = message.key

    @property
    def body(self) -> bytes:
        return self._body

    def ack(self) -> None:
        with self._broker.cond:
            self._settle(self._seq, self._token, "acked")
            self._broker.cond.notify_all()

    def hand_back(self, delay: float = 0.0) -> None:
        with self._broker.cond:
            self._settle(self._seq, self._token, "handed_back", delay)
            self._broker.cond.notify_all()

    def extend(self) -> None:
        with self._broker.cond:
            self._extend(self._seq, self._token)


class FakeSubscription:
    """A job's log from its first record on, then whatever is appended."""

    def __init__(self, broker: FakeBroker, generation_id: str) -> None:
        self._broker = broker
        self._id = generation_id
        self._next = 0
        self.closed = False

    def next(self, timeout: float) -> EventRecord | None:
        cond = self._broker.cond
        with cond:
            log = self._broker.logs.setdefault(self._id, [])
            if not cond.wait_for(lambda: len(log) > self._next or self.closed, timeout):
                return None
            if self.closed:
                return None
            record = log[self._next]
            self._next += 1
            return record

    def close(self) -> None:
        with self._broker.cond:
            self.closed = True
            self._broker.subscriptions_closed += 1
            self._broker.cond.notify_all()


class FakeBroker:
    def __init__(self) -> None:
        # Reentrant, so that `wait_for` predicates may call the public methods.
        self.cond = threading.Condition(threading.RLock())
        self._seq = itertools.count(1)
        self._tokens = itertools.count(1)
        self._revisions = itertools.count(1)
        self.jobs: _Queue[bytes] = _Queue()
        self.recorder: _Queue[EventRecord] = _Queue()
        self.enqueued: list[str] = []
        self.logs: dict[str, list[EventRecord]] = {}
        self.claims: dict[str, Claim] = {}
        self.claim_history: dict[str, list[Claim]] = {}
        self.cancel_signals: list[str] = []
        self.directory: dict[str, bytes] = {}
        self.subscriptions_opened = 0
        self.subscriptions_closed = 0
        self.closed = False
        self._listeners: list[Callable[[str], None]] = []
        self._publish_faults: list[str] = []

    # -- the queue of jobs -------------------------------------------------------------------

    def queue_depth(self) -> int:
        with self.cond:
            return len(self.jobs.messages)

    max_payload = 1024 * 1024  # NATS's default

    def max_message_bytes(self) -> int:
        return self.max_payload

    def enqueue(self, generation_id: str, body: bytes) -> None:
        with self.cond:
            if generation_id in self.enqueued:
                return  # deduplicated, as by Nats-Msg-Id
            self.enqueued.append(generation_id)
            self.jobs.put(next(self._seq), generation_id, bytes(body))
            self.cond.notify_all()

    def fetch(self, count: int, timeout: float) -> list[Delivery]:
        with self.cond:
            self.cond.wait_for(lambda: self.closed or self.jobs.available(), timeout)
            if self.closed:
                raise BrokerUnavailable("closed")
            taken = self.jobs.take(count, self._tokens)
            return [FakeDelivery(self, self.jobs, m, m.value) for m in taken]

    def expire_leases(self) -> int:
        """Every leased job and state event becomes available again, as when the lease
        runs out; returns how many jobs were expired."""
        with self.cond:
            expired = self.jobs.expire()
            self.recorder.expire()
            self.cond.notify_all()
            return expired

    # -- each job's event log ----------------------------------------------------------------

    def fail_next_publish(self, kind: str) -> None:
        with self.cond:
            self._publish_faults.append(kind)

    def publish(self, event: EventRecord) -> None:
        with self.cond:
            if event.kind in self._publish_faults:
                self._publish_faults.remove(event.kind)
                raise BrokerUnavailable(f"publish {event.kind} (injected)")
            meta = json.loads(json.dumps(event.meta, default=str))
            stored = EventRecord(event.generation_id, event.kind, event.attempt, meta, event.data)
            self.logs.setdefault(event.generation_id, []).append(stored)
            if event.kind in STATE_KINDS:
                self.recorder.put(next(self._seq), event.generation_id, stored)
            self.cond.notify_all()

    def events(self, generation_id: str) -> FakeSubscription:
        with self.cond:
            self.subscriptions_opened += 1
        return FakeSubscription(self, generation_id)

    def fetch_state_events(self, count: int, timeout: float) -> list[tuple[EventRecord, Delivery]]:
        with self.cond:
            self.cond.wait_for(lambda: self.closed or self.recorder.available(), timeout)
            if self.closed:
                raise BrokerUnavailable("closed")
            taken = self.recorder.take(count, self._tokens)
            return [(m.value, FakeDelivery(self, self.recorder, m, b"")) for m in taken]

    def log(self, generation_id: str) -> list[EventRecord]:
        with self.cond:
            return list(self.logs.get(generation_id, ()))

    def state_records(self, generation_id: str) -> list[EventRecord]:
        """The state events of a job that reached the recorder queue, acked or not."""
        return [r for r in self.log(generation_id) if r.kind in STATE_KINDS]

    # -- claims and cancellation ---------------------------------------------------------------

    def claim(self, generation_id: str) -> Claim | None:
        with self.cond:
            return self.claims.get(generation_id)

    def create_claim(self, generation_id: str, claim: Claim) -> None:
        with self.cond:
            if generation_id in self.claims:
                raise ClaimExistsError(generation_id)
            self._store_claim(generation_id, claim)

    def update_claim(self, generation_id: str, claim: Claim) -> bool:
        with self.cond:
            now = self.claims.get(generation_id)
            if now is None or now.revision != claim.revision:
                return False
            self._store_claim(generation_id, claim)
            return True

    def delete_claim(self, generation_id: str) -> None:
        """As when the claim's key ages out of the bucket."""
        with self.cond:
            self.claims.pop(generation_id, None)
            self.cond.notify_all()

    def _store_claim(self, generation_id: str, claim: Claim) -> None:
        stored = replace(claim, revision=next(self._revisions))
        self.claims[generation_id] = stored
        self.claim_history.setdefault(generation_id, []).append(stored)
        self.cond.notify_all()

    def signal_cancel(self, generation_id: str) -> None:
        with self.cond:
            self.cancel_signals.append(generation_id)
            listeners = list(self._listeners)
        for listener in listeners:
            listener(generation_id)

    def on_cancel(self, listener: Callable[[str], None]) -> None:
        with self.cond:
            self._listeners.append(listener)

    # -- the workers' directory ----------------------------------------------------------------

    def advertise(self, worker: str, document: bytes) -> None:
        with self.cond:
            self.directory[worker] = bytes(document)

    def workers(self) -> dict[str, bytes]:
        with self.cond:
            return dict(self.directory)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    # -- for tests -------------------------------------------------------------------------------

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Waits until `predicate()` holds, re-checking it whenever the broker changes."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                # Also re-check now and then: some predicates watch state outside the broker.
                self.cond.wait(min(remaining, 0.01))
            return True

    def settlements(self, generation_id: str) -> list[str]:
        """What became of each delivery of a job, in order ("acked", "handed_back"...)."""
        with self.cond:
            return [s.outcome for s in self.jobs.settlements if s.key == generation_id]

    def pending_jobs(self) -> list[str]:
        """Jobs not yet acked, leased or not."""
        with self.cond:
            return [m.key for m in self.jobs.messages.values()]


def _conforms(broker: FakeBroker) -> Broker:
    """mypy checks here that FakeBroker is structurally a Broker."""
    return broker
