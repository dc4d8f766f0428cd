"""Tiny but structurally real LoRA files for the demo, tests and benchmarks.

Real key names and shapes matter: the reader detects architecture from shapes when metadata is
missing, so fakes with arbitrary keys would test nothing. Random weights are seeded and the header
is canonicalised, so the same call always writes the same bytes (and hash).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from safetensors.numpy import save

from server.domain.models import Architecture

__all__ = ["write_demo_loras", "write_synthetic_lora"]

LoraFormat = Literal["kohya", "peft"]


@dataclass(frozen=True, slots=True)
class _Layout:
    context_dim: int  # cross-attention key input: what the reader detects architecture from
    channels: int
    text_encoders: tuple[int, ...]
    kohya_block: str
    peft_block: str
    kohya_version: str
    modelspec: str
    checkpoint: str
    resolution: str


_SD_BLOCKS = (
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0",
)
_LAYOUTS = {
    Architecture.SD1: _Layout(768, 320, (768,), *_SD_BLOCKS, "sd_v1", "stable-diffusion-v1/lora",
                              "v1-5-pruned-emaonly.safetensors", "512x512"),
    Architecture.SD2: _Layout(1024, 320, (1024,), *_SD_BLOCKS, "sd_v2",
                              "stable-diffusion-v2-768-v/lora", "v2-1_768-ema-pruned.safetensors",
                              "768x768"),
    # kohya names SDXL UNet modules the SGM way; diffusers' down_blocks.0 has no attention.
    Architecture.SDXL: _Layout(2048, 640, (768, 1280),
                               "lora_unet_input_blocks_4_1_transformer_blocks_0",
                               "unet.down_blocks.1.attentions.0.transformer_blocks.0",
                               "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora",
                               "sd_xl_base_1.0.safetensors", "1024x1024"),
}  # fmt: skip


def _modules(architecture: Architecture, fmt: LoraFormat) -> list[tuple[str, int, int]]:
    """(module name, in features, out features) for a handful of real LoRA targets."""
    layout = _LAYOUTS[architecture]
    ctx, ch = layout.context_dim, layout.channels
    block = layout.kohya_block if fmt == "kohya" else layout.peft_block
    sep = "_" if fmt == "kohya" else "."
    modules = [
        (f"{block}{sep}attn1{sep}to_q", ch, ch),
        (f"{block}{sep}attn2{sep}to_k", ctx, ch),
    ]
    widths = layout.text_encoders
    for i, width in enumerate(widths):
        if fmt == "kohya":
            prefix = "lora_te" if len(widths) == 1 else f"lora_te{i + 1}"
            name = f"{prefix}_text_model_encoder_layers_0_self_attn_q_proj"
        else:
            prefix = "text_encoder" if i == 0 else f"text_encoder_{i + 1}"
            name = f"{prefix}.text_model.encoder.layers.0.self_attn.q_proj"
        modules.append((name, width, width))
    return modules


def _default_tag_frequency(trigger_words: Sequence[str], tags: Sequence[str]) -> dict[str, int]:
    """What kohya would have counted: trigger words caption every image, tags fewer."""
    images = 24
    frequency = dict.fromkeys(trigger_words, images)
    for i, tag in enumerate(tags):
        frequency.setdefault(tag, max(1, images - 3 * (i + 1)))
    return frequency


def write_synthetic_lora(
    path: Path,
    *,
    architecture: Architecture,
    name: str,
    trigger_words: Sequence[str] = (),
    tags: Sequence[str] = (),
    tag_frequency: Mapping[str, int] | None = None,
    rank: int = 4,
    fmt: LoraFormat = "kohya",
    with_metadata: bool = True,
    seed: int = 0,
) -> Path:
    if architecture not in _LAYOUTS:
        raise ValueError(f"no synthetic LoRA layout for {architecture}")
    if rank <= 0:
        raise ValueError("rank must be positive")
    rng = np.random.default_rng(seed)
    alpha = rank / 2
    tensors: dict[str, np.ndarray] = {}
    for module, in_features, out_features in _modules(architecture, fmt):
        down = rng.standard_normal((rank, in_features)) * 0.02
        up = rng.standard_normal((out_features, rank)) * 0.02
        if fmt == "kohya":
            tensors[f"{module}.lora_down.weight"] = down.astype(np.float16)
            tensors[f"{module}.lora_up.weight"] = up.astype(np.float16)
            tensors[f"{module}.alpha"] = np.array(alpha, dtype=np.float16)
        else:
            tensors[f"{module}.lora_A.weight"] = down.astype(np.float16)
            tensors[f"{module}.lora_B.weight"] = up.astype(np.float16)

    metadata: dict[str, str] | None = None
    if with_metadata:
        layout = _LAYOUTS[architecture]
        frequency = (
            dict(tag_frequency)
            if tag_frequency is not None
            else _default_tag_frequency(trigger_words, tags)
        )
        metadata = {
            "ss_output_name": name,
            "ss_base_model_version": layout.kohya_version,
            "ss_sd_model_name": layout.checkpoint,
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(rank),
            "ss_network_alpha": str(alpha),
            "ss_tag_frequency": json.dumps({"1_dataset": frequency}),
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.title": name,
            "modelspec.architecture": layout.modelspec,
            "modelspec.implementation": "https://github.com/kohya-ss/sd-scripts",
            "modelspec.resolution": layout.resolution,
        }
        if trigger_words:
            metadata["modelspec.trigger_phrase"] = ", ".join(trigger_words)
        if tags:
            metadata["modelspec.tags"] = ", ".join(tags)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_canonical(save(tensors, metadata=metadata)))
    return path


def _canonical(data: bytes) -> bytes:
    """safetensors writes __metadata__ in Rust HashMap order, which changes from run to run;
    sorting it makes a given call always produce the same bytes and hash."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # tensor data stays 8-byte aligned, as safetensors keeps it
    return struct.pack("<Q", len(raw)) + raw + data[8 + length :]


def write_demo_loras(directory: Path) -> list[Path]:
    """Writes a varied demo library and returns the LoRA paths (sidecars are written beside
    two of them but not returned)."""
    directory.mkdir(parents=True, exist_ok=True)
    styles, characters = directory / "styles", directory / "characters"
    paths = [
        write_synthetic_lora(
            styles / "watercolor_style_v2.safetensors",
            architecture=Architecture.SD1,
            name="Watercolor Style",
            trigger_words=("wtrcolor style",),
            tags=("watercolor", "painting", "soft colors", "paper texture"),
            seed=1,
        ),
        write_synthetic_lora(
            styles / "pixel_art_sd15.safetensors",
            architecture=Architecture.SD1,
            name="Pixel Art",
            trigger_words=("pixel art",),
            tags=("pixel art", "16-bit", "retro game", "sprite"),
            rank=8,
            seed=2,
        ),
        write_synthetic_lora(
            styles / "cyberpunk_city_xl.safetensors",
            architecture=Architecture.SDXL,
            name="Cyberpunk City XL",
            trigger_words=("cyberpunk city",),
            tags=("cyberpunk", "cityscape", "neon lights", "night", "rain", "sci-fi"),
            seed=3,
        ),
        write_synthetic_lora(
            characters / "aiko_oc_xl.safetensors",
            architecture=Architecture.SDXL,
            name="Aiko (original character)",
            trigger_words=("aiko_oc",),
            tags=("anime", "character", "blue hair", "twin tails"),
            seed=4,
        ),
        write_synthetic_lora(
            styles / "misty_landscapes_sd21.safetensors",
            architecture=Architecture.SD2,
            name="Misty Landscapes",
            tags=("landscape", "fog", "mountains", "photography", "golden hour"),
            seed=5,
        ),
        # Like many diffusers-trained uploads: no metadata at all, only tensor shapes.
        write_synthetic_lora(
            styles / "ink_sketch_peft.safetensors",
            architecture=Architecture.SD1,
            name="ink_sketch_peft",
            fmt="peft",
            with_metadata=False,
            seed=6,
        ),
    ]
    a1111 = {
        "description": "Loose watercolor washes with visible paper grain.",
        "sd version": "SD1",
        "activation text": "wtrcolor style, watercolor painting",
        "preferred weight": 0.8,
        "notes": "Works best with 30+ steps.",
    }
    (styles / "watercolor_style_v2.json").write_text(json.dumps(a1111, indent=4), "utf-8")
    civitai = {
        "id": 104233,
        "modelId": 93151,
        "name": "v1.0",
        "description": "<p>First release.</p>",
        "baseModel": "SDXL 1.0",
        "trainedWords": ["aiko_oc", "blue hair, twin tails"],
        "model": {
            "name": "Aiko - Original Character",
            "type": "LORA",
            "nsfw": False,
            "tags": ["anime", "character", "original character"],
            "description": "<p>Aiko, a cheerful <strong>original character</strong>.</p>"
            "<p>Use <em>aiko_oc</em> at weight 0.7&ndash;0.9.</p>",
        },
    }
    (characters / "aiko_oc_xl.civitai.info").write_text(json.dumps(civitai, indent=2), "utf-8")
    return paths
