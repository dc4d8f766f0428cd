"""Getting a ready pipeline: the resident pipelines, least recently used first, under the
device budget; each one's model hash, scheduler instances and LoRA cache; and the check that
a job's LoRA files are still the ones that were imported."""

from __future__ import annotations

import gc
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from server.domain.generation_job import GenerationJob, ResolvedLora
from server.domain.models import BaseModelConfig, UpscalerModelConfig
from server.domain.schedulers import SCHEDULERS
from server.infrastructure.diffusion.adapters import (
    AdapterCache,
    AdapterLoadError,
    AdapterSpec,
    AdapterStats,
)
from server.infrastructure.diffusion.compilation import compile_blocks
from server.infrastructure.diffusion.controlnets import controlnet_hash, load_controlnet
from server.infrastructure.diffusion.embeddings import EmbeddingCache
from server.infrastructure.diffusion.families import ModelFamily, family_for
from server.infrastructure.diffusion.footprint import DeviceMemory, resident_bytes
from server.infrastructure.diffusion.lora_prefetch import LoraPrefetcher
from server.infrastructure.diffusion.registry import INPAINTING_CHANNELS, weights_bytes
from server.infrastructure.diffusion.row_loras import MixedPlan, RowLoras
from server.infrastructure.gguf_header import GGUF_SUFFIX
from server.infrastructure.lora_files import update_digest

log = logging.getLogger("loracle.executor")

K = TypeVar("K", bound=Hashable)

GIB = 1024**3
# Upscaler models kept loaded (each tens of MB; a hires fix uses one).
MAX_UPSCALERS = 2
# Pipelines made from a loaded one (they share its modules; each costs only its wrapper).
MAX_VARIANTS = 16

# (model, device, dtype) -> a diffusers pipeline; registry.load_pipeline by default.
Loader = Callable[[BaseModelConfig, str, str], Any]


class UpscalerLoadError(Exception):
    """An upscaler model whose file no longer loads (the batch fails, MODEL_LOAD_FAILED)."""


class LoadCounters(Protocol):
    """Where the cache counts its loads and evictions (the executor's stats)."""

    model_loads: int
    model_evictions: int


@dataclass
class LoadedPipeline:
    """A pipeline on the device, with everything kept alongside it."""

    pipe: Any
    family: ModelFamily
    model_hash: str
    size_bytes: int
    adapters: AdapterCache
    # The textual-inversion embeddings the running batch names (embeddings.py).
    embeddings: EmbeddingCache
    # The per-row LoRA hooks of batches that mix LoRAs (row_loras.py).
    row_loras: RowLoras
    scheduler_config: Any
    default_scheduler: str
    schedulers: dict[str, Any] = field(default_factory=dict)
    # The img2img, inpainting and ControlNet pipelines, built from `pipe`'s components on
    # first use, by mode and ControlNet names; the most recently used last.
    variants: OrderedDict[tuple[str, tuple[str, ...]], Any] = field(default_factory=OrderedDict)
    # The ControlNets loaded for this model (in its device and dtype), by name.
    controlnets: dict[str, Any] = field(default_factory=dict)
    controlnet_hashes: dict[str, str] = field(default_factory=dict)

    @property
    def denoiser(self) -> Any:
        """The denoising module (a UNet, or a transformer): its device and dtype are the
        model's, for what runs beside it (ControlNets, upscaler models)."""
        return getattr(self.pipe, self.family.denoiser)

    @property
    def inpainting(self) -> bool:
        """A dedicated inpainting model: every mode runs as inpainting (base.as_inpainting).
        Only UNets have one (a transformer family has no `unet`)."""
        config = getattr(getattr(self.pipe, "unet", None), "config", None)
        return getattr(config, "in_channels", None) == INPAINTING_CHANNELS

    def for_mode(self, mode: str, controls: tuple[str, ...] = ()) -> Any:
        """The pipeline running `mode` (domain.generation_job.Mode) with the ControlNets
        named by `controls` (loaded by `PipelineCache.prepare`) and the scheduler `prepare`
        set: made once from the loaded components (`from_pipe` shares every module, so no
        weights are copied and the fused LoRAs apply to it too)."""
        pipeline_class = self.family.pipeline_for_mode(mode, bool(controls))
        if pipeline_class is None:
            return self.pipe
        key = (mode, controls)
        variant = self.variants.get(key)
        if variant is None:
            extra: dict[str, Any] = {}
            if controls:
                import diffusers

                family = self.family
                # A class running one ControlNet over several images takes it once.
                names = controls if family.several_controlnets else tuple(dict.fromkeys(controls))
                models = [self.controlnets[name] for name in names]
                if len(controls) == 1:
                    extra["controlnet"] = models[0]
                else:  # GenerationJobs refuses several where the family has no such class
                    assert family.multi_controlnet_class is not None
                    extra["controlnet"] = getattr(diffusers, family.multi_controlnet_class)(models)
            variant = pipeline_class.from_pipe(self.pipe, **extra)
            variant.set_progress_bar_config(disable=True)
            self.variants[key] = variant
            while len(self.variants) > MAX_VARIANTS:
                self.variants.popitem(last=False)
        self.variants.move_to_end(key)
        variant.scheduler = self.pipe.scheduler
        return variant

    def scheduler(self, name: str) -> Any:
        """The scheduler a request names ("" for the model's own), made once per model."""
        cached = self.schedulers.get(name)
        if cached is None:
            import diffusers

            choice = SCHEDULERS[name]
            cls = getattr(diffusers, choice.diffusers_class)
            cached = cls.from_config(self.scheduler_config, **choice.options)
            self.schedulers[name] = cached
        return cached


class PipelineCache:
    """Not thread-safe for loading: the executor's worker thread is the only caller of
    `prepare`; `names` may be read from any thread."""

    def __init__(
        self,
        *,
        loader: Loader,
        device: str,
        budget_bytes: int,
        adapter_budget_bytes: int,
        counters: LoadCounters,
        prefetcher: LoraPrefetcher | None = None,
        compile_backend: str = "inductor",
    ) -> None:
        self._compile_backend = compile_backend
        self._loader = loader
        self.prefetcher = prefetcher or LoraPrefetcher(0)
        self.adapter_stats = AdapterStats()  # every model's LoRA loads and evictions
        self._device = device
        self._budget = budget_bytes
        self._adapter_budget = adapter_budget_bytes
        self._counters = counters
        self._lock = threading.Lock()
        self._pipelines: OrderedDict[str, LoadedPipeline] = OrderedDict()
        self._verified: set[str] = set()
        self._model_hashes: dict[tuple[Path, float], str] = {}
        self._controlnet_hashes: dict[tuple[Path, float], str] = {}
        self._upscalers: OrderedDict[tuple[str, Path, str, str], tuple[Any, int]] = OrderedDict()

    def names(self) -> list[str]:
        """Resident models, least recently used first."""
        with self._lock:
            return list(self._pipelines)

    def prepare(self, job: GenerationJob) -> LoadedPipeline:
        """The job's model on the device with exactly its LoRAs applied and its scheduler
        set. Raises AdapterLoadError for a LoRA that cannot be applied, OSError or ValueError
        for a model that cannot be loaded, and torch's OutOfMemoryError."""
        loaded = self._ready(job)
        self.verify_loras(job.loras)
        loaded.adapters.apply([_spec(x) for x in job.loras])
        return loaded

    def prepare_mixed(
        self, job: GenerationJob, sets: Mapping[K, Sequence[ResolvedLora]]
    ) -> tuple[LoadedPipeline, MixedPlan]:
        """The job's model for a batch whose jobs ask for different LoRA sets (by the
        caller's label): every LoRA loaded, none fused, and a plan hooking in each row's own
        deltas (close it after the batch). Raises as `prepare` does, and
        row_loras.NotMixable (nothing hooked) for LoRAs that cannot be computed per row."""
        loaded = self._ready(job)
        every = [lora for loras in sets.values() for lora in loras]
        self.verify_loras(every)
        names = loaded.adapters.load_unfused([_spec(x) for x in every])
        labelled = {
            label: tuple((names[x.sha256], float(x.weight)) for x in loras)
            for label, loras in sets.items()
        }
        return loaded, loaded.row_loras.plan(labelled)

    def _ready(self, job: GenerationJob) -> LoadedPipeline:
        """The job's model loaded, with its ControlNets, hires upscaler and scheduler."""
        loaded = self.get(job.model)
        self._load_controlnets(loaded, job)
        if job.hires is not None and job.hires.model is not None:
            denoiser = loaded.denoiser
            self.upscaler(job.hires.model, str(denoiser.device), denoiser.dtype)
        loaded.pipe.scheduler = loaded.scheduler(job.scheduler)
        return loaded

    def _load_controlnets(self, loaded: LoadedPipeline, job: GenerationJob) -> None:
        """The job's ControlNets, loaded once per model (they run in its device and dtype)
        and counted in its size against the device budget. Raises ControlNetLoadError."""
        for control in job.controls:
            config = control.controlnet
            if config.name in loaded.controlnets:
                continue
            model = load_controlnet(config, loaded.denoiser, loaded.family)
            loaded.controlnets[config.name] = model
            loaded.controlnet_hashes[config.name] = controlnet_hash(config, self._controlnet_hashes)
            loaded.size_bytes += sum(p.numel() * p.element_size() for p in model.parameters())

    def upscaler(
        self, config: UpscalerModelConfig, device: str = "", dtype: Any = None
    ) -> tuple[Any, int]:
        """The upscaler model's network and native factor, loaded once in `device` and
        `dtype` (default: this cache's device; half precision on CUDA, float32 on the CPU);
        the two most recently used stay loaded. Raises UpscalerLoadError."""
        import torch

        from server.infrastructure.diffusion.upscaler_models import (
            UpscalerFileError,
            load_upscaler,
        )

        device = device or self.device()
        if dtype is None:
            dtype = torch.float16 if device.startswith("cuda") else torch.float32
        key = (config.name, config.path, device, str(dtype))
        entry = self._upscalers.get(key)
        if entry is None:
            try:
                net, shape = load_upscaler(config.path, device, dtype)
            except (UpscalerFileError, OSError) as exc:
                raise UpscalerLoadError(f"upscaler {config.name!r}: {exc}") from None
            entry = (net, shape.scale)
            self._upscalers[key] = entry
            while len(self._upscalers) > MAX_UPSCALERS:
                self._upscalers.popitem(last=False)
        self._upscalers.move_to_end(key)
        return entry

    def device(self) -> str:
        """The device pipelines load on ("auto": CUDA when there is one)."""
        import torch

        if self._device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self._device

    def get(self, model: BaseModelConfig) -> LoadedPipeline:
        """The model's pipeline, loaded (after unloading the least recently used ones while
        the budget needs room) if it is not resident."""
        with self._lock:
            loaded = self._pipelines.get(model.name)
            if loaded is not None:
                self._pipelines.move_to_end(model.name)
                return loaded
        import torch

        device = self.device()
        need = _estimate_bytes(model, device)
        while self._budget and self._pipelines and self._resident() + need > self._budget:
            with self._lock:
                name, evicted = self._pipelines.popitem(last=False)
            log.info("unloading model %s to stay under the device budget", name)
            del evicted
            self._counters.model_evictions += 1
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        pipe = self._loader(model, device, model.dtype)
        family = family_for(model.architecture)
        if family is None:
            raise ValueError(f"architecture {model.architecture.value} is not supported yet")
        pipe.set_progress_bar_config(disable=True)
        if model.compile:
            compile_blocks(
                getattr(pipe, family.denoiser), family.compiled_blocks, self._compile_backend
            )
        # A pipeline is hundreds of thousands of long-lived objects; frozen, full garbage
        # collections stop rescanning them (a pause in the middle of someone's denoising).
        gc.collect()
        gc.freeze()
        size = sum(
            p.numel() * p.element_size()
            for component in pipe.components.values()
            if isinstance(component, torch.nn.Module)
            for p in component.parameters()
        )
        if model.offload and device.startswith("cuda"):
            # Offloaded: the components wait in host memory, one at a time on the device.
            size = _estimate_bytes(model, device)
        # A configured budget also covers activations and adapters, which weights omit.
        size = max(size, int(model.vram_budget_gb * GIB))
        loaded = LoadedPipeline(
            pipe=pipe,
            family=family,
            model_hash=_model_hash(model, family.denoiser, self._model_hashes),
            size_bytes=size,
            adapters=AdapterCache(
                pipe,
                budget_bytes=self._adapter_budget,
                components=family.lora_components,
                # GGUF weights are quantized bytes: peft cannot merge a LoRA into them (a
                # shape error), so LoRAs run beside them, unfused.
                # torchao's quantized weights likewise: fusing would re-quantize them, and
                # unfusing would not give them back bit for bit.
                fuse=model.path.suffix.lower() != GGUF_SUFFIX and not model.quantize,
                prefetched=self._prefetched,
                stats=self.adapter_stats,
            ),
            embeddings=EmbeddingCache(pipe, family.text_encoders),
            row_loras=RowLoras(pipe, family.lora_components, uniform=model.compile),
            scheduler_config=pipe.scheduler.config,
            default_scheduler=type(pipe.scheduler).__name__,
        )
        loaded.schedulers[""] = pipe.scheduler
        self._counters.model_loads += 1
        with self._lock:
            self._pipelines[model.name] = loaded
        return loaded

    def restore_base_weights(self) -> None:
        """After running out of memory: every resident pipeline back to its bare weights."""
        with self._lock:
            resident = list(self._pipelines.values())
        for loaded in resident:
            try:
                loaded.adapters.restore()
                loaded.embeddings.clear()
            except Exception:
                log.exception("could not restore base weights after OOM; unloading the model")

    def resident(self, sha256: str) -> bool:
        """Whether some resident model has this LoRA loaded (read from any thread: at worst
        a file is read ahead for nothing)."""
        with self._lock:
            resident = list(self._pipelines.values())
        try:
            return any(sha256 in loaded.adapters.loaded for loaded in resident)
        except RuntimeError:  # the worker changed a cache while it was read: read it ahead
            return False

    def _prefetched(self, sha256: str) -> dict[str, Any] | None:
        taken = self.prefetcher.take(sha256)
        return None if taken is None else taken.tensors

    def verify_loras(self, loras: Iterable[ResolvedLora], what: str = "LoRA") -> None:
        """A LoRA (or embedding) file replaced after import would make the recorded hashes
        lie (the loader thread checks the files it reads ahead)."""
        for lora in loras:
            if lora.sha256 in self._verified:
                continue
            if self.prefetcher.verified(lora.sha256):
                self._verified.add(lora.sha256)
                continue
            digest = hashlib.sha256()
            try:
                with lora.path.open("rb") as f:
                    update_digest(digest, f)
            except OSError as exc:
                raise AdapterLoadError(
                    f"{what} {lora.name!r}: cannot read its file ({exc})", lora.sha256
                ) from None
            if digest.hexdigest() != lora.sha256:
                raise AdapterLoadError(
                    f"{what} {lora.name!r}: its file changed since it was imported; "
                    "import it again",
                    lora.sha256,
                )
            self._verified.add(lora.sha256)

    def _resident(self) -> int:
        with self._lock:
            return sum(p.size_bytes for p in self._pipelines.values())


def _spec(lora: ResolvedLora) -> AdapterSpec:
    return AdapterSpec(lora.sha256, lora.path, lora.weight, lora.name)


def _estimate_bytes(model: BaseModelConfig, device: str) -> int:
    """What loading the model will put on the device, before it is loaded: its entry's own
    budget, else its weights at the dtype it will run in, quantized or offloaded as set
    (footprint.py), else its files' size."""
    if model.vram_budget_gb:
        return int(model.vram_budget_gb * GIB)
    family = family_for(model.architecture)
    if family is not None:
        memory = DeviceMemory(0, device.startswith("cuda"), "")
        if estimate := resident_bytes(model, family, memory):
            return estimate
    return weights_bytes(model)


def _model_hash(model: BaseModelConfig, denoiser: str, known: dict[tuple[Path, float], str]) -> str:
    """A1111's short model hash: SHA-256 of the checkpoint (of a folder, its denoiser's
    weights), 10 hex.
    Reading gigabytes takes seconds, so a model unloaded and loaded again under the device
    budget reuses the hash while its files are unchanged."""
    path = model.path
    candidates = [path] if path.is_file() else sorted((path / denoiser).glob("*.safetensors"))
    key = (path, max((c.stat().st_mtime for c in candidates), default=0.0))
    if key not in known:
        digest = hashlib.sha256()
        for candidate in candidates:
            with candidate.open("rb") as f:
                update_digest(digest, f)
        known[key] = digest.hexdigest()[:10]
    return known[key]
