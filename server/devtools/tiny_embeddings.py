"""Textual-inversion embeddings shaped for one loaded pipeline (its text encoders' widths), in
A1111's, diffusers' or SDXL's two-part form, so tests can name them in prompts of the tiny
random models and see the conditioning change. The tiny widths (32) are no real text
encoder's, so the file's metadata names the architecture the reader would otherwise take
from the width."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
from safetensors.numpy import save_file

__all__ = ["write_embedding", "write_embedding_for_pipeline"]

EmbeddingFormat = Literal["a1111", "diffusers"]
_MODELSPEC = {
    "SD1": "stable-diffusion-v1/textual-inversion",
    "SD2": "stable-diffusion-v2/textual-inversion",
    "SDXL": "stable-diffusion-xl-v1-base/textual-inversion",
}


def write_embedding(
    path: Path,
    widths: tuple[int, ...],
    *,
    vectors: int = 2,
    fmt: EmbeddingFormat = "a1111",
    architecture: str = "",
    seed: int = 0,
) -> Path:
    """One width: a single-tensor embedding (`emb_params`, or diffusers' `{<stem>: ...}`);
    two: SDXL's `clip_l` + `clip_g`. Vectors are large (scale 5) so their effect shows."""
    rng = np.random.default_rng(seed)

    def part(width: int) -> np.ndarray:
        return (rng.standard_normal((vectors, width)) * 5).astype(np.float32)

    if len(widths) == 2:
        tensors = {"clip_l": part(widths[0]), "clip_g": part(widths[1])}
    else:
        key = "emb_params" if fmt == "a1111" else f"<{path.stem}>"
        tensors = {key: part(widths[0])}
    metadata = {"modelspec.architecture": _MODELSPEC[architecture]} if architecture else None
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def write_embedding_for_pipeline(
    pipe: Any,
    path: Path,
    *,
    vectors: int = 2,
    fmt: EmbeddingFormat = "a1111",
    architecture: str = "",
    seed: int = 0,
) -> Path:
    """An embedding with one part per text encoder of `pipe` (SDXL: two)."""
    widths = tuple(
        getattr(pipe, name).get_input_embeddings().weight.shape[-1]
        for name in ("text_encoder", "text_encoder_2")
        if getattr(pipe, name, None) is not None
    )
    return write_embedding(
        path, widths, vectors=vectors, fmt=fmt, architecture=architecture, seed=seed
    )
