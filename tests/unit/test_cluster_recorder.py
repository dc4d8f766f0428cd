"""The replicas' outcome recorder: an outcome is acknowledged to the broker only once it is
saved, so a store outage delays it and loses nothing; version conflicts between replicas
recording one job at once are retried in place."""

from __future__ import annotations

from server.application.generation.lifecycle import Transition
from server.domain.errors import ConflictError, DomainError, UnavailableError
from server.domain.generation_events import Completed, Timings
from server.infrastructure.broker.codec import Who, to_record
from server.infrastructure.broker.replica import RecorderFeed
from tests.unit.fake_broker import FakeBroker

GID = "0b7c2a52-5a38-4c2e-9a51-51b9b1b2c0de"


class FlakyRecorder:
    def __init__(self, failures: list[DomainError]) -> None:
        self.failures = failures
        self.calls = 0
        self.saved: list[Transition] = []

    def record_now(self, transition: Transition) -> None:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        self.saved.append(transition)


def settlements(broker: FakeBroker) -> list[str]:
    with broker.cond:
        return [s.outcome for s in broker.recorder.settlements]


def run_feed(broker: FakeBroker, recorder: FlakyRecorder) -> RecorderFeed:
    broker.publish(to_record(GID, 1, Completed(Timings()), images=[], who=Who("ann", "r-1")))
    feed = RecorderFeed(broker, recorder, retry_delay=0.05)
    feed.start()
    assert broker.wait_for(lambda: feed.recorded == 1, 10.0)
    feed.stop()
    return feed


def test_an_outcome_is_acknowledged_only_once_saved() -> None:
    broker = FakeBroker()
    outage: list[DomainError] = [UnavailableError("store down"), UnavailableError("store down")]
    recorder = FlakyRecorder(outage)
    run_feed(broker, recorder)
    assert settlements(broker) == ["handed_back", "handed_back", "acked"]
    [saved] = recorder.saved
    assert (saved.generation_id, saved.principal, saved.request_id) == (GID, "ann", "r-1")
    assert isinstance(saved.payload, Completed)


def test_a_version_conflict_is_retried_without_giving_the_outcome_back() -> None:
    broker = FakeBroker()
    recorder = FlakyRecorder([ConflictError("raced another replica")])
    run_feed(broker, recorder)
    assert recorder.calls == 2
    assert settlements(broker) == ["acked"]
