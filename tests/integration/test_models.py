"""Base models: the tiny SD1.5 and SDXL pipelines are built locally, checked without loading,
and loaded through the same code a real model folder goes through."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from server.domain.errors import PreconditionError
from server.domain.models import Architecture, BaseModelConfig
from server.infrastructure.diffusion.placeholder import build_tiny_sd15, build_tiny_sdxl
from server.infrastructure.diffusion.registry import (
    EMBEDDED_NAME,
    ModelRegistry,
    inspect_model,
    load_pipeline,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"sd15": build_tiny_sd15(root / "sd15"), "sdxl": build_tiny_sdxl(root / "sdxl")}


def test_tiny_models_are_recognised(tiny: dict[str, Path]) -> None:
    assert inspect_model(BaseModelConfig("a", Architecture.SD1, tiny["sd15"])) == (
        "",
        "EulerDiscreteScheduler",
    )
    assert inspect_model(BaseModelConfig("b", Architecture.SDXL, tiny["sdxl"]))[0] == ""


def test_bad_models_are_reported_not_loaded(tiny: dict[str, Path], tmp_path: Path) -> None:
    wrong = inspect_model(BaseModelConfig("w", Architecture.SDXL, tiny["sd15"]))[0]
    assert "StableDiffusionPipeline, not a SDXL pipeline" in wrong
    assert (
        "does not exist"
        in inspect_model(BaseModelConfig("m", Architecture.SD1, tmp_path / "nope"))[0]
    )
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04")
    assert "only .safetensors" in inspect_model(BaseModelConfig("p", Architecture.SD1, pickle))[0]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert "lacks unet" in inspect_model(BaseModelConfig("b", Architecture.SD1, broken))[0]
    with pytest.raises(PreconditionError):
        load_pipeline(BaseModelConfig("b", Architecture.SD1, broken))


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_loaded_through_the_real_code_and_deterministic(tiny: dict[str, Path], kind: str) -> None:
    import torch

    arch = Architecture.SD1 if kind == "sd15" else Architecture.SDXL
    pipe = load_pipeline(BaseModelConfig(kind, arch, tiny[kind]))
    assert type(pipe).__name__ == (
        "StableDiffusionPipeline" if kind == "sd15" else "StableDiffusionXLPipeline"
    )

    def render(seed: int) -> np.ndarray:
        image = pipe(
            "a lighthouse",
            num_inference_steps=2,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(seed),
        ).images[0]
        return np.asarray(image)

    first, again, other = render(7), render(7), render(8)
    assert first.shape == (64, 64, 3)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_registry_builds_the_embedded_placeholder(tmp_path: Path) -> None:
    registry = ModelRegistry((), data_dir=tmp_path)
    (before,) = registry.statuses()
    assert before.config.name == EMBEDDED_NAME
    assert before.config.placeholder
    assert not before.ready
    assert "building" in before.error
    assert before.loading  # MODEL_NOT_READY then carries RetryInfo
    registry.ensure_embedded(wait=True)
    (after,) = registry.statuses()
    assert after.ready, after.error
    assert not after.loading
    missing = BaseModelConfig("m", Architecture.SD1, tmp_path / "nope")
    (broken,) = ModelRegistry((missing,), data_dir=tmp_path).statuses()
    assert not broken.ready
    assert not broken.loading  # broken, not on its way: nothing to wait for
    assert after.default_scheduler == "EulerDiscreteScheduler"
    assert (tmp_path / "models" / EMBEDDED_NAME / "model_index.json").exists()
    # A second start finds it built and ready at once.
    assert ModelRegistry((), data_dir=tmp_path).statuses()[0].ready
