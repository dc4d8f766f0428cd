"""A `.gguf` file's tensor index (names, quantization types, shapes) read without its
weights, in the shape of `safetensors_header.read_header`, so the start-up checks of a
single-file model read either format the same way. GGUF is what quantized FLUX and SD3
transformers are shared as (city96's conversions keep the original key names)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server.infrastructure.safetensors_header import HeaderError

GGUF_SUFFIX = ".gguf"


def read_gguf_header(path: Path) -> dict[str, Any]:
    """{tensor name: {"dtype": the GGML type's name ("Q8_0", "F32"...), "shape": torch's
    order}}. `gguf.GGUFReader` memory-maps the file and parses only the index (a file cut
    short fails here: its last tensors' data cannot be mapped)."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
        return {
            tensor.name: {
                "dtype": tensor.tensor_type.name,
                # GGUF lists dimensions innermost first; torch and safetensors outermost first.
                "shape": [int(d) for d in reversed(tensor.shape.tolist())],
            }
            for tensor in reader.tensors
        }
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        detail = str(exc) if isinstance(exc, ValueError) and str(exc) else exc.__class__.__name__
        raise HeaderError(f"not a readable GGUF file ({detail})") from None
