"""Cluster mode's write side: BrokerWorker on the in-memory broker, running jobs on a real
DiffusionExecutor whose loader returns a fake pipeline (a few steps, tiny flat images, no
model), and the replica's BrokerExecutor and RemoteJobStream.cancel."""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from server.application.context import DispatchContext, use_context
from server.domain.errors import Reason, ResourceExhaustedError
from server.domain.generation_events import (
    Cancelled,
    Completed,
    ImageChunk,
    ImageComplete,
    Payload,
    Started,
    image_chunks,
)
from server.domain.generation_job import ControlInput, GenerationJob, InputImage
from server.domain.models import (
    Architecture,
    BaseModelConfig,
    BaseModelInfo,
    ControlNetConfig,
    ControlNetInfo,
    UpscalerModelInfo,
)
from server.infrastructure.broker.codec import (
    Who,
    decode_job,
    recorded_images,
    to_payload,
    to_record,
)
from server.infrastructure.broker.port import Claim, EventRecord
from server.infrastructure.broker.replica import BrokerExecutor, RemoteJobStream
from server.infrastructure.broker.worker import BrokerWorker
from server.infrastructure.diffusion import images as images_module
from server.infrastructure.diffusion.executor import DiffusionExecutor
from server.infrastructure.diffusion.families.sd import StableDiffusion
from server.infrastructure.diffusion.handles import JobHandle
from server.infrastructure.lora_files import LoraFileReader
from tests.unit.fake_broker import FakeBroker

# -- a pipeline without a model ------------------------------------------------------------------


class FakeScheduler:
    def __init__(self) -> None:
        self.config: dict[str, object] = {"num_train_timesteps": 1000}
        self.timesteps: list[int] = []


@dataclass
class FakeOutput:
    images: list[Image.Image]


StepCallback = Callable[[Any, int, int, dict[str, Any]], dict[str, Any]]


class FakePipeline:
    """What DiffusionExecutor calls on a diffusers pipeline: each step calls the step
    callback (where the executor reports progress and honours cancellation), and each row
    comes out as a flat image coloured by its generator's seed. `gate` holds every step
    until it is set; `entered` is set once denoising has begun."""

    def __init__(self) -> None:
        self.scheduler = FakeScheduler()
        self.components: dict[str, object] = {}
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.calls: list[tuple[int, int]] = []  # (width, rows) of each batch

    def set_progress_bar_config(self, **_: object) -> None:
        pass

    def __call__(
        self,
        *,
        prompt: list[str],
        width: int,
        height: int,
        num_inference_steps: int,
        generator: list[torch.Generator],
        callback_on_step_end: StepCallback,
        **_: object,
    ) -> FakeOutput:
        self.calls.append((width, len(prompt)))
        self.scheduler.timesteps = list(range(num_inference_steps, 0, -1))
        for step in range(num_inference_steps):
            self.entered.set()
            assert self.gate.wait(5.0), "the test never released the pipeline"
            callback_on_step_end(self, step, num_inference_steps - step, {})
        return FakeOutput([Image.new("RGB", (width, height), _colour(g)) for g in generator])


def _colour(generator: torch.Generator) -> tuple[int, int, int]:
    seed = generator.initial_seed()
    return (seed % 256, (seed * 7) % 256, (seed * 13) % 256)


class Models:
    def __init__(self, config: BaseModelConfig) -> None:
        self.config = config

    def statuses(self) -> list[BaseModelInfo]:
        return [BaseModelInfo(self.config, True)]

    def controlnets(self) -> list[ControlNetInfo]:
        return []

    def upscaler_models(self) -> list[UpscalerModelInfo]:
        return []


class RefusingExecutor(DiffusionExecutor):
    """Refuses its first `refusals` jobs, as an executor that is shutting down does."""

    def __init__(self, refusals: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.refusals = refusals

    def submit(
        self, job: GenerationJob, on_accept: Callable[[int], None] | None = None
    ) -> JobHandle:
        if self.refusals > 0:
            self.refusals -= 1
            raise ResourceExhaustedError("the executor is shutting down", 5.0)
        return super().submit(job, on_accept)


# -- a cluster of one worker ----------------------------------------------------------------------


@dataclass
class Cluster:
    broker: FakeBroker
    pipeline: FakePipeline
    model: BaseModelConfig
    lora_root: Path
    loads: list[str] = field(default_factory=list)
    executor: DiffusionExecutor | None = None
    worker: BrokerWorker | None = None

    def load(self, model: BaseModelConfig, device: str, dtype: str) -> FakePipeline:
        self.loads.append(model.name)
        return self.pipeline

    def job(self, **fields: Any) -> GenerationJob:
        base: dict[str, Any] = {
            "generation_id": str(uuid.uuid4()),
            "model": self.model,
            "prompt": "a fox",
            "original_prompt": "a fox",
            "width": 8,
            "height": 8,
            "steps": 2,
            "guidance_scale": 5.0,
            "seed": 7,
            "chunk_size": 100,
        }
        return GenerationJob(**{**base, **fields})

    def submit(self, **fields: Any) -> str:
        """Queues a job the way an API replica does."""
        with use_context(DispatchContext(principal="alice", request_id="req-1")):
            return BrokerExecutor(self.broker).submit(self.job(**fields)).generation_id

    def start(
        self, executor: DiffusionExecutor | None = None, **worker_options: Any
    ) -> BrokerWorker:
        self.executor = executor or DiffusionExecutor(loader=self.load)
        self.executor.start()
        self.worker = BrokerWorker(
            self.broker, self.executor, Models(self.model), LoraFileReader([self.lora_root]),
            name="worker-1", **worker_options,
        )  # fmt: skip
        self.worker.start()
        return self.worker

    def settled(self, *gids: str) -> None:
        """Waits until the worker acked each of these jobs."""
        assert self.broker.wait_for(lambda: not set(gids) & set(self.broker.pending_jobs()), 5.0), (
            f"still pending: {self.broker.pending_jobs()}"
        )

    def kinds(self, gid: str) -> list[str]:
        return [r.kind for r in self.broker.log(gid)]

    def client_view(self, gid: str) -> list[Payload]:
        return [e.payload for e in RemoteJobStream(self.broker, gid).events(poll=0.01)]


def _manifest(job: GenerationJob, index: int, loaded: object) -> dict[str, object]:
    return {"generation_id": job.generation_id, "seed": job.seed + index}


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    # The PNG's manifest names the diffusers version, and importing diffusers alone takes
    # longer than all these tests; the manifest is covered by the integration tests.
    monkeypatch.setattr(images_module, "manifest", _manifest)
    # The fake pipeline encodes its own prompts (it has no tokenizer or text encoder);
    # prompt conditioning is covered by tests/integration/test_conditioning.py.
    monkeypatch.setattr(StableDiffusion, "text_encoders", ())
    lora_root = tmp_path / "loras"
    lora_root.mkdir()
    model = BaseModelConfig("tiny", Architecture.SD1, tmp_path / "model")
    c = Cluster(FakeBroker(), FakePipeline(), model, lora_root)
    yield c
    c.pipeline.gate.set()
    c.broker.close()  # wakes the pull loop at once
    if c.worker is not None:
        c.worker.stop(timeout=5.0)
    if c.executor is not None:
        c.executor.stop(timeout=5.0)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def whole_images(payloads: list[Payload]) -> dict[int, tuple[bytes, ImageComplete]]:
    """Images as a client assembles them, each checked against its checksum record."""
    parts: dict[int, list[ImageChunk]] = {}
    out: dict[int, tuple[bytes, ImageComplete]] = {}
    for p in payloads:
        if isinstance(p, ImageChunk):
            assert p.image_index not in out
            parts.setdefault(p.image_index, []).append(p)
        elif isinstance(p, ImageComplete):
            chunks = parts.pop(p.image_index)
            data = b"".join(c.data for c in chunks)
            assert [c.offset for c in chunks] == [c.offset for c in image_chunks(0, data, 100)]
            assert (sha(data), len(data)) == (p.sha256, p.size_bytes)
            out[p.image_index] = (data, p)
    assert not parts
    return out


def records_of(broker: FakeBroker, gid: str, kind: str) -> list[EventRecord]:
    return [r for r in broker.log(gid) if r.kind == kind]


# -- the worker -----------------------------------------------------------------------------------


def test_a_job_runs_and_its_events_and_outcome_land_in_the_broker(cluster: Cluster) -> None:
    gid = cluster.submit()
    cluster.start()
    cluster.settled(gid)
    broker = cluster.broker

    log = broker.log(gid)
    assert (log[0].kind, log[0].attempt) == ("queued", 0)  # from the replica
    assert [r.attempt for r in log[1:]] == [1] * (len(log) - 1)
    assert cluster.kinds(gid) == [
        "queued", "started", "progress", "progress", "chunk", "image", "completed",
    ]  # fmt: skip
    chunk, image = records_of(broker, gid, "chunk")[0], records_of(broker, gid, "image")[0]
    complete = to_payload(image)
    assert isinstance(complete, ImageComplete)
    assert complete.image_index == 0
    assert complete.seed == 7
    assert chunk.data.startswith(b"\x89PNG")
    assert sha(chunk.data) == complete.sha256
    assert image.meta["chunk_size"] == 100  # what the client asked for, for the relays

    # The outcome, for the replicas' shared recorder: who asked, and the image records.
    pulled = broker.fetch_state_events(10, timeout=0)
    assert [(r.kind, r.attempt) for r, _ in pulled] == [("started", 1), ("completed", 1)]
    completed = pulled[1][0]
    assert recorded_images(completed) == [complete]
    assert Who.from_dict(completed.meta["who"]) == Who("alice", "req-1", "a fox", ())
    for _, delivery in pulled:
        delivery.ack()

    claim = broker.claim(gid)
    assert claim is not None
    assert (claim.state, claim.attempt, claim.worker) == ("done", 1, "worker-1")
    assert broker.settlements(gid) == ["acked"]
    assert broker.queue_depth() == 0
    assert cluster.pipeline.calls == [(8, 1)]

    # Any replica relays it, re-chunked to the client's size.
    view = cluster.client_view(gid)
    assert isinstance(view[-1], Completed)
    data, relayed = whole_images(view)[0]
    assert relayed == complete
    assert data == chunk.data
    assert len(data) > 100
    assert RemoteJobStream(broker, gid).finished


def test_a_fetch_keeps_compatible_jobs_and_hands_the_others_back(cluster: Cluster) -> None:
    a = cluster.submit()
    b = cluster.submit(width=16)  # another size: not batchable with A
    c = cluster.submit(seed=99, prompt="a hare")  # batchable with A
    # max_batch 2: the executor starts the batch as soon as A and C are both in (the worker
    # submits them back to back, well within batch_wait); B then waits out batch_wait alone.
    cluster.start(DiffusionExecutor(loader=cluster.load, max_batch=2, batch_wait=0.25))
    cluster.settled(a, b, c)
    broker = cluster.broker
    assert broker.settlements(a) == ["acked"]
    assert broker.settlements(c) == ["acked"]
    assert broker.settlements(b) == ["handed_back", "acked"]  # ran later, on its own
    assert cluster.pipeline.calls == [(8, 2), (16, 1)]
    started = {g: to_payload(records_of(broker, g, "started")[0]) for g in (a, b, c)}
    assert started == {a: Started(2), b: Started(1), c: Started(2)}
    for gid in (a, b, c):
        claim = broker.claim(gid)
        assert claim is not None
        assert (claim.state, claim.attempt) == ("done", 1)  # a hand-back is no attempt
        assert cluster.kinds(gid)[-1] == "completed"


def test_a_job_that_used_up_its_attempts_fails_without_running(cluster: Cluster) -> None:
    gid = cluster.submit()
    queued = cluster.broker.claim(gid)
    assert queued is not None
    # Three workers took it and died: the claim says so, and the lease ran out again.
    assert cluster.broker.update_claim(
        gid, Claim("running", 3, "worker-gone", False, queued.revision)
    )
    cluster.start(max_attempts=3)
    cluster.settled(gid)
    broker = cluster.broker
    assert cluster.kinds(gid) == ["queued", "failed"]
    [failed] = broker.state_records(gid)
    assert failed.attempt == 3
    error = str(failed.meta["error"])
    assert "gave up after 3 attempts" in error
    assert "worker-gone" in error
    assert recorded_images(failed) == []
    assert Who.from_dict(failed.meta["who"]).principal == "alice"
    claim = broker.claim(gid)
    assert claim is not None
    assert claim.state == "done"
    assert broker.settlements(gid) == ["acked"]
    assert cluster.loads == []
    assert cluster.pipeline.calls == []
    assert cluster.client_view(gid)[-1] == to_payload(failed)


def test_a_job_naming_a_controlnet_the_worker_lacks_is_refused(cluster: Cluster) -> None:
    control = ControlInput(
        controlnet=ControlNetConfig("canny", Architecture.SD1, Path("/replica/canny")),
        image=InputImage(data=b"png", sha256="s", width=8, height=8),
        scale=1.0,
        guidance_start=0.0,
        guidance_end=1.0,
    )
    gid = cluster.submit(controls=(control,))
    cluster.start()
    cluster.settled(gid)
    assert cluster.kinds(gid) == ["queued", "failed"]
    [failed] = cluster.broker.state_records(gid)
    assert failed.meta["reason"] == Reason.WORKER_REFUSED
    assert str(failed.meta["error"]) == "worker worker-1 has no ready ControlNet 'canny'"
    assert cluster.pipeline.calls == []


def test_a_cancel_signal_stops_a_running_job(cluster: Cluster) -> None:
    cluster.pipeline.gate.clear()
    gid = cluster.submit(steps=5)
    cluster.start()
    assert cluster.pipeline.entered.wait(5.0)
    # Only the signal: the claim's cancel flag stays unset, so nothing else can stop it.
    cluster.broker.signal_cancel(gid)
    cluster.pipeline.gate.set()
    cluster.settled(gid)
    broker = cluster.broker
    assert [(r.kind, r.attempt) for r in broker.state_records(gid)] == [
        ("started", 1),
        ("cancelled", 1),
    ]
    kinds = cluster.kinds(gid)
    assert "chunk" not in kinds
    assert "image" not in kinds
    assert "completed" not in kinds
    assert kinds.count("progress") < 5
    assert broker.settlements(gid) == ["acked"]
    claim = broker.claim(gid)
    assert claim is not None
    assert claim.state in ("done", "cancelled")
    assert cluster.client_view(gid)[-1] == Cancelled()


def test_a_job_cancelled_while_queued_is_acked_and_never_run(cluster: Cluster) -> None:
    gid = cluster.submit()
    RemoteJobStream(cluster.broker, gid).cancel()
    cancelled = cluster.broker.claim(gid)
    log_before = cluster.broker.log(gid)
    cluster.start()
    cluster.settled(gid)
    assert cluster.broker.settlements(gid) == ["acked"]
    assert cluster.broker.log(gid) == log_before  # the worker published nothing
    assert cluster.kinds(gid) == ["queued", "cancelled"]
    assert cluster.broker.claim(gid) == cancelled  # nor touched the claim
    assert cluster.loads == []
    assert cluster.pipeline.calls == []


def test_a_second_attempt_reuses_the_images_the_first_finished(cluster: Cluster) -> None:
    broker = cluster.broker
    gid = cluster.submit(num_images=2)
    # Attempt 1, on a worker that then died: image 0 whole, image 1 half sent.
    [dead] = broker.fetch(1, timeout=0)
    queued = broker.claim(gid)
    assert queued is not None
    assert broker.update_claim(gid, Claim("running", 1, "worker-dead", False, queued.revision))
    first = b"the first attempt's image 0, already on a client's disk" * 3
    earlier = ImageComplete(0, sha(first), len(first), "image/png", 7)
    broker.publish(to_record(gid, 1, Started(2)))
    for piece in image_chunks(0, first, 64):
        broker.publish(to_record(gid, 1, piece))
    record = to_record(gid, 1, earlier)
    record.meta["chunk_size"] = 100
    broker.publish(record)
    broker.publish(to_record(gid, 1, ImageChunk(1, 0, b"half of image 1", False)))
    assert broker.expire_leases() == 1
    dead.ack()  # too late: the lease is gone, so this changes nothing

    cluster.start()
    cluster.settled(gid)
    second = [r for r in broker.log(gid) if r.attempt == 2]
    assert second
    assert second[0].kind == "started"
    indices = {(r.kind, int(str(r.meta["index"]))) for r in second if r.kind in ("chunk", "image")}
    assert indices == {("chunk", 1), ("image", 1)}  # image 0 was not made public again
    [completed] = [r for r in second if r.kind == "completed"]
    images = recorded_images(completed)
    assert [i.image_index for i in images] == [0, 1]
    assert images[0] == earlier
    claim = broker.claim(gid)
    assert claim is not None
    assert (claim.state, claim.attempt) == ("done", 2)
    assert broker.settlements(gid) == ["expired", "acked"]
    assert broker.jobs.stale == 1

    view = whole_images(cluster.client_view(gid))
    assert view[0] == (first, earlier)
    assert view[1][0].startswith(b"\x89PNG")
    assert view[1][1] == images[1]


# -- the worker: bugs these tests found (fixed) -----------------------------------------------


def test_stopping_a_worker_does_not_cancel_the_jobs_it_holds(cluster: Cluster) -> None:
    cluster.pipeline.gate.clear()
    gid = cluster.submit(steps=3)
    worker = cluster.start()
    assert cluster.pipeline.entered.wait(5.0)
    # stop() waits for the job's pump to hand it back, which needs the step to end.
    threading.Timer(0.2, cluster.pipeline.gate.set).start()
    worker.stop(timeout=0)  # as on SIGTERM once the grace period is over
    broker = cluster.broker
    assert broker.wait_for(lambda: broker.settlements(gid) != [], 5.0)
    assert broker.wait_for(lambda: worker.completed == 1, 5.0)
    # Handed back for another worker, or finished: either way the client's job goes on.
    assert "cancelled" not in cluster.kinds(gid)
    outcome = broker.settlements(gid)[0]
    if outcome == "acked":
        assert cluster.kinds(gid)[-1] == "completed"
    else:
        claim = broker.claim(gid)
        assert claim is not None
        assert claim.state != "done"


def test_a_failed_outcome_publish_does_not_leave_the_job_without_an_outcome(
    cluster: Cluster,
) -> None:
    broker = cluster.broker
    gid = cluster.submit()
    broker.fail_next_publish("completed")
    worker = cluster.start()
    assert broker.wait_for(lambda: worker.completed == 1, 5.0)
    assert broker.settlements(gid) == []  # not acked: the lease runs out
    broker.expire_leases()
    cluster.settled(gid)
    assert cluster.kinds(gid)[-1] in ("completed", "failed")


def test_a_job_the_local_executor_refuses_keeps_its_attempts(cluster: Cluster) -> None:
    gid = cluster.submit()
    cluster.start(RefusingExecutor(3, loader=cluster.load), max_attempts=3)
    cluster.settled(gid)
    assert cluster.broker.settlements(gid) == ["handed_back"] * 3 + ["acked"]
    assert cluster.kinds(gid)[-1] == "completed"


# -- the replica's side ---------------------------------------------------------------------------


def test_submit_queues_the_job_with_a_claim_and_a_queued_event(cluster: Cluster) -> None:
    broker = cluster.broker
    cluster.submit()
    accepted: list[int] = []
    job = cluster.job(loras=())
    with use_context(DispatchContext(principal="bob", request_id="req-2")):
        stream = BrokerExecutor(broker).submit(job, accepted.append)
    assert accepted == [1]  # one job ahead of it
    assert stream.generation_id == job.generation_id
    claim = broker.claim(job.generation_id)
    assert claim is not None
    assert (claim.state, claim.attempt) == ("queued", 0)
    [queued] = broker.log(job.generation_id)
    assert (queued.kind, queued.attempt, queued.meta["position"]) == ("queued", 0, 1)
    message = decode_job(broker.jobs.messages[max(broker.jobs.messages)].value)
    assert message.generation_id == job.generation_id
    assert message.who == Who("bob", "req-2", "a fox", ())
    assert BrokerExecutor(broker).handle(job.generation_id) is not None
    assert BrokerExecutor(broker).handle(str(uuid.uuid4())) is None


def test_submit_refuses_when_the_cluster_queue_is_full(cluster: Cluster) -> None:
    broker = cluster.broker
    executor = BrokerExecutor(broker, max_queue=2)
    executor.submit(cluster.job())
    executor.submit(cluster.job())
    third = cluster.job()
    with pytest.raises(ResourceExhaustedError) as err:
        executor.submit(third)
    assert err.value.retry_after_seconds > 0
    assert broker.claim(third.generation_id) is None
    assert broker.log(third.generation_id) == []
    assert broker.queue_depth() == 2


def test_submit_queues_nothing_when_on_accept_raises(cluster: Cluster) -> None:
    broker = cluster.broker
    job = cluster.job()

    def store_down(position: int) -> None:
        raise RuntimeError("the event store is down")

    with pytest.raises(RuntimeError):
        BrokerExecutor(broker).submit(job, store_down)
    assert broker.claim(job.generation_id) is None
    assert broker.log(job.generation_id) == []
    assert broker.queue_depth() == 0
    assert broker.enqueued == []


def test_cancelling_a_queued_job_publishes_its_outcome_and_cancels_the_claim(
    cluster: Cluster,
) -> None:
    broker = cluster.broker
    gid = cluster.submit()
    stream = RemoteJobStream(broker, gid)
    finished_before = stream.finished
    with use_context(DispatchContext(principal="carol", request_id="req-9")):
        stream.cancel()
    claim = broker.claim(gid)
    assert claim is not None
    assert (claim.state, claim.cancel) == ("cancelled", True)
    [record] = broker.state_records(gid)
    assert (record.kind, record.attempt) == ("cancelled", 0)
    assert Who.from_dict(record.meta["who"]) == Who("carol", "req-9")
    assert recorded_images(record) == []
    assert broker.cancel_signals == []  # no worker holds it: nothing to signal
    assert (finished_before, stream.finished) == (False, True)
    assert cluster.client_view(gid)[-1] == Cancelled()
    stream.cancel()  # again: nothing more
    assert len(broker.state_records(gid)) == 1


def test_cancelling_a_running_job_flags_the_claim_and_signals_its_worker(
    cluster: Cluster,
) -> None:
    broker = cluster.broker
    gid = cluster.submit()
    queued = broker.claim(gid)
    assert queued is not None
    assert broker.update_claim(gid, Claim("running", 1, "worker-9", False, queued.revision))
    heard: list[str] = []
    broker.on_cancel(heard.append)
    RemoteJobStream(broker, gid).cancel()
    claim = broker.claim(gid)
    assert claim is not None
    assert (claim.state, claim.attempt, claim.worker, claim.cancel) == (
        "running", 1, "worker-9", True,
    )  # fmt: skip
    assert heard == [gid]
    assert broker.state_records(gid) == []  # the worker publishes the outcome
