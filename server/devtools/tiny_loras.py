"""LoRA files shaped for one loaded pipeline, so tests can apply them to the tiny random models
(or a real one) and see the image change.

`synthetic_loras` writes real-shaped fakes for full-size models that are only ever read, never
applied; these are applied, so names and shapes come from the pipeline's actual modules. The
tiny models' odd widths defeat the reader's shape-based architecture detection, so pass
`metadata` (e.g. `{"ss_base_model_version": "sd_v1"}`) when the file must be classified.

`write_flux_lora` writes one LoRA for a FLUX transformer in each of the formats FLUX LoRAs are
published in, with the same low-rank deltas, so that a test can check diffusers' conversions
rather than trust them.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
from safetensors.numpy import save

from server.devtools.synthetic_loras import _canonical

__all__ = ["FLUX_TARGETS", "FluxLoraFormat", "write_flux_lora", "write_lora_for_pipeline"]

# peft: diffusers' own names (`transformer.<module>.lora_A`); kohya: `lora_unet_<module_>`
# with lora_down/lora_up/alpha; diffusion_model: the original model's module names under
# `diffusion_model.` with lora_A/lora_B, as ai-toolkit and musubi-tuner write them for
# transformer families whose original names are diffusers' (Qwen-Image, Z-Image).
LoraFormat = Literal["kohya", "peft", "diffusion_model"]

_UNET_TARGET = re.compile(r"\.attn[12]\.(?:to_q|to_k|to_v|to_out\.0)$")
_UNET_CONV = re.compile(r"\.attentions\.\d+\.(?:proj_in|proj_out)$|\.resnets\.\d+\.conv1$")
# The transformers' attention projections: FLUX's double- and single-stream blocks, SD3's and
# Qwen-Image's joint blocks (`attn`), Z-Image's single-stream layers and refiners
# (`attention`).
_TRANSFORMER_TARGET = re.compile(
    r"\.(?:attn|attention)\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj)$"
)
_TEXT_TARGET = re.compile(r"\.self_attn\.(?:q_proj|k_proj|v_proj|out_proj)$")
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# Transformers whose original checkpoints name modules otherwise than diffusers (FLUX's
# double_blocks.N.img_attn.qkv, SD3's joint_blocks): their kohya files are not a rename.
_RENAMED_TRANSFORMERS = frozenset({"FluxTransformer2DModel", "SD3Transformer2DModel"})
# diffusers UNet blocks as kohya's SDXL trainer (the SGM UNet) numbers them.
_DIFFUSERS_BLOCK = re.compile(
    r"^(down_blocks|mid_block|up_blocks)\.(?:(\d+)\.)?attentions\.(\d+)\."
)


def write_lora_for_pipeline(
    pipe: Any,
    path: Path,
    *,
    fmt: LoraFormat = "peft",
    rank: int = 4,
    seed: int = 0,
    scale: float = 1.0,
    text_encoder: bool = True,
    metadata: dict[str, str] | None = None,
    alpha: float | None = None,
    convs: bool = False,
) -> Path:
    """Writes a LoRA for every attention projection of `pipe`'s UNet, or transformer (FLUX,
    peft format only), and text encoders.

    Each module's delta B @ A (alpha = rank, so diffusers applies it unscaled) has a standard
    deviation of `scale` times that of the weight it changes: at 1.0 the change is as large as
    the weight itself, which shows in any image. Kohya files for SDXL use the SGM block names
    (input_blocks/middle_block/output_blocks) that kohya's trainer writes and diffusers maps back.
    `alpha` (kohya only; default: the rank) scales the delta by alpha / rank, as trainers do;
    `convs` adds convolutions, as kohya's LoCon trainer targets them: the UNet's projections
    (SD1's 1x1 proj_in/proj_out) and the resnets' first 3x3 convolutions.
    """
    if rank <= 0:
        raise ValueError("rank must be positive")
    rng = np.random.default_rng(seed)
    unet = getattr(pipe, "unet", None)
    sdxl = unet is not None and getattr(pipe, "text_encoder_2", None) is not None
    tensors: dict[str, np.ndarray] = {}
    if unet is not None:
        if fmt == "diffusion_model":
            raise ValueError("diffusion_model names are written for transformers only")
        targets = [("unet", name, module) for name, module in _modules(unet, _UNET_TARGET)]
        if convs:
            targets += [("unet", n, m) for n, m in _modules(unet, _UNET_CONV, conv=True)]
    else:
        if fmt != "peft" and type(pipe.transformer).__name__ in _RENAMED_TRANSFORMERS:
            raise ValueError(
                f"{fmt} names of {type(pipe.transformer).__name__} are not diffusers'"
                " (write_flux_lora writes FLUX's)"
            )
        found = _modules(pipe.transformer, _TRANSFORMER_TARGET)
        targets = [("transformer", name, module) for name, module in found]
    if text_encoder:
        for component in _TEXT_ENCODERS:
            model = getattr(pipe, component, None)
            # CLIP text encoders only (FLUX's T5 is not a LoRA target).
            if model is not None and type(model).__name__.startswith("CLIPText"):
                targets += [(component, n, m) for n, m in _modules(model, _TEXT_TARGET)]
    if not targets:
        raise ValueError(f"{type(pipe).__name__} has no attention projections to target")
    for component, module_name, module in targets:
        weight = module.weight.detach().float().cpu().numpy()
        out_features, in_features, *kernel = weight.shape
        std = scale * float(weight.std() or 1.0)
        down = rng.standard_normal((rank, in_features, *kernel)) / math.sqrt(in_features)
        up = rng.standard_normal((out_features, rank)) * std * math.sqrt(in_features / rank)
        up = up.reshape(out_features, rank, *[1] * len(kernel))
        if fmt == "diffusion_model":
            tensors[f"diffusion_model.{module_name}.lora_A.weight"] = down.astype(np.float16)
            tensors[f"diffusion_model.{module_name}.lora_B.weight"] = up.astype(np.float16)
        elif fmt == "kohya":
            key = _kohya_name(component, module_name, sdxl=sdxl, unet=unet)
            tensors[f"{key}.lora_down.weight"] = down.astype(np.float16)
            tensors[f"{key}.lora_up.weight"] = up.astype(np.float16)
            tensors[f"{key}.alpha"] = np.array(alpha or rank, dtype=np.float16)
        else:
            tensors[f"{component}.{module_name}.lora_A.weight"] = down.astype(np.float16)
            tensors[f"{component}.{module_name}.lora_B.weight"] = up.astype(np.float16)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_canonical(save(tensors, metadata=metadata)))
    return path


def _modules(model: Any, pattern: re.Pattern[str], *, conv: bool = False) -> list[tuple[str, Any]]:
    """Plain linear (or convolution) projections only: a module already wrapped by peft has
    its own names."""
    import torch

    kind = torch.nn.Conv2d if conv else torch.nn.Linear
    return [
        (name, module)
        for name, module in model.named_modules()
        if pattern.search(name) and type(module) is kind
    ]


def _kohya_name(component: str, module_name: str, *, sdxl: bool, unet: Any) -> str:
    if component == "transformer":
        return "lora_unet_" + module_name.replace(".", "_")
    if component == "unet":
        if sdxl:
            module_name = _sgm_name(module_name, unet.config.layers_per_block)
        return "lora_unet_" + module_name.replace(".", "_")
    # kohya names text encoder modules from CLIPTextModel's root, `text_model.` included.
    if not module_name.startswith("text_model."):
        module_name = "text_model." + module_name
    prefix = ("lora_te2_" if component == "text_encoder_2" else "lora_te1_") if sdxl else "lora_te_"
    return prefix + module_name.replace(".", "_")


def _sgm_name(module_name: str, layers_per_block: Any) -> str:
    """down_blocks.1.attentions.0 -> input_blocks.4.1, mid_block -> middle_block.1,
    up_blocks.0.attentions.2 -> output_blocks.2.1 (the inverse of diffusers' mapping)."""
    if not isinstance(layers_per_block, int):
        raise ValueError("kohya SDXL names need one layers_per_block for every UNet block")
    match = _DIFFUSERS_BLOCK.match(module_name)
    if match is None:
        raise ValueError(f"no SGM name for UNet module {module_name}")
    kind, block, layer = match.group(1), int(match.group(2) or 0), int(match.group(3))
    rest = module_name[match.end() :]
    if kind == "down_blocks":
        sgm = f"input_blocks.{1 + block * (layers_per_block + 1) + layer}.1."
    elif kind == "mid_block":
        sgm = "middle_block.1."
    else:
        sgm = f"output_blocks.{block * (layers_per_block + 1) + layer}.1."
    return sgm + rest


# A FLUX LoRA's modules as the original (BFL) model names them, and the diffusers modules each
# is split into: the fused projections (`qkv`, the single blocks' `linear1` = q, k, v and the
# MLP's input) take one LoRA whose down matrix all the parts share and whose up matrix is the
# parts' up matrices stacked, in this order.
_FLUX_DOUBLE: dict[str, tuple[str, ...]] = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
}
_FLUX_SINGLE: dict[str, tuple[str, ...]] = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
}
# XLabs' processors: `qkv_lora1`/`proj_lora1` on the image stream, `..2` on the text stream,
# and the single blocks' `proj_lora` (linear2). Their single-block `qkv_lora` changes q, k and
# v only, which is no LoRA of linear1 (that has the MLP's input too), so linear1 has none.
_XLABS = {
    "img_attn.qkv": "qkv_lora1",
    "img_attn.proj": "proj_lora1",
    "txt_attn.qkv": "qkv_lora2",
    "txt_attn.proj": "proj_lora2",
    "linear2": "proj_lora",
}
# What every format below carries and diffusers 0.42 converts for a FLUX transformer of any
# width. Not `linear1`: `_convert_kohya_flux_lora_to_diffusers` splits a kohya (or ComfyUI)
# linear1 at FLUX.1's widths (dims=[3072, 3072, 3072, 12288]) and asserts they add up to the
# file's, so only a FLUX.1-sized linear1 loads; and xlabs has no linear1 (above).
FLUX_TARGETS: tuple[str, ...] = (*_FLUX_DOUBLE, "linear2")

# peft: diffusers' names (`transformer.transformer_blocks.0.attn.to_q.lora_A.weight`), fused
# projections split; kohya: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`,
# `.lora_up.weight`, `.alpha`; comfyui: BFL names under `diffusion_model.` with lora_down/
# lora_up/alpha, as ComfyUI saves them; diffusion_model: BFL names under `diffusion_model.` with
# lora_A/lora_B (no alpha), which diffusers 0.42 does not convert for FLUX (its
# FluxLoraLoaderMixin.lora_state_dict renames BFL names only in files with lora_down keys, or
# Control LoRAs of FLUX.1's size), so such a file loads no layer; xlabs:
# `double_blocks.0.processor.qkv_lora1.down.weight`/`.up.weight`, no alpha.
FluxLoraFormat = Literal["peft", "kohya", "comfyui", "diffusion_model", "xlabs"]


def write_flux_lora(
    pipe: Any,
    path: Path,
    *,
    fmt: FluxLoraFormat = "peft",
    targets: tuple[str, ...] = FLUX_TARGETS,
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    scale: float = 1.0,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Writes a LoRA for `targets` (BFL module names: `img_attn.qkv`, `img_attn.proj`,
    `txt_attn.qkv`, `txt_attn.proj`, `linear1`, `linear2`) of every block of `pipe`'s FLUX
    transformer, in `fmt`. The same arguments give the same deltas in every format: each
    target's is (alpha / rank) * up @ down, with one down matrix for all of a fused
    projection's parts (so a peft file repeats it for q, k and v and splits the up matrix).
    Formats with an alpha (kohya, comfyui) store `alpha` (default: rank) and the bare up
    matrix; the others bake alpha / rank into the up matrix, so an alpha of a power of two
    times the rank gives the same fp16 deltas exactly. The delta's standard deviation is
    about `scale` times that of the weight it changes. Transformer only: no text encoder."""
    if rank <= 0:
        raise ValueError("rank must be positive")
    if fmt not in get_args(FluxLoraFormat):
        raise ValueError(f"unknown FLUX LoRA format {fmt!r}")
    unknown = sorted(set(targets) - set(_FLUX_DOUBLE) - set(_FLUX_SINGLE))
    if unknown or not targets:
        raise ValueError(f"unknown FLUX LoRA targets {unknown or targets}")
    if fmt == "xlabs" and "linear1" in targets:
        raise ValueError("xlabs files have no LoRA of the single blocks' linear1")
    transformer = pipe.transformer
    if type(transformer).__name__ != "FluxTransformer2DModel":
        raise ValueError(f"{type(transformer).__name__} is not a FLUX transformer")
    factor = (rank if alpha is None else alpha) / rank
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    blocks = [
        ("double_blocks", "transformer_blocks", _FLUX_DOUBLE),
        ("single_blocks", "single_transformer_blocks", _FLUX_SINGLE),
    ]
    for bfl_blocks, diffusers_blocks, parts_of in blocks:
        for i, block in enumerate(getattr(transformer, diffusers_blocks)):
            for target in (t for t in parts_of if t in targets):
                parts = [block.get_submodule(name) for name in parts_of[target]]
                weight = np.concatenate(
                    [p.weight.detach().float().cpu().numpy() for p in parts], axis=0
                )
                out_features, in_features = weight.shape
                std = scale * float(weight.std() or 1.0)
                down = rng.standard_normal((rank, in_features)) / math.sqrt(in_features)
                up = rng.standard_normal((out_features, rank)) * std * math.sqrt(in_features / rank)
                down16, up16 = down.astype(np.float16), up.astype(np.float16)
                baked = (up16.astype(np.float32) * factor).astype(np.float16)
                bfl = f"{bfl_blocks}.{i}.{target}"
                if fmt == "peft":
                    splits = np.cumsum([p.weight.shape[0] for p in parts])[:-1]
                    for name, part_up in zip(
                        parts_of[target], np.split(baked, splits), strict=True
                    ):
                        module = f"transformer.{diffusers_blocks}.{i}.{name}"
                        tensors[f"{module}.lora_A.weight"] = down16
                        tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(part_up)
                elif fmt in ("kohya", "comfyui"):
                    key = (
                        "lora_unet_" + bfl.replace(".", "_")
                        if fmt == "kohya"
                        else f"diffusion_model.{bfl}"
                    )
                    tensors[f"{key}.lora_down.weight"] = down16
                    tensors[f"{key}.lora_up.weight"] = up16
                    tensors[f"{key}.alpha"] = np.array(factor * rank, dtype=np.float16)
                elif fmt == "diffusion_model":
                    tensors[f"diffusion_model.{bfl}.lora_A.weight"] = down16
                    tensors[f"diffusion_model.{bfl}.lora_B.weight"] = baked
                else:
                    key = f"{bfl_blocks}.{i}.processor.{_XLABS[target]}"
                    tensors[f"{key}.down.weight"] = down16
                    tensors[f"{key}.up.weight"] = baked
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_canonical(save(tensors, metadata=metadata)))
    return path
