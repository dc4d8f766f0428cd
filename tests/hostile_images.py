"""Input images a client may send: broken or hostile ones the server must refuse before
queuing (INVALID_ARGUMENT naming the field), and odd but valid ones it must accept. Shared
by the integration tests and the reliability suite's fuzzer."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def bad_images() -> dict[str, bytes]:
    """Refused: not an image, empty, truncated, a decompression bomb's header, animated,
    a format other than PNG, JPEG and WebP."""
    rgb = noise(64, 64)
    whole = encode(rgb)
    # A PNG whose header claims 50,000 x 50,000 pixels, and nothing else.
    bomb = bytearray(encode(Image.new("L", (1, 1))))
    bomb[16:24] = (50_000).to_bytes(4, "big") + (50_000).to_bytes(4, "big")
    return {
        "not an image": b"hello, world" * 10,
        "empty": b"",
        "zero-size header": bytes(bomb[:16]) + bytes(8) + bytes(bomb[24:]),
        "truncated": whole[: len(whole) // 2],
        "50k x 50k header": bytes(bomb),
        "animated": encode(rgb, save_all=True, append_images=[noise(64, 64, 9)]),
        "gif": encode(rgb, "GIF"),
    }


def odd_images() -> dict[str, bytes]:
    """Accepted: modes other than 8-bit RGB, converted by the server."""
    grey = noise(64, 64).convert("L")
    return {
        "CMYK JPEG": encode(noise(64, 64).convert("CMYK"), "JPEG"),
        "16-bit PNG": encode(grey.convert("I;16")),
        "grey with alpha": encode(grey.convert("LA")),
        "palette": encode(noise(64, 64).convert("P")),
        "WebP": encode(noise(64, 64), "WEBP"),
    }
