"""Cheap previews: a fixed linear map from the 4 latent channels to RGB at latent resolution
(1/8 of the image), as A1111 and ComfyUI do, instead of a VAE decode per preview."""

from __future__ import annotations

import io
from typing import Any

from server.domain.models import Architecture

# Least-squares fits of latent -> RGB published with A1111/ComfyUI (rows: latent channels).
_FACTORS = {
    Architecture.SD1: (
        (0.3512, 0.2297, 0.3227),
        (0.3250, 0.4974, 0.2350),
        (-0.2829, 0.1762, 0.2721),
        (-0.2120, -0.2616, -0.7177),
    ),
    Architecture.SDXL: (
        (0.3651, 0.4232, 0.4341),
        (-0.2533, -0.0042, 0.1068),
        (0.1076, 0.1111, -0.0362),
        (-0.3165, -0.2492, -0.2188),
    ),
}
_BIAS = {Architecture.SDXL: (0.1084, -0.0175, -0.0011)}


def latent_preview(latent: Any, architecture: Architecture) -> Any:
    """(4, h, w) latent tensor -> (h, w, 3) uint8 numpy array."""
    import torch

    factors = torch.tensor(
        _FACTORS.get(architecture, _FACTORS[Architecture.SD1]),
        dtype=torch.float32,
        device=latent.device,
    )
    rgb = torch.einsum("chw,cr->hwr", latent.float(), factors)
    bias = _BIAS.get(architecture)
    if bias is not None:
        rgb = rgb + torch.tensor(bias, device=latent.device)
    return ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).cpu().numpy()


def preview_jpeg(latent: Any, architecture: Architecture, quality: int = 70) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(latent_preview(latent, architecture)).save(
        buffer, format="JPEG", quality=quality
    )
    return buffer.getvalue()
