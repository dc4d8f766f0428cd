"""The tiny random-weight FLUX.1-dev-style pipeline: built locally in diffusers' layout, loaded
back as a FluxPipeline, and run for two steps at 64x64, deterministic under a seed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline
from PIL import Image

from server.infrastructure.diffusion.placeholder import build_tiny_flux

torch.set_num_threads(1)

COMPONENTS = (
    "transformer",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "scheduler",
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("models") / "flux")


@pytest.fixture(scope="module")
def pipe(folder: Path) -> Any:
    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe: Any, seed: int) -> np.ndarray[Any, Any]:
    image = pipe(
        "a red fox in the snow",
        num_inference_steps=2,
        height=64,
        width=64,
        guidance_scale=3.5,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]
    assert isinstance(image, Image.Image)
    assert image.size == (64, 64)
    return np.asarray(image)


def test_folder_is_a_small_diffusers_flux_layout(folder: Path) -> None:
    assert (folder / "model_index.json").is_file()
    for name in COMPONENTS:
        assert (folder / name).is_dir(), name
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    assert size < 10 * 2**20


def test_loads_back_as_flux_pipeline(pipe: Any) -> None:
    assert isinstance(pipe, FluxPipeline)
    assert pipe.transformer.config.guidance_embeds
    assert pipe.vae.config.latent_channels == 16
    assert pipe.scheduler.config.use_dynamic_shifting
    tokenizer_2 = pipe.tokenizer_2
    words = tokenizer_2("a cat").input_ids
    assert tokenizer_2.convert_ids_to_tokens(words) == ["\u2581a", "\u2581c", "a", "t", "</s>"]
    ids = tokenizer_2("a cat", padding="max_length", max_length=512).input_ids
    assert ids == words + [tokenizer_2.pad_token_id] * (512 - len(words))


def test_two_steps_at_64_are_seeded(pipe: Any) -> None:
    first = _generate(pipe, seed=1)
    assert np.array_equal(first, _generate(pipe, seed=1))
    assert not np.array_equal(first, _generate(pipe, seed=2))


def test_build_is_deterministic_in_its_seed(folder: Path, tmp_path: Path) -> None:
    again = build_tiny_flux(tmp_path / "again")
    name = "transformer/diffusion_pytorch_model.safetensors"
    assert (again / name).read_bytes() == (folder / name).read_bytes()
