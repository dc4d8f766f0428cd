"""The generation handlers through the real buses, with a fake device executor (and, for
cluster mode, the fake broker) passed to bootstrap by keyword: in-memory storage, no torch."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.application.commands import (
    CancelGenerationCommand,
    GenerateImageCommand,
    GenerationRequest,
    LoraChoice,
    SubmitGenerationCommand,
)
from server.application.context import DispatchContext
from server.application.generation.jobs import MODEL_LOADING_RETRY_SECONDS
from server.application.queries import GetGenerationQuery
from server.bootstrap import Container
from server.domain.errors import (
    DomainError,
    GenerationFailedError,
    NotFoundError,
    PreconditionError,
    ResourceExhaustedError,
    UnavailableError,
    ValidationError,
)
from server.domain.generation import GenerationState, GenerationView
from server.domain.generation_events import (
    Cancelled,
    Completed,
    Failed,
    ImageComplete,
    Payload,
    Queued,
    Started,
    Timings,
)
from server.infrastructure.broker.codec import decode_job, to_record
from server.infrastructure.broker.replica import model_document
from tests.support import make_container
from tests.unit.fake_broker import FakeBroker
from tests.unit.fake_executor import FakeExecutor, FakeModels, ready_model


def ctx(request_id: str = "", principal: str = "alice") -> DispatchContext:
    return DispatchContext(principal=principal, request_id=request_id)


@pytest.fixture
def fake() -> FakeExecutor:
    return FakeExecutor(max_queue=2)


@pytest.fixture
def c(tmp_path: Path, fake: FakeExecutor) -> Iterator[Container]:
    container = make_container(
        tmp_path, "memory://", executor=fake, models=FakeModels(ready_model("tiny"))
    )
    yield container
    container.close()


def request(**fields: object) -> GenerationRequest:
    return GenerationRequest(prompt=str(fields.pop("prompt", "a red fox")), **fields)  # type: ignore[arg-type]


def recorded(c: Container, generation_id: str) -> GenerationView:
    c.recorder.flush()
    c.projector.wait_for(c.store.max_position(), 5.0)
    return c.queries.dispatch(GetGenerationQuery(generation_id=generation_id), ctx()).data


def test_bootstrap_uses_the_executor_it_is_given(c: Container, fake: FakeExecutor) -> None:
    assert c.executor is fake
    assert fake.started


def test_generate_image_streams_the_job_and_records_its_outcome(
    c: Container, fake: FakeExecutor
) -> None:
    stream = c.commands.stream(GenerateImageCommand(request=request(num_images=2)), ctx("r1"))
    first = next(stream)
    assert first.payload == Queued(1)
    job = fake.jobs[first.generation_id].job
    # The model's defaults fill what the request left at zero.
    assert (job.width, job.height, job.steps) == (512, 512, 25)
    fake.run(first.generation_id)
    kinds = [type(e.payload) for e in stream]
    assert kinds == [Started, ImageComplete, ImageComplete, Completed]
    view = recorded(c, first.generation_id)
    assert view.state is GenerationState.SUCCEEDED
    assert [i.index for i in view.images] == [0, 1]
    assert view.timings == {
        "queue_seconds": 0.5,
        "text_encoding_seconds": 0.25,
        "denoising_seconds": 2.0,
        "decoding_seconds": 0.125,
    }


def test_a_failed_job_is_recorded_failed_with_its_reason(c: Container, fake: FakeExecutor) -> None:
    gid, _ = c.commands.dispatch(SubmitGenerationCommand(request=request()), ctx()).unwrap()
    fake.fail(gid, "the LoRA's shapes do not fit this model")
    view = recorded(c, gid)
    assert view.state is GenerationState.FAILED
    assert view.error == "the LoRA's shapes do not fit this model"


def test_out_of_memory_ends_the_stream_resource_exhausted(c: Container, fake: FakeExecutor) -> None:
    stream = c.commands.stream(GenerateImageCommand(request=request()), ctx())
    first = next(stream)
    fake.fail(first.generation_id, "the device ran out of memory", "OUT_OF_DEVICE_MEMORY")
    seen: list[Payload] = []
    with pytest.raises(ResourceExhaustedError):
        seen.extend(e.payload for e in stream)
    assert isinstance(seen[-1], Failed)


@pytest.mark.parametrize(
    ("reason", "error", "retry"),
    [
        ("LORA_LOAD_FAILED", PreconditionError, None),
        ("MODEL_LOAD_FAILED", PreconditionError, None),
        ("SERVER_SHUTTING_DOWN", UnavailableError, 5.0),
        ("WORKER_LOST", UnavailableError, 5.0),
        ("GENERATION_FAILED", GenerationFailedError, None),
    ],
)
def test_every_failure_ends_the_stream_with_its_error_after_the_failed_event(
    c: Container, fake: FakeExecutor, reason: str, error: type[DomainError], retry: float | None
) -> None:
    stream = c.commands.stream(GenerateImageCommand(request=request()), ctx())
    first = next(stream)
    fake.fail(first.generation_id, "it did not work", reason, "ab" * 32)
    seen: list[Payload] = []
    with pytest.raises(error) as raised:
        seen.extend(e.payload for e in stream)
    assert seen[-1] == Failed("it did not work", reason, "ab" * 32)
    assert raised.value.reason == reason
    assert raised.value.message == "it did not work"
    assert raised.value.retry_after_seconds == retry


def test_invalid_requests_are_refused_before_anything_is_queued(
    c: Container, fake: FakeExecutor
) -> None:
    bad = request(prompt=" ", width=70, steps=-1, num_images=0)
    with pytest.raises(ValidationError) as caught:
        c.commands.dispatch(SubmitGenerationCommand(request=bad), ctx()).unwrap()
    fields = {v.field for v in caught.value.field_violations}
    assert fields == {"spec.prompt", "spec.width", "spec.steps", "spec.num_images"}
    assert fake.jobs == {}


def test_unknown_model_and_unknown_lora_are_not_found(c: Container, fake: FakeExecutor) -> None:
    with pytest.raises(NotFoundError) as model:
        c.commands.dispatch(SubmitGenerationCommand(request=request(model="nope")), ctx()).unwrap()
    assert model.value.reason == "MODEL_NOT_FOUND"
    assert model.value.message == "model 'nope' not found; there are: tiny"
    loras = (LoraChoice("no-such-lora"),)
    with pytest.raises(NotFoundError) as lora:
        c.commands.dispatch(SubmitGenerationCommand(request=request(loras=loras)), ctx()).unwrap()
    assert lora.value.reason == "LORA_NOT_FOUND"
    assert fake.jobs == {}


def test_a_model_that_is_not_ready_is_a_precondition(tmp_path: Path) -> None:
    info = ready_model("tiny")
    models = FakeModels(type(info)(info.config, False, "still loading"))
    c = make_container(tmp_path, "memory://", executor=FakeExecutor(), models=models)
    try:
        with pytest.raises(PreconditionError) as caught:
            c.commands.dispatch(SubmitGenerationCommand(request=request()), ctx()).unwrap()
        assert caught.value.reason == "MODEL_NOT_READY"
        assert caught.value.retry_after_seconds is None  # broken, not loading: no RetryInfo
    finally:
        c.close()


def test_a_model_that_is_still_loading_says_when_to_retry(tmp_path: Path) -> None:
    info = ready_model("tiny")
    models = FakeModels(type(info)(info.config, False, "building", loading=True))
    c = make_container(tmp_path, "memory://", executor=FakeExecutor(), models=models)
    try:
        with pytest.raises(PreconditionError) as caught:
            c.commands.dispatch(SubmitGenerationCommand(request=request()), ctx()).unwrap()
        assert caught.value.reason == "MODEL_NOT_READY"
        assert caught.value.retry_after_seconds == MODEL_LOADING_RETRY_SECONDS
    finally:
        c.close()


def test_a_full_queue_is_resource_exhausted_and_records_nothing(
    c: Container, fake: FakeExecutor
) -> None:
    for _ in range(fake.max_queue):
        c.commands.dispatch(SubmitGenerationCommand(request=request()), ctx()).unwrap()
    before = c.store.max_position()
    with pytest.raises(ResourceExhaustedError):
        c.commands.dispatch(SubmitGenerationCommand(request=request()), ctx()).unwrap()
    assert c.store.max_position() == before


def test_a_retried_submit_answers_the_first_generation(c: Container, fake: FakeExecutor) -> None:
    command = SubmitGenerationCommand(request=request())
    first = c.commands.dispatch(command, ctx("same"))
    c.commands.dispatch(SubmitGenerationCommand(request=request()), ctx()).unwrap()
    again = c.commands.dispatch(command, ctx("same"))
    assert again.unwrap() == first.unwrap()
    assert again.position == first.position > 0  # the same consistency token
    assert len(fake.jobs) == 2


def test_a_retried_cancel_answers_the_first_cancel(c: Container, fake: FakeExecutor) -> None:
    gid, _ = c.commands.dispatch(SubmitGenerationCommand(request=request()), ctx()).unwrap()
    command = CancelGenerationCommand(generation_id=gid)
    first = c.commands.dispatch(command, ctx("cancel"))
    c.commands.dispatch(SubmitGenerationCommand(request=request()), ctx()).unwrap()
    again = c.commands.dispatch(command, ctx("cancel"))
    assert again.unwrap() == first.unwrap()
    assert again.position == first.position


def test_cancel_stops_a_queued_job_and_answers_its_recorded_state(
    c: Container, fake: FakeExecutor
) -> None:
    gid, _ = c.commands.dispatch(SubmitGenerationCommand(request=request()), ctx()).unwrap()
    view = c.commands.dispatch(CancelGenerationCommand(generation_id=gid), ctx()).unwrap()
    assert view is not None
    assert view.state is GenerationState.CANCELLED
    assert isinstance(fake.jobs[gid].last_payload(), Cancelled)


def test_cancel_of_a_job_no_process_runs_cancels_it_in_the_store(
    c: Container, fake: FakeExecutor
) -> None:
    gid, _ = c.commands.dispatch(SubmitGenerationCommand(request=request()), ctx()).unwrap()
    del fake.jobs[gid]  # its process died with it
    view = c.commands.dispatch(CancelGenerationCommand(generation_id=gid), ctx()).unwrap()
    assert view is not None
    assert view.state is GenerationState.CANCELLED


def test_cancel_of_an_unknown_or_malformed_id(c: Container) -> None:
    with pytest.raises(ValidationError):
        c.commands.dispatch(CancelGenerationCommand(generation_id="x"), ctx()).unwrap()
    missing = "00000000-0000-4000-8000-000000000000"
    with pytest.raises(NotFoundError):
        c.commands.dispatch(CancelGenerationCommand(generation_id=missing), ctx()).unwrap()


# -- cluster mode: the same handlers over the fake broker ---------------------------------


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Container, FakeBroker]]:
    broker = FakeBroker()
    advert = {"at": 9e12, "models": [model_document(ready_model("tiny"))], "running": 0}
    broker.advertise("worker-1", json.dumps(advert).encode())
    container = make_container(tmp_path, "memory://", executor=FakeExecutor(), broker=broker)
    yield container, broker
    container.close()


def test_cluster_submit_queues_in_the_broker_and_records_what_a_worker_publishes(
    cluster: tuple[Container, FakeBroker],
) -> None:
    c, broker = cluster
    gid, _ = c.commands.dispatch(SubmitGenerationCommand(request=request()), ctx("r1")).unwrap()
    message = decode_job(next(iter(broker.jobs.messages.values())).value)
    assert (message.generation_id, message.model, message.who.principal) == (gid, "tiny", "alice")
    # A worker runs it and publishes the outcome; whichever replica pulls it records it.
    finished = threading.Event()
    c.projector.on_change(
        lambda change: (
            finished.set()
            if any(v.id == gid and v.state is GenerationState.SUCCEEDED for v in change.generations)
            else None
        )
    )
    broker.publish(to_record(gid, 1, Started(1), who=message.who))
    broker.publish(to_record(gid, 1, Completed(Timings()), images=[], who=message.who))
    assert finished.wait(10.0)
    assert recorded(c, gid).state is GenerationState.SUCCEEDED
