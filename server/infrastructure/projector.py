"""Follows the event log and keeps the read models up to date, off the request path.

Each batch of events is applied in one read-model transaction together with the new tracking
position, so a crash never applies an event twice or skips one. Other processes writing to a
shared PostgreSQL are picked up by polling; local writes wake the projector at once."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from server.domain.errors import (
    ConsistencyTimeoutError,
    DomainError,
    InvalidTokenError,
)
from server.domain.generation import Generation, GenerationView
from server.domain.lora import CommandRecord, Lora
from server.domain.models import AuditEntry, HistoryEntry, LoraView, is_uuid
from server.domain.recommend.feedback import (
    LINK_WINDOW,
    MAX_CANDIDATES,
    Feedback,
    MadeRecommendation,
    UsedLoras,
    link,
)
from server.domain.recommendation import PastGeneration, Recommendation
from server.infrastructure.event_store import EventStore, fold
from server.infrastructure.read_model import (
    ProjectedChange,
    SqlReadModel,
    made_recommendation,
)

log = logging.getLogger("loracle.projector")

_EVENT_FIELDS_NOT_IN_DATA = frozenset(
    {
        "timestamp",
        "originator_topic",
        "originator_id",
        "originator_version",
        "principal",
        "request_id",
    }
)

ChangeListener = Callable[[ProjectedChange], None]


class Projector:
    def __init__(
        self,
        store: EventStore,
        read_model: SqlReadModel,
        *,
        batch_size: int = 5000,
        poll_interval: float = 0.25,
        default_wait: float = 30.0,
    ) -> None:
        self._store = store
        self._read_model = read_model
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._default_wait = default_wait
        self._position = read_model.position()
        # Whether any recommendation was ever projected: until one is, a generation's history
        # record has nothing to answer and linking it costs no query (a bulk history replay).
        self._recommended = read_model.has_recommendations()
        self._cond = threading.Condition()
        # One batch at a time in this process; other processes are fenced by tracking.
        self._project_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listeners: list[ChangeListener] = []
        self.last_error: str = ""
        store.on_saved(lambda _position: self._wake.set())

    @property
    def position(self) -> int:
        return self._position

    def on_change(self, listener: ChangeListener) -> None:
        """Called after each applied batch (query-cache invalidation, search indexes)."""
        self._listeners.append(listener)

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="loracle-projector", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def rebuild(self) -> int:
        """Drops the read models and replays the whole log into them."""
        with self._project_lock:
            self._read_model.reset()
            self._recommended = False
            with self._cond:
                self._position = 0
        return self.catch_up()

    def catch_up(self) -> int:
        """Projects everything recorded so far; returns the position reached."""
        while self._project_batch():
            pass
        return self._position

    def reached(self, position: int) -> bool:
        return position <= self._position

    def wait_for(self, position: int, timeout: float | None) -> None:
        if position <= self._position:
            return
        if position > self._store.max_position():
            raise InvalidTokenError.consistency()
        self._wake.set()
        deadline = time.monotonic() + (self._default_wait if timeout is None else timeout)
        with self._cond:
            while self._position < position:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ConsistencyTimeoutError(
                        f"read model at {self._position} has not reached {position} yet"
                    )
                self._cond.wait(min(remaining, self._poll_interval))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                more = self._project_batch()
                self.last_error = ""
            except DomainError as exc:
                self.last_error = exc.message
                log.warning("projection paused: %s", exc.message)
                more = False
            except Exception as exc:  # keep following the log whatever one batch did
                self.last_error = type(exc).__name__
                log.exception("projection batch failed; retrying")
                more = False
            if not more:
                self._wake.wait(self._poll_interval)
                self._wake.clear()

    def _project_batch(self) -> bool:
        with self._project_lock:
            return self._project_batch_locked()

    def changes(self, after: int, until: int) -> Iterator[ProjectedChange]:
        """The batches that took the read models from `after` to `until`, built again from
        the event log without applying them (for in-memory indexes restored from a snapshot
        taken at `after`)."""
        while after < until:
            notifications = [
                n for n in self._store.notifications(after, self._batch_size) if n.id <= until
            ]
            if not notifications:
                return
            change = self._change(after, notifications, link=False)
            yield change
            after = change.position

    def _change(
        self, after: int, notifications: Sequence[Any], *, link: bool = True
    ) -> ProjectedChange:
        """The batch as the read models take it. `link=False` (a batch built again, already
        applied) reads its answered recommendations back from the read model: linking them
        again would find them answered."""
        # Each LoRA's and generation's events in this batch, oldest first.
        batch_events: dict[uuid.UUID, list[Any]] = {}
        audit: list[AuditEntry] = []
        history: list[HistoryEntry] = []
        catalog: set[str] = set()
        recommended: list[tuple[int, MadeRecommendation]] = []
        past: list[tuple[int, Any]] = []
        for n in notifications:
            if n.topic.startswith(_COMMAND_RECORD):
                continue
            event = self._store.decode(n)
            audit.append(_audit_entry(n.id, event))
            if n.topic.startswith(_LORA):
                catalog.add(str(n.originator_id))
            if n.topic.startswith((_LORA, *_GENERATION)):
                batch_events.setdefault(uuid.UUID(str(n.originator_id)), []).append(event)
            elif n.topic.startswith(_PAST_GENERATION):
                history.append(HistoryEntry(n.id, event.prompt, tuple(event.lora_ids)))
                past.append((n.id, event))
            elif n.topic.startswith(_RECOMMENDATION_MADE):
                recommended.append((n.id, made_recommendation(audit[-1])))
        upserts: list[LoraView] = []
        deletes: list[str] = []
        generations: list[GenerationView] = []
        for aggregate in self._aggregates(batch_events).values():
            if isinstance(aggregate, Lora):
                if aggregate.deleted:
                    deletes.append(str(aggregate.id))
                else:
                    upserts.append(aggregate.view())
            elif isinstance(aggregate, Generation):
                generations.append(aggregate.view())
        # Audit rows of a generation's events carry its owner (from the views), catalog
        # events none: ListEvents shows a principal only those and its own generations'.
        return ProjectedChange(
            after,
            notifications[-1].id,
            upserts,
            deletes,
            audit,
            history,
            generations,
            self._feedback(past, recommended, {g.id: g for g in generations})
            if link
            else list(self._read_model.feedback(after=after, until=notifications[-1].id)),
            frozenset(catalog),
        )

    def _project_batch_locked(self) -> bool:
        after = self._position
        notifications = self._store.notifications(after, self._batch_size)
        if not notifications:
            return False
        change = self._change(after, notifications)
        # False: another process sharing the database applied this batch first. This process's
        # in-memory consumers (the recommendation index, the query cache) still need it.
        self._read_model.apply(change)
        # Listeners run before waiters wake, so a query that waited for this position can
        # neither hit a cache entry computed before it nor an index that lacks it.
        for listener in self._listeners:
            try:
                listener(change)
            except Exception:
                log.exception("projection listener failed")
        with self._cond:
            self._position = change.position
            self._cond.notify_all()
        return len(notifications) == self._batch_size

    def _feedback(
        self,
        past: list[tuple[int, Any]],
        recommended: list[tuple[int, MadeRecommendation]],
        generations: dict[str, GenerationView],
    ) -> list[Feedback]:
        """Links each recorded generation of the batch to the recommendation it answers, if
        any (server.domain.recommend.feedback): the generation's owner and submission time
        come from its view (this batch's or the read model's), else from the record."""
        out: list[Feedback] = []
        answered: set[str] = set()
        if not (self._recommended or recommended):
            return out
        self._recommended = True
        for position, event in past:
            key = str(event.key)
            view = generations.get(key)
            if view is None and is_uuid(key):
                view = self._read_model.get_generation(key)
            principal = view.owner if view is not None else str(event.principal)
            submitted = _aware(
                view.create_time if view is not None and view.create_time else event.timestamp
            )
            used = UsedLoras(principal, str(event.prompt), tuple(event.lora_ids), submitted)
            in_batch = [
                rec
                for p, rec in reversed(recommended)
                if p < position and rec.principal == principal
            ]
            earlier = self._read_model.recent_recommendations(
                principal, submitted - LINK_WINDOW, submitted, MAX_CANDIDATES
            )
            found = link(position, used, [*in_batch, *earlier], answered)
            if found is not None:
                out.append(found)
                answered.add(found.recommendation_id)
        return out

    def _aggregates(self, batch_events: dict[uuid.UUID, list[Any]]) -> dict[uuid.UUID, Any]:
        """Each aggregate as of its last event in the batch. One that begins in the batch is
        built from the batch's events alone (the log is contiguous, so it holds all of them);
        the others are read in bulk up to the version the batch reached."""
        built: dict[uuid.UUID, Any] = {}
        earlier: dict[uuid.UUID, int] = {}
        for aggregate_id, events in batch_events.items():
            if events[0].originator_version == 1:
                built[aggregate_id] = fold(events)
            else:
                earlier[aggregate_id] = events[-1].originator_version
        if earlier:
            built.update(self._store.get_many(earlier, versions=earlier))
        return {i: built[i] for i in batch_events if i in built}


def _topic_prefix(cls: type[Any]) -> str:
    return f"{cls.__module__}:{cls.__qualname__}."


_COMMAND_RECORD = _topic_prefix(CommandRecord)
_LORA = _topic_prefix(Lora)
_PAST_GENERATION = _topic_prefix(PastGeneration)
_RECOMMENDATION_MADE = f"{_topic_prefix(Recommendation)}Made"
_GENERATION = (
    _topic_prefix(Generation),
    # Events stored before the aggregate moved from server.domain.generation_job.
    "server.domain.generation_job:Generation.",
)


def _aware(moment: Any) -> Any:
    """An event's time in UTC (stored naive times are UTC)."""
    if isinstance(moment, datetime):
        moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
        moment = moment.astimezone(UTC)
    return moment


def _audit_entry(position: int, event: Any) -> AuditEntry:
    owner, _, name = type(event).__qualname__.rpartition(".")
    data = {k: v for k, v in vars(event).items() if k not in _EVENT_FIELDS_NOT_IN_DATA}
    occurred = _aware(event.timestamp)
    return AuditEntry(
        position=position,
        aggregate_id=str(event.originator_id),
        aggregate_version=int(event.originator_version),
        type=f"{owner}{name}",
        principal=str(getattr(event, "principal", "")),
        request_id=str(getattr(event, "request_id", "")),
        occurred_at=occurred,
        data=data,
    )
