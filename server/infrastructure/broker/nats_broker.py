"""The broker port on NATS JetStream.

- `<NS>_JOBS`: work-queue stream of jobs (`<ns>.jobs.<id>`), one durable pull consumer
  `workers` shared by every worker; its ack wait is the job lease.
- `<NS>_EVENTS`: every job's events (`<ns>.gen.<id>.live` and `.state`), kept for the
  retention period so any replica can relay or replay any job; a durable consumer `recorder`
  on the `.state` subjects is shared by the API replicas.
- KV `<ns>-jobs` (claims) and `<ns>-workers` (heartbeats and the models each worker serves).

nats-py is asyncio-only; the service is threaded, so one event loop runs on its own thread
and every call crosses over with a timeout (a broker that does not answer is UNAVAILABLE)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import nats
from nats.aio.msg import Msg
from nats.js import api
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from server.domain.errors import ResourceExhaustedError
from server.infrastructure.broker.port import (
    STATE_KINDS,
    BrokerUnavailable,
    Claim,
    Delivery,
    EventRecord,
)

log = logging.getLogger("loracle.broker")
T = TypeVar("T")
_HEADER = "Loracle-Event"


class _NatsDelivery:
    def __init__(self, broker: NatsBroker, msg: Msg) -> None:
        self._broker = broker
        self._msg = msg

    @property
    def body(self) -> bytes:
        return bytes(self._msg.data)

    def ack(self) -> None:
        self._broker.call(self._msg.ack(), "ack")

    def hand_back(self, delay: float = 0.0) -> None:
        self._broker.call(self._msg.nak(delay or None), "nak")

    def extend(self) -> None:
        self._broker.call(self._msg.in_progress(), "extend lease")


class _Subscription:
    """A job's events from the first one on, in order (an ordered consumer: it re-creates
    itself after a reconnect from the last sequence it delivered)."""

    def __init__(self, broker: NatsBroker, generation_id: str) -> None:
        self._broker = broker
        self._queue: queue.Queue[EventRecord] = queue.Queue()
        subject = f"{broker.ns}.gen.{generation_id}.*"

        async def on_message(msg: Msg) -> None:
            self._queue.put(_decode_event(msg))

        self._sub = broker.call(
            broker.js.subscribe(
                subject,
                cb=on_message,
                stream=broker.events_stream,
                ordered_consumer=True,
                deliver_policy=api.DeliverPolicy.ALL,
            ),
            "follow a job",
        )

    def next(self, timeout: float) -> EventRecord | None:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        # The consumer is ephemeral: if this fails, the server drops it when it goes idle.
        with contextlib.suppress(BrokerUnavailable):
            self._broker.call(self._sub.unsubscribe(), "unsubscribe", timeout=2.0)


class NatsBroker:
    def __init__(
        self,
        url: str,
        *,
        namespace: str = "loracle",
        lease_seconds: float = 30.0,
        retention_seconds: float = 24 * 3600,
        max_queue: int = 0,
        call_timeout: float = 5.0,
        name: str = "loracle",
    ) -> None:
        self.ns = namespace.lower()
        upper = namespace.upper().replace("-", "_")
        self.jobs_stream = f"{upper}_JOBS"
        self.events_stream = f"{upper}_EVENTS"
        self._timeout = call_timeout
        self._cancel_listeners: list[Callable[[str], None]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="loracle-nats")
        self._thread.daemon = True
        self._thread.start()
        try:
            self.call(
                self._connect(url, name, lease_seconds, retention_seconds, max_queue),
                "connect",
                timeout=max(call_timeout, 10.0),
            )
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise

    async def _connect(
        self, url: str, name: str, lease: float, retention: float, max_queue: int
    ) -> None:
        async def on_error(exc: Exception) -> None:
            log.warning("broker connection: %s", exc)

        self.nc = await nats.connect(
            url,
            name=name,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            connect_timeout=5,
            error_cb=on_error,
            allow_reconnect=True,
        )
        self.js = self.nc.jetstream(timeout=self._timeout)
        await self._ensure_stream(
            api.StreamConfig(
                name=self.jobs_stream,
                subjects=[f"{self.ns}.jobs.*"],
                retention=api.RetentionPolicy.WORK_QUEUE,
                storage=api.StorageType.FILE,
                duplicate_window=120.0,
                max_msgs=max_queue if max_queue > 0 else -1,
                discard=api.DiscardPolicy.NEW,
            )
        )
        await self._ensure_stream(
            api.StreamConfig(
                name=self.events_stream,
                subjects=[f"{self.ns}.gen.*.*"],
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE,
                max_age=retention,
            )
        )
        await self._ensure_consumer(
            self.jobs_stream,
            api.ConsumerConfig(
                durable_name="workers",
                ack_policy=api.AckPolicy.EXPLICIT,
                ack_wait=lease,
                max_deliver=-1,  # attempts are counted by claims: a hand-back is not one
                max_ack_pending=-1,
            ),
        )
        await self._ensure_consumer(
            self.events_stream,
            api.ConsumerConfig(
                durable_name="recorder",
                ack_policy=api.AckPolicy.EXPLICIT,
                ack_wait=30.0,
                max_deliver=-1,
                filter_subject=f"{self.ns}.gen.*.state",
            ),
        )
        self._jobs_sub = await self.js.pull_subscribe_bind("workers", self.jobs_stream)
        self._state_sub = await self.js.pull_subscribe_bind("recorder", self.events_stream)
        self._claims: KeyValue = await self.js.create_key_value(
            bucket=f"{self.ns}-jobs", ttl=retention, storage=api.StorageType.FILE
        )
        self._workers: KeyValue = await self.js.create_key_value(
            bucket=f"{self.ns}-workers", ttl=30.0, storage=api.StorageType.FILE
        )

        async def on_cancel(msg: Msg) -> None:
            generation_id = msg.subject.rsplit(".", 1)[-1]
            for listener in self._cancel_listeners:
                listener(generation_id)

        await self.nc.subscribe(f"{self.ns}.cancel.*", cb=on_cancel)

    async def _ensure_stream(self, config: api.StreamConfig) -> None:
        try:
            await self.js.add_stream(config)
        except nats.js.errors.BadRequestError:
            await self.js.update_stream(config)  # created earlier with other limits

    async def _ensure_consumer(self, stream: str, config: api.ConsumerConfig) -> None:
        try:
            await self.js.add_consumer(stream, config)
        except nats.js.errors.BadRequestError as exc:
            # Never delete it to apply new settings: its deliveries in flight would be lost.
            log.warning("keeping consumer %s as it is: %s", config.durable_name, exc)

    def call(self, coro: Coroutine[Any, Any, T], what: str, timeout: float | None = None) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(self._timeout if timeout is None else timeout)
        except TimeoutError as exc:
            if not future.done():  # the broker did not answer in time
                future.cancel()
                raise BrokerUnavailable(what) from _Silent(what)
            raise BrokerUnavailable(what) from exc  # the call's own timeout (an empty fetch)
        except (nats.errors.Error, OSError) as exc:
            future.cancel()
            if isinstance(exc, nats.js.errors.APIError) and not isinstance(
                exc, nats.js.errors.ServiceUnavailableError
            ):
                raise
            raise BrokerUnavailable(what) from exc

    # -- jobs --------------------------------------------------------------------------------

    def queue_depth(self) -> int:
        info = self.call(self.js.stream_info(self.jobs_stream), "queue depth")
        return int(info.state.messages)

    def max_message_bytes(self) -> int:
        """The server's max_payload (1 MB unless the NATS server is configured otherwise)."""
        return int(self.nc.max_payload)

    def enqueue(self, generation_id: str, body: bytes) -> None:
        try:
            self._enqueue(generation_id, body)
        except nats.js.errors.APIError as exc:  # the stream's own bound (max_queue) is hit
            raise ResourceExhaustedError(
                f"the cluster's generation queue is full ({exc.description})", 2.0
            ) from None

    def _enqueue(self, generation_id: str, body: bytes) -> None:
        self.call(
            self.js.publish(
                f"{self.ns}.jobs.{generation_id}",
                body,
                headers={"Nats-Msg-Id": generation_id},
                stream=self.jobs_stream,
            ),
            "queue the job",
        )

    def fetch(self, count: int, timeout: float) -> list[Delivery]:
        msgs = self._pull(self._jobs_sub, count, timeout, "fetch jobs")
        return [_NatsDelivery(self, m) for m in msgs]

    def _pull(self, sub: Any, count: int, timeout: float, what: str) -> list[Msg]:
        try:
            msgs: list[Msg] = self.call(sub.fetch(count, timeout=timeout), what, timeout + 5.0)
        except BrokerUnavailable as exc:
            if isinstance(exc.__cause__, TimeoutError):  # nothing to fetch right now
                return []
            raise
        return msgs

    # -- events ------------------------------------------------------------------------------

    def publish(self, event: EventRecord) -> None:
        where = "state" if event.kind in STATE_KINDS else "live"
        header = json.dumps({"k": event.kind, "a": event.attempt, **event.meta}, default=str)
        self.call(
            self.js.publish(
                f"{self.ns}.gen.{event.generation_id}.{where}",
                event.data,
                headers={_HEADER: header},
                stream=self.events_stream,
            ),
            "publish an event",
        )

    def events(self, generation_id: str) -> _Subscription:
        return _Subscription(self, generation_id)

    def fetch_state_events(self, count: int, timeout: float) -> list[tuple[EventRecord, Delivery]]:
        msgs = self._pull(self._state_sub, count, timeout, "fetch outcomes")
        return [(_decode_event(m), _NatsDelivery(self, m)) for m in msgs]

    # -- claims ------------------------------------------------------------------------------

    def claim(self, generation_id: str) -> Claim | None:
        async def get() -> Claim | None:
            try:
                entry = await self._claims.get(generation_id)
            except (KeyNotFoundError, NotFoundError):
                return None
            if not entry.value:
                return None
            doc = json.loads(entry.value)
            return Claim(
                doc["state"], doc["attempt"], doc["worker"], doc["cancel"], entry.revision or 0
            )

        return self.call(get(), "read a claim")

    def create_claim(self, generation_id: str, claim: Claim) -> None:
        self.call(self._claims.create(generation_id, _claim_bytes(claim)), "record a claim")

    def update_claim(self, generation_id: str, claim: Claim) -> bool:
        """Compare-and-set against `claim.revision`; False when someone changed it first."""
        try:
            self.call(
                self._claims.update(generation_id, _claim_bytes(claim), last=claim.revision),
                "update a claim",
            )
        except KeyWrongLastSequenceError:
            return False
        except nats.js.errors.APIError as exc:
            if exc.err_code == 10071:  # wrong last sequence, as a plain API error
                return False
            raise
        return True

    def signal_cancel(self, generation_id: str) -> None:
        async def send() -> None:
            await self.nc.publish(f"{self.ns}.cancel.{generation_id}", b"")
            await self.nc.flush(timeout=2)

        self.call(send(), "signal a cancellation")

    def on_cancel(self, listener: Callable[[str], None]) -> None:
        self._cancel_listeners.append(listener)

    # -- workers -----------------------------------------------------------------------------

    def advertise(self, worker: str, document: bytes) -> None:
        self.call(self._workers.put(worker, document), "advertise a worker")

    def workers(self) -> dict[str, bytes]:
        async def read() -> dict[str, bytes]:
            # One watch over the bucket gives every current value; keys() and a get per key
            # would cost a round trip per worker.
            watcher = await self._workers.watchall(ignore_deletes=True)
            out: dict[str, bytes] = {}
            try:
                async for entry in watcher:
                    if entry is None:  # the current values are all in
                        break
                    if entry.value:
                        out[entry.key] = bytes(entry.value)
            finally:
                await watcher.stop()  # type: ignore[no-untyped-call]
            return out

        return self.call(read(), "list workers")

    def close(self) -> None:
        """Closes, not drains: nothing is acknowledged implicitly, so nothing needs flushing,
        and a drain waits out every pull request in flight."""

        async def finish() -> None:
            await self.nc.close()
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        with contextlib.suppress(BrokerUnavailable, nats.errors.Error):
            self.call(finish(), "close", timeout=5.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)


class _Silent(Exception):
    """The broker did not answer within the call's timeout (not an empty fetch)."""


def _claim_bytes(claim: Claim) -> bytes:
    doc = {
        "state": claim.state,
        "attempt": claim.attempt,
        "worker": claim.worker,
        "cancel": claim.cancel,
    }
    return json.dumps(doc).encode()


def _decode_event(msg: Msg) -> EventRecord:
    header = json.loads((msg.headers or {}).get(_HEADER, "{}"))
    kind = str(header.pop("k", ""))
    attempt = int(header.pop("a", 0))
    generation_id = msg.subject.split(".")[-2]
    return EventRecord(generation_id, kind, attempt, header, bytes(msg.data))
