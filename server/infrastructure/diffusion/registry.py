"""The configured base models: checked at start-up without loading weights, so a missing or
bad model is reported at once (and by ListBaseModels), not at the first request."""

from __future__ import annotations

import json
import logging
import struct
import threading
from pathlib import Path
from typing import Any

from server.domain.models import Architecture, BaseModelConfig, BaseModelInfo

log = logging.getLogger("loracle.models")

EMBEDDED_NAME = "tiny-sd15"
_PIPELINES = {
    Architecture.SD1: {"StableDiffusionPipeline"},
    Architecture.SD2: {"StableDiffusionPipeline"},
    Architecture.SDXL: {"StableDiffusionXLPipeline"},
}
_COMPONENTS = {
    Architecture.SD1: ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    Architecture.SD2: ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    Architecture.SDXL: (
        "unet",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "scheduler",
    ),
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


def inspect_model(config: BaseModelConfig) -> tuple[str, str]:
    """(error, default scheduler) for a model on disk; error is "" when it looks loadable."""
    if config.architecture not in _PIPELINES:
        return f"architecture {config.architecture.value} is not supported yet", ""
    path = config.path
    if not path.exists():
        return f"{path} does not exist", ""
    if path.is_file():
        return _inspect_single_file(path), ""
    index_path = path / "model_index.json"
    try:
        index: dict[str, Any] = json.loads(index_path.read_text())
    except (OSError, ValueError) as exc:
        return f"{index_path}: not a diffusers model folder ({exc.__class__.__name__})", ""
    kind = str(index.get("_class_name", ""))
    if kind not in _PIPELINES[config.architecture]:
        return (
            f"{path} holds a {kind or 'unknown pipeline'}, not a "
            f"{config.architecture.value} pipeline"
        ), ""
    missing = [c for c in _COMPONENTS[config.architecture] if not (path / c).is_dir()]
    if missing:
        return f"{path} lacks {', '.join(missing)}", ""
    scheduler = ""
    try:
        scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        scheduler = str(scheduler_config.get("_class_name", ""))
    except (OSError, ValueError):
        return f"{path}/scheduler has no readable scheduler_config.json", ""
    return "", scheduler


def _inspect_single_file(path: Path) -> str:
    if path.suffix.lower() != ".safetensors":
        return f"{path}: only .safetensors checkpoints are accepted (pickle can run code)"
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path}: truncated"
            (length,) = struct.unpack("<Q", head)
            if length == 0 or length > MAX_HEADER_BYTES:
                return f"{path}: not a safetensors file (header length {length})"
            json.loads(f.read(length))
    except (OSError, ValueError) as exc:
        return f"{path}: unreadable safetensors header ({exc.__class__.__name__})"
    return ""


class ModelRegistry:
    """Holds the configured models and their status. When no model is configured, an
    embedded tiny SD1.5 placeholder is built in the background on first start."""

    def __init__(self, configs: tuple[BaseModelConfig, ...], *, data_dir: Path) -> None:
        self._lock = threading.Lock()
        self._configs = list(configs)
        self._status: dict[str, BaseModelInfo] = {}
        self._building: threading.Thread | None = None
        if not self._configs:
            folder = data_dir / "models" / EMBEDDED_NAME
            self._configs.append(
                BaseModelConfig(EMBEDDED_NAME, Architecture.SD1, folder, placeholder=True)
            )
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

    def _build(self, pending: list[BaseModelConfig]) -> None:
        from server.devtools.tiny_pipelines import build_tiny_sd15

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
                        config, False, f"building the embedded model failed: {exc}"
                    )
                continue
            self._refresh(config)

    def _refresh(self, config: BaseModelConfig) -> None:
        error, scheduler = inspect_model(config)
        if error and config.placeholder and not config.path.exists():
            error = "building the embedded placeholder model (random weights)"
        with self._lock:
            self._status[config.name] = BaseModelInfo(
                config, not error, error, config.dtype, config.scheduler or scheduler
            )


def load_pipeline(config: BaseModelConfig, *, device: str = "cpu", dtype: str = "auto") -> Any:
    """Loads a configured model from disk (never from a hub). The executor calls this; tests
    call it on the tiny models, so the path a real model takes is the one they test."""
    import torch
    from diffusers import DiffusionPipeline

    from server.domain.errors import PreconditionError

    error, _ = inspect_model(config)
    if error:
        raise PreconditionError(error, reason="MODEL_NOT_READY", metadata={"model": config.name})
    if config.path.is_file():
        raise PreconditionError(
            "loading single-file checkpoints lands with the generation executor; convert it "
            "to a diffusers folder for now",
            reason="SINGLE_FILE_NOT_SUPPORTED_YET",
            metadata={"model": config.name},
        )
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    pipe = DiffusionPipeline.from_pretrained(
        str(config.path), local_files_only=True, torch_dtype=getattr(torch, dtype)
    )
    return pipe.to(device)
