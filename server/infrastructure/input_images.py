"""Images clients send (init images, masks): checked before a job is queued, opened again by
the executor. Only PNG, JPEG and WebP of one frame; the size is read from the header and
checked before any pixel is decoded (a 50,000 x 50,000 header costs nothing), then the image
is decoded completely (a truncated file is refused here, not on the device). Modes other
than RGB (CMYK, 16-bit, palette, alpha) are converted when opened."""

from __future__ import annotations

import io
import warnings
from typing import Any

from PIL import Image

FORMATS = frozenset({"PNG", "JPEG", "WEBP"})


class _Refused(ValueError):
    """Our own sentence; any other error from a decoder becomes "not readable"."""


class PillowImageReader:
    """The ImageReader port (application/ports.py)."""

    def measure(self, data: bytes, max_pixels: int) -> tuple[int, int]:
        with _opened(data, max_pixels) as image:
            width, height = image.size
            return int(width), int(height)

    def blank(self, data: bytes) -> bool:
        return open_mask(data).getbbox() is None


class _opened:
    """An image opened from bytes, checked; ValueError with one plain sentence otherwise."""

    def __init__(self, data: bytes, max_pixels: int) -> None:
        self._data = data
        self._max_pixels = max_pixels
        self._image: Any = None

    def __enter__(self) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(self._data))
                self._image = image
                if image.format not in FORMATS:
                    raise _Refused(f"is a {image.format} image; send PNG, JPEG or WebP")
                width, height = image.size
                if width < 1 or height < 1:
                    raise _Refused("has no pixels")
                if width * height > self._max_pixels:
                    raise _Refused(
                        f"is {width}x{height} pixels; at most {self._max_pixels:,} pixels"
                    )
                if getattr(image, "n_frames", 1) > 1:
                    raise _Refused("is animated; send one frame")
                image.load()
        except _Refused:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise _Refused("is too large to decode") from None
        except Exception:  # a decoder's own error on hostile bytes, never shown as it is
            raise _Refused("is not a readable PNG, JPEG or WebP image") from None
        return image

    def __exit__(self, *_: object) -> None:
        if self._image is not None:
            self._image.close()


def open_rgb(data: bytes) -> Any:
    """An input image as RGB (checked before queuing, so it opens). 16-bit grey is scaled
    to 8 bits rather than clipped."""
    image: Any = Image.open(io.BytesIO(data))
    image.load()
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda v: v / 256).convert("L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels become black, as A1111 does when it flattens an upload.
        background = Image.new("RGB", image.size)
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def open_mask(data: bytes) -> Any:
    """A mask as 8-bit luminance (white: paint again)."""
    return open_rgb(data).convert("L")
