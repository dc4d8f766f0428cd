"""One FLUX LoRA in each format FLUX LoRAs are published in, through the real server on a tiny
random-weight FLUX.1 pipeline: catalogued as FLUX from its keys alone, and giving the image the
diffusers/peft file gives, so diffusers 0.42's conversion of each is a true one:

- peft: `transformer.transformer_blocks.0.attn.to_q.lora_A.weight` (the reference);
- kohya: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, `.lora_up`, `.alpha`;
- comfyui: `diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight` (BFL's names under
  `diffusion_model.`, lora_down/lora_up/alpha, as ComfyUI saves them);
- xlabs: `double_blocks.0.processor.qkv_lora1.down.weight` (`..2` for the text stream).

The LoRA changes the double blocks' fused qkv and output projections of both streams and the
single blocks' linear2 (server/devtools/tiny_loras.py, `write_flux_lora`): a kohya qkv LoRA is
one down matrix shared by q, k and v and their up matrices stacked, which diffusers splits, so
the peft file repeats the down matrix. Its alpha is twice its rank: kohya and ComfyUI files
store it, the others have it baked into their up matrices, so an alpha diffusers ignored would
show as a different image.

What diffusers 0.42 cannot load is refused cleanly and leaves the model as it was:
- BFL's names under `diffusion_model.` with lora_A/lora_B: `FluxLoraLoaderMixin.lora_state_dict`
  converts BFL-named files only when they have lora_down keys (the kohya converter's ComfyUI
  branch renames `diffusion_model.` to `lora_unet_`) or query_norm scales (a Control LoRA,
  `_convert_bfl_flux_control_lora_to_diffusers`, which besides hard-codes FLUX.1's 19 double
  and 38 single blocks and width 3072), so none of the file's layers reach the transformer
  (nor do they with a `transformer.` prefix on BFL's names, lora_A or lora_down alike);
- a kohya LoRA of the single blocks' linear1 (q, k, v and the MLP's input, fused):
  `_convert_kohya_flux_lora_to_diffusers` splits it at FLUX.1's widths
  (`dims=[3072, 3072, 3072, 12288]`) and asserts they add up to the file's, which the tiny
  model's (32 x 3 + 128) do not. So linear1 is in no equivalence here; a FLUX.1-sized one
  loads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.application.commands import GenerationRequest, ImportLoRAsCommand, LoraChoice
from server.application.context import DispatchContext
from server.bootstrap import Container, bootstrap
from server.config import Settings
from server.devtools.tiny_loras import FLUX_TARGETS, FluxLoraFormat, write_flux_lora
from server.domain import generation_events as gen
from server.domain.errors import PreconditionError
from server.domain.models import Architecture, BaseModelConfig
from server.infrastructure.diffusion.placeholder import build_tiny_flux
from server.infrastructure.diffusion.registry import load_pipeline
from tests.support import pixels, streamed_events

ALICE = DispatchContext(principal="alice", scopes=frozenset({"read", "generate"}))
FORMATS: tuple[FluxLoraFormat, ...] = ("peft", "kohya", "comfyui", "xlabs")
RANK, ALPHA, SEED = 4, 8.0, 7
# File name -> (format, targets) of the files diffusers 0.42 cannot load into the tiny model.
UNLOADABLE: dict[str, tuple[FluxLoraFormat, tuple[str, ...]]] = {
    "ink_bfl_lora_a": ("diffusion_model", FLUX_TARGETS),
    "ink_kohya_linear1": ("kohya", (*FLUX_TARGETS, "linear1")),
}


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model and, beside it, the same LoRA (one seed) in each format, with no metadata."""
    root = tmp_path_factory.mktemp("flux-lora-formats")
    model = build_tiny_flux(root / "flux-tiny")
    pipe = load_pipeline(BaseModelConfig("flux", Architecture.FLUX, model))
    loras = root / "loras"
    for fmt in FORMATS:
        path = loras / f"ink_{fmt}.safetensors"
        write_flux_lora(pipe, path, fmt=fmt, rank=RANK, alpha=ALPHA, seed=SEED)
    for name, (fmt, targets) in UNLOADABLE.items():
        path = loras / f"{name}.safetensors"
        write_flux_lora(pipe, path, fmt=fmt, targets=targets, rank=RANK, alpha=ALPHA, seed=SEED)
    return root


@pytest.fixture(scope="module")
def c(tmp_path_factory: pytest.TempPathFactory, lora_root: Path) -> Iterator[Container]:
    """One server for the module, its LoRAs imported once."""
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("data"),
        storage_url="memory://",
        models=(BaseModelConfig("flux", Architecture.FLUX, lora_root / "flux-tiny"),),
        batch_wait_ms=0,
        lora_roots=(lora_root / "loras",),
    )
    container = bootstrap(settings)
    updates = list(container.commands.stream(ImportLoRAsCommand(directory=""), ALICE))
    assert updates[-1].totals.registered == len(FORMATS) + len(UNLOADABLE), updates[-1]
    container.projector.catch_up()
    yield container
    container.close()


def events_of(c: Container, *loras: str) -> list[gen.GenerationEvent]:
    spec: dict[str, Any] = {"loras": tuple(LoraChoice(name, 1.0) for name in loras)}
    base = GenerationRequest(model="flux", prompt="a red fox", steps=3, seed=5, width=64, height=64)
    return streamed_events(c, dataclasses.replace(base, **spec), ALICE)


def test_every_file_is_catalogued_as_flux_from_its_keys(c: Container) -> None:
    for name in [f"ink_{fmt}" for fmt in FORMATS] + list(UNLOADABLE):
        (lora,) = c.read_model.find_by_file_name(name)
        assert lora.metadata.base_model.architecture is Architecture.FLUX, name


def test_each_format_gives_the_peft_files_image_and_comes_off_exactly(c: Container) -> None:
    plain = pixels(events_of(c))
    styled = {fmt: pixels(events_of(c, f"ink_{fmt}")) for fmt in FORMATS}
    assert np.abs(styled["peft"] - plain).max() > 4  # a LoRA that shows (by 20 levels)
    for fmt in FORMATS[1:]:
        # The same deltas, converted: the fused weights come out bit-identical, and so do the
        # images; one level is allowed for a sum taken in another order. (A delta half as
        # large, an alpha ignored, is 14 levels off.)
        assert np.abs(styled[fmt] - styled["peft"]).max() <= 1, fmt
    assert np.array_equal(pixels(events_of(c)), plain)  # the base weights come back exactly


@pytest.mark.parametrize(
    ("name", "says"),
    [
        (
            "ink_bfl_lora_a",
            "none of its 5 layers exist in this model (a LoRA for another architecture, or a "
            "layout diffusers does not convert?)",
        ),
        ("ink_kohya_linear1", "cannot be loaded: diffusers' conversion refused it (Assertion"),
    ],
)
def test_what_diffusers_cannot_convert_fails_cleanly_and_leaves_the_model(
    c: Container, name: str, says: str
) -> None:
    plain = pixels(events_of(c))
    with pytest.raises(PreconditionError) as failed:
        events_of(c, name)
    assert failed.value.reason == "LORA_LOAD_FAILED"
    assert says in failed.value.message, failed.value.message
    assert np.array_equal(pixels(events_of(c)), plain)
    # A loadable format still applies after the failure.
    assert not np.array_equal(pixels(events_of(c, "ink_kohya")), plain)
