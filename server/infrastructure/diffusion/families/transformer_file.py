"""Transformer-only single files (FLUX, SD3): BFL's `flux1-dev.safetensors`, Stability's
`sd3.5_large.safetensors`, ComfyUI's files (keys under `model.diffusion_model.`) and city96's
GGUFs of them. The file lends the transformer alone; the VAE, text encoders, tokenizers,
scheduler and every config come from `config_dir`, a local diffusers folder of the family
(its transformer/ needs only config.json)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from server.domain.models import BaseModelConfig
from server.infrastructure.gguf_header import GGUF_SUFFIX

StateDict = dict[str, Any]


def read_checkpoint(config: BaseModelConfig) -> StateDict:
    """The file's tensors by suffix, case-insensitively (diffusers' own dispatch is
    case-sensitive and sends anything else to torch.load). GGUF tensors stay quantized
    (diffusers' GGUFParameter); F32/F16 ones are plain tensors."""
    if config.path.suffix.lower() == GGUF_SUFFIX:
        from diffusers.models.model_loading_utils import load_gguf_checkpoint

        gguf: StateDict = load_gguf_checkpoint(str(config.path))
        return gguf
    from safetensors.torch import load_file

    return load_file(str(config.path))


def load_transformer_file(
    config: BaseModelConfig,
    torch_dtype: Any,
    *,
    transformer_class: Any,
    pipeline_class: Any,
    convert: Callable[[StateDict], StateDict] = lambda checkpoint: checkpoint,
    **components: Any,
) -> Any:
    """`transformer_class.from_single_file` on the file's tensors (`convert`: what a family
    does to them before diffusers' own conversion), then the pipeline from config_dir with
    that transformer (`components`: others to set, e.g. no T5). A GGUF is loaded with
    diffusers' GGUF quantizer: its Linear weights stay quantized in memory and each layer
    dequantizes to `torch_dtype` as it runs. A safetensors file honours `quantize` as a
    folder does (torchao, on the transformer only)."""
    if config.config_dir is None:
        # inspect_model refuses this before any load; this guards direct callers.
        raise ValueError(f"{config.path}: a transformer-only file needs config_dir")
    from diffusers import GGUFQuantizationConfig

    from server.infrastructure.diffusion.quantization import torchao_config

    quantization: dict[str, Any] = {}
    if config.path.suffix.lower() == GGUF_SUFFIX:
        quantization["quantization_config"] = GGUFQuantizationConfig(compute_dtype=torch_dtype)
    transformer = transformer_class.from_single_file(
        convert(read_checkpoint(config)),
        config=str(config.config_dir),
        subfolder="transformer",
        local_files_only=True,
        torch_dtype=torch_dtype,
        **quantization,
    )
    torchao = torchao_config(config)  # `quantize` (refused for a GGUF)
    if torchao is not None:
        # from_single_file loads on the CPU, where diffusers' torchao quantizer skips every
        # weight (it takes them for offloaded ones): the loaded transformer is quantized as
        # that quantizer would have, with the same config.
        from torchao.quantization import quantize_

        quantize_(transformer, torchao.quant_type)
    return pipeline_class.from_pretrained(
        str(config.config_dir),
        transformer=transformer,
        local_files_only=True,
        torch_dtype=torch_dtype,
        **components,
    )
