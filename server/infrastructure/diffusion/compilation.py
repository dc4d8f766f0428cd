"""torch.compile for a model's denoiser, opt-in per model (`[[models]] compile = true`).

Regional: only the repeated blocks (a UNet's transformer and resnet blocks, a transformer's
layers) are compiled, each class once (its instances share the compiled code), which keeps
start-up to the compile time of a few blocks instead of the whole network. Graphs must not
depend on which LoRAs a batch mixes: the per-row LoRA hooks (row_loras.py) are installed once
and only their tensors change; shapes that vary (rows, distinct LoRA sets, rank buckets) are
made dynamic by torch after their first change, so a warm-up that sees them compiles for good.
Compiled code is cached on disk in the data directory (`TORCHINDUCTOR_CACHE_DIR`), so a
restart reuses it."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("loracle.executor")

__all__ = ["compile_blocks", "compile_count", "use_cache_dir"]


def use_cache_dir(folder: Path) -> None:
    """Inductor's (and Triton's) on-disk cache in `folder`, unless the environment set one."""
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder))


def compile_blocks(denoiser: Any, block_classes: Sequence[str], backend: str = "inductor") -> int:
    """Compiles, in place, every module of `denoiser` whose class is one of the denoiser's own
    `_repeated_blocks` (diffusers' declaration) or else `block_classes`; returns how many."""
    names = set(getattr(denoiser, "_repeated_blocks", None) or block_classes)
    count = 0
    for module in denoiser.modules():
        if type(module).__name__ in names:
            module.compile(backend=backend)
            count += 1
    log.info("compiled %d blocks of %s (%s)", count, type(denoiser).__name__, backend)
    return count


def compile_count() -> int:
    """Graphs compiled by torch in this process so far (for recompile counts)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
