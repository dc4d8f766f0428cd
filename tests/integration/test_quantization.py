"""Quantization on load (`quantize = "int8" | "fp8"`): torchao's weight-only configs applied by
diffusers to the denoiser of a tiny Z-Image model as it loads, on the CPU (where torchao runs
them by dequantizing; fp8's fast kernels need a CUDA GPU of compute capability 8.9+). The
quantized models generate images close to the full-precision one and run LoRAs beside their
weights (never fused into them), removing them exactly."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.application.commands import GenerationRequest, ImportLoRAsCommand, LoraChoice
from server.application.context import DispatchContext
from server.application.queries import ListBaseModelsQuery
from server.bootstrap import Container, bootstrap
from server.config import Settings
from server.devtools.tiny_loras import write_lora_for_pipeline
from server.domain.models import Architecture, BaseModelConfig
from server.infrastructure.diffusion.placeholder import build_tiny_z_image
from server.infrastructure.diffusion.registry import load_pipeline
from tests.support import pixels, streamed_events

pytest.importorskip("torchao", reason="torchao is a dev dependency (loracle[quantization])")

ALICE = DispatchContext(principal="alice", scopes=frozenset({"read", "generate"}))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_z_image(tmp_path_factory.mktemp("zimage") / "tiny")


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory: pytest.TempPathFactory, folder: Path) -> Path:
    root = tmp_path_factory.mktemp("loras")
    pipe = load_pipeline(BaseModelConfig("m", Architecture.Z_IMAGE, folder))
    write_lora_for_pipeline(pipe, root / "ink.safetensors", seed=6)
    return root


@pytest.fixture
def c(tmp_path: Path, folder: Path, lora_root: Path) -> Iterator[Container]:
    models = (
        BaseModelConfig("full", Architecture.Z_IMAGE, folder),
        BaseModelConfig("int8", Architecture.Z_IMAGE, folder, quantize="int8"),
        BaseModelConfig("fp8", Architecture.Z_IMAGE, folder, quantize="fp8"),
    )
    settings = Settings(
        data_dir=tmp_path, storage_url="memory://", models=models, lora_roots=(lora_root,)
    )
    container = bootstrap(settings)
    yield container
    container.close()


def image(c: Container, model: str, **spec: Any) -> np.ndarray[Any, np.dtype[np.int16]]:
    request = GenerationRequest(
        model=model, prompt="a red fox", steps=3, seed=5, width=64, height=64
    )
    return pixels(streamed_events(c, dataclasses.replace(request, **spec), ALICE))


@pytest.mark.parametrize(("quantize", "tensor"), [("int8", "Int8Tensor"), ("fp8", "Float8Tensor")])
def test_the_denoiser_is_quantized_on_load_and_nothing_else(
    folder: Path, quantize: str, tensor: str
) -> None:
    pipe = load_pipeline(BaseModelConfig("q", Architecture.Z_IMAGE, folder, quantize=quantize))
    assert type(pipe.transformer.layers[0].attention.to_q.weight).__name__ == tensor
    assert type(pipe.text_encoder.layers[0].self_attn.q_proj.weight).__name__ == "Parameter"


def test_quantized_models_generate_close_to_full_precision(c: Container) -> None:
    listed = c.queries.dispatch(ListBaseModelsQuery(), ALICE).data.models
    assert all(m.ready for m in listed), [m.error for m in listed]
    full = image(c, "full")
    for quantize in ("int8", "fp8"):
        quantized = image(c, quantize)
        assert not np.array_equal(full, quantized), quantize  # not the same weights
        # Seen: int8 at most 1 level apart (0.12 on average), fp8 (e4m3: 3 mantissa bits) at
        # most 5 (0.81 on average). A broken quantization gives noise (about 85 on average).
        assert np.abs(full - quantized).mean() <= 8, quantize
        assert np.array_equal(image(c, quantize), quantized), quantize


def test_loras_run_beside_quantized_weights_and_come_off_exactly(c: Container) -> None:
    updates = list(c.commands.stream(ImportLoRAsCommand(directory=""), ALICE))
    assert updates[-1].totals.registered == 1, updates[-1]
    c.projector.catch_up()
    plain = image(c, "int8")
    styled = image(c, "int8", loras=(LoraChoice("ink", 1.0),))
    assert not np.array_equal(styled, plain)
    # Unfused, the LoRA changes the image as it does at full precision.
    full_styled = image(c, "full", loras=(LoraChoice("ink", 1.0),))
    assert np.abs(styled - full_styled).max() <= 8
    assert np.array_equal(image(c, "int8"), plain)
