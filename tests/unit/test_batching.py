"""The batching policy both the executor and the cluster worker use."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from server.domain.batching import Batch, batch_key, why_apart
from server.domain.generation_job import ControlInput, GenerationJob, InputImage, ResolvedLora
from server.domain.models import Architecture, BaseModelConfig, ControlNetConfig

MODEL = BaseModelConfig("tiny", Architecture.SD1, Path("/models/tiny"))


def lora(sha: str, weight: float = 1.0) -> ResolvedLora:
    return ResolvedLora(sha, sha, f"{sha}.safetensors", sha, Path(f"/l/{sha}"), weight)


def job(**fields: Any) -> GenerationJob:
    base: dict[str, Any] = dict(
        generation_id="g",
        model=MODEL,
        prompt="a cat",
        original_prompt="a cat",
        width=64,
        height=64,
        steps=4,
        guidance_scale=7.0,
        seed=1,
    )
    return GenerationJob(**(base | fields))


def test_jobs_that_differ_only_per_row_share_a_key() -> None:
    a = job(prompt="a cat", seed=1, num_images=2, output_format="png", preview_every=1)
    b = job(prompt="a dog", seed=9, negative_prompt="", output_format="webp", chunk_size=10)
    assert batch_key(a) == batch_key(b)


def control(name: str = "canny", data: bytes = b"edges", **fields: Any) -> ControlInput:
    image = InputImage(data=data, sha256=data.hex(), width=64, height=64)
    base: dict[str, Any] = dict(scale=1.0, guidance_start=0.0, guidance_end=1.0)
    return ControlInput(
        controlnet=ControlNetConfig(name, Architecture.SD1, Path(f"/cn/{name}")),
        image=image,
        **(base | fields),
    )


INIT = InputImage(data=b"init", sha256="i", width=64, height=64)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"model": replace(MODEL, name="other")}, ["model"]),
        ({"width": 128}, ["size"]),
        ({"height": 128}, ["size"]),
        ({"steps": 5}, ["steps"]),
        ({"scheduler": "euler"}, ["scheduler"]),
        ({"guidance_scale": 5.0}, ["guidance_scale"]),
        ({"negative_prompt": "blurry"}, ["negative_prompt"]),
        ({"init_image": INIT, "strength": 0.5}, ["mode", "strength"]),
        ({"controls": (control(),)}, ["controls"]),
        ({"steps": 5, "width": 128}, ["size", "steps"]),
    ],
    ids=lambda value: "+".join(value) if isinstance(value, dict) else "",
)
def test_what_the_denoising_loop_shares_splits_batches_and_says_why(
    change: dict[str, Any], why: list[str]
) -> None:
    assert batch_key(job()) != batch_key(job(**change))
    assert why_apart(batch_key(job()), batch_key(job(**change))) == why


def test_control_images_are_per_row_but_controlnets_and_their_settings_are_shared() -> None:
    one = job(controls=(control(data=b"a"),))
    assert batch_key(one) == batch_key(job(controls=(control(data=b"b"),)))
    for other in (
        control("depth"),
        control(scale=0.5),
        control(guidance_start=0.2),
        control(guidance_end=0.8),
    ):
        assert why_apart(batch_key(one), batch_key(job(controls=(other,)))) == ["controls"]
    two = job(controls=(control("canny"), control("depth")))
    swapped = job(controls=(control("depth"), control("canny")))
    assert batch_key(two) != batch_key(swapped)  # the order pairs images with ControlNets


def test_loras_are_per_row_and_do_not_split_batches() -> None:
    """The executor runs jobs asking for different LoRAs as one batch of per-row deltas."""
    ab = job(loras=(lora("aa"), lora("bb", 0.5)))
    assert batch_key(ab) == batch_key(job())
    assert batch_key(ab) == batch_key(job(loras=(lora("cc", 0.6),)))


def test_a_batch_takes_compatible_jobs_up_to_its_image_limit() -> None:
    batch: Batch[str] = Batch(max_images=4)
    assert batch.offer("first", "k", 2)
    assert not batch.offer("other key", "j", 1)
    assert not batch.offer("too big", "k", 3)
    assert batch.offer("fits", "k", 2)
    assert batch.full
    assert not batch.offer("no room", "k", 1)
    assert batch.members == ["first", "fits"]
    assert batch.images == 4


def test_a_job_larger_than_the_limit_runs_alone() -> None:
    batch: Batch[str] = Batch(max_images=2)
    assert batch.offer("huge", "k", 5)
    assert batch.full
    assert not batch.offer("small", "k", 1)
    assert batch.members == ["huge"]


def test_the_queue_logs_why_a_waiting_job_does_not_join_the_batch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from server.infrastructure.diffusion.handles import JobHandle
    from server.infrastructure.diffusion.job_queue import JobQueue

    queue = JobQueue(max_queue=4, max_batch=4, batch_wait=0.0)
    first, same, other = (
        JobHandle(job(generation_id="a")),
        JobHandle(job(generation_id="b", prompt="a dog")),
        JobHandle(job(generation_id="c", steps=9, width=128)),
    )
    for handle in (first, same, other):
        queue.put(handle)
    with caplog.at_level("DEBUG", logger="loracle.executor"):
        assert queue.next_batch() == [first, same]
    assert "generation c waits for a later batch: it differs in size, steps" in caplog.text
