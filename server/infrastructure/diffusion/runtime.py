"""What other infrastructure (metrics, logging) needs from torch and the Hugging Face
libraries, kept here so nothing outside this package imports them. Imports are lazy: a
process that never generates (a test, the CLI) never pays for them."""

from __future__ import annotations

import logging
import os
import warnings


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


_LIBRARIES = (
    "diffusers",
    "transformers",
    "peft",
    "accelerate",
    "huggingface_hub",
    "torch",
    "torchao",
)


def quiet_libraries(*, verbose: bool = False) -> None:
    """Keeps the server's log its own: the Hugging Face libraries log through the root
    handler (so JSON stays JSON), their progress bars (for terminals) are off, and their
    advisories and deprecation warnings (for the developers of code that calls them, not for
    whoever runs this server) are shown only when `verbose` (log level DEBUG). Errors always
    pass. Environment variables too: some of those warnings fire while the libraries import."""
    level = "warning" if verbose else "error"
    for name, value in (
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("TRANSFORMERS_VERBOSITY", level),
        ("DIFFUSERS_VERBOSITY", level),
        ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
    ):
        os.environ.setdefault(name, value)
    logging.captureWarnings(True)
    if not verbose:
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category)
        for library in _LIBRARIES:
            warnings.filterwarnings("ignore", module=rf"{library}(\.|$)")
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging
    from huggingface_hub.utils.tqdm import disable_progress_bars

    disable_progress_bars()
    for library in (diffusers_logging, transformers_logging):
        library.disable_default_handler()
        library.enable_propagation()
        library.disable_progress_bar()
        library.set_verbosity(logging.WARNING if verbose else logging.ERROR)
    # torchao (when installed, diffusers imports it) warns about the CUDA kernels a CPU or
    # older GPU cannot load, and about a missing triton: not this server's problem.
    for name in ("peft", "accelerate", "huggingface_hub", "torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.WARNING if verbose else logging.ERROR)
