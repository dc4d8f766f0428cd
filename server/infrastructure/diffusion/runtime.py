"""What other infrastructure (metrics, logging) needs from torch and the Hugging Face
libraries, kept here so nothing outside this package imports them. Imports are lazy: a
process that never generates (a test, the CLI) never pays for them."""

from __future__ import annotations

import logging


def device_memory() -> list[tuple[int, int, int]]:
    """(device index, bytes allocated, bytes reserved) per CUDA device, and only once CUDA is
    initialised: touching it from a scrape thread would create a context (hundreds of MiB)
    on a device nothing uses yet."""
    import torch

    cuda = torch.cuda
    if not (cuda.is_available() and cuda.is_initialized()):  # type: ignore[no-untyped-call]
        return []
    return [
        (index, cuda.memory_allocated(index), cuda.memory_reserved(index))
        for index in range(cuda.device_count())
    ]


def route_library_logging() -> None:
    """Keeps stderr all JSON: Python warnings (diffusers' deprecations) and the Hugging Face
    libraries' own handlers go through logging instead, and their progress bars, which are
    for terminals, are turned off."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    logging.captureWarnings(True)
    for library in (diffusers_logging, transformers_logging):
        library.disable_default_handler()
        library.enable_propagation()
        library.disable_progress_bar()
