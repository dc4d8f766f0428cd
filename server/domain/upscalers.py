"""The hires-fix upscalers by A1111's names: the latent ones resize the first pass's latents
(an interpolation mode, with or without antialiasing), the image ones resize its decoded
image. Upscaler models (ESRGAN and kin, `[[upscalers]]`) are configured, not built in: a hires
fix names them by their configured name."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Upscaler:
    name: str
    latent: bool
    # torch.nn.functional.interpolate's mode (latent) or Pillow's resampling filter (image).
    mode: str
    antialias: bool = False


UPSCALERS: tuple[Upscaler, ...] = (
    Upscaler("Latent", latent=True, mode="bilinear"),
    Upscaler("Latent (antialiased)", latent=True, mode="bilinear", antialias=True),
    Upscaler("Latent (bicubic)", latent=True, mode="bicubic"),
    Upscaler("Latent (bicubic antialiased)", latent=True, mode="bicubic", antialias=True),
    Upscaler("Latent (nearest)", latent=True, mode="nearest"),
    Upscaler("Latent (nearest-exact)", latent=True, mode="nearest-exact"),
    Upscaler("Lanczos", latent=False, mode="lanczos"),
    Upscaler("Nearest", latent=False, mode="nearest"),
)
DEFAULT_UPSCALER = "Latent"
_BY_NAME = {u.name.casefold(): u for u in UPSCALERS}


def find_upscaler(name: str) -> Upscaler | None:
    """The upscaler A1111 calls `name` (any case; "" is the default), or None."""
    return _BY_NAME.get((name or DEFAULT_UPSCALER).strip().casefold())


def builtin_names() -> list[str]:
    return [u.name for u in UPSCALERS]
