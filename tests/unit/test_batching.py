"""The batching policy both the executor and the cluster worker use."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from server.domain.batching import Batch, batch_key
from server.domain.generation_job import GenerationJob, ResolvedLora
from server.domain.models import Architecture, BaseModelConfig

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


@pytest.mark.parametrize(
    "change",
    [
        {"model": replace(MODEL, name="other")},
        {"width": 128},
        {"height": 128},
        {"steps": 5},
        {"scheduler": "euler"},
        {"guidance_scale": 5.0},
        {"negative_prompt": "blurry"},
        {"loras": (lora("aa"),)},
    ],
    ids=lambda change: next(iter(change)),
)
def test_what_the_denoising_loop_shares_splits_batches(change: dict[str, Any]) -> None:
    assert batch_key(job()) != batch_key(job(**change))


def test_lora_order_does_not_matter_but_weights_do() -> None:
    ab = job(loras=(lora("aa"), lora("bb", 0.5)))
    ba = job(loras=(lora("bb", 0.5), lora("aa")))
    assert batch_key(ab) == batch_key(ba)
    assert batch_key(ab) != batch_key(job(loras=(lora("aa"), lora("bb", 0.6))))


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
