"""A1111 prompt conditioning on the tiny SD1.5 and SDXL pipelines, loaded through the real
loading code: plain prompts give exactly diffusers' own embeddings, emphasis changes them
measurably and deterministically, long prompts and BREAK make more 77-token chunks, and an
image does not depend on the other prompts of its batch."""

from __future__ import annotations

from io import BytesIO
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from server.domain import generation_events as gen
from server.domain.generation_job import GenerationJob
from server.domain.models import Architecture, BaseModelConfig
from server.infrastructure.diffusion.conditioning import (
    CHUNK,
    chunk_prompt,
    encode_batch,
)
from server.infrastructure.diffusion.executor import DiffusionExecutor
from server.infrastructure.diffusion.families import family_for
from server.infrastructure.diffusion.placeholder import build_tiny_sd15, build_tiny_sdxl
from server.infrastructure.diffusion.registry import load_pipeline
from tests.support import generation_job

torch.set_num_threads(1)

# The tiny tokenizer is byte-level: one token per character (plus "</w>" at word ends).
LONG = ", ".join(f"word{i}" for i in range(30))  # 30 * 7 - 2 = 208 tokens: 3 chunks


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BaseModelConfig]:
    root = tmp_path_factory.mktemp("models")
    return {
        "sd": BaseModelConfig("sd", Architecture.SD1, build_tiny_sd15(root / "sd")),
        "sdxl": BaseModelConfig("sdxl", Architecture.SDXL, build_tiny_sdxl(root / "sdxl")),
    }


@pytest.fixture(scope="module")
def pipes(models: dict[str, BaseModelConfig]) -> dict[str, Any]:
    return {name: load_pipeline(m, device="cpu", dtype="float32") for name, m in models.items()}


def encode(pipe: Any, model: BaseModelConfig, prompts: list[str], negatives: list[str]) -> Any:
    family = family_for(model.architecture)
    assert family is not None
    return encode_batch(pipe, family.text_encoders, prompts, negatives)


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_a_plain_prompt_is_exactly_diffusers_own_encoding(
    name: str, pipes: dict[str, Any], models: dict[str, BaseModelConfig]
) -> None:
    pipe = pipes[name]
    prompts, negatives = ["a red fox, snow", "a castle"], ["blurry", "ugly, text"]
    (group,) = encode(pipe, models[name], prompts, negatives)
    if name == "sd":
        cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True, negatives)
        expected = {"prompt_embeds": cond, "negative_prompt_embeds": uncond}
    else:
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompts, device="cpu", negative_prompt=negatives
        )
        expected = {
            "prompt_embeds": cond,
            "negative_prompt_embeds": uncond,
            "pooled_prompt_embeds": pooled,
            "negative_pooled_prompt_embeds": uncond_pooled,
        }
    assert set(group.kwargs) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(group.kwargs[key], tensor), key


def test_sdxl_without_negative_prompts_leaves_the_zeroing_to_the_pipeline(
    pipes: dict[str, Any], models: dict[str, BaseModelConfig]
) -> None:
    (group,) = encode(pipes["sdxl"], models["sdxl"], ["a (fox:1.3)"], [""])
    assert "negative_prompt_embeds" not in group.kwargs  # force_zeros_for_empty_prompt
    assert "pooled_prompt_embeds" in group.kwargs


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_emphasis_changes_the_embedding_measurably_and_deterministically(
    name: str, pipes: dict[str, Any], models: dict[str, BaseModelConfig]
) -> None:
    pipe, model = pipes[name], models[name]

    def embeds(prompt: str) -> Any:
        (group,) = encode(pipe, model, [prompt], ["x"])
        return group.kwargs["prompt_embeds"]

    plain, up, down = embeds("a fox"), embeds("a (fox:1.5)"), embeds("a [fox]")
    assert torch.equal(up, embeds("a (fox:1.5)"))  # deterministic
    assert (up - plain).abs().max() > 1e-3
    assert (down - plain).abs().max() > 1e-3
    # Only the emphasised tokens move relative to the others: the start token's state is
    # rescaled by its encoder's mean correction alone, so its direction is unchanged.
    family = family_for(model.architecture)
    assert family is not None
    offset = 0
    for spec in family.text_encoders:
        width = getattr(pipe, spec.encoder).config.hidden_size
        ratio = up[0, 0, offset : offset + width] / plain[0, 0, offset : offset + width]
        assert torch.allclose(ratio, ratio[0].expand_as(ratio), atol=1e-5)
        offset += width
    # "(fox)" is 1.1 and "((fox))" 1.21: nesting multiplies.
    assert torch.allclose(embeds("a (fox:1.1)"), embeds("a (fox)"), atol=1e-6)
    assert torch.allclose(embeds("a (fox:1.21)"), embeds("a ((fox))"), atol=1e-5)


def test_tokens_are_chunked_as_a1111_does(pipes: dict[str, Any]) -> None:
    tokenizer = pipes["sd"].tokenizer
    start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    short = chunk_prompt(tokenizer, "a fox")
    assert len(short.tokens) == 1
    assert short.tokens[0] == tokenizer("a fox", padding="max_length", max_length=77).input_ids
    long = chunk_prompt(tokenizer, LONG)
    assert len(long.tokens) == 3
    for chunk in long.tokens:
        assert len(chunk) == CHUNK + 2
        assert chunk[0] == start
        assert chunk[-1] == end
    # The first chunk ends after a comma (A1111 moves the words after the chunk's last comma
    # within its last 20 tokens to the next chunk), so no word is split between chunks.
    comma = tokenizer.get_vocab()[",</w>"]
    first = long.tokens[0]
    assert first[first.index(end) - 1] == comma
    # BREAK closes a chunk; weights follow their tokens.
    broken = chunk_prompt(tokenizer, "a fox BREAK (snow:1.5)")
    assert len(broken.tokens) == 2
    assert max(broken.weights[0]) == 1.0
    assert 1.5 in broken.weights[1]


def test_prompt_and_negative_prompt_are_padded_to_the_same_length(
    pipes: dict[str, Any], models: dict[str, BaseModelConfig]
) -> None:
    (group,) = encode(pipes["sd"], models["sd"], [LONG], ["blurry"])
    assert group.kwargs["prompt_embeds"].shape[1] == 3 * 77
    assert group.kwargs["negative_prompt_embeds"].shape[1] == 3 * 77
    # ... and the padding chunks of the negative prompt are the empty prompt's encoding.
    (empty,) = encode(pipes["sd"], models["sd"], [""], [""])
    assert torch.equal(
        group.kwargs["negative_prompt_embeds"][:, 77:154], empty.kwargs["prompt_embeds"]
    )


def test_rows_of_different_lengths_are_grouped(
    pipes: dict[str, Any], models: dict[str, BaseModelConfig]
) -> None:
    groups = encode(pipes["sdxl"], models["sdxl"], ["a fox", LONG, "a hare"], ["", "", "x"])
    assert [g.rows for g in groups] == [[0, 2], [1]]
    assert [g.kwargs["prompt_embeds"].shape[1] for g in groups] == [77, 3 * 77]


# -- through the executor ------------------------------------------------------------------


def run(executor: DiffusionExecutor, jobs: list[GenerationJob]) -> list[np.ndarray]:
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
    return out


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_an_image_does_not_depend_on_the_prompts_batched_with_it(
    name: str, models: dict[str, BaseModelConfig]
) -> None:
    model = models[name]
    jobs = [
        generation_job(model, prompt="a (fox:1.4)", original_prompt="a (fox:1.4)", seed=3),
        generation_job(model, prompt=LONG, original_prompt=LONG, seed=4),
        generation_job(model, prompt="a fox", original_prompt="a fox", seed=5),
    ]
    alone = []
    for j in jobs:
        ex = DiffusionExecutor(device="cpu", calibration_sides=())
        try:
            alone += run(ex, [j])
        finally:
            ex.stop()
    ex = DiffusionExecutor(max_batch=8, batch_wait=0.5, device="cpu", calibration_sides=())
    try:
        together = run(ex, jobs)
        assert ex.stats.batches == 1
    finally:
        ex.stop()
    # Batched matmuls may round differently from single ones: within 1 per 8-bit value, the
    # tolerance of every batching test here.
    for a, b in zip(alone, together, strict=True):
        assert np.abs(a.astype(int) - b).max() <= 1
    # Emphasis reaches the image.
    assert np.abs(alone[0].astype(int) - alone[2]).max() > 10
