"""What a replica lists as the cluster's models: the live workers' adverts, remembered for a
while so one bad read of the directory neither empties the list nor fails the call."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from server.domain.models import Architecture, BaseModelConfig, BaseModelInfo
from server.infrastructure.broker.port import BrokerUnavailable
from server.infrastructure.broker.replica import ClusterModels, model_document
from tests.unit.fake_broker import FakeBroker

CONFIG = BaseModelConfig("tiny", Architecture.SD1, Path("/models/tiny"))


class StarvedBroker(FakeBroker):
    """A broker whose directory reads can be made to time out."""

    def __init__(self) -> None:
        super().__init__()
        self.silent = False

    def workers(self) -> dict[str, bytes]:
        if self.silent:
            raise BrokerUnavailable("list workers")
        return super().workers()


def advert(broker: FakeBroker, worker: str, at: float, ready: bool = True) -> None:
    document = {"at": at, "models": [model_document(BaseModelInfo(CONFIG, ready))]}
    broker.advertise(worker, json.dumps(document).encode())


def fresh(models: ClusterModels) -> list[BaseModelInfo]:
    models._cache = (float("-inf"), [])  # past the one-second cache
    return models.statuses()


def test_a_failed_directory_read_answers_from_recent_adverts() -> None:
    broker = StarvedBroker()
    advert(broker, "w1", time.time())
    models = ClusterModels(broker, (CONFIG,), ttl=15.0)
    assert [m.ready for m in fresh(models)] == [True]
    broker.silent = True
    assert [m.ready for m in fresh(models)] == [True]


def test_a_failed_directory_read_with_nothing_recent_is_unavailable() -> None:
    broker = StarvedBroker()
    advert(broker, "w1", time.time() - 60)  # older than the ttl
    models = ClusterModels(broker, (CONFIG,), ttl=15.0)
    [listed] = fresh(models)
    assert not listed.ready  # the configured model, served by nobody
    broker.silent = True
    with pytest.raises(BrokerUnavailable):
        fresh(models)


def test_adverts_expire_by_their_own_age() -> None:
    broker = StarvedBroker()
    advert(broker, "w1", time.time() - 14.5)
    models = ClusterModels(broker, (CONFIG,), ttl=15.0)
    assert [m.ready for m in fresh(models)] == [True]
    time.sleep(0.6)
    assert [m.ready for m in fresh(models)] == [False]
