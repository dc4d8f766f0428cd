"""A1111 prompt syntax on the transformer families, each on its tiny random-weight pipeline
loaded through the real loading code: FLUX and SD3.5 encode plain prompts exactly as
diffusers' own `encode_prompt` does (SD3 with and without T5), emphasis moves their T5 (and
SD3's CLIP) embeddings measurably and deterministically, `BREAK` makes another T5 segment, an
image does not depend on the prompts batched with it; Qwen-Image and Z-Image get the prompt's
plain text."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from server.domain import generation_events as gen
from server.domain.generation_job import GenerationJob
from server.domain.models import Architecture, BaseModelConfig
from server.infrastructure.diffusion.conditioning import ConditionedGroup
from server.infrastructure.diffusion.executor import DiffusionExecutor
from server.infrastructure.diffusion.families import family_for
from server.infrastructure.diffusion.placeholder import (
    build_tiny_flux,
    build_tiny_qwen_image,
    build_tiny_sd3,
    build_tiny_z_image,
)
from server.infrastructure.diffusion.registry import load_pipeline
from server.infrastructure.diffusion.transformer_conditioning import t5_segments
from tests.support import generation_job

torch.set_num_threads(1)

ARCHITECTURES = {
    "flux": Architecture.FLUX,
    "sd3": Architecture.SD3,
    "sd3_without_t5": Architecture.SD3,
    "qwen": Architecture.QWEN_IMAGE,
    "z": Architecture.Z_IMAGE,
}
SD3_KEYS = (
    "prompt_embeds",
    "negative_prompt_embeds",
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BaseModelConfig]:
    root = tmp_path_factory.mktemp("models")
    folders: dict[str, Path] = {
        "flux": build_tiny_flux(root / "flux"),
        "sd3": build_tiny_sd3(root / "sd3"),
        "sd3_without_t5": build_tiny_sd3(root / "sd3_without_t5", t5=False),
        "qwen": build_tiny_qwen_image(root / "qwen"),
        "z": build_tiny_z_image(root / "z"),
    }
    return {
        name: BaseModelConfig(name, ARCHITECTURES[name], folder) for name, folder in folders.items()
    }


@pytest.fixture(scope="module")
def pipes(models: dict[str, BaseModelConfig]) -> dict[str, Any]:
    return {
        name: load_pipeline(models[name], device="cpu", dtype="float32")
        for name in ("flux", "sd3", "sd3_without_t5")
    }


def encode(
    pipe: Any, name: str, prompts: list[str], negatives: list[str]
) -> list[ConditionedGroup]:
    family = family_for(ARCHITECTURES[name])
    assert family is not None
    return family.encode(pipe, prompts, negatives)


def test_a_plain_flux_prompt_is_exactly_diffusers_own_encoding(pipes: dict[str, Any]) -> None:
    pipe = pipes["flux"]
    prompts, negatives = ["a red fox, snow", "a castle"], ["blurry", ""]
    (group,) = encode(pipe, "flux", prompts, negatives)
    with torch.no_grad():  # as the pipeline's __call__ runs it
        cond, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, device="cpu")
        uncond, uncond_pooled, _ = pipe.encode_prompt(negatives, prompt_2=None, device="cpu")
    expected = {
        "prompt_embeds": cond,
        "pooled_prompt_embeds": pooled,
        "negative_prompt_embeds": uncond,
        "negative_pooled_prompt_embeds": uncond_pooled,
    }
    assert set(group.kwargs) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(group.kwargs[key], tensor), key
    # Without negative prompts (no true CFG) none is encoded.
    (group,) = encode(pipe, "flux", prompts, ["", ""])
    assert set(group.kwargs) == {"prompt_embeds", "pooled_prompt_embeds"}


@pytest.mark.parametrize("name", ["sd3", "sd3_without_t5"])
@pytest.mark.parametrize("negatives", [["blurry", "ugly, text"], ["", ""]])
def test_a_plain_sd3_prompt_is_exactly_diffusers_own_encoding(
    name: str, negatives: list[str], pipes: dict[str, Any]
) -> None:
    pipe = pipes[name]
    prompts = ["a red fox, snow", "a castle"]
    (group,) = encode(pipe, name, prompts, negatives)
    with torch.no_grad():
        expected = pipe.encode_prompt(
            prompts, None, None, device="cpu", negative_prompt=negatives if any(negatives) else None
        )
    assert set(group.kwargs) == set(SD3_KEYS)
    for key, tensor in zip(SD3_KEYS, expected, strict=True):
        assert torch.equal(group.kwargs[key], tensor), key


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_emphasis_moves_t5_measurably_and_deterministically(
    name: str, pipes: dict[str, Any]
) -> None:
    pipe = pipes[name]
    t5 = pipe.tokenizer_2 if name == "flux" else pipe.tokenizer_3
    start = 0 if name == "flux" else 77  # SD3: CLIP's 77 tokens, then T5's

    def embeds(prompt: str) -> Any:
        (group,) = encode(pipe, name, [prompt], ["x"])
        return group.kwargs["prompt_embeds"][0]

    plain, up, down = embeds("a fox"), embeds("a (fox:1.5)"), embeds("a [fox]")
    assert torch.equal(up, embeds("a (fox:1.5)"))  # deterministic
    assert torch.equal(plain, embeds("a (fox:1.0)"))  # a weight of 1 is no weight
    t5_plain, t5_up, t5_down = plain[start:], up[start:], down[start:]
    assert (t5_up - t5_plain).abs().max() > 1e-3
    assert (t5_down - t5_plain).abs().max() > 1e-3
    # Every T5 token's state is rescaled by the mean correction alone except the emphasised
    # ones, which move further in the same direction.
    weights = torch.tensor(t5_segments(t5, "a (fox:1.5)", t5_plain.shape[0]).weights[0])
    ratio = t5_up / t5_plain
    correction = ratio[weights == 1.0]
    assert torch.allclose(correction, correction[0, 0].expand_as(correction), rtol=1e-4)
    assert torch.allclose(ratio[weights == 1.5], correction[0, 0] * 1.5, rtol=1e-4)
    if name == "sd3":  # ... and both CLIPs' hidden states move too
        assert (up[:77] - plain[:77]).abs().max() > 1e-3


def test_break_starts_another_t5_segment(pipes: dict[str, Any]) -> None:
    flux, sd3, bare = pipes["flux"], pipes["sd3"], pipes["sd3_without_t5"]
    segments = t5_segments(flux.tokenizer_2, "a fox BREAK (snow:1.5)", 512)
    assert len(segments.tokens) == 2
    assert max(segments.weights[0]) == 1.0
    assert 1.5 in segments.weights[1]
    # Rows of one and two segments are two calls; the negative prompt is padded to the same
    # shape with the empty prompt's segment.
    groups = encode(flux, "flux", ["a fox", "a fox BREAK snow"], ["x", "y"])
    assert [g.rows for g in groups] == [[0], [1]]
    assert [g.kwargs["prompt_embeds"].shape[1] for g in groups] == [512, 1024]
    assert groups[1].kwargs["negative_prompt_embeds"].shape[1] == 1024
    (empty,) = encode(flux, "flux", [""], ["x"])
    assert torch.equal(
        groups[1].kwargs["negative_prompt_embeds"][:, 512:], empty.kwargs["prompt_embeds"]
    )
    # The second segment is encoded on its own: the same as a prompt of its words alone.
    (alone,) = encode(flux, "flux", ["snow"], ["x"])
    assert torch.equal(groups[1].kwargs["prompt_embeds"][:, 512:], alone.kwargs["prompt_embeds"])
    # SD3: two CLIP chunks and two T5 segments; without T5, two CLIP chunks and T5's zeros.
    (group,) = encode(sd3, "sd3", ["a fox BREAK snow"], [""])
    assert group.kwargs["prompt_embeds"].shape[1] == 2 * 77 + 2 * 256
    assert group.kwargs["negative_prompt_embeds"].shape[1] == 2 * 77 + 2 * 256
    (group,) = encode(bare, "sd3_without_t5", ["a fox BREAK snow"], [""])
    assert group.kwargs["prompt_embeds"].shape[1] == 2 * 77 + 256
    assert not group.kwargs["prompt_embeds"][:, 2 * 77 :].any()


# -- through the executor ------------------------------------------------------------------


def run(jobs: list[GenerationJob], *, batch: bool = False) -> list[np.ndarray]:
    executor = (
        DiffusionExecutor(max_batch=8, batch_wait=0.5, device="cpu", calibration_sides=())
        if batch
        else DiffusionExecutor(device="cpu", calibration_sides=())
    )
    try:
        handles = [executor.submit(j) for j in jobs]
        executor.start()
        out = []
        for handle in handles:
            data = bytearray()
            for event in handle.events():
                if isinstance(event.payload, gen.ImageChunk):
                    data += event.payload.data
                assert not isinstance(event.payload, gen.Failed), event.payload
            out.append(np.asarray(Image.open(BytesIO(bytes(data))).convert("RGB")))
        if batch:
            assert executor.stats.batches == 1
        return out
    finally:
        executor.stop()


def job(model: BaseModelConfig, prompt: str, seed: int, **fields: Any) -> GenerationJob:
    return generation_job(
        model, prompt=prompt, original_prompt=prompt, seed=seed, width=32, height=32, **fields
    )


@pytest.mark.parametrize(("name", "fields"), [("flux", {"true_cfg_scale": 2.0}), ("sd3", {})])
def test_an_image_does_not_depend_on_the_prompts_batched_with_it(
    name: str, fields: dict[str, Any], models: dict[str, BaseModelConfig]
) -> None:
    model = models[name]
    jobs = [
        job(model, "a (fox:1.6)", 3, negative_prompt="blurry", **fields),
        job(model, "a fox BREAK snow", 4, negative_prompt="blurry", **fields),
        job(model, "a fox", 3, negative_prompt="blurry", **fields),
    ]
    alone = [image for j in jobs for image in run([j])]
    together = run(jobs, batch=True)
    for a, b in zip(alone, together, strict=True):
        assert np.abs(a.astype(int) - b).max() <= 1
    assert np.array_equal(run([jobs[0]])[0], alone[0])  # and the same on every run


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_emphasis_reaches_the_image_deterministically(name: str, pipes: dict[str, Any]) -> None:
    """In floats: the tiny random transformers heed their text too little for 8-bit pixels
    to show a weight on one word (a whole other prompt moves them by a few levels)."""
    pipe = pipes[name]

    def image(prompt: str) -> Any:
        (group,) = encode(pipe, name, [prompt], ["blurry"])
        kwargs = dict(group.kwargs)
        if name == "flux":
            kwargs["true_cfg_scale"] = 2.0
        out = pipe(
            **kwargs,
            width=32,
            height=32,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(3),
            output_type="np",
        )
        return out.images[0]

    plain, emphasised = image("a fox"), image("a (fox:1.5)")
    assert np.array_equal(emphasised, image("a (fox:1.5)"))
    assert np.abs(emphasised - plain).max() > 1e-5


@pytest.mark.parametrize("name", ["qwen", "z"])
def test_qwen_and_z_image_encode_the_prompt_as_plain_text(
    name: str, models: dict[str, BaseModelConfig]
) -> None:
    model = models[name]
    images = run(
        [
            job(model, "a (cat:1.3) BREAK [snow]", 5, guidance_scale=2.0),
            job(model, "a cat snow", 5, guidance_scale=2.0),
            job(model, "a \\(cat:1.3\\) snow", 5, guidance_scale=2.0),
        ]
    )
    assert np.array_equal(images[0], images[1])  # the syntax is gone, the words are not
    assert not np.array_equal(images[0], images[2])  # escaped, the brackets are words
