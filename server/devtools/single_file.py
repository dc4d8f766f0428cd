"""Writes a diffusers SD1.5 or SDXL folder as one original-layout (LDM / A1111) `.safetensors`
checkpoint, the form most base models are shared in. It exists so the single-file loader can be
tested on the tiny random pipelines: loading the written file back must give every weight again.

The key mapping is the inverse of diffusers' `single_file_utils` conversion (and of the
`convert_diffusers_to_original_stable_diffusion.py` script), derived from the model configs so
that it also holds for the tiny UNets, whose block counts differ from the real ones."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

Tensor = Any  # torch.Tensor, kept out of the signatures so importing this module stays cheap
Renames = list[tuple[str, str, Callable[[str], str]]]

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
_UNET_TOP = {
    "conv_in.": "input_blocks.0.0.",
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_OPEN_CLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def write_single_file_checkpoint(diffusers_folder: Path, out: Path) -> Path:
    """Converts an SD1.x or SDXL diffusers folder to one LDM-layout checkpoint at `out`."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    index = json.loads((diffusers_folder / "model_index.json").read_text())
    pipe = DiffusionPipeline.from_pretrained(str(diffusers_folder), local_files_only=True)
    state = _prefixed("model.diffusion_model.", unet_to_ldm(pipe.unet.state_dict(), pipe.unet))
    state |= _prefixed("first_stage_model.", vae_to_ldm(pipe.vae.state_dict(), pipe.vae))
    clip = _with_position_ids(clip_to_ldm(pipe.text_encoder.state_dict()))
    if "text_encoder_2" in index:
        state |= _prefixed("conditioner.embedders.0.transformer.", clip)
        open_clip = open_clip_to_ldm(pipe.text_encoder_2.state_dict())
        state |= _prefixed("conditioner.embedders.1.model.", open_clip)
    else:
        state |= _prefixed("cond_stage_model.transformer.", clip)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata={"format": "pt"})
    return out


def write_single_file_controlnet(diffusers_folder: Path, out: Path) -> Path:
    """Converts a diffusers ControlNet folder to one original-layout (lllyasviel,
    `control_model.*`) `.safetensors` file, as ControlNets are mostly shared."""
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    controlnet = ControlNetModel.from_pretrained(str(diffusers_folder), local_files_only=True)
    state = _prefixed("control_model.", controlnet_to_ldm(controlnet.state_dict(), controlnet))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata={"format": "pt"})
    return out


# The control encoder's last convolution: diffusers' conversion takes it from index 14, where
# the real (four-level) encoder has it, whatever the encoder's depth.
_HINT_OUT = 14


def controlnet_to_ldm(state: Mapping[str, Tensor], controlnet: Any) -> dict[str, Tensor]:
    """ControlNetModel keys -> cldm keys: its UNet half as the UNet's input and middle blocks,
    the zero convolutions, and the control encoder (`input_hint_block`)."""
    own = ("controlnet_down_blocks.", "controlnet_mid_block.", "controlnet_cond_embedding.")
    out = unet_to_ldm({k: v for k, v in state.items() if not k.startswith(own)}, controlnet)
    same = _renamer({})
    renames: Renames = [
        ("controlnet_mid_block.", "middle_block_out.0.", same),
        ("controlnet_cond_embedding.conv_in.", "input_hint_block.0.", same),
        ("controlnet_cond_embedding.conv_out.", f"input_hint_block.{_HINT_OUT}.", same),
    ]
    renames += [
        (f"controlnet_down_blocks.{i}.", f"zero_convs.{i}.0.", same)
        for i in range(len(controlnet.controlnet_down_blocks))
    ]
    renames += [
        (f"controlnet_cond_embedding.blocks.{j}.", f"input_hint_block.{2 * (j + 1)}.", same)
        for j in range(len(controlnet.controlnet_cond_embedding.blocks))
    ]
    return out | _rename(
        {k: v for k, v in state.items() if k.startswith(own)}, renames, "ControlNet"
    )


def unet_to_ldm(state: Mapping[str, Tensor], unet: Any) -> dict[str, Tensor]:
    """UNet2DConditionModel keys -> openaimodel keys (input/middle/output_blocks)."""
    layers = _per_block(unet.config.layers_per_block, len(unet.config.down_block_types))
    resnet = _renamer(_UNET_RESNET)
    same = _renamer({})
    renames: Renames = [(d, o, same) for d, o in _UNET_TOP.items()]
    block = 1  # input_blocks.0 is conv_in
    for i, count in enumerate(layers):
        for j in range(count):
            renames.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{block}.0.", resnet))
            renames.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{block}.1.", same))
            block += 1
        if any(k.startswith(f"down_blocks.{i}.downsamplers.") for k in state):
            renames.append(
                (f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{block}.0.op.", same)
            )
            block += 1
    renames += [
        ("mid_block.resnets.0.", "middle_block.0.", resnet),
        ("mid_block.attentions.0.", "middle_block.1.", same),
        ("mid_block.resnets.1.", "middle_block.2.", resnet),
    ]
    block = 0
    for i, count in enumerate(reversed(layers)):
        for j in range(count + 1):
            renames.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{block}.0.", resnet))
            renames.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{block}.1.", same))
            block += 1
        # The upsampler shares the block's last layer, after its attention when there is one.
        slot = 2 if any(k.startswith(f"up_blocks.{i}.attentions.") for k in state) else 1
        last = f"output_blocks.{block - 1}.{slot}.conv."
        renames.append((f"up_blocks.{i}.upsamplers.0.conv.", last, same))
    return _rename(state, renames, "UNet")


def vae_to_ldm(state: Mapping[str, Tensor], vae: Any) -> dict[str, Tensor]:
    """AutoencoderKL keys -> LDM autoencoder keys; the decoder's up blocks count backwards."""
    ups = len(vae.config.up_block_types)
    resnet = _renamer(_VAE_RESNET)
    attention = _renamer(_VAE_ATTENTION)
    same = _renamer({})
    renames: Renames = []
    for part in ("encoder", "decoder"):
        renames += [
            (f"{part}.conv_norm_out.", f"{part}.norm_out.", same),
            (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", resnet),
            (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", resnet),
            (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", attention),
        ]
    for i in range(len(vae.config.down_block_types)):
        renames += [
            (f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.", resnet),
            (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", same),
        ]
    for i in range(ups):
        renames += [
            (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{ups - 1 - i}.block.", resnet),
            (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{ups - 1 - i}.upsample.", same),
        ]
    for name in ("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.", "decoder.conv_out."):
        renames.append((name, name, same))
    renames += [
        ("quant_conv.", "quant_conv.", same),
        ("post_quant_conv.", "post_quant_conv.", same),
    ]
    out = _rename(state, renames, "VAE")
    # LDM's attention projections are 1x1 convolutions, diffusers' are linear layers.
    for key, value in out.items():
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            out[key] = value[:, :, None, None]
    return out


def clip_to_ldm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CLIPTextModel keys as the original checkpoints hold them: under `text_model.`."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}


def open_clip_to_ldm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CLIPTextModelWithProjection keys -> OpenCLIP's: fused q/k/v, transposed projection."""
    import torch

    src = clip_to_ldm({k: v for k, v in state.items() if k != "text_projection.weight"})
    out = {ldm: src.pop(key) for key, ldm in _OPEN_CLIP_TOP.items()}
    out["text_projection"] = state["text_projection.weight"].T
    prefix = "text_model.encoder.layers."
    layers = sorted({int(k[len(prefix) :].split(".")[0]) for k in src if k.startswith(prefix)})
    for n in layers:
        at = f"{prefix}{n}."
        to = f"transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            qkv = [src.pop(f"{at}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{to}attn.in_proj_{kind}"] = torch.cat(qkv)
            for name, ldm in _OPEN_CLIP_LAYER.items():
                out[f"{to}{ldm}.{kind}"] = src.pop(f"{at}{name}.{kind}")
    if src:
        raise ValueError(f"text_encoder_2 keys without an OpenCLIP name: {sorted(src)[:5]}")
    return out


def _with_position_ids(clip: dict[str, Tensor]) -> dict[str, Tensor]:
    """Adds the `position_ids` buffer that real checkpoints carry, so loading meets it too."""
    import torch

    positions = clip["text_model.embeddings.position_embedding.weight"].shape[0]
    return clip | {"text_model.embeddings.position_ids": torch.arange(positions)[None]}


def _per_block(layers_per_block: int | Iterable[int], blocks: int) -> list[int]:
    if isinstance(layers_per_block, int):
        return [layers_per_block] * blocks
    return list(layers_per_block)


def _renamer(names: Mapping[str, str]) -> Callable[[str], str]:
    """Renames the leading module of a key's remainder (`norm1.weight` -> `in_layers.0.weight`)."""

    def rename(rest: str) -> str:
        for old, new in names.items():
            if rest.startswith(f"{old}."):
                return new + rest[len(old) :]
        return rest

    return rename


def _rename(state: Mapping[str, Tensor], renames: Renames, part: str) -> dict[str, Tensor]:
    """Applies the first matching prefix rename to each key; a key none matches is an error, so
    a mapping gap fails here instead of as a silently random weight after loading."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        for old, new, inner in renames:
            if key.startswith(old):
                out[new + inner(key[len(old) :])] = value
                break
        else:
            raise ValueError(f"{part} key {key} has no original-layout name")
    return out


def _prefixed(prefix: str, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {prefix + k: v for k, v in state.items()}
