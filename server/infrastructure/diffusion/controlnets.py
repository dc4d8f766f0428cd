"""Configured ControlNets: checked at start-up without loading weights (like base models,
registry.py), loaded on first use in the device and dtype of the model they steer, and kept
with that model's pipeline (pipelines.LoadedPipeline)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from server.domain.models import Architecture, ControlNetConfig, ControlNetInfo
from server.infrastructure.diffusion.families import ModelFamily, family_for
from server.infrastructure.lora_files import update_digest
from server.infrastructure.safetensors_header import HeaderError, read_header

CONFIG = "config.json"
SD_CONTROLNET = "ControlNetModel"
# What a ControlNet's config must share with its denoiser's, by class: the width of the text
# embedding it takes (and of SD3's pooled one), and a transformer ControlNet's hidden width
# (the product of the keys) and heads, its outputs being added to the transformer's blocks.
_TEXT = "text embedding"
_HIDDEN = "hidden state"
_MMDIT_FIT = {
    _TEXT: ("joint_attention_dim",),
    _HIDDEN: ("num_attention_heads", "attention_head_dim"),
}
_FITS: dict[str, dict[str, tuple[str, ...]]] = {
    SD_CONTROLNET: {_TEXT: ("cross_attention_dim",)},
    "FluxControlNetModel": {_TEXT: ("joint_attention_dim",)},
    "SD3ControlNetModel": _MMDIT_FIT | {"pooled text embedding": ("pooled_projection_dim",)},
    "QwenImageControlNetModel": _MMDIT_FIT,
    # Z-Image's shares the transformer's text and timestep embedders and its rotary
    # embedding: its width and heads are the transformer's.
    "ZImageControlNetModel": {_HIDDEN: ("dim",), "attention heads": ("n_heads",)},
}
WEIGHTS = "diffusion_pytorch_model.safetensors"
# Keys a single file holds in diffusers' layout, and in the original (lllyasviel) one.
DIFFUSERS_KEY = "controlnet_cond_embedding."
ORIGINAL_KEYS = ("control_model.input_hint_block.", "input_hint_block.")
NEEDS_CONFIG_DIR = (
    "a single-file ControlNet needs config_dir: a local folder holding its config.json "
    "(no hub access)"
)


class ControlNetLoadError(Exception):
    """A ControlNet that cannot steer the model it was asked for (its job fails)."""


def inspect_controlnet(config: ControlNetConfig) -> ControlNetInfo:
    """Its status: ready, or why not (files missing, not a ControlNet, another architecture)."""
    error = _inspect(config)
    return ControlNetInfo(config, not error, error)


def _inspect(config: ControlNetConfig) -> str:
    path = config.path
    family = family_for(config.architecture)
    if family is None or not family.controlnet_pipelines:
        return f"ControlNets are not built for {config.architecture.value} models yet"
    if not path.exists():
        return f"{path} does not exist"
    if path.is_file() and family.controlnet_class != SD_CONTROLNET:
        return (
            f"{path}: {config.architecture.value} ControlNets are loaded from diffusers "
            "folders (config.json beside diffusion_pytorch_model.safetensors)"
        )
    if path.is_file():
        error = _inspect_file(path, config.architecture)
        if error:
            return error
        if config.config_dir is None:
            return NEEDS_CONFIG_DIR
        folder = config.config_dir
    else:
        folder = path
        if not (path / WEIGHTS).is_file():
            return f"{path} has no {WEIGHTS} (only safetensors are loaded: pickle can run code)"
    return _inspect_config(folder, config.architecture)


def _inspect_file(path: Path, architecture: Architecture) -> str:
    if path.suffix.lower() != ".safetensors":
        return f"{path}: only .safetensors ControlNets are accepted (pickle can run code)"
    try:
        header = read_header(path)
    except HeaderError as exc:
        return f"{path}: {exc}"
    if not any(key.startswith((DIFFUSERS_KEY, *ORIGINAL_KEYS)) for key in header):
        return f"{path} is not a ControlNet: it has no control-image encoder ({DIFFUSERS_KEY}*)"
    original = any(key.startswith(ORIGINAL_KEYS) for key in header)
    if original and architecture is Architecture.SDXL:
        # diffusers' conversion of the original layout drops SDXL's added embedding.
        return (
            f"{path} is an SDXL ControlNet in the original layout (control_model.*), which "
            "diffusers cannot convert; use one in diffusers' layout (as diffusers and most "
            "SDXL ControlNets publish them)"
        )
    return ""


def _inspect_config(folder: Path, architecture: Architecture) -> str:
    """diffusers' config tells an SDXL ControlNet (its UNet half has SDXL's added text and
    time embedding) from an SD1/SD2 one; the text encoder's width (768 or 1024) is checked
    against the model's when it is loaded."""
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError) as exc:
        return f"{folder / CONFIG}: not a diffusers ControlNet config ({exc.__class__.__name__})"
    kind = config.get("_class_name", "") if isinstance(config, dict) else ""
    family = family_for(architecture)
    expected = SD_CONTROLNET if family is None else family.controlnet_class
    if kind != expected:
        return f"{folder / CONFIG} describes a {kind or 'unknown model'}, not a {expected}"
    if expected != SD_CONTROLNET:
        return ""
    xl = config.get("addition_embed_type") == "text_time"
    if xl != (architecture is Architecture.SDXL):
        found = "an SDXL" if xl else "an SD1/SD2"
        return f"{folder / CONFIG} describes {found} ControlNet, not {architecture.value}"
    return ""


def load_controlnet(config: ControlNetConfig, denoiser: Any, family: ModelFamily) -> Any:
    """The ControlNet in the `denoiser`'s (UNet's or transformer's) device and dtype. Raises
    ControlNetLoadError when its files do not load or it does not fit the denoiser (a text
    encoder of another width)."""
    import diffusers

    controlnet_class = getattr(diffusers, family.controlnet_class)
    try:
        if config.path.is_file():
            model = controlnet_class.from_single_file(
                str(config.path),
                config=str(config.config_dir),
                local_files_only=True,
                torch_dtype=denoiser.dtype,
            )
        else:
            model = controlnet_class.from_pretrained(
                str(config.path),
                local_files_only=True,
                use_safetensors=True,
                torch_dtype=denoiser.dtype,
            )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ControlNetLoadError(
            f"ControlNet {config.name!r} could not be loaded ({exc.__class__.__name__}); "
            "see the server's log"
        ) from exc
    misfit = _misfit(model.config, denoiser.config, family.controlnet_class)
    if misfit:
        raise ControlNetLoadError(
            f"ControlNet {config.name!r} {misfit}: it was trained for another base model"
        )
    model.to(denoiser.device)
    model.requires_grad_(False)
    return model


def _misfit(controlnet: Any, denoiser: Any, controlnet_class: str) -> str:
    """How the ControlNet's config does not fit its denoiser's; "" when it does. A width of
    None is one the ControlNet does not take (SD3.5's own ControlNets take no text)."""
    for what, keys in _FITS[controlnet_class].items():
        width = math.prod(getattr(controlnet, k) or 0 for k in keys)
        expected = math.prod(getattr(denoiser, k, 0) or 0 for k in keys)
        if getattr(controlnet, keys[0]) is None or width == expected:
            continue
        if what == "attention heads":
            return f"has {width} attention heads, the model's transformer {expected}"
        return f"takes a {width}-wide {what}, the model gives {expected}"
    return ""


def controlnet_hash(config: ControlNetConfig, known: dict[tuple[Path, float], str]) -> str:
    """The short hash sd-webui-controlnet writes after a ControlNet's name (SHA-256 of its
    weights, 8 hex); cached while the file is unchanged."""
    path = config.path if config.path.is_file() else config.path / WEIGHTS
    key = (path, path.stat().st_mtime)
    if key not in known:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            update_digest(digest, f)
        known[key] = digest.hexdigest()[:8]
    return known[key]
