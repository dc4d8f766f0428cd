"""The generation executor: one worker thread owns the device, the pipelines and their LoRAs.
Requests wait in a bounded queue; compatible jobs (same model, LoRAs, size, steps, scheduler,
guidance) run as one batch, each image with its own seeded generator. Every job's events go
to a replayable list that any number of readers follow."""

from __future__ import annotations

import gc
import hashlib
import io
import json
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.domain.batching import Batch, batch_key
from server.domain.errors import ResourceExhaustedError
from server.domain.generation_events import (
    TERMINAL,
    Cancelled,
    Completed,
    Failed,
    GenerationEvent,
    ImageComplete,
    Payload,
    Preview,
    Progress,
    Queued,
    Started,
    Timings,
    image_chunks,
)
from server.domain.generation_job import GenerationJob
from server.domain.models import BaseModelConfig
from server.domain.schedulers import SCHEDULERS, a1111_label
from server.infrastructure.diffusion.adapters import AdapterCache, AdapterLoadError, AdapterSpec
from server.infrastructure.diffusion.images import ImageStore
from server.infrastructure.diffusion.previews import preview_jpeg
from server.infrastructure.diffusion.registry import load_pipeline
from server.infrastructure.lora_files import update_digest

log = logging.getLogger("loracle.executor")

VERSION = "loracle 0.1.0"
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
GIB = 1024**3

Job = GenerationJob
Loader = Callable[[BaseModelConfig, str, str], Any]
Transition = Callable[["JobHandle", Payload], None]


class JobHandle:
    """A job's events, kept so any number of readers can follow or replay them."""

    def __init__(self, job: Job, on_cancel: Callable[[JobHandle], None] | None = None) -> None:
        self.job = job
        self._on_cancel = on_cancel
        self.submitted = time.monotonic()
        self.finished_at: float | None = None
        self.images: list[ImageComplete] = []
        self._events: list[GenerationEvent] = []
        self._cond = threading.Condition()
        self._cancel = threading.Event()
        self._transitions: list[Transition] = []

    @property
    def generation_id(self) -> str:
        return self.job.generation_id

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def finished(self) -> bool:
        with self._cond:
            return bool(self._events) and isinstance(self._events[-1].payload, TERMINAL)

    @property
    def last_sequence(self) -> int:
        with self._cond:
            return len(self._events)

    def on_transition(self, listener: Transition) -> None:
        """Called on the publishing thread for Started and the final event (recording)."""
        self._transitions.append(listener)

    def cancel(self) -> None:
        """A running job stops at its next step; a waiting one leaves the queue now."""
        self._cancel.set()
        if self._on_cancel is not None:
            self._on_cancel(self)
        with self._cond:
            self._cond.notify_all()

    def publish(self, payload: Payload) -> bool:
        with self._cond:
            if self._events and isinstance(self._events[-1].payload, TERMINAL):
                return False
            if isinstance(payload, ImageComplete):
                self.images.append(payload)
            if isinstance(payload, TERMINAL):
                self.finished_at = time.monotonic()
            self._events.append(GenerationEvent(self.generation_id, len(self._events) + 1, payload))
            # Under the lock, before readers wake: whoever sees the final event can rely on
            # its transition having been handed over (listeners only enqueue).
            if isinstance(payload, (Started, *TERMINAL)):
                for listener in self._transitions:
                    try:
                        listener(self, payload)
                    except Exception:
                        log.exception("generation transition listener failed")
            self._cond.notify_all()
        return True

    def events(
        self, after: int = 0, poll: float = 0.5, stop: Callable[[], bool] | None = None
    ) -> Iterator[GenerationEvent]:
        """Events with a sequence number above `after`, waiting for new ones until the job
        ends (or `stop()` says the reader went away)."""
        seen = after
        while True:
            with self._cond:
                if seen >= len(self._events) and self._terminal_locked():
                    return
                while len(self._events) <= seen:
                    if stop is not None and stop():
                        return
                    self._cond.wait(poll)
                batch = self._events[seen:]
            for event in batch:
                yield event
                if isinstance(event.payload, TERMINAL):
                    return
            seen += len(batch)

    def _terminal_locked(self) -> bool:
        return bool(self._events) and isinstance(self._events[-1].payload, TERMINAL)


class _Interrupted(Exception):
    """Raised from the step callback: diffusers' interrupt flag would still decode."""


@dataclass
class _Loaded:
    pipe: Any
    model_hash: str
    size_bytes: int
    adapters: AdapterCache
    scheduler_config: Any
    default_scheduler: str
    schedulers: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExecutorStats:
    batches: int = 0
    images: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    model_loads: int = 0
    model_evictions: int = 0
    out_of_memory: int = 0


class DiffusionExecutor:
    def __init__(
        self,
        *,
        max_queue: int = 16,
        max_batch: int = 8,
        batch_wait: float = 0.01,
        device: str = "auto",
        threads: int = 1,
        device_budget_gb: float = 0.0,
        adapter_budget_gb: float = 2.0,
        images: ImageStore | None = None,
        handle_retention: float = 600.0,
        loader: Loader | None = None,
    ) -> None:
        self._max_queue = max_queue
        self._max_batch = max_batch
        self._batch_wait = batch_wait
        self._device = device
        self._threads = threads
        self._budget = int(device_budget_gb * GIB)
        self._adapter_budget = int(adapter_budget_gb * GIB)
        self._images = images
        self._retention = handle_retention
        self._loader: Loader = loader or (
            lambda model, device, dtype: load_pipeline(model, device=device, dtype=dtype)
        )
        self._waiting: deque[JobHandle] = deque()
        self._handles: dict[str, JobHandle] = {}
        self._lock = threading.Condition()
        self._pipelines: OrderedDict[str, _Loaded] = OrderedDict()
        self._verified: set[str] = set()
        self._model_hashes: dict[tuple[Path, float], str] = {}
        self._stop = False
        self._worker: threading.Thread | None = None
        self.running: list[JobHandle] = []
        self.stats = ExecutorStats()

    # -- the request side ------------------------------------------------------------------

    def start(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._loop, name="loracle-executor", daemon=True)
            self._worker.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._lock:
            self._stop = True
            waiting = list(self._waiting)
            self._waiting.clear()
            running = list(self.running)
            self._lock.notify_all()
        for handle in waiting:
            handle.publish(Failed("the server shut down before this generation started"))
        for handle in running:
            handle.cancel()
        if self._worker is not None:
            self._worker.join(timeout)

    def submit(self, job: Job, on_accept: Callable[[int], None] | None = None) -> JobHandle:
        """Queues a job. `on_accept(position)` runs once the queue has room and before the job
        can start, so whatever it records (the Submitted event) precedes the job's own events;
        if it raises, nothing is queued."""
        handle = JobHandle(job, self._withdraw)
        with self._lock:
            if self._stop:
                raise ResourceExhaustedError("the executor is shutting down", 5.0)
            if len(self._waiting) >= self._max_queue:
                raise ResourceExhaustedError(
                    f"the generation queue is full ({self._max_queue} jobs waiting)", 2.0
                )
            position = len(self._waiting) + (1 if self.running else 0)
            if on_accept is not None:
                on_accept(position)
            handle.publish(Queued(position))
            self._waiting.append(handle)
            self._handles[job.generation_id] = handle
            self._forget_old_locked()
            self._lock.notify_all()
        return handle

    def handle(self, generation_id: str) -> JobHandle | None:
        with self._lock:
            return self._handles.get(generation_id)

    def loaded_models(self) -> list[str]:
        """Resident models, least recently used first."""
        with self._lock:
            return list(self._pipelines)

    def queue_depth(self) -> int:
        """Jobs waiting for the device (not counting the running batch)."""
        with self._lock:
            return len(self._waiting)

    def idle(self) -> bool:
        with self._lock:
            return not self._waiting and not self.running

    def _withdraw(self, handle: JobHandle) -> None:
        with self._lock:
            if handle not in self._waiting:
                return
            self._waiting.remove(handle)
            handle.publish(Cancelled())
            self._announce_positions()

    def _announce_positions(self) -> None:
        ahead = 1 if self.running else 0
        for place, waiting in enumerate(self._waiting, start=ahead):
            waiting.publish(Queued(place))

    def _forget_old_locked(self) -> None:
        now = time.monotonic()
        for gid, handle in list(self._handles.items()):
            if handle.finished_at is not None and now - handle.finished_at > self._retention:
                del self._handles[gid]

    # -- the worker ------------------------------------------------------------------------

    def _loop(self) -> None:
        import torch

        torch.set_num_threads(self._threads)
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run_batch(batch)
            except Exception as exc:  # a bug must not kill the worker
                log.exception("generation batch failed")
                for handle in batch:
                    handle.publish(Failed(f"generation failed: {type(exc).__name__}"))
            finally:
                with self._lock:
                    self.running = []
                    self._announce_positions()
                if self._images is not None:
                    self._images.sweep_if_due()

    def _next_batch(self) -> list[JobHandle] | None:
        """The oldest job plus compatible ones behind it, up to `max_batch` images; waits up
        to `batch_wait` for more to arrive while the batch has room."""
        with self._lock:
            while not self._waiting and not self._stop:
                self._lock.wait()
            if self._stop:
                return None
            first = self._waiting.popleft()
            batch: Batch[JobHandle] = Batch(self._max_batch)
            batch.offer(first, batch_key(first.job), first.job.num_images)
            self.running = batch.members
            deadline = time.monotonic() + self._batch_wait
            while not batch.full and not self._stop:
                for waiting in list(self._waiting):
                    if batch.offer(waiting, batch_key(waiting.job), waiting.job.num_images):
                        self._waiting.remove(waiting)
                remaining = deadline - time.monotonic()
                if batch.full or remaining <= 0:
                    break
                self._lock.wait(remaining)
            self._announce_positions()
            return batch.members

    def _run_batch(self, batch: list[JobHandle]) -> None:
        import torch

        live = [h for h in batch if not h.cancelled]
        for handle in batch:
            if handle.cancelled:
                handle.publish(Cancelled())
        if not live:
            return
        job = live[0].job
        started = time.monotonic()
        try:
            loaded = self._pipeline(job.model)
            self._verify_loras(job)
            loaded.adapters.apply(
                [AdapterSpec(x.sha256, x.path, x.weight, x.name) for x in job.loras]
            )
            pipe = loaded.pipe
            pipe.scheduler = self._scheduler(loaded, job.scheduler)
        except AdapterLoadError as exc:
            for handle in live:
                handle.publish(Failed(str(exc)))
            return
        except torch.OutOfMemoryError:
            self._out_of_memory(live, "loading the model")
            return
        except (OSError, ValueError) as exc:
            log.exception("could not prepare model %s", job.model.name)
            for handle in live:
                handle.publish(Failed(f"could not prepare model {job.model.name!r}: {exc}"))
            return

        total = sum(h.job.num_images for h in live)
        self.stats.batches += 1
        self.stats.batch_sizes.append(total)
        for handle in live:
            handle.publish(Started(total))
        rows: list[tuple[JobHandle, int]] = [(h, i) for h in live for i in range(h.job.num_images)]
        marks: dict[str, float] = {}

        def on_step(
            _pipe: Any, step: int, _timestep: Any, tensors: dict[str, Any]
        ) -> dict[str, Any]:
            now = time.monotonic()
            marks.setdefault("first_step", now)
            marks["last_step"] = now
            active = [h for h in live if not h.cancelled]
            for handle in live:
                if handle.cancelled:
                    handle.publish(Cancelled())
            if not active:
                raise _Interrupted
            done = step + 1
            # The loop runs once per scheduler timestep: PLMS adds one, Heun nearly doubles
            # them, so the scheduler's count is the honest total.
            total = len(getattr(_pipe.scheduler, "timesteps", ())) or job.steps
            for handle in active:
                handle.publish(Progress(done, max(total, done), now - started))
            latents = tensors.get("latents")
            for row, (handle, index) in enumerate(rows):
                every = handle.job.preview_every
                due = bool(every) and done % every == 0 and done < handle.job.steps
                if due and latents is not None and not handle.cancelled:
                    jpeg = preview_jpeg(latents[row], handle.job.model.architecture)
                    handle.publish(Preview(index, done, jpeg))
            return tensors

        negatives = [h.job.negative_prompt for h, _ in rows]
        try:
            result = pipe(
                prompt=[h.job.prompt for h, _ in rows],
                negative_prompt=negatives if any(negatives) else None,
                width=job.width,
                height=job.height,
                num_inference_steps=job.steps,
                guidance_scale=job.guidance_scale,
                num_images_per_prompt=1,
                generator=[
                    torch.Generator(device="cpu").manual_seed(h.job.seed + i) for h, i in rows
                ],
                callback_on_step_end=on_step,
            )
        except _Interrupted:
            return
        except torch.OutOfMemoryError:
            self._out_of_memory(live, "denoising")
            return
        denoised = time.monotonic()
        # The step callback fires after a step, so the first mark includes step 1; take one
        # average step off it to split prompt encoding from denoising.
        last = marks.get("last_step", denoised)
        first = marks.get("first_step", started)
        if job.steps > 1 and last > first:
            first = max(started, first - (last - first) / (job.steps - 1))
        for row, (handle, index) in enumerate(rows):
            if handle.cancelled:
                handle.publish(Cancelled())  # images it finished earlier stay recorded
                continue
            self._deliver(handle, index, result.images[row], loaded)
        self.stats.images += len(rows)
        finished = time.monotonic()
        for handle in live:
            handle.publish(
                Completed(
                    Timings(
                        queue_seconds=started - handle.submitted,
                        text_encoding_seconds=first - started,
                        denoising_seconds=last - first,
                        decoding_seconds=finished - last,
                    )
                )
            )

    def _deliver(self, handle: JobHandle, index: int, image: Any, loaded: _Loaded) -> None:
        job = handle.job
        data = encode_image(image, job, index, loaded)
        mime = MIME[job.output_format]
        digest = hashlib.sha256(data).hexdigest()
        if self._images is not None:
            self._images.save(job.generation_id, index, mime, data)
        for chunk in image_chunks(index, data, job.chunk_size):
            handle.publish(chunk)
        handle.publish(ImageComplete(index, digest, len(data), mime, job.seed + index))

    def _out_of_memory(self, live: Sequence[JobHandle], stage: str) -> None:
        """Fails the batch, frees what it held, and keeps serving."""
        import torch

        self.stats.out_of_memory += 1
        log.error("out of device memory while %s; failing %d job(s)", stage, len(live))
        for handle in live:
            handle.publish(
                Failed(
                    f"out of device memory while {stage}; retry later or with a smaller "
                    "batch or size",
                    code="RESOURCE_EXHAUSTED",
                )
            )
        for loaded in self._pipelines.values():
            try:
                loaded.adapters.restore()
            except Exception:
                log.exception("could not restore base weights after OOM; unloading the model")
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- models, schedulers, LoRAs ---------------------------------------------------------

    def _pipeline(self, model: BaseModelConfig) -> _Loaded:
        loaded = self._pipelines.get(model.name)
        if loaded is not None:
            self._pipelines.move_to_end(model.name)
            return loaded
        import torch

        device = self._device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        need = _estimate_bytes(model)
        while self._budget and self._pipelines and self._resident() + need > self._budget:
            name, evicted = self._pipelines.popitem(last=False)
            log.info("unloading model %s to stay under the device budget", name)
            del evicted
            self.stats.model_evictions += 1
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        pipe = self._loader(model, device, model.dtype)
        pipe.set_progress_bar_config(disable=True)
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
        # A configured budget also covers activations and adapters, which weights omit.
        size = max(size, int(model.vram_budget_gb * GIB))
        loaded = _Loaded(
            pipe=pipe,
            model_hash=_model_hash(model, self._model_hashes),
            size_bytes=size,
            adapters=AdapterCache(pipe, budget_bytes=self._adapter_budget),
            scheduler_config=pipe.scheduler.config,
            default_scheduler=type(pipe.scheduler).__name__,
        )
        loaded.schedulers[""] = pipe.scheduler
        self.stats.model_loads += 1
        with self._lock:
            self._pipelines[model.name] = loaded
        return loaded

    def _resident(self) -> int:
        return sum(p.size_bytes for p in self._pipelines.values())

    @staticmethod
    def _scheduler(loaded: _Loaded, name: str) -> Any:
        cached = loaded.schedulers.get(name)
        if cached is None:
            import diffusers

            choice = SCHEDULERS[name]
            cls = getattr(diffusers, choice.diffusers_class)
            cached = cls.from_config(loaded.scheduler_config, **choice.options)
            loaded.schedulers[name] = cached
        return cached

    def _verify_loras(self, job: Job) -> None:
        """A LoRA file replaced after import would make the recorded hashes lie."""
        for lora in job.loras:
            if lora.sha256 in self._verified:
                continue
            digest = hashlib.sha256()
            try:
                with lora.path.open("rb") as f:
                    update_digest(digest, f)
            except OSError as exc:
                raise AdapterLoadError(
                    f"LoRA {lora.name!r}: cannot read its file ({exc})"
                ) from None
            if digest.hexdigest() != lora.sha256:
                raise AdapterLoadError(
                    f"LoRA {lora.name!r}: its file changed since it was imported; import it again"
                )
            self._verified.add(lora.sha256)


def _estimate_bytes(model: BaseModelConfig) -> int:
    if model.vram_budget_gb:
        return int(model.vram_budget_gb * GIB)
    path = model.path
    files = [path] if path.is_file() else list(path.glob("*/*.safetensors"))
    return sum(f.stat().st_size for f in files if f.exists())


def _model_hash(model: BaseModelConfig, known: dict[tuple[Path, float], str]) -> str:
    """A1111's short model hash: SHA-256 of the checkpoint (here the UNet weights), 10 hex.
    Reading gigabytes takes seconds, so a model unloaded and loaded again under the device
    budget reuses the hash while its files are unchanged."""
    path = model.path
    candidates = [path] if path.is_file() else sorted((path / "unet").glob("*.safetensors"))
    key = (path, max((c.stat().st_mtime for c in candidates), default=0.0))
    if key not in known:
        digest = hashlib.sha256()
        for candidate in candidates:
            with candidate.open("rb") as f:
                update_digest(digest, f)
        known[key] = digest.hexdigest()[:10]
    return known[key]


def a1111_parameters(job: Job, index: int, model_hash: str, default_scheduler: str) -> str:
    """The `parameters` text A1111, ComfyUI importers and Civitai read from PNGs."""
    lines = [job.original_prompt]
    if job.negative_prompt:
        lines.append(f"Negative prompt: {job.negative_prompt}")
    fields = [
        f"Steps: {job.steps}",
        f"Sampler: {a1111_label(job.scheduler, default_scheduler)}",
        f"CFG scale: {job.guidance_scale:g}",
        f"Seed: {job.seed + index}",
        f"Size: {job.width}x{job.height}",
        f"Model hash: {model_hash}",
        f"Model: {job.model.name}",
    ]
    if job.loras:
        hashes = ", ".join(
            f"{lora.file_name or lora.name}: {lora.sha256[:12]}" for lora in job.loras
        )
        fields.append(f'Lora hashes: "{hashes}"')
    fields.append(f"Version: {VERSION}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def manifest(job: Job, index: int, loaded: _Loaded) -> dict[str, Any]:
    """Everything needed to make the image again, as JSON in the PNG."""
    import diffusers
    import torch

    scheduler = loaded.schedulers.get(job.scheduler) or loaded.pipe.scheduler
    return {
        "generation_id": job.generation_id,
        "model": job.model.name,
        "model_hash": loaded.model_hash,
        "architecture": job.model.architecture.value,
        "prompt": job.original_prompt,
        "negative_prompt": job.negative_prompt,
        "seed": job.seed + index,
        "steps": job.steps,
        "guidance_scale": job.guidance_scale,
        "size": [job.width, job.height],
        "scheduler": {
            "name": job.scheduler or "default",
            "class": type(scheduler).__name__,
            "config": dict(scheduler.config),
        },
        "loras": [
            {"id": x.lora_id, "name": x.name, "sha256": x.sha256, "weight": x.weight}
            for x in job.loras
        ],
        "versions": {
            "loracle": VERSION,
            "diffusers": diffusers.__version__,
            "torch": torch.__version__,
        },
    }


def encode_image(image: Any, job: Job, index: int, loaded: _Loaded) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    buffer = io.BytesIO()
    parameters = a1111_parameters(job, index, loaded.model_hash, loaded.default_scheduler)
    document = json.dumps(manifest(job, index, loaded), sort_keys=True, default=str)
    if job.output_format == "png":
        info = PngInfo()
        info.add_text("parameters", parameters)
        info.add_text("loracle", document)
        image.save(buffer, format="PNG", pnginfo=info)
    else:
        exif = image.getexif()
        exif[0x9286] = parameters  # UserComment, where A1111 keeps parameters in JPEG/WebP
        image.save(buffer, format=job.output_format.upper(), quality=95, exif=exif)
    return buffer.getvalue()
