"""Quantization on load (`quantize` in a `[[models]]` entry): torchao's weight-only configs,
applied by diffusers to the denoiser only as it loads (the text encoders and VAE keep their
dtype). Weight-only because it needs no calibration and keeps activations in the model's
dtype. Both halve a bf16 denoiser's memory and run anywhere; fp8 is fast only on CUDA GPUs of
compute capability 8.9 or newer (elsewhere torchao dequantizes as it multiplies)."""

from __future__ import annotations

import importlib.util
from typing import Any

from server.domain.models import BaseModelConfig


def quantization_problem(config: BaseModelConfig) -> str:
    """Why the model's `quantize` cannot be honoured here ("" when it can or is not set)."""
    if not config.quantize:
        return ""
    if importlib.util.find_spec("torchao") is None:
        return (
            f"quantize = {config.quantize!r} needs the torchao package "
            "(pip install 'loracle[quantization]')"
        )
    if config.path.suffix.lower() == ".gguf":
        return "a GGUF file is quantized already; leave quantize out"
    return ""


def torchao_config(config: BaseModelConfig) -> Any | None:
    """diffusers' TorchAoConfig for the model's `quantize`, or None."""
    if not config.quantize:
        return None
    from diffusers import TorchAoConfig
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    kinds = {"int8": Int8WeightOnlyConfig, "fp8": Float8WeightOnlyConfig}
    return TorchAoConfig(kinds[config.quantize]())


def pipeline_quantization(config: BaseModelConfig, denoiser: str) -> dict[str, Any]:
    """`from_pretrained` keyword arguments quantizing the `denoiser` component ({}: none)."""
    quant = torchao_config(config)
    if quant is None:
        return {}
    from diffusers import PipelineQuantizationConfig

    return {"quantization_config": PipelineQuantizationConfig(quant_mapping={denoiser: quant})}
