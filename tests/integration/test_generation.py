"""GenerateImage through the command bus and the real executor, on the tiny SD1.5 model."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from PIL import Image

from server.application.commands import GenerateImageCommand, GenerationRequest
from server.application.context import DispatchContext
from server.bootstrap import Container, bootstrap
from server.config import Settings
from server.domain import generation_events as gen
from server.domain.errors import (
    NotFoundError,
    ResourceExhaustedError,
    ValidationError,
)
from server.domain.models import Architecture, BaseModelConfig
from server.infrastructure.diffusion.executor import DiffusionExecutor
from server.infrastructure.diffusion.placeholder import build_tiny_sd15


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd15(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def c(tmp_path: Path, model_dir: Path) -> Iterator[Container]:
    settings = Settings(
        data_dir=tmp_path,
        storage_url="memory://",
        max_queue=2,
        models=(BaseModelConfig("tiny", Architecture.SD1, model_dir),),
    )
    container = bootstrap(settings)
    yield container
    container.close()


def generate(
    c: Container, ctx: DispatchContext | None = None, **spec: Any
) -> list[gen.GenerationEvent]:
    base = GenerationRequest(prompt="a red fox", steps=3, seed=11, width=64, height=64)
    request = dataclasses.replace(base, **spec)
    return list(c.commands.stream(GenerateImageCommand(request=request), ctx))


def images(events: list[gen.GenerationEvent]) -> dict[int, bytes]:
    out: dict[int, bytearray] = {}
    for e in events:
        if isinstance(e.payload, gen.ImageChunk):
            buf = out.setdefault(e.payload.image_index, bytearray())
            assert e.payload.offset == len(buf)
            buf.extend(e.payload.data)
    return {k: bytes(v) for k, v in out.items()}


def test_stream_order_chunks_and_checksums(c: Container) -> None:
    events = generate(c, num_images=2, chunk_size_bytes=1024)
    kinds = [type(e.payload).__name__ for e in events]
    assert kinds[0] == "Queued"
    assert kinds[1] == "Started"
    assert kinds.count("Progress") == 3
    assert kinds[-1] == "Completed"
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    done = {
        e.payload.image_index: e.payload for e in events if isinstance(e.payload, gen.ImageComplete)
    }
    assert sorted(done) == [0, 1]
    assert [done[0].seed, done[1].seed] == [11, 12]
    for index, data in images(events).items():
        assert hashlib.sha256(data).hexdigest() == done[index].sha256
        assert len(data) == done[index].size_bytes
        assert sum(
            1
            for e in events
            if isinstance(e.payload, gen.ImageChunk) and e.payload.image_index == index
        ) == -(-len(data) // 1024)
        png = Image.open(io.BytesIO(data))
        assert png.size == (64, 64)
        parameters = png.info["parameters"]
        assert parameters.startswith("a red fox\n")
        assert f"Seed: {11 + index}, Size: 64x64" in parameters
        assert "Steps: 3" in parameters
        manifest = json.loads(png.info["loracle"])
        assert manifest["seed"] == 11 + index
    timings = events[-1].payload
    assert isinstance(timings, gen.Completed)
    assert timings.timings.denoising_seconds >= 0


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16)


def test_same_seed_same_image_whatever_the_batch(c: Container) -> None:
    """Each image has its own seeded generator. Batched float arithmetic on the CPU may round
    differently, so "the same image" is: no 8-bit value off by more than 1."""
    alone = pixels(images(generate(c, seed=12))[0])
    in_batch = pixels(images(generate(c, seed=11, num_images=2))[1])
    assert np.abs(alone - in_batch).max() <= 1
    assert np.array_equal(alone, pixels(images(generate(c, seed=12))[0]))
    assert np.abs(pixels(images(generate(c, seed=13))[0]) - alone).max() > 10


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"width": 65}, "spec.width"),
        ({"height": 4096}, "spec.height"),
        ({"steps": 500}, "spec.steps"),
        ({"num_images": 9}, "spec.num_images"),
        ({"guidance_scale": -1.0}, "spec.guidance_scale"),
        ({"prompt": " "}, "spec.prompt"),
    ],
)
def test_bad_requests_are_refused_with_the_field(
    c: Container, spec: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as err:
        generate(c, **spec)
    assert err.value.violations[0].field == field


def test_unknown_model_and_loras(c: Container) -> None:
    with pytest.raises(NotFoundError):
        generate(c, model="nope")
    with pytest.raises(NotFoundError) as err:
        generate(c, prompt="a fox <lora:pixel:0.8>")
    assert "pixel" in err.value.message


def test_cancelling_the_caller_cancels_the_job(c: Container) -> None:
    ctx = DispatchContext()
    stream = c.commands.stream(
        GenerateImageCommand(
            request=GenerationRequest(prompt="a slow fox", steps=150, seed=1, width=64, height=64)
        ),
        ctx,
    )
    seen = []
    for event in stream:
        seen.append(event)
        if isinstance(event.payload, gen.Progress) and event.payload.step == 2:
            ctx.cancellation.set()
    assert not any(isinstance(e.payload, gen.ImageChunk) for e in seen)
    # The job ends cancelled within a step; the executor then serves the next one.
    assert isinstance(c.executor, DiffusionExecutor)
    assert all(h.cancelled for h in c.executor.running)
    assert images(generate(c))[0]


def test_a_full_queue_is_refused(c: Container) -> None:
    def start(i: int) -> Generator[gen.GenerationEvent, None, None]:
        request = GenerationRequest(prompt=f"fox {i}", steps=150, seed=i, width=64, height=64)
        stream = c.commands.stream(GenerateImageCommand(request=request), DispatchContext())
        return cast(Generator[gen.GenerationEvent, None, None], stream)

    running = start(0)
    while not isinstance(next(running).payload, gen.Started):
        pass
    waiting = [start(1), start(2)]  # the queue holds 2
    assert [next(s).payload for s in waiting] == [gen.Queued(1), gen.Queued(2)]
    with pytest.raises(ResourceExhaustedError) as err:
        next(start(3))
    assert err.value.retry_after_seconds > 0
    for stream in [running, *waiting]:
        stream.close()  # the callers leave: their jobs are cancelled, nothing leaks
    assert images(generate(c))[0]
