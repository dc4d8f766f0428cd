"""Diffusers transformer state dicts written back in the layouts people download them in:
Black Forest Labs' FLUX.1 (`double_blocks.*`, as in `flux1-dev.safetensors` and city96's
GGUFs) and Stability's SD3 MMDiT (`joint_blocks.*`). Each is the inverse of diffusers'
`convert_flux_transformer_checkpoint_to_diffusers` / `convert_sd3_transformer_checkpoint_to_
diffusers` (diffusers/loaders/single_file_utils.py), so a tiny random transformer converted
here and loaded back through `from_single_file` must give every weight again.

Tensors are torch tensors; the maps take and return plain dicts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

Tensor = Any  # torch.Tensor
StateDict = dict[str, Tensor]

COMFY_PREFIX = "model.diffusion_model."


def _swap_halves(tensor: Tensor) -> Tensor:
    """BFL's and SD3's final AdaLayerNorm emit (shift, scale); diffusers' emits (scale,
    shift). Swapping is its own inverse."""
    import torch

    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _indices(state: StateDict, prefix: str) -> Iterator[int]:
    numbers = {k.removeprefix(prefix).split(".", 1)[0] for k in state if k.startswith(prefix)}
    yield from sorted(int(n) for n in numbers)


def _linear(out: StateDict, state: StateDict, source: str, target: str) -> None:
    """A Linear's weight and bias (when it has one) under a new name."""
    for suffix in ("weight", "bias"):
        key = f"{source}.{suffix}"
        if key in state:
            out[f"{target}.{suffix}"] = state[key]


def _fused(out: StateDict, state: StateDict, sources: tuple[str, ...], target: str) -> None:
    """Linears fused along their outputs (BFL's qkv, FLUX's single-block linear1)."""
    import torch

    for suffix in ("weight", "bias"):
        out[f"{target}.{suffix}"] = torch.cat([state[f"{s}.{suffix}"] for s in sources], dim=0)


def flux_to_bfl(state: StateDict, *, prefix: str = "") -> StateDict:
    """A diffusers `FluxTransformer2DModel` state dict in BFL's layout; `prefix`
    ("model.diffusion_model." for ComfyUI's files) goes before every key."""
    out: StateDict = {}
    embedders = {
        "time_text_embed.timestep_embedder": "time_in",
        "time_text_embed.text_embedder": "vector_in",
        "time_text_embed.guidance_embedder": "guidance_in",
    }
    for source, target in embedders.items():
        _linear(out, state, f"{source}.linear_1", f"{target}.in_layer")
        _linear(out, state, f"{source}.linear_2", f"{target}.out_layer")
    _linear(out, state, "context_embedder", "txt_in")
    _linear(out, state, "x_embedder", "img_in")
    for i in _indices(state, "transformer_blocks."):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        _linear(out, state, f"{d}.norm1.linear", f"{b}.img_mod.lin")
        _linear(out, state, f"{d}.norm1_context.linear", f"{b}.txt_mod.lin")
        qkv = tuple(f"{d}.attn.to_{x}" for x in "qkv")
        _fused(out, state, qkv, f"{b}.img_attn.qkv")
        _fused(out, state, tuple(f"{d}.attn.add_{x}_proj" for x in "qkv"), f"{b}.txt_attn.qkv")
        for norm, name in (("norm_q", "query_norm"), ("norm_k", "key_norm")):
            out[f"{b}.img_attn.norm.{name}.scale"] = state[f"{d}.attn.{norm}.weight"]
        for norm, name in (("norm_added_q", "query_norm"), ("norm_added_k", "key_norm")):
            out[f"{b}.txt_attn.norm.{name}.scale"] = state[f"{d}.attn.{norm}.weight"]
        for ff, mlp in (("ff", "img_mlp"), ("ff_context", "txt_mlp")):
            _linear(out, state, f"{d}.{ff}.net.0.proj", f"{b}.{mlp}.0")
            _linear(out, state, f"{d}.{ff}.net.2", f"{b}.{mlp}.2")
        _linear(out, state, f"{d}.attn.to_out.0", f"{b}.img_attn.proj")
        _linear(out, state, f"{d}.attn.to_add_out", f"{b}.txt_attn.proj")
    for i in _indices(state, "single_transformer_blocks."):
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        _linear(out, state, f"{d}.norm.linear", f"{b}.modulation.lin")
        sources = (*(f"{d}.attn.to_{x}" for x in "qkv"), f"{d}.proj_mlp")
        _fused(out, state, sources, f"{b}.linear1")
        out[f"{b}.norm.query_norm.scale"] = state[f"{d}.attn.norm_q.weight"]
        out[f"{b}.norm.key_norm.scale"] = state[f"{d}.attn.norm_k.weight"]
        _linear(out, state, f"{d}.proj_out", f"{b}.linear2")
    _linear(out, state, "proj_out", "final_layer.linear")
    for suffix in ("weight", "bias"):
        modulation = state[f"norm_out.linear.{suffix}"]
        out[f"final_layer.adaLN_modulation.1.{suffix}"] = _swap_halves(modulation)
    return {prefix + k: v for k, v in out.items()}


def sd3_to_mmdit(state: StateDict, *, prefix: str = COMFY_PREFIX) -> StateDict:
    """A diffusers `SD3Transformer2DModel` state dict in Stability's MMDiT layout, under
    `model.diffusion_model.` as in `sd3.5_large.safetensors`. The last block is
    context-pre-only: no context projection or MLP, and its context modulation swapped."""
    out: StateDict = {
        "pos_embed": state["pos_embed.pos_embed"],
        "x_embedder.proj.weight": state["pos_embed.proj.weight"],
        "x_embedder.proj.bias": state["pos_embed.proj.bias"],
    }
    for source, target in (
        ("time_text_embed.timestep_embedder", "t_embedder"),
        ("time_text_embed.text_embedder", "y_embedder"),
    ):
        _linear(out, state, f"{source}.linear_1", f"{target}.mlp.0")
        _linear(out, state, f"{source}.linear_2", f"{target}.mlp.2")
    _linear(out, state, "context_embedder", "context_embedder")
    blocks = list(_indices(state, "transformer_blocks."))
    for i in blocks:
        d, j = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        x, c = f"{j}.x_block", f"{j}.context_block"
        _fused(out, state, tuple(f"{d}.attn.to_{n}" for n in "qkv"), f"{x}.attn.qkv")
        _fused(out, state, tuple(f"{d}.attn.add_{n}_proj" for n in "qkv"), f"{c}.attn.qkv")
        for norm, block, name in (
            ("norm_q", x, "ln_q"),
            ("norm_k", x, "ln_k"),
            ("norm_added_q", c, "ln_q"),
            ("norm_added_k", c, "ln_k"),
        ):
            if f"{d}.attn.{norm}.weight" in state:
                out[f"{block}.attn.{name}.weight"] = state[f"{d}.attn.{norm}.weight"]
        _linear(out, state, f"{d}.attn.to_out.0", f"{x}.attn.proj")
        _linear(out, state, f"{d}.attn.to_add_out", f"{c}.attn.proj")
        if f"{d}.attn2.to_q.weight" in state:  # SD3.5 medium's dual-attention blocks
            _fused(out, state, tuple(f"{d}.attn2.to_{n}" for n in "qkv"), f"{x}.attn2.qkv")
            _linear(out, state, f"{d}.attn2.to_out.0", f"{x}.attn2.proj")
            for norm, name in (("norm_q", "ln_q"), ("norm_k", "ln_k")):
                if f"{d}.attn2.{norm}.weight" in state:
                    out[f"{x}.attn2.{name}.weight"] = state[f"{d}.attn2.{norm}.weight"]
        _linear(out, state, f"{d}.norm1.linear", f"{x}.adaLN_modulation.1")
        _linear(out, state, f"{d}.norm1_context.linear", f"{c}.adaLN_modulation.1")
        if i == blocks[-1]:
            for suffix in ("weight", "bias"):
                key = f"{c}.adaLN_modulation.1.{suffix}"
                out[key] = _swap_halves(out[key])
        for ff, block in (("ff", x), ("ff_context", c)):
            _linear(out, state, f"{d}.{ff}.net.0.proj", f"{block}.mlp.fc1")
            _linear(out, state, f"{d}.{ff}.net.2", f"{block}.mlp.fc2")
    _linear(out, state, "proj_out", "final_layer.linear")
    for suffix in ("weight", "bias"):
        modulation = state[f"norm_out.linear.{suffix}"]
        out[f"final_layer.adaLN_modulation.1.{suffix}"] = _swap_halves(modulation)
    return {prefix + k: v for k, v in out.items()}


# diffusers' Z-Image names -> the original checkpoint's (convert_z_image_transformer_
# checkpoint_to_diffusers, reversed); q, k and v are fused into one qkv below.
_Z_IMAGE_RENAMES = (
    ("all_final_layer.2-1.", "final_layer."),
    ("all_x_embedder.2-1.", "x_embedder."),
    (".attention.to_out.0.", ".attention.out."),
    (".attention.norm_k.", ".attention.k_norm."),
    (".attention.norm_q.", ".attention.q_norm."),
)


def z_image_to_original(state: StateDict, *, prefix: str = "") -> StateDict:
    """A diffusers Z-Image transformer's state dict in the original layout (Tongyi's, and
    ComfyUI's with `prefix`): q, k and v fused into `attention.qkv`, the output and norms
    renamed, the patch embedder and final layer without diffusers' patch-size suffix."""
    import torch

    out: StateDict = {}
    for key, tensor in state.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            parts = [state[key.replace("to_q", name)] for name in ("to_q", "to_k", "to_v")]
            out[prefix + key.replace(".attention.to_q.", ".attention.qkv.")] = torch.cat(parts)
            continue
        for old, new in _Z_IMAGE_RENAMES:
            key = key.replace(old, new)
        out[prefix + key] = tensor
    return out


def transformer_state(folder: Path) -> StateDict:
    """The transformer weights of a diffusers folder, as saved."""
    from safetensors.torch import load_file

    state: StateDict = {}
    for file in sorted((folder / "transformer").glob("*.safetensors")):
        state |= load_file(str(file))
    return state


def write_safetensors(state: StateDict, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def write_gguf(state: StateDict, path: Path, *, arch: str = "flux") -> Path:
    """A GGUF as city96's conversion writes one: Linear weights quantized Q8_0; 1-D tensors
    (biases, norms), convolutions, SD3's pos_embed and rows that do not fill Q8_0's 32-value
    blocks kept F32; `arch` in `general.architecture`, as ComfyUI-GGUF reads it."""
    import gguf
    import numpy as np

    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    writer = gguf.GGUFWriter(str(path), arch)
    for key, tensor in state.items():
        data = tensor.detach().float().numpy()
        if data.ndim == 2 and data.shape[-1] % block == 0:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(key, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(key, data.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
