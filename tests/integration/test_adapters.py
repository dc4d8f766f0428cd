"""The LoRA adapter cache on the tiny SD1.5 and SDXL pipelines: LoRAs change the image, and
removing them gives back the base weights and image bit for bit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from server.devtools.tiny_loras import write_lora_for_pipeline
from server.domain.models import Architecture, BaseModelConfig
from server.infrastructure.diffusion.adapters import AdapterCache, AdapterLoadError, AdapterSpec
from server.infrastructure.diffusion.placeholder import build_tiny_sd15, build_tiny_sdxl
from server.infrastructure.diffusion.registry import load_pipeline
from server.infrastructure.lora_files import LoraFileReader, sha256_file

torch.set_num_threads(1)

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
Loader = Callable[[], Any]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"sd15": build_tiny_sd15(root / "sd15"), "sdxl": build_tiny_sdxl(root / "sdxl")}


def _loader(folder: Path, architecture: Architecture) -> Loader:
    def load() -> Any:
        pipe = load_pipeline(BaseModelConfig(folder.name, architecture, folder), device="cpu")
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return load


@pytest.fixture(scope="module")
def sd15(models: dict[str, Path]) -> Loader:
    """A fresh pipeline per call: each cache owns its pipeline's adapters."""
    return _loader(models["sd15"], Architecture.SD1)


@pytest.fixture(scope="module")
def sdxl(models: dict[str, Path]) -> Loader:
    return _loader(models["sdxl"], Architecture.SDXL)


@pytest.fixture(scope="module")
def loras(
    tmp_path_factory: pytest.TempPathFactory, sd15: Loader, sdxl: Loader
) -> dict[str, AdapterSpec]:
    root = tmp_path_factory.mktemp("loras")
    sd1_pipe, xl_pipe = sd15(), sdxl()
    paths = {
        "a": write_lora_for_pipeline(sd1_pipe, root / "a.safetensors", seed=1),
        "b": write_lora_for_pipeline(sd1_pipe, root / "b.safetensors", seed=2),
        "kohya": write_lora_for_pipeline(sd1_pipe, root / "k.safetensors", fmt="kohya", seed=3),
        "xl": write_lora_for_pipeline(xl_pipe, root / "xl.safetensors", seed=4),
        "xl_kohya": write_lora_for_pipeline(xl_pipe, root / "xlk.safetensors", fmt="kohya", seed=5),
    }
    return {name: spec(path, name) for name, path in paths.items()}


def spec(path: Path, name: str, weight: float = 1.0) -> AdapterSpec:
    return AdapterSpec(sha256_file(path), path, weight, name)


def generate(pipe: Any, seed: int = 7) -> np.ndarray:
    result = pipe(
        "a red fox",
        width=64,
        height=64,
        num_inference_steps=3,
        output_type="np",
        generator=torch.Generator("cpu").manual_seed(seed),
    )
    return np.asarray(result.images)


def base_parameters(pipe: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every parameter object with a copy of its value. peft wraps modules but keeps the
    original parameter objects (as base_layer.weight), so identity tracks them."""
    return [
        (p, p.detach().clone())
        for c in COMPONENTS
        if (model := getattr(pipe, c, None)) is not None
        for p in model.parameters()
    ]


def assert_base_weights(pipe: Any, saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    live = {
        id(p) for c in COMPONENTS if getattr(pipe, c, None) for p in getattr(pipe, c).parameters()
    }
    changed = [
        i for i, (p, copy) in enumerate(saved) if id(p) not in live or not torch.equal(p, copy)
    ]
    assert not changed, f"{len(changed)} of {len(saved)} base parameters differ"


def adapters_in(pipe: Any) -> set[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    names: set[str] = set()
    for c in COMPONENTS:
        for module in getattr(pipe, c).modules() if getattr(pipe, c, None) else ():
            if isinstance(module, BaseTunerLayer):
                names.update(module._all_available_adapter_names())
    return names


def assert_no_adapter_active(pipe: Any) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for c in COMPONENTS:
        for module in getattr(pipe, c).modules() if getattr(pipe, c, None) else ():
            if isinstance(module, BaseTunerLayer):
                assert not module.merged
                assert module.disable_adapters or not (
                    set(module.active_adapters) & set(module._all_available_adapter_names())
                )


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def test_peft_and_kohya_loras_change_the_image(sd15: Loader, loras: dict[str, AdapterSpec]) -> None:
    pipe = sd15()
    cache = AdapterCache(pipe)
    base = generate(pipe)
    cache.apply([loras["a"]])
    with_peft = generate(pipe)
    cache.apply([loras["kohya"]])
    with_kohya = generate(pipe)
    assert mean_abs_diff(with_peft, base) > 0.01
    assert mean_abs_diff(with_kohya, base) > 0.01
    assert mean_abs_diff(with_kohya, with_peft) > 0.01
    assert cache.stats.loads == 2


def test_restore_gives_back_the_base_weights_bit_for_bit(
    sd15: Loader, loras: dict[str, AdapterSpec]
) -> None:
    pipe = sd15()
    cache = AdapterCache(pipe)
    saved = base_parameters(pipe)
    base = generate(pipe)
    cache.apply([loras["a"]])
    assert dict(cache.applied) == {loras["a"].key: 1.0}
    assert not np.array_equal(generate(pipe), base)
    cache.restore()
    assert not cache.applied
    assert cache.loaded == (loras["a"].key,)  # cached, disabled
    assert_base_weights(pipe, saved)
    assert_no_adapter_active(pipe)
    assert np.array_equal(generate(pipe), base)
    cache.apply([])  # nothing applied: a no-op
    assert np.array_equal(generate(pipe), base)


def test_switching_loras_leaves_no_residue(sd15: Loader, loras: dict[str, AdapterSpec]) -> None:
    pipe = sd15()
    cache = AdapterCache(pipe)
    cache.apply([loras["a"]])
    with_a = generate(pipe)
    cache.apply([loras["b"]])
    switched = generate(pipe)

    fresh = sd15()
    AdapterCache(fresh).apply([loras["b"]])
    expected = generate(fresh)
    assert not np.allclose(with_a, switched, atol=1e-3)
    np.testing.assert_allclose(switched, expected, rtol=0, atol=1e-5)


def test_weighted_loras_and_repeated_specs_cost_nothing(
    sd15: Loader, loras: dict[str, AdapterSpec]
) -> None:
    pipe = sd15()
    cache = AdapterCache(pipe)
    a, b = spec(loras["a"].path, "a", 0.7), spec(loras["b"].path, "b", 0.5)
    cache.apply([a, b])
    fused = generate(pipe)
    assert cache.stats.loads == 2
    fused_weights = [p.detach().clone() for p in pipe.unet.parameters()]

    cache.apply([b, a])  # the same set in another order
    assert cache.stats.unchanged == 1
    assert cache.stats.loads == 2
    assert cache.stats.hits == 2
    assert all(
        torch.equal(p, q) for p, q in zip(pipe.unet.parameters(), fused_weights, strict=True)
    )
    assert np.array_equal(generate(pipe), fused)

    # Fusing honours the weights: the unfused adapters at 0.7 and 0.5 compute the same image.
    unfused_pipe = sd15()
    AdapterCache(unfused_pipe, fuse=False).apply([a, b])
    np.testing.assert_allclose(generate(unfused_pipe), fused, rtol=0, atol=1e-4)

    cache.apply([spec(loras["a"].path, "a", 0.2), b])  # a weight changed: re-fused, not reloaded
    assert cache.stats.loads == 2
    assert not np.array_equal(generate(pipe), fused)


def test_sdxl_lora_on_both_text_encoders_restores_exactly(
    sdxl: Loader, loras: dict[str, AdapterSpec]
) -> None:
    pipe = sdxl()
    cache = AdapterCache(pipe)
    saved = base_parameters(pipe)
    base = generate(pipe)
    cache.apply([loras["xl"]])
    adapter_components = pipe.get_list_adapters()
    assert set(adapter_components) == set(COMPONENTS)
    assert mean_abs_diff(generate(pipe), base) > 0.01
    cache.restore()
    assert_base_weights(pipe, saved)
    assert_no_adapter_active(pipe)
    assert np.array_equal(generate(pipe), base)


def test_sdxl_kohya_lora_with_sgm_block_names(sdxl: Loader, loras: dict[str, AdapterSpec]) -> None:
    pipe = sdxl()
    cache = AdapterCache(pipe)
    base = generate(pipe)
    cache.apply([loras["xl_kohya"]])
    assert set(pipe.get_list_adapters()) == set(COMPONENTS)
    assert mean_abs_diff(generate(pipe), base) > 0.01


def test_lora_for_another_architecture_is_refused_cleanly(
    sd15: Loader, loras: dict[str, AdapterSpec]
) -> None:
    pipe = sd15()
    cache = AdapterCache(pipe)
    saved = base_parameters(pipe)
    base = generate(pipe)
    cache.apply([loras["a"]])
    xl = spec(loras["xl"].path, "Cyberpunk XL")
    with pytest.raises(AdapterLoadError, match="Cyberpunk XL") as raised:
        cache.apply([loras["a"], xl])
    assert "\n" not in str(raised.value)
    assert "shapes do not match" in str(raised.value)
    assert cache.applied == ()
    assert cache.loaded == (loras["a"].key,)  # the good LoRA stays cached
    assert adapters_in(pipe) == {"l_" + loras["a"].key[:16]}
    assert_no_adapter_active(pipe)
    assert_base_weights(pipe, saved)
    assert np.array_equal(generate(pipe), base)
    cache.apply([loras["b"]])  # the cache still works
    assert mean_abs_diff(generate(pipe), base) > 0.01


def test_a_failing_text_encoder_does_not_leave_the_unet_half_loaded(
    sd15: Loader, loras: dict[str, AdapterSpec], tmp_path: Path
) -> None:
    tensors = load_file(str(loras["a"].path))
    for key, value in tensors.items():
        if key.startswith("text_encoder.") and key.endswith("lora_A.weight"):
            tensors[key] = torch.cat([value, value[:, :1]], dim=1)  # one input too many
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken))

    pipe = sd15()
    cache = AdapterCache(pipe)
    base = generate(pipe)
    with pytest.raises(AdapterLoadError, match="'broken'"):
        cache.apply([spec(broken, "broken")])
    assert adapters_in(pipe) == set()
    assert cache.loaded == ()
    assert_no_adapter_active(pipe)
    assert np.array_equal(generate(pipe), base)


@pytest.mark.parametrize(
    ("content", "reason"),
    [(None, "cannot read its file"), (b"not a safetensors file", "cannot be loaded")],
)
def test_unreadable_files_are_refused(
    sd15: Loader, tmp_path: Path, content: bytes | None, reason: str
) -> None:
    path = tmp_path / "bad.safetensors"
    if content is not None:
        path.write_bytes(content)
    cache = AdapterCache(sd15())
    with pytest.raises(AdapterLoadError, match=f"LoRA 'bad': {reason}"):
        cache.apply([AdapterSpec("0" * 64, path, 1.0, "bad")])
    assert cache.loaded == ()


def test_least_recently_used_loras_are_evicted_over_budget(
    sd15: Loader, loras: dict[str, AdapterSpec]
) -> None:
    a, b = loras["a"], loras["b"]
    budget = a.path.stat().st_size + b.path.stat().st_size - 1
    pipe = sd15()
    cache = AdapterCache(pipe, budget_bytes=budget)
    cache.apply([a])
    cache.apply([b])
    assert cache.stats.evictions == 1
    assert cache.loaded == (b.key,)
    assert adapters_in(pipe) == {"l_" + b.key[:16]}


def test_tiny_loras_carry_metadata_for_the_reader(sd15: Loader, tmp_path: Path) -> None:
    path = write_lora_for_pipeline(
        sd15(),
        tmp_path / "styled.safetensors",
        fmt="kohya",
        metadata={"ss_base_model_version": "sd_v1", "ss_output_name": "Tiny Style"},
    )
    scanned = LoraFileReader([tmp_path]).read(str(path))
    assert scanned.metadata.name == "Tiny Style"
    assert scanned.metadata.base_model.architecture == Architecture.SD1
    assert scanned.metadata.rank == 4


def test_torch_state_dict_reports_become_one_line() -> None:
    """Not every report names a size mismatch (missing or unexpected keys): still one line."""
    from server.infrastructure.diffusion.adapters import _reason

    report = RuntimeError(
        "Error(s) in loading state_dict for UNet2DConditionModel:\n\tMissing key(s) in "
        'state_dict: "down_blocks.0.attentions.0.proj_in.lora_A.l_x.weight".\n\t'
        'Unexpected key(s) in state_dict: "foo.lora_B.weight".'
    )
    reason = _reason(report)
    assert "\n" not in reason
    assert "state_dict" not in reason
    assert "do not fit" in reason
