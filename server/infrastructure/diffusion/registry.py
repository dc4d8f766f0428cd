"""The configured base models: checked at start-up without loading weights, so a missing or
bad model is reported at once (and by ListBaseModels), not at the first request."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from server.domain.models import (
    FALLBACK_DEFAULTS,
    Architecture,
    BaseModelConfig,
    BaseModelInfo,
    ControlNetConfig,
    ControlNetInfo,
    GenerationDefaults,
    UpscalerModelConfig,
    UpscalerModelInfo,
)
from server.infrastructure.diffusion.controlnets import inspect_controlnet
from server.infrastructure.diffusion.families import ModelFamily, family_for
from server.infrastructure.diffusion.footprint import DeviceMemory, fit_problem
from server.infrastructure.diffusion.quantization import quantization_problem
from server.infrastructure.gguf_header import GGUF_SUFFIX, read_gguf_header
from server.infrastructure.safetensors_header import HeaderError, read_header

log = logging.getLogger("loracle.models")

EMBEDDED_NAME = "tiny-sd15"
NEEDS_CONFIG_DIR = (
    "single-file checkpoint needs config_dir: a local diffusers folder of the same "
    "architecture (its configs and tokenizers are used; no hub access)"
)
NEEDS_DENOISER_CONFIG_DIR = (
    "a single {arch} file holds the transformer alone and needs config_dir: a local "
    "diffusers {arch} folder that lends the VAE, text encoders, tokenizers and configs "
    "(its transformer/ needs only config.json; no hub access)"
)


def inspect_model(config: BaseModelConfig) -> tuple[str, str]:
    """(error, default scheduler) for a model on disk; error is "" when it looks loadable."""
    family = family_for(config.architecture)
    if family is None:
        return f"architecture {config.architecture.value} is not supported yet", ""
    path = config.path
    if not path.exists():
        return f"{path} does not exist", ""
    if path.is_file():
        return _inspect_checkpoint(config, family)
    return _inspect_folder(path, config.architecture, family)


def _inspect_folder(path: Path, architecture: Architecture, family: ModelFamily) -> tuple[str, str]:
    index_path = path / "model_index.json"
    try:
        index: dict[str, Any] = json.loads(index_path.read_text())
    except (OSError, ValueError) as exc:
        return f"{index_path}: not a diffusers model folder ({exc.__class__.__name__})", ""
    kind = str(index.get("_class_name", ""))
    if kind not in family.pipeline_classes:
        return (
            f"{path} holds a {kind or 'unknown pipeline'}, not a {architecture.value} pipeline"
        ), ""
    missing = [c for c in family.components if not (path / c).is_dir()]
    if missing:
        return f"{path} lacks {', '.join(missing)}", ""
    scheduler = ""
    try:
        scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        scheduler = str(scheduler_config.get("_class_name", ""))
    except (OSError, ValueError):
        return f"{path}/scheduler has no readable scheduler_config.json", ""
    return "", scheduler


def _inspect_checkpoint(config: BaseModelConfig, family: ModelFamily) -> tuple[str, str]:
    """A single file holds only weights: its configs, tokenizers and scheduler come from
    config_dir, which is what keeps diffusers from fetching them from the hub."""
    if not family.single_file:
        arch = config.architecture.value
        return f"single-file {arch} checkpoints are not supported yet; use a diffusers folder", ""
    error = _inspect_single_file(config.path, config.architecture, family)
    if error:
        return error, ""
    needs = NEEDS_DENOISER_CONFIG_DIR if family.denoiser_file else NEEDS_CONFIG_DIR
    if config.config_dir is None:
        return needs.format(arch=config.architecture.value), ""
    if not config.config_dir.is_dir():
        needs = needs.format(arch=config.architecture.value)
        return f"config_dir {config.config_dir} is not a folder; {needs}", ""
    error, scheduler = _inspect_folder(config.config_dir, config.architecture, family)
    if error:
        return f"config_dir: {error}", scheduler
    if family.denoiser_file:  # its widths are checked as diffusers loads it
        return "", scheduler
    given = unet_channels(config.path, family)
    expected = unet_channels(config.config_dir, family)
    if given != expected:
        kind = "an inpainting" if given == INPAINTING_CHANNELS else "a text-to-image"
        return (
            f"{config.path} is {kind} checkpoint ({given}-channel UNet) but config_dir's UNet "
            f"takes {expected} channels: use a diffusers folder of the same kind as config_dir"
        ), ""
    return "", scheduler


# The UNet of a dedicated inpainting checkpoint takes the noisy latents (4 channels), the
# mask (1) and the masked image's latents (4).
INPAINTING_CHANNELS = 9
# The key of the UNet's first convolution in an original-layout checkpoint.
UNET_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


def unet_channels(path: Path, family: ModelFamily) -> int | None:
    """The input channels of a model's UNet (4; 9 for an inpainting checkpoint): from its
    config in a diffusers folder, from its first convolution's shape in a single file; None
    when it cannot be read."""
    try:
        if path.is_dir():
            config = json.loads((path / family.denoiser / "config.json").read_text())
            return int(config["in_channels"])
        return int(read_header(path)[UNET_CONV_IN]["shape"][1])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def _inspect_single_file(path: Path, architecture: Architecture, family: ModelFamily) -> str:
    gguf = path.suffix.lower() == GGUF_SUFFIX
    if gguf and not family.denoiser_file:
        return f"{path}: {architecture.value} checkpoints are read from .safetensors, not GGUF"
    if not gguf and path.suffix.lower() != ".safetensors":
        accepted = ".safetensors or .gguf" if family.denoiser_file else ".safetensors"
        return f"{path}: only {accepted} checkpoints are accepted (pickle can run code)"
    try:
        header = read_gguf_header(path) if gguf else read_header(path)
    except HeaderError as exc:
        return f"{path}: {exc}"
    error = _missing_parts(path, architecture, family, header)
    if error or not gguf:
        return error
    return _unsupported_quantization(path, header)


def _unsupported_quantization(path: Path, header: dict[str, Any]) -> str:
    """A GGUF whose quantization diffusers cannot dequantize fails only when loaded: said at
    start-up instead. (Importing diffusers here costs a second, only when a GGUF is set.)"""
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES

    supported = {"F32", "F16", *(t.name for t in SUPPORTED_GGUF_QUANT_TYPES)}
    found = sorted({str(t["dtype"]) for t in header.values()} - supported)
    if found:
        return (
            f"{path} holds tensors quantized as {', '.join(found)}, which diffusers cannot "
            f"dequantize (it takes {', '.join(sorted(supported))})"
        )
    return ""


def _missing_parts(
    path: Path, architecture: Architecture, family: ModelFamily, header: dict[str, Any]
) -> str:
    """Checks for the keys by which diffusers finds each part in the file: when a text
    encoder's key is missing, it silently loads that encoder from config_dir instead."""
    missing = [
        part.description
        for part in family.checkpoint_parts(architecture)
        if not any(key.startswith(part.prefixes) for key in header)
    ]
    if missing:
        parts = ", ".join(missing)
        return f"{path} is not an original-layout {architecture.value} checkpoint: lacks {parts}"
    return family.check_checkpoint_header(path, header)


class ModelRegistry:
    """Holds the configured models and ControlNets and their status. When no model is
    configured, an embedded tiny SD1.5 placeholder is built in the background on first start."""

    def __init__(
        self,
        configs: tuple[BaseModelConfig, ...],
        *,
        data_dir: Path,
        controlnets: tuple[ControlNetConfig, ...] = (),
        upscalers: tuple[UpscalerModelConfig, ...] = (),
        device_memory: DeviceMemory | None = None,
    ) -> None:
        # What models must fit (none known: nothing is checked, as on the CPU).
        self._memory = device_memory or DeviceMemory(0, False, "")
        self._upscalers = [_inspect_upscaler(u) for u in upscalers]
        for upscaler in self._upscalers:
            if upscaler.error:
                log.error("upscaler %s is not usable: %s", upscaler.config.name, upscaler.error)
        self._controlnets = [inspect_controlnet(c) for c in controlnets]
        for controlnet in self._controlnets:
            if controlnet.error:
                log.error(
                    "ControlNet %s is not usable: %s", controlnet.config.name, controlnet.error
                )
        self._lock = threading.Lock()
        self._configs = [_with_family_fields(c) for c in configs]
        self._status: dict[str, BaseModelInfo] = {}
        self._building: threading.Thread | None = None
        if not self._configs:
            folder = data_dir / "models" / EMBEDDED_NAME
            embedded = BaseModelConfig(EMBEDDED_NAME, Architecture.SD1, folder, placeholder=True)
            self._configs.append(_with_family_fields(embedded))
        for config in self._configs:
            self._refresh(config)
            info = self._status[config.name]
            if info.error and not config.placeholder:
                log.error("base model %s is not usable: %s", config.name, info.error)

    def ensure_embedded(self, *, wait: bool = False) -> None:
        """Builds missing placeholder models off the start-up path."""
        pending = [c for c in self._configs if c.placeholder and not self._status[c.name].ready]
        if not pending:
            return
        self._building = threading.Thread(
            target=self._build, args=(pending,), name="loracle-embedded-model", daemon=True
        )
        self._building.start()
        if wait:
            self._building.join()

    def close(self, timeout: float = 60.0) -> None:
        """Waits for a running build: torch aborts the process if it exits mid-build."""
        if self._building is not None:
            self._building.join(timeout)

    def statuses(self) -> list[BaseModelInfo]:
        with self._lock:
            return [self._status[c.name] for c in self._configs]

    def controlnets(self) -> list[ControlNetInfo]:
        return list(self._controlnets)

    def upscaler_models(self) -> list[UpscalerModelInfo]:
        return list(self._upscalers)

    def _build(self, pending: list[BaseModelConfig]) -> None:
        from server.infrastructure.diffusion.placeholder import build_tiny_sd15

        for config in pending:
            try:
                build_tiny_sd15(config.path)
                log.info(
                    "built the embedded placeholder model %s at %s (random weights: "
                    "its images are noise)",
                    config.name,
                    config.path,
                )
            except Exception as exc:  # reported through ListBaseModels
                log.exception("could not build the embedded model")
                with self._lock:
                    self._status[config.name] = BaseModelInfo(
                        config,
                        False,
                        f"building the embedded model failed: {exc}",
                        defaults=_defaults(config),
                    )
                continue
            self._refresh(config)

    def _refresh(self, config: BaseModelConfig) -> None:
        error, scheduler = inspect_model(config)
        error = error or quantization_problem(config)
        family = family_for(config.architecture)
        if not error and family is not None and not config.placeholder:
            error = fit_problem(config, family, self._memory)
        inpainting = (
            not error
            and family is not None
            and unet_channels(config.path, family) == INPAINTING_CHANNELS
        )
        loading = bool(error) and config.placeholder and not config.path.exists()
        if loading:
            error = "building the embedded placeholder model (random weights)"
        with self._lock:
            self._status[config.name] = BaseModelInfo(
                config,
                not error,
                error,
                config.dtype,
                config.scheduler or scheduler,
                _defaults(config),
                loading=loading,
                inpainting=inpainting,
                weights_bytes=0 if error else weights_bytes(config),
                **_traits(config),
            )


def _inspect_upscaler(config: UpscalerModelConfig) -> UpscalerModelInfo:
    """From the file's header alone: its architecture and native scale, or why it is not
    one this server loads."""
    from server.infrastructure.diffusion.upscaler_models import (
        UpscalerFileError,
        inspect_upscaler,
    )

    if not config.path.is_file():
        return UpscalerModelInfo(config, False, f"{config.path} is not a file")
    try:
        shape = inspect_upscaler(config.path)
    except UpscalerFileError as exc:
        return UpscalerModelInfo(config, False, f"{config.path}: {exc}")
    return UpscalerModelInfo(config, True, "", shape.architecture, shape.scale)


def _with_family_fields(config: BaseModelConfig) -> BaseModelConfig:
    """The config with what its family adds to every job's batch key."""
    family = family_for(config.architecture)
    if family is None or family.batch_fields == config.batch_fields:
        return config
    return replace(config, batch_fields=family.batch_fields)


def weights_bytes(config: BaseModelConfig) -> int:
    """The bytes of a model's weights on disk (a folder's components' safetensors files; a
    transformer-only file's, plus those config_dir lends it: the VAE and text encoders)."""
    path = config.path
    files = [path] if path.is_file() else list(path.glob("*/*.safetensors"))
    family, lender = family_for(config.architecture), config.config_dir
    if path.is_file() and lender is not None and family is not None and family.denoiser_file:
        files += [f for f in lender.glob("*/*.safetensors") if f.parent.name != family.denoiser]
    return sum(f.stat().st_size for f in files if f.exists())


def _traits(config: BaseModelConfig) -> dict[str, Any]:
    """What the model's family takes, for checks before queueing."""
    family = family_for(config.architecture)
    if family is None:
        return {}
    return {
        "schedulers": family.schedulers,
        "takes_negative_prompt": family.takes_negative_prompt,
        "hires_fix": family.hires_fix,
        "latent_hires": family.latent_hires,
        "latent_hires_controlled": family.latent_hires_controlled,
        "controlnet_modes": tuple(family.controlnet_pipelines),
        "several_control_images": family.multi_controlnet_class is not None,
        "several_controlnets": family.several_controlnets,
        "controlnet_step_range": family.controlnet_step_range,
        "size_multiple": family.size_multiple,
    }


def _defaults(config: BaseModelConfig) -> GenerationDefaults:
    """The family's defaults, with what the model's entry sets instead."""
    family = family_for(config.architecture)
    base = FALLBACK_DEFAULTS if family is None else family.defaults
    guidance = config.default_guidance_scale
    return GenerationDefaults(
        config.default_width or base.width,
        config.default_height or base.height,
        config.default_steps or base.steps,
        base.guidance_scale if guidance is None else guidance,
    )


def load_pipeline(config: BaseModelConfig, *, device: str = "cpu", dtype: str = "auto") -> Any:
    """Loads a configured model from disk (never from a hub), as its family loads a folder or
    a single file. The executor calls this; tests call it on the tiny models, so the path a
    real model takes is the one they test."""
    import torch

    from server.domain.errors import PreconditionError, Reason

    error, _ = inspect_model(config)
    family = family_for(config.architecture)
    if error or family is None:
        raise PreconditionError(
            error,
            reason=Reason.MODEL_NOT_READY,
            metadata={"model": config.name},
            retry_after_seconds=5.0,
        )
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    torch_dtype = getattr(torch, dtype)
    if config.path.is_file():
        pipe = family.load_single_file(config, torch_dtype)
    else:
        pipe = family.load_folder(config, torch_dtype)
    return _place(pipe, config, device)


def _place(pipe: Any, config: BaseModelConfig, device: str) -> Any:
    """On the device, or (`offload`) in host memory with diffusers' hooks moving each
    component (model) or layer (sequential) to the GPU while it runs. Offloading exists for
    GPUs smaller than the model: on the CPU there is nothing to offload to."""
    if not config.offload or not device.startswith("cuda"):
        if config.offload:
            log.info("model %s: offload applies to a CUDA device only; ignored", config.name)
        return pipe.to(device)
    if config.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)
    return pipe
