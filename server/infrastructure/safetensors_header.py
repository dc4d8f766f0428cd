"""A `.safetensors` file's header (tensor names, dtypes, shapes, offsets) read without its
weights: start-up checks of models, ControlNets and upscalers look at gigabyte files in
milliseconds, and a truncated or foreign file says so in one sentence."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

MAX_HEADER_BYTES = 100 * 1024 * 1024


class HeaderError(ValueError):
    """Not a readable safetensors file; the message says why, after the path."""


def read_header(path: Path, *, check_length: bool = True) -> dict[str, Any]:
    """The header's tensors (its `__metadata__` dropped). `check_length`: the file must hold
    every tensor the header promises (a download cut short fails here, not at load time)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise HeaderError("truncated")
            (length,) = struct.unpack("<Q", head)
            if length == 0 or length > MAX_HEADER_BYTES:
                raise HeaderError(f"not a safetensors file (header length {length})")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise HeaderError("not a safetensors file (its header is not a table)")
        header.pop("__metadata__", None)
        end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    except HeaderError:
        raise
    except (OSError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise HeaderError(f"unreadable safetensors header ({exc.__class__.__name__})") from None
    if check_length and 8 + length + end > size:
        raise HeaderError(f"truncated ({size} bytes, its header needs {8 + length + end})")
    return header
