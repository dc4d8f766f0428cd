"""The generation executor: one worker thread owns the device and the pipelines; requests
wait in a bounded queue and follow their job through a replayable event list.

Not built yet (the rest of the generation issue): dynamic batching of compatible jobs,
applying LoRAs, previews, and the scheduler chosen per request."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from server.application.commands.generation import GenerationRequest
from server.domain.errors import ResourceExhaustedError
from server.domain.generation import (
    TERMINAL,
    Cancelled,
    Completed,
    Failed,
    GenerationEvent,
    ImageChunk,
    ImageComplete,
    Payload,
    Progress,
    Queued,
    Started,
    Timings,
)
from server.domain.models import BaseModelConfig, BaseModelInfo
from server.infrastructure.diffusion.registry import load_pipeline

log = logging.getLogger("loracle.executor")

VERSION = "loracle 0.1.0"
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


@dataclass(frozen=True, slots=True)
class Job:
    generation_id: str
    model: BaseModelConfig
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    num_images: int
    output_format: str = "png"
    chunk_size: int = 64 * 1024


class JobHandle:
    """A job's events, kept so any number of readers can follow or replay them."""

    def __init__(self, job: Job, on_cancel: Callable[[JobHandle], None] | None = None) -> None:
        self.job = job
        self._on_cancel = on_cancel
        self.submitted = time.monotonic()
        self._events: list[GenerationEvent] = []
        self._cond = threading.Condition()
        self._cancel = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def finished(self) -> bool:
        with self._cond:
            return bool(self._events) and isinstance(self._events[-1].payload, TERMINAL)

    def cancel(self) -> None:
        """A running job stops at its next step; a waiting one leaves the queue now."""
        self._cancel.set()
        if self._on_cancel is not None:
            self._on_cancel(self)
        with self._cond:
            self._cond.notify_all()

    def publish(self, payload: Payload) -> None:
        with self._cond:
            if self._events and isinstance(self._events[-1].payload, TERMINAL):
                return
            self._events.append(
                GenerationEvent(self.job.generation_id, len(self._events) + 1, payload)
            )
            self._cond.notify_all()

    def events(
        self, after: int = 0, poll: float = 0.5, stop: Callable[[], bool] | None = None
    ) -> Iterator[GenerationEvent]:
        """Events with a sequence number above `after`, waiting for new ones until the job
        ends (or `stop()` says the reader went away)."""
        seen = after
        while True:
            with self._cond:
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


class _Interrupted(Exception):
    """Raised from the step callback: diffusers' interrupt flag would still decode."""


class DiffusionExecutor:
    def __init__(self, *, max_queue: int = 16, device: str = "auto", threads: int = 1) -> None:
        self._max_queue = max_queue
        self._device = device
        self._threads = threads
        self._waiting: deque[JobHandle] = deque()
        self._lock = threading.Condition()
        self._pipelines: dict[str, tuple[Any, str]] = {}
        self._stop = False
        self._worker: threading.Thread | None = None
        self.running: JobHandle | None = None

    def start(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._loop, name="loracle-executor", daemon=True)
            self._worker.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._lock:
            self._stop = True
            for handle in self._waiting:
                handle.publish(Failed("server shutting down"))
            self._waiting.clear()
            self._lock.notify_all()
        if self.running is not None:
            self.running.cancel()
        if self._worker is not None:
            self._worker.join(timeout)

    def submit(self, job: Job) -> JobHandle:
        handle = JobHandle(job, self._withdraw)
        with self._lock:
            if self._stop:
                raise ResourceExhaustedError("the executor is shutting down", 5.0)
            if len(self._waiting) >= self._max_queue:
                raise ResourceExhaustedError(
                    f"the generation queue is full ({self._max_queue} jobs waiting)", 2.0
                )
            position = len(self._waiting) + (1 if self.running is not None else 0)
            handle.publish(Queued(position))
            self._waiting.append(handle)
            self._lock.notify_all()
        return handle

    def _withdraw(self, handle: JobHandle) -> None:
        with self._lock:
            if handle not in self._waiting:
                return
            self._waiting.remove(handle)
            handle.publish(Cancelled())
            self._announce_positions()

    def _announce_positions(self) -> None:
        ahead = 1 if self.running is not None else 0
        for place, waiting in enumerate(self._waiting, start=ahead):
            waiting.publish(Queued(place))

    # -- the worker ----------------------------------------------------------------------

    def _loop(self) -> None:
        import torch

        torch.set_num_threads(self._threads)
        while True:
            with self._lock:
                while not self._waiting and not self._stop:
                    self._lock.wait()
                if self._stop:
                    return
                handle = self._waiting.popleft()
                self.running = handle
                self._announce_positions()  # everyone behind moved up one place
            try:
                if handle.cancelled:
                    handle.publish(Cancelled())
                else:
                    self._run(handle)
            except Exception as exc:
                log.exception("generation %s failed", handle.job.generation_id)
                handle.publish(Failed(f"generation failed: {type(exc).__name__}"))
            finally:
                with self._lock:
                    self.running = None

    def _pipeline(self, model: BaseModelConfig) -> tuple[Any, str]:
        cached = self._pipelines.get(model.name)
        if cached is None:
            import torch

            device = self._device
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            pipe = load_pipeline(model, device=device, dtype=model.dtype)
            pipe.set_progress_bar_config(disable=True)
            cached = (pipe, _model_hash(model))
            self._pipelines.clear()  # one model resident until the VRAM-budget LRU lands
            self._pipelines[model.name] = cached
        return cached

    def _run(self, handle: JobHandle) -> None:
        import torch

        job = handle.job
        started = time.monotonic()
        queue_seconds = started - handle.submitted
        pipe, model_hash = self._pipeline(job.model)
        handle.publish(Started(job.num_images))
        marks: dict[str, float] = {}

        def on_step(
            _pipe: Any, step: int, _timestep: Any, tensors: dict[str, Any]
        ) -> dict[str, Any]:
            now = time.monotonic()
            marks.setdefault("first_step", now)
            marks["last_step"] = now
            if handle.cancelled:
                raise _Interrupted
            handle.publish(Progress(step + 1, job.steps, now - started))
            return tensors

        generators = [
            torch.Generator(device="cpu").manual_seed(job.seed + i) for i in range(job.num_images)
        ]
        try:
            result = pipe(
                prompt=job.prompt,
                negative_prompt=job.negative_prompt or None,
                width=job.width,
                height=job.height,
                num_inference_steps=job.steps,
                guidance_scale=job.guidance_scale,
                num_images_per_prompt=job.num_images,
                generator=generators,
                callback_on_step_end=on_step,
            )
        except _Interrupted:
            handle.publish(Cancelled())
            return
        denoised = time.monotonic()
        first = marks.get("first_step", started)
        last = marks.get("last_step", denoised)
        for index, image in enumerate(result.images):
            data = encode_image(image, job, index, model_hash)
            digest = hashlib.sha256(data).hexdigest()
            for offset in range(0, len(data), job.chunk_size):
                piece = data[offset : offset + job.chunk_size]
                handle.publish(ImageChunk(index, offset, piece, offset + len(piece) >= len(data)))
            handle.publish(
                ImageComplete(index, digest, len(data), MIME[job.output_format], job.seed + index)
            )
        handle.publish(
            Completed(
                Timings(
                    queue_seconds=queue_seconds,
                    text_encoding_seconds=first - started,
                    denoising_seconds=last - first,
                    decoding_seconds=time.monotonic() - last,
                )
            )
        )


def _model_hash(model: BaseModelConfig) -> str:
    """A1111's short model hash: SHA-256 of the checkpoint (here the UNet weights), 10 hex."""
    path = model.path
    candidates = [path] if path.is_file() else sorted((path / "unet").glob("*.safetensors"))
    digest = hashlib.sha256()
    for candidate in candidates:
        with candidate.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:10]


def a1111_parameters(job: Job, index: int, model_hash: str) -> str:
    """The `parameters` text A1111, ComfyUI importers and Civitai read from PNGs."""
    lines = [job.prompt]
    if job.negative_prompt:
        lines.append(f"Negative prompt: {job.negative_prompt}")
    lines.append(
        ", ".join(
            [
                f"Steps: {job.steps}",
                "Sampler: Euler",
                f"CFG scale: {job.guidance_scale:g}",
                f"Seed: {job.seed + index}",
                f"Size: {job.width}x{job.height}",
                f"Model hash: {model_hash}",
                f"Model: {job.model.name}",
                f"Version: {VERSION}",
            ]
        )
    )
    return "\n".join(lines)


def encode_image(image: Any, job: Job, index: int, model_hash: str) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    buffer = io.BytesIO()
    parameters = a1111_parameters(job, index, model_hash)
    manifest = json.dumps(
        {
            "generation_id": job.generation_id,
            "model": job.model.name,
            "model_hash": model_hash,
            "architecture": job.model.architecture.value,
            "seed": job.seed + index,
            "steps": job.steps,
            "guidance_scale": job.guidance_scale,
            "size": [job.width, job.height],
            "loras": [],
            "version": VERSION,
        },
        sort_keys=True,
    )
    if job.output_format == "png":
        info = PngInfo()
        info.add_text("parameters", parameters)
        info.add_text("loracle", manifest)
        image.save(buffer, format="PNG", pnginfo=info)
    else:
        exif = image.getexif()
        exif[0x9286] = parameters  # UserComment, where A1111 keeps parameters in JPEG/WebP
        image.save(buffer, format=job.output_format.upper(), quality=95, exif=exif)
    return buffer.getvalue()


def make_job(
    *,
    generation_id: str,
    model: BaseModelInfo,
    request: GenerationRequest,
    width: int,
    height: int,
    steps: int,
    guidance_scale: float,
    seed: int,
) -> Job:
    return Job(
        generation_id=generation_id,
        model=model.config,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=guidance_scale,
        seed=seed,
        num_images=request.num_images,
        output_format=request.output_format,
        chunk_size=request.chunk_size_bytes or 64 * 1024,
    )
