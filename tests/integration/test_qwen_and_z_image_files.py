"""Qwen-Image and Z-Image transformers as people download them: one file (Qwen-Image: diffusers'
names under ComfyUI's `model.diffusion_model.`; Z-Image: Tongyi's original layout with fused
qkv, plain and prefixed) or a Q8_0 GGUF of it, beside a config_dir that lends everything else.
Written from the tiny pipelines, loaded through `load_pipeline`, and run: the same image as
the folder they came from (GGUF: a close one, its Linear weights still quantized)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.quantizers.gguf.utils import GGUFParameter

from server.domain.models import Architecture, BaseModelConfig
from server.infrastructure.diffusion.placeholder import build_tiny_qwen_image, build_tiny_z_image
from server.infrastructure.diffusion.registry import inspect_model, load_pipeline
from tests.integration.test_single_file import no_network  # noqa: F401 (autouse fixture)
from tests.original_layouts import (
    COMFY_PREFIX,
    transformer_state,
    write_gguf,
    write_safetensors,
    z_image_to_original,
)

QWEN, Z = Architecture.QWEN_IMAGE, Architecture.Z_IMAGE


def _qwen_file(state: dict[str, Any]) -> dict[str, Any]:
    return {COMFY_PREFIX + key: value for key, value in state.items()}


LAYOUTS: dict[str, tuple[Architecture, Callable[[Path], Path], Callable[[Any], Any]]] = {
    "qwen-comfy": (QWEN, build_tiny_qwen_image, _qwen_file),
    "z-original": (Z, build_tiny_z_image, z_image_to_original),
    "z-comfy": (Z, build_tiny_z_image, lambda s: z_image_to_original(s, prefix=COMFY_PREFIX)),
}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def files(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    architecture, build, layout = LAYOUTS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    source = build(root / "source")
    config_dir = root / "config_dir"
    shutil.copytree(source, config_dir)
    for weights in (config_dir / "transformer").glob("*.safetensors"):
        weights.unlink()  # a transformer that loads can only come from the file
    original = layout(transformer_state(source))
    return {
        "architecture": architecture,
        "source": source,
        "config_dir": config_dir,
        "file": write_safetensors(original, root / "tiny.safetensors"),
        "gguf": write_gguf(original, root / "tiny-Q8_0.gguf", arch="tiny"),
        # As leejet's Z-Image GGUFs store them: pad tokens as (dim,) vectors.
        "gguf-flat": write_gguf(
            {k: v.reshape(-1) if k.endswith("pad_token") else v for k, v in original.items()},
            root / "tiny-flat-Q8_0.gguf",
            arch="tiny",
        ),
    }


def _render(pipe: Any) -> np.ndarray[Any, np.dtype[np.int16]]:
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red fox",
        num_inference_steps=3,
        width=64,
        height=64,
        generator=torch.Generator("cpu").manual_seed(5),
    ).images[0]
    return np.asarray(image, dtype=np.int16)


def test_a_transformer_file_renders_as_its_folder(files: dict[str, Any]) -> None:
    arch = files["architecture"]
    config = BaseModelConfig("m", arch, files["file"], config_dir=files["config_dir"])
    assert inspect_model(config)[0] == ""
    pipe = load_pipeline(config)
    folder = load_pipeline(BaseModelConfig("m", arch, files["source"]))
    mine, theirs = pipe.transformer.state_dict(), folder.transformer.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert np.abs(_render(pipe) - _render(folder)).max() <= 1


@pytest.mark.parametrize("kind", ["gguf", "gguf-flat"])
def test_a_q8_gguf_stays_quantized_and_renders_close(files: dict[str, Any], kind: str) -> None:
    """Z-Image's pad tokens quantized (this writer's) or stored flat (leejet's) are taken as
    the (1, dim) parameters diffusers' model has."""
    arch = files["architecture"]
    config = BaseModelConfig("m", arch, files[kind], config_dir=files["config_dir"])
    assert inspect_model(config)[0] == ""
    pipe = load_pipeline(config)
    quantized = [p for p in pipe.transformer.parameters() if isinstance(p, GGUFParameter)]
    assert quantized, "no weight stayed quantized"
    folder = load_pipeline(BaseModelConfig("m", arch, files["source"]))
    # Q8_0 keeps ~8 bits a weight: seen at most 2 levels apart on these tiny models.
    assert np.abs(_render(pipe) - _render(folder)).mean() < 1.0


def test_a_file_of_the_other_family_is_not_ready(files: dict[str, Any]) -> None:
    other = Z if files["architecture"] is QWEN else QWEN
    config = BaseModelConfig("m", other, files["file"], config_dir=files["config_dir"])
    error, _ = inspect_model(config)
    assert "lacks the" in error, error
