"""The LoRAs of one loaded pipeline: loaded once, kept while they fit a byte budget, fused for
speed, and always removable down to bit-identical base weights.

Verified against diffusers 0.42 and peft 0.21:
- `load_lora_weights` reads kohya (`lora_unet_`, `lora_te_`, `lora_te1_`/`lora_te2_`, SGM block
  names for SDXL) and diffusers/peft files, and makes the adapter just loaded the active one.
- `fuse_lora(adapter_names=...)` merges the named adapters whether active or not, at the
  scales `set_adapters` last gave them; so weights are set first, then fused.
- Fusing then unfusing is not bit-exact (differences of about 1e-7 in every merged weight), so
  the base weights of the modules a fusion touches are saved first and copied back afterwards.
- A layer whose adapters are disabled while merged unmerges itself on its next forward, so
  everything is unfused before adapters are disabled or deleted.
- A failed load can leave the adapter in the components loaded before the failing one (the
  UNet loads before the text encoders), so a failure deletes it everywhere.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["AdapterCache", "AdapterLoadError", "AdapterSpec", "AdapterStats"]

log = logging.getLogger("loracle.adapters")


class _ReportedHere(logging.Filter):
    """diffusers logs a failed LoRA load as torch's multi-line report, then raises it; this
    cache turns that error into one line (and logs it), so the duplicate is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "was unsuccessful with the following error" not in str(record.msg)


logging.getLogger("diffusers.loaders.peft").addFilter(_ReportedHere())

_DOWN_KEY = re.compile(
    r"(?:\.lora_down|\.lora_A|\.lora\.down|_lora\.down|\.lora_linear_layer\.down)\.weight$"
)
_SIZE_MISMATCH = re.compile(
    r"size mismatch for ([\w.]+?)\.lora_[AB]\.[\w.]*: copying a param with shape "
    r"torch\.Size\(\[([\d, ]*)\]\) from checkpoint, the shape in current model is "
    r"torch\.Size\(\[([\d, ]*)\]\)"
)


@dataclass(frozen=True, slots=True)
class AdapterSpec:
    key: str  # the file's sha256: two paths to the same bytes share one loaded adapter
    path: Path
    weight: float
    name: str  # for messages only


class AdapterLoadError(Exception):
    """A LoRA that cannot be applied to this pipeline (unreadable file, shape mismatch, no
    matching modules). The message names the LoRA and says why, in one line; `sha256` names
    its file, so a caller can avoid picking it again for this model."""

    def __init__(self, message: str, sha256: str = "") -> None:
        super().__init__(message)
        self.sha256 = sha256


@dataclass(slots=True)
class AdapterStats:
    loads: int = 0  # adapters read from disk
    hits: int = 0  # requested adapters that were already loaded
    evictions: int = 0
    unchanged: int = 0  # apply() calls that found the same LoRAs applied and did nothing
    prefetched: int = 0  # loads from tensors the loader thread had read ahead


@dataclass(frozen=True, slots=True)
class _Loaded:
    adapter: str
    size: int


class AdapterCache:
    """Owns the LoRAs of one pipeline. Not thread-safe: the executor's worker thread is the
    only caller.

    Fused adapters cost only peft's wrapper calls (a UNet step about 10% slower than the bare
    model); unfused, one rank-16 LoRA on SDXL's attention made a step 2.1x slower on an H200
    and two 2.75x. But fusing changes the base weights in place, so before fusing the cache
    copies the weights the fusion will touch, and undoing it unfuses and copies them back.

    The copies live on `snapshot_device`, by default the weight's own device. Measured on an
    H200 with a full-size bf16 SDXL UNet and LoRAs on every attention projection (1B of its
    2.6B parameters): copies on the GPU cost 2 GB of its memory, a switch between loaded LoRAs
    took 0.27 s and restore() 0.14 s; copies on "cpu" saved those 2 GB, but a switch took
    1.8 s and restore() 0.34 s. Copies are freed as soon as they are restored.

    `components` names the pipeline components LoRAs go into (the model family's
    `lora_components`); None means every torch module of the pipeline.
    """

    def __init__(
        self,
        pipe: Any,
        *,
        budget_bytes: int = 2 * 1024**3,
        fuse: bool = True,
        snapshot_device: str | None = None,
        components: Sequence[str] | None = None,
        prefetched: Callable[[str], dict[str, Any] | None] | None = None,
        stats: AdapterStats | None = None,
    ) -> None:
        self._pipe = pipe
        self._components = None if components is None else tuple(components)
        self._budget = budget_bytes
        self._fuse = fuse
        self._snapshot_device = snapshot_device
        # A LoRA's tensors already read from disk (lora_prefetch.py), by file hash.
        self._prefetched = prefetched or (lambda _key: None)
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()  # least recently used first
        self._applied: tuple[tuple[str, float], ...] = ()
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []  # (live weight, base copy)
        self._touched = False  # adapters may be active or merged: restore() has work to do
        self.stats = stats or AdapterStats()  # shared by the executor's caches

    @property
    def applied(self) -> tuple[tuple[str, float], ...]:
        return self._applied

    @property
    def loaded(self) -> tuple[str, ...]:
        return tuple(self._loaded)

    @property
    def loaded_bytes(self) -> int:
        return sum(entry.size for entry in self._loaded.values())

    def apply(self, specs: Sequence[AdapterSpec]) -> None:
        """Makes the pipeline compute with exactly these LoRAs at these weights (none: the base
        model). The same set as now applied, in any order, is a no-op. On failure the pipeline
        is left at its base weights with no adapter active, and AdapterLoadError names the
        LoRA at fault (out-of-memory errors pass through unchanged)."""
        keys = [spec.key for spec in specs]
        if len(set(keys)) != len(keys):
            raise ValueError("each LoRA may be applied once; combine duplicate weights first")
        wanted = {(spec.key, float(spec.weight)) for spec in specs}
        for key in keys:
            if key in self._loaded:
                self._loaded.move_to_end(key)
        if wanted == set(self._applied) and (specs or not self._touched):
            self.stats.unchanged += 1
            self.stats.hits += len(specs)
            return
        self.restore()
        if not specs:
            return
        try:
            self._make_room(specs)
            for spec in specs:
                self._ensure_loaded(spec)
            self._activate(specs)
        except BaseException:
            self.restore()
            raise

    def load_unfused(self, specs: Sequence[AdapterSpec]) -> dict[str, str]:
        """For a batch that mixes LoRAs (row_loras.py): every LoRA of `specs` loaded (the
        least recently used others evicted for room), none active and nothing fused, so the
        pipeline computes with its exact base weights until per-row deltas are hooked in.
        Returns each LoRA's peft adapter name by key. Raises as `apply` does, leaving the
        pipeline at its base weights."""
        unique = list({spec.key: spec for spec in specs}.values())
        self.restore()
        try:
            self._make_room(unique)
            for spec in unique:
                self._ensure_loaded(spec)
        finally:
            self._touched = True  # loads activate adapters: restore() must disable them
            self._pipe.disable_lora()
        return {spec.key: self._loaded[spec.key].adapter for spec in unique}

    def restore(self) -> None:
        """Back to the exact base weights with no adapter active; loaded adapters stay cached,
        disabled."""
        if not self._touched:
            return
        try:
            if self._saved:
                with _quiet_peft():
                    self._pipe.unfuse_lora()
        finally:
            with torch.no_grad():
                for weight, saved in self._saved:
                    weight.copy_(saved)
            self._saved = []
            self._applied = ()
        self._pipe.disable_lora()
        self._touched = False

    def _make_room(self, specs: Sequence[AdapterSpec]) -> None:
        """Evicts before loading, so the device never holds more than the budget allows;
        the requested LoRAs themselves are kept even if they alone exceed it."""
        wanted = {spec.key for spec in specs}
        incoming = sum(_file_size(spec) for spec in specs if spec.key not in self._loaded)
        for key in list(self._loaded):
            if self.loaded_bytes + incoming <= self._budget:
                break
            if key not in wanted:
                entry = self._loaded.pop(key)
                with _quiet_peft():
                    self._pipe.delete_adapters([entry.adapter])
                self.stats.evictions += 1
                log.info("evicted LoRA %s (%d bytes) to stay within the budget", key, entry.size)

    def _ensure_loaded(self, spec: AdapterSpec) -> None:
        if spec.key in self._loaded:
            self._loaded.move_to_end(spec.key)
            self.stats.hits += 1
            return
        adapter = _adapter_name(spec.key)
        clash = next((k for k, e in self._loaded.items() if e.adapter == adapter), None)
        if clash is not None:
            raise ValueError(f"LoRA keys {clash} and {spec.key} share the prefix of {adapter}")
        size = _file_size(spec)
        self._touched = True  # a load activates the new adapter, even on a disabled pipeline
        try:
            tensors = self._prefetched(spec.key)
            if tensors is None:
                expected = _down_count(_header_keys(spec.path))
                source: str | dict[str, Any] = str(spec.path)
            else:
                self.stats.prefetched += 1
                expected = _down_count(tensors)
                source = dict(tensors)  # diffusers' converters pop from the dict they get
            with _quiet_peft():
                self._pipe.load_lora_weights(source, adapter_name=adapter)
        except torch.OutOfMemoryError:
            self._purge(adapter)
            raise
        except Exception as exc:
            self._purge(adapter)
            message = f"LoRA {spec.name!r}: {_reason(exc)}"
            log.warning("cannot apply %s", message)
            raise AdapterLoadError(message, spec.key) from exc
        matched = self._layer_count(adapter)
        if matched == 0:
            self._purge(adapter)
            raise AdapterLoadError(
                f"LoRA {spec.name!r}: none of its {expected} layers exist in this model "
                "(a LoRA for another architecture, or a layout diffusers does not convert?)",
                spec.key,
            )
        if matched < expected:
            log.warning(
                "LoRA %s: only %d of its %d layers exist in this model; the rest are ignored",
                spec.name,
                matched,
                expected,
            )
        self._loaded[spec.key] = _Loaded(adapter, size)
        self.stats.loads += 1
        log.info("loaded LoRA %s as %s (%d layers, %d bytes)", spec.name, adapter, matched, size)

    def _activate(self, specs: Sequence[AdapterSpec]) -> None:
        adapters = [self._loaded[spec.key].adapter for spec in specs]
        weights = [float(spec.weight) for spec in specs]
        self._touched = True
        self._pipe.enable_lora()
        self._pipe.set_adapters(adapters, adapter_weights=weights)
        if self._fuse:
            self._save_base_weights(adapters)
            self._pipe.fuse_lora(adapter_names=adapters, lora_scale=1.0)
        self._applied = tuple((spec.key, float(spec.weight)) for spec in specs)

    def _save_base_weights(self, adapters: list[str]) -> None:
        """Copies the parameters (weight and bias) of every base layer that carries one of
        `adapters`: exactly what a fusion may change."""
        for layer in self._tuner_layers():
            if any(name in _adapters_of(layer) for name in adapters):
                for weight in layer.get_base_layer().parameters(recurse=False):
                    device = self._snapshot_device or weight.device
                    self._saved.append((weight, weight.detach().to(device, copy=True)))

    def _purge(self, adapter: str) -> None:
        """Deletes a half-loaded adapter from every component, leaving the others intact."""
        try:
            with _quiet_peft():
                self._pipe.delete_adapters([adapter])
        finally:
            self._pipe.disable_lora()

    def _layer_count(self, adapter: str) -> int:
        return sum(1 for layer in self._tuner_layers() if adapter in _adapters_of(layer))

    def _tuner_layers(self) -> list[Any]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers: list[Any] = []
        names = self._components
        if names is None:
            names = tuple(getattr(self._pipe, "components", {}))
        for component in names:
            model = getattr(self._pipe, component, None)
            if isinstance(model, torch.nn.Module):
                layers += [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        return layers


@contextmanager
def _quiet_peft() -> Iterator[None]:
    """Silences peft's warnings about states this cache creates on purpose: several adapters
    in one model, unfusing layers a fusion left alone, deleting an active adapter."""
    with warnings.catch_warnings():
        for message in (
            "Already found a `peft_config`",
            "Already unmerged",
            "Adapter .* was active which is now deleted",
        ):
            warnings.filterwarnings("ignore", message=message)
        yield


def _adapter_name(key: str) -> str:
    """peft keys modules by adapter name, so it must be a plain identifier."""
    return "l_" + re.sub(r"\W", "_", key)[:16]


def _adapters_of(layer: Any) -> set[str]:
    names: set[str] = set()
    for attr in layer.adapter_layer_names:
        names.update(getattr(layer, attr, {}).keys())
    return names


def _file_size(spec: AdapterSpec) -> int:
    try:
        return spec.path.stat().st_size
    except OSError as exc:
        raise AdapterLoadError(
            f"LoRA {spec.name!r}: cannot read its file ({exc.strerror or exc})", spec.key
        ) from exc


def _header_keys(path: Path) -> list[str]:
    """The file's tensor names, read from the header alone."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys: list[str] = f.keys()  # safe_open is not iterable
    return keys


def _down_count(keys: Iterable[str]) -> int:
    """LoRA layers among tensor names: their down (A) matrices."""
    return sum(1 for key in keys if _DOWN_KEY.search(key))


def _reason(exc: Exception) -> str:
    """One line for the user; the full error stays chained for the log."""
    text = str(exc)
    if mismatch := _SIZE_MISMATCH.findall(text):
        module, file_shape, model_shape = mismatch[0]
        more = f" (and {len(mismatch) - 1} more)" if len(mismatch) > 1 else ""
        return (
            f"shapes do not match this model: {module} is [{model_shape}], the file has "
            f"[{file_shape}]{more}; a LoRA for another architecture?"
        )
    if "ignore_mismatched_sizes" in text:
        return "its text encoder shapes do not match this model; a LoRA for another architecture?"
    if "not found in the base model" in text:
        return "none of its layers exist in this model (a LoRA for another architecture?)"
    if "Error(s) in loading state_dict" in text:
        # torch's multi-line report (missing or unexpected keys, shapes in another form):
        # the log keeps it chained; the user gets the gist.
        return "its weights do not fit this model's layers; a LoRA for another architecture?"
    if isinstance(exc, OSError):
        return f"cannot read its file ({exc.strerror or exc})"
    first = " ".join(text.split())
    if not first:
        # diffusers' converters assert their model's sizes without a message (FLUX.1's
        # widths in its kohya converter): say where it stopped instead of an empty colon.
        return f"cannot be loaded: diffusers' conversion refused it ({type(exc).__name__})"
    if len(first) > 200:
        first = first[:197] + "..."
    return f"cannot be loaded ({type(exc).__name__}: {first})"
