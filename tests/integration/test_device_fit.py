"""Memory honesty: a model whose weights cannot fit the device memory (here a device budget
smaller than a tiny Z-Image model) is reported not ready by ListBaseModels at start-up, with
what it needs and what would make it fit, while the same model quantized on load or offloaded
fits and generates."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file

from server.application.commands import GenerationRequest
from server.application.context import DispatchContext
from server.application.queries import ListBaseModelsQuery
from server.bootstrap import Container, bootstrap
from server.config import Settings
from server.domain.models import Architecture, BaseModelConfig, BaseModelInfo
from server.infrastructure.diffusion.families import family_for
from server.infrastructure.diffusion.footprint import (
    GIB,
    DeviceMemory,
    component_bytes,
    resident_bytes,
)
from server.infrastructure.diffusion.placeholder import build_tiny_z_image
from tests.support import image_of, streamed_events

ALICE = DispatchContext(principal="alice", scopes=frozenset({"read", "generate"}))
CPU = DeviceMemory(0, False, "")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_z_image(tmp_path_factory.mktemp("zimage") / "tiny")


def test_the_footprint_is_each_components_weights_at_the_run_dtype(folder: Path) -> None:
    family = family_for(Architecture.Z_IMAGE)
    assert family is not None
    config = BaseModelConfig("z", Architecture.Z_IMAGE, folder)
    at_fp32 = component_bytes(config, family, 4)
    assert set(at_fp32) == {"transformer", "text_encoder", "vae"}
    # The tiny model is stored in float32: its tensors' bytes, loaded, are what it takes.
    for name, count in at_fp32.items():
        (weights,) = (folder / name).glob("*.safetensors")
        loaded = load_file(weights)
        assert count == sum(t.numel() * t.element_size() for t in loaded.values()), name
    assert component_bytes(config, family, 2) == {k: v // 2 for k, v in at_fp32.items()}
    cuda = DeviceMemory(80 * GIB, True, "a GPU")
    assert resident_bytes(config, family, cuda) == sum(at_fp32.values()) // 2  # bfloat16


@pytest.fixture
def c(tmp_path: Path, folder: Path) -> Iterator[Container]:
    family = family_for(Architecture.Z_IMAGE)
    assert family is not None
    full = BaseModelConfig("full", Architecture.Z_IMAGE, folder)
    parts = component_bytes(full, family, 4)
    # Room for the model with its transformer at one byte per weight, not at four.
    budget = sum(parts.values()) - parts["transformer"] // 2
    models = (
        full,
        BaseModelConfig("int8", Architecture.Z_IMAGE, folder, quantize="int8"),
        BaseModelConfig("offloaded", Architecture.Z_IMAGE, folder, offload="model"),
        BaseModelConfig("padded", Architecture.Z_IMAGE, folder, quantize="int8", vram_budget_gb=1),
    )
    settings = Settings(
        data_dir=tmp_path, storage_url="memory://", models=models, device_budget_gb=budget / GIB
    )
    container = bootstrap(settings)
    yield container
    container.close()


def listed(c: Container) -> dict[str, BaseModelInfo]:
    return {m.config.name: m for m in c.queries.dispatch(ListBaseModelsQuery(), ALICE).data.models}


def test_a_model_that_cannot_fit_is_reported_at_start_up(c: Container) -> None:
    models = listed(c)
    full = models["full"]
    assert not full.ready
    assert full.error.startswith("its weights need 2.1 MiB of device memory at float32, more ")
    assert full.error.endswith(
        'than the device budget (1.4 MiB); set quantize = "fp8" or offload = "model" in its '
        "[[models]] entry"
    )
    # The entry's own budget (activations included) counts when larger than its weights.
    assert "need 1024.0 GiB" not in models["padded"].error
    assert models["padded"].error.startswith("its weights need 1.0 GiB of device memory")
    assert models["int8"].ready, models["int8"].error
    assert models["offloaded"].ready, models["offloaded"].error


def test_what_fits_generates(c: Container) -> None:
    request = GenerationRequest(model="int8", prompt="a fox", steps=2, width=64, height=64)
    assert image_of(streamed_events(c, request, ALICE)).size == (64, 64)


def test_nothing_is_checked_without_a_known_device_memory(folder: Path) -> None:
    family = family_for(Architecture.Z_IMAGE)
    assert family is not None
    assert DeviceMemory.probe(0.0) == CPU  # this machine has no CUDA device
    budget = DeviceMemory.probe(12.0)
    assert (budget.bytes, budget.described) == (12 * GIB, "the device budget (12.0 GiB)")


def test_the_device_budget_counts_what_loading_will_put_on_the_device(folder: Path) -> None:
    """Before a load, the LRU budget's estimate is the footprint: a quantized denoiser and an
    offloaded model take less than the same files at full precision."""
    from server.infrastructure.diffusion.pipelines import _estimate_bytes

    full = BaseModelConfig("z", Architecture.Z_IMAGE, folder)
    family = family_for(Architecture.Z_IMAGE)
    assert family is not None
    parts = component_bytes(full, family, 4)
    assert _estimate_bytes(full, "cpu") == sum(parts.values())
    assert _estimate_bytes(full, "cuda") == sum(parts.values()) // 2  # bfloat16
    int8 = BaseModelConfig("z", Architecture.Z_IMAGE, folder, quantize="int8")
    assert _estimate_bytes(int8, "cpu") == sum(parts.values()) - parts["transformer"] * 3 // 4
    offloaded = BaseModelConfig("z", Architecture.Z_IMAGE, folder, offload="model")
    assert _estimate_bytes(offloaded, "cuda") == max(parts.values()) // 2
