"""Single-file checkpoints (original LDM / A1111 layout): written from the tiny pipelines, then
loaded with a config_dir that lends configs and tokenizers, while any network use fails."""

from __future__ import annotations

import copy
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from safetensors import safe_open

from server.config import load_settings
from server.devtools.single_file import (
    open_clip_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
    write_single_file_checkpoint,
)
from server.domain.errors import PreconditionError
from server.domain.models import Architecture, BaseModelConfig
from server.infrastructure.diffusion import registry
from server.infrastructure.diffusion.families.sd import CLIP_SD1, OPEN_CLIP_SD2
from server.infrastructure.diffusion.families.sdxl import CLIP_SDXL, OPEN_CLIP_SDXL
from server.infrastructure.diffusion.placeholder import build_tiny_sd15, build_tiny_sdxl
from server.infrastructure.diffusion.registry import inspect_model, load_pipeline

torch.set_num_threads(1)

SD1 = Architecture.SD1
SDXL = Architecture.SDXL
SD1_PARTS = ("unet", "vae", "text_encoder")
SDXL_PARTS = (*SD1_PARTS, "text_encoder_2")


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Offline mode for the libraries, and every name lookup and connect refused and
    recorded, so a library that swallows the error still fails the test."""
    attempts: list[object] = []

    def refuse(*args: object, **_: object) -> Any:
        attempts.append(args[-1] if isinstance(args[0], socket.socket) else args[0])
        raise OSError(f"network access in a test: {attempts[-1]}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    yield
    assert attempts == []


@pytest.fixture(scope="module")
def sd15(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A checkpoint, its source folder, and a config_dir of the same architecture whose own
    weights differ, so any weight taken from config_dir instead of the file shows."""
    root = tmp_path_factory.mktemp("single_file_sd15")
    source = build_tiny_sd15(root / "source")
    return {
        "source": source,
        "config_dir": build_tiny_sd15(root / "config_dir", seed=1),
        "sdxl_dir": build_tiny_sdxl(root / "sdxl"),
        "ckpt": write_single_file_checkpoint(source, root / "tiny.safetensors"),
    }


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The SDXL checkpoint with a config_dir that holds configs and tokenizers only."""
    root = tmp_path_factory.mktemp("single_file_sdxl")
    source = _tiny_sdxl_with_wider_second_encoder(root / "source")
    config_dir = root / "config_dir"
    shutil.copytree(source, config_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    return {
        "source": source,
        "config_dir": config_dir,
        "ckpt": write_single_file_checkpoint(source, root / "tiny-xl.safetensors"),
    }


def _tiny_sdxl_with_wider_second_encoder(folder: Path) -> Path:
    """The tiny SDXL with text_encoder_2 48 wide instead of 32: diffusers tells SDXL's two
    encoders apart by width (768 and 1280 in real models), so equal widths cannot load."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    build_tiny_sdxl(folder)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder), local_files_only=True)
    text_config = copy.deepcopy(pipe.text_encoder_2.config)
    text_config.hidden_size = text_config.projection_dim = 48
    torch.manual_seed(2)
    unet = UNet2DConditionModel.from_config(
        # Cross-attention sees both encoders (32 + 48); the added embedding is the pooled
        # 48 plus six 8-wide time ids.
        {**pipe.unet.config, "cross_attention_dim": 80, "projection_class_embeddings_input_dim": 96}
    )
    pipe.register_modules(unet=unet, text_encoder_2=CLIPTextModelWithProjection(text_config))
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def _same_weights(a: Any, b: Any, part: str) -> bool:
    mine, theirs = getattr(a, part).state_dict(), getattr(b, part).state_dict()
    assert mine.keys() == theirs.keys(), part
    return all(torch.equal(mine[k], theirs[k]) for k in mine)


def _render(pipe: Any) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(1)
    images = pipe(
        "a lighthouse",
        num_inference_steps=3,
        height=64,
        width=64,
        generator=generator,
        output_type="np",
    ).images
    return np.asarray(images[0])


def test_checkpoint_has_the_original_layout(sd15: dict[str, Path]) -> None:
    with safe_open(str(sd15["ckpt"]), "pt") as f:
        keys = set(f.keys())
    assert {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight",
        "model.diffusion_model.output_blocks.1.1.conv.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "first_stage_model.decoder.up.1.upsample.conv.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
    } <= keys
    assert not any(k.startswith(("down_blocks.", "unet.", "text_model.")) for k in keys)


def test_sd15_file_loads_its_own_weights_and_renders_the_same(sd15: dict[str, Path]) -> None:
    config = BaseModelConfig("tiny-file", SD1, sd15["ckpt"], config_dir=sd15["config_dir"])
    assert inspect_model(config) == ("", "EulerDiscreteScheduler")
    from_file = load_pipeline(config, device="cpu")
    from_folder = load_pipeline(BaseModelConfig("tiny", SD1, sd15["source"]), device="cpu")
    config_dir = load_pipeline(BaseModelConfig("other", SD1, sd15["config_dir"]), device="cpu")

    assert type(from_file).__name__ == "StableDiffusionPipeline"
    assert all(_same_weights(from_file, from_folder, part) for part in SD1_PARTS)
    # The text encoder too comes from the file, not from config_dir's weights.
    assert not any(_same_weights(from_file, config_dir, part) for part in SD1_PARTS)
    assert np.array_equal(_render(from_file), _render(from_folder))


def test_sdxl_file_needs_only_configs_and_tokenizers(sdxl: dict[str, Path]) -> None:
    config = BaseModelConfig("tiny-xl-file", SDXL, sdxl["ckpt"], config_dir=sdxl["config_dir"])
    assert inspect_model(config)[0] == ""
    from_file = load_pipeline(config, device="cpu")
    from_folder = load_pipeline(BaseModelConfig("tiny-xl", SDXL, sdxl["source"]), device="cpu")

    assert type(from_file).__name__ == "StableDiffusionXLPipeline"
    assert all(_same_weights(from_file, from_folder, part) for part in SDXL_PARTS)
    assert np.array_equal(_render(from_file), _render(from_folder))


def test_mapping_inverts_diffusers_on_real_layouts() -> None:
    """The tiny UNet has 2 blocks of 1 layer; real SD1.5 and SDXL have 4 and 3 blocks of 2
    layers, 10-deep transformers and a 32-layer OpenCLIP. Checked on meta tensors: names only."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as diffusers_single_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    sdxl_unet = {
        "block_out_channels": (320, 640, 1280),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 10),
        "cross_attention_dim": 2048,
        "attention_head_dim": (5, 10, 20),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    }
    bigg = CLIPTextConfig(
        hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32
    )
    with torch.device("meta"):
        unets = [UNet2DConditionModel(cross_attention_dim=768), UNet2DConditionModel(**sdxl_unet)]
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
        )
        open_clip = CLIPTextModelWithProjection(bigg)
    for unet in unets:
        ldm = {
            f"model.diffusion_model.{k}": v for k, v in unet_to_ldm(unet.state_dict(), unet).items()
        }
        back = diffusers_single_file.convert_ldm_unet_checkpoint(ldm, dict(unet.config))
        assert back.keys() == unet.state_dict().keys()
    ldm = {f"first_stage_model.{k}": v for k, v in vae_to_ldm(vae.state_dict(), vae).items()}
    back = diffusers_single_file.convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    assert back.keys() == vae.state_dict().keys()
    prefix = "conditioner.embedders.1.model."
    ldm = {prefix + k: v for k, v in open_clip_to_ldm(open_clip.state_dict()).items()}
    back = diffusers_single_file.convert_open_clip_checkpoint(open_clip, ldm, prefix=prefix)
    assert back.keys() == open_clip.state_dict().keys()


def test_unloadable_files_are_reported_at_start_up(sd15: dict[str, Path], tmp_path: Path) -> None:
    ckpt, config_dir = sd15["ckpt"], sd15["config_dir"]

    def error(path: Path, folder: Path | None = config_dir, arch: Architecture = SD1) -> str:
        return inspect_model(BaseModelConfig("m", arch, path, config_dir=folder))[0]

    assert error(ckpt, None) == registry.NEEDS_CONFIG_DIR
    assert "is not a folder" in error(ckpt, tmp_path / "nope")
    assert "holds a StableDiffusionXLPipeline, not a SD1 pipeline" in error(ckpt, sd15["sdxl_dir"])
    assert "lacks the CLIP text encoder (conditioner." in error(ckpt, sd15["sdxl_dir"], SDXL)
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04")
    assert "only .safetensors" in error(pickle)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    assert "truncated" in error(cut)
    stub = tmp_path / "stub.safetensors"
    stub.write_bytes(b"\x10\x00")
    assert "truncated" in error(stub)
    with pytest.raises(PreconditionError, match="needs config_dir"):
        load_pipeline(BaseModelConfig("m", SD1, ckpt))


def test_sdxl_encoders_of_equal_width_are_refused(sd15: dict[str, Path], tmp_path: Path) -> None:
    ckpt = write_single_file_checkpoint(sd15["sdxl_dir"], tmp_path / "same.safetensors")
    config = BaseModelConfig("m", SDXL, ckpt, config_dir=sd15["sdxl_dir"])
    assert "cannot tell them apart" in inspect_model(config)[0]


def test_recognition_keys_match_diffusers() -> None:
    """The start-up check looks for the keys diffusers itself uses to find each encoder."""
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES

    ours = (CLIP_SD1, OPEN_CLIP_SD2, CLIP_SDXL, OPEN_CLIP_SDXL)
    names = ("clip", "open_clip", "clip_sdxl", "open_clip_sdxl")
    assert ours == tuple(CHECKPOINT_KEY_NAMES[name] for name in names)


def test_config_dir_resolves_like_path(tmp_path: Path) -> None:
    toml = tmp_path / "loracle.toml"
    toml.write_text(
        '[[models]]\nname = "file"\narchitecture = "SD1"\npath = "m/a.safetensors"\n'
        'config_dir = "configs/sd15"\n'
        '[[models]]\nname = "folder"\narchitecture = "SDXL"\npath = "/srv/xl"\n'
    )
    single, folder = load_settings(["--config", str(toml)], environ={}).models
    assert single.config_dir == tmp_path / "configs/sd15"
    assert folder.config_dir is None
