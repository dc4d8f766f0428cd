"""What a model's weights take in device memory, read from its files' headers at start-up, so
that a model that cannot fit the device is reported by ListBaseModels with the reason instead
of failing its first request with an out-of-memory error minutes into loading.

Counted: each component's tensors at the dtype the model runs in (a float32 file loaded in
bfloat16 takes half its bytes), the denoiser at one byte per weight when quantized on load
(int8, fp8), a GGUF file at its own size. Offloading changes what must be resident at once:
with `offload = "model"` only the largest component, with "sequential" one layer (always
fits). Activations are not counted: they depend on the request, and the executor handles
running out of memory per batch; a `vram_budget_gb` on the model entry covers them when set."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from server.domain.models import BaseModelConfig
from server.infrastructure.diffusion.families import ModelFamily
from server.infrastructure.gguf_header import GGUF_SUFFIX
from server.infrastructure.safetensors_header import HeaderError, read_header

GIB = 1024**3
# Floating-point tensors take the model's dtype when loaded; other tensors keep theirs.
_FLOATS = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_STORED_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2}


@dataclass(frozen=True, slots=True)
class DeviceMemory:
    """The memory models must fit: `device_budget_gb` when set, else the CUDA device's;
    0 when neither is known (the CPU without a budget: nothing is checked)."""

    bytes: int
    cuda: bool
    # How it is named in messages: "the device budget (12 GiB)", "NVIDIA H100's 79.2 GiB".
    described: str

    @staticmethod
    def probe(budget_gb: float) -> DeviceMemory:
        import importlib.util

        cuda_name, cuda_bytes = "", 0
        if importlib.util.find_spec("torch") is not None:
            import torch

            if torch.cuda.is_available():
                properties = torch.cuda.get_device_properties(0)
                cuda_name, cuda_bytes = properties.name, int(properties.total_memory)
        if budget_gb > 0:
            budget = int(budget_gb * GIB)
            return DeviceMemory(budget, bool(cuda_bytes), f"the device budget ({size(budget)})")
        if cuda_bytes:
            return DeviceMemory(cuda_bytes, True, f"{cuda_name}'s {size(cuda_bytes)}")
        return DeviceMemory(0, False, "")


def run_dtype(config: BaseModelConfig, memory: DeviceMemory) -> str:
    """The dtype `dtype = "auto"` resolves to where the models run (registry.load_pipeline)."""
    if config.dtype != "auto":
        return config.dtype
    return "bfloat16" if memory.cuda else "float32"


def component_bytes(
    config: BaseModelConfig, family: ModelFamily, element_bytes: int
) -> dict[str, int]:
    """Each component's weights in device memory, by its folder name ("checkpoint" for the
    parts of an A1111 single file, which are not told apart)."""
    path, out = config.path, {}
    if path.is_dir():
        for folder in sorted(p for p in path.iterdir() if p.is_dir()):
            out[folder.name] = sum(_file_bytes(f, element_bytes) for f in _weights(folder))
        return {name: size for name, size in out.items() if size}
    if not family.denoiser_file:
        return {"checkpoint": _file_bytes(path, element_bytes)}
    out[family.denoiser] = _file_bytes(path, element_bytes)
    if config.config_dir is not None and config.config_dir.is_dir():
        for folder in sorted(p for p in config.config_dir.iterdir() if p.is_dir()):
            if folder.name != family.denoiser:
                out[folder.name] = sum(_file_bytes(f, element_bytes) for f in _weights(folder))
    return {name: size for name, size in out.items() if size}


def resident_bytes(config: BaseModelConfig, family: ModelFamily, memory: DeviceMemory) -> int:
    """What must be on the device at once to run the model (weights only)."""
    element = _DTYPE_BYTES.get(run_dtype(config, memory), 4)
    parts = component_bytes(config, family, element)
    if config.quantize and family.denoiser in parts:
        # Weight-only int8/fp8: one byte per weight (plus per-channel scales, ignored).
        parts[family.denoiser] = math.ceil(parts[family.denoiser] / element)
    if config.offload == "sequential" or not parts:
        return 0
    if config.offload == "model":
        return max(parts.values())
    return sum(parts.values())


def fit_problem(config: BaseModelConfig, family: ModelFamily, memory: DeviceMemory) -> str:
    """Why the model cannot fit the device ("" when it can, or nothing is known)."""
    if not memory.bytes:
        return ""
    need = max(resident_bytes(config, family, memory), int(config.vram_budget_gb * GIB))
    if need <= memory.bytes:
        return ""
    fixes = []
    if not config.quantize:
        fixes.append('quantize = "fp8"')
    if config.offload != "sequential":
        fixes.append('offload = "model"' if not config.offload else 'offload = "sequential"')
    hint = f"; set {' or '.join(fixes)} in its [[models]] entry" if fixes else ""
    return (
        f"its weights need {size(need)} of device memory at "
        f"{run_dtype(config, memory)}, more than {memory.described}{hint}"
    )


def size(count: int) -> str:
    """Bytes as people read them: GiB, or MiB below a tenth of one."""
    return f"{count / GIB:.1f} GiB" if count >= GIB / 10 else f"{count / 2**20:.1f} MiB"


def _weights(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _file_bytes(path: Path, element_bytes: int) -> int:
    """A weights file's bytes once loaded: float tensors at `element_bytes` each."""
    if path.suffix.lower() == GGUF_SUFFIX:
        return path.stat().st_size if path.exists() else 0
    try:
        header = read_header(path, check_length=False)
    except HeaderError:
        return 0
    total = 0
    for entry in header.values():
        count = math.prod(int(d) for d in entry.get("shape", []))
        dtype = str(entry.get("dtype", ""))
        total += count * (element_bytes if dtype in _FLOATS else _STORED_BYTES.get(dtype, 1))
    return total
