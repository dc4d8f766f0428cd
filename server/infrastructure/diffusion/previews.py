"""Cheap previews: a fixed linear map from the latent channels to RGB at latent resolution
(1/8 of the image), as A1111 and ComfyUI do, instead of a VAE decode per preview. Each model
family declares its map (`ModelFamily.preview_factors` and `preview_bias`)."""

from __future__ import annotations

import io
from typing import Any

from server.infrastructure.diffusion.families.base import LatentToRGB


def latent_preview(
    latent: Any, factors: LatentToRGB, bias: tuple[float, float, float] | None = None
) -> Any:
    """(channels, h, w) latent tensor -> (h, w, 3) uint8 numpy array."""
    import torch

    weights = torch.tensor(factors, dtype=torch.float32, device=latent.device)
    rgb = torch.einsum("chw,cr->hwr", latent.float(), weights)
    if bias is not None:
        rgb = rgb + torch.tensor(bias, device=latent.device)
    return ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).cpu().numpy()


def preview_jpeg(
    latent: Any,
    factors: LatentToRGB,
    bias: tuple[float, float, float] | None = None,
    quality: int = 70,
) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(latent_preview(latent, factors, bias)).save(
        buffer, format="JPEG", quality=quality
    )
    return buffer.getvalue()
