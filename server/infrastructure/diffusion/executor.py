"""The generation executor: one worker thread owns the device, the pipelines and their LoRAs.
Requests wait in a bounded queue (job_queue.py); compatible jobs (same model, size, steps,
scheduler, guidance; any LoRAs and textual-inversion embeddings) run as one batch, each image
with its own seeded generator, in the call its model family makes (families/). A batch whose
jobs share one LoRA set runs it fused; one that mixes LoRAs adds each row's own
(row_loras.py). Every job's events go to a replayable handle (handles.py) that any number of
readers follow."""

from __future__ import annotations

import gc
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from server.domain.errors import Reason
from server.domain.generation_events import (
    Cancelled,
    Completed,
    Failed,
    ImageComplete,
    Preview,
    Progress,
    Queued,
    Started,
    Timings,
    image_chunks,
)
from server.domain.generation_job import GenerationJob, ResolvedLora
from server.infrastructure.diffusion import hires, image_inputs
from server.infrastructure.diffusion.adapters import AdapterLoadError, AdapterStats
from server.infrastructure.diffusion.conditioning import ConditionedGroup, RowScope, all_rows
from server.infrastructure.diffusion.controlnets import ControlNetLoadError
from server.infrastructure.diffusion.embeddings import EmbeddingSpec
from server.infrastructure.diffusion.estimates import StepCosts, describe_seconds
from server.infrastructure.diffusion.families.base import BatchRows, ModelFamily, as_inpainting
from server.infrastructure.diffusion.handles import JobHandle
from server.infrastructure.diffusion.images import (
    MIME,
    ImageStore,
    encode_image,
    encode_upscaled,
)
from server.infrastructure.diffusion.job_queue import JobQueue
from server.infrastructure.diffusion.lora_prefetch import LoraPrefetcher
from server.infrastructure.diffusion.pipelines import (
    GIB,
    LoadedPipeline,
    Loader,
    PipelineCache,
    UpscalerLoadError,
)
from server.infrastructure.diffusion.previews import preview_jpeg
from server.infrastructure.diffusion.registry import load_pipeline
from server.infrastructure.diffusion.row_loras import MixedPlan, NotMixable
from server.infrastructure.input_images import open_rgb

log = logging.getLogger("loracle.executor")

# The sizes at which a model never timed here is timed (two steps, one image, each): two, so
# the way its step time grows with the size is measured, not assumed. Only a job larger than
# the largest is worth it: a smaller one's own steps time the model soon enough.
CALIBRATION_SIDES = (64, 128)

# One row of a batch: a job and the index of one of its images.
Row = tuple[JobHandle, int]


@dataclass
class ExecutorStats:
    batches: int = 0
    images: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    model_loads: int = 0
    model_evictions: int = 0
    out_of_memory: int = 0
    # Batches whose rows asked for different LoRAs (per-row deltas), the distinct LoRA files
    # of each, and the time the worker spent loading LoRAs for them.
    mixed_batches: int = 0
    distinct_loras: list[int] = field(default_factory=list)
    adapter_wait_seconds: float = 0.0
    adapters: AdapterStats = field(default_factory=AdapterStats)


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
        mix_loras: bool = True,
        compile_backend: str = "inductor",
        images: ImageStore | None = None,
        handle_retention: float = 600.0,
        loader: Loader | None = None,
        slow_job_seconds: float = 60.0,
        calibration_sides: tuple[int, ...] = CALIBRATION_SIDES,
    ) -> None:
        self._threads = threads
        # Whether jobs asking for different LoRAs run as one batch (read per batch).
        self.mix_loras = mix_loras
        self._costs = StepCosts()
        self._timed: set[str] = set()
        self._calibration_sides = calibration_sides
        self._slow_job = slow_job_seconds
        self._images = images
        self._retention = handle_retention
        self.stats = ExecutorStats()
        self._queue = JobQueue(max_queue=max_queue, max_batch=max_batch, batch_wait=batch_wait)
        self._pipelines = PipelineCache(
            loader=loader
            or (lambda model, device, dtype: load_pipeline(model, device=device, dtype=dtype)),
            device=device,
            budget_bytes=int(device_budget_gb * GIB),
            adapter_budget_bytes=int(adapter_budget_gb * GIB),
            counters=self.stats,
            # LoRA files read ahead: as many bytes as the adapters' own budget.
            prefetcher=LoraPrefetcher(int(adapter_budget_gb * GIB)),
            compile_backend=compile_backend,
        )
        self.stats.adapters = self._pipelines.adapter_stats
        self._handles: dict[str, JobHandle] = {}
        self._handles_lock = threading.Lock()
        self._worker: threading.Thread | None = None

    # -- the request side ------------------------------------------------------------------

    def start(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._loop, name="loracle-executor", daemon=True)
            self._worker.start()
            self._pipelines.prefetcher.start()

    def stop(self, timeout: float = 30.0) -> None:
        waiting, running = self._queue.close()
        for handle in waiting:
            handle.publish(
                Failed(
                    "the server shut down before this generation started; submit it again",
                    Reason.SERVER_SHUTTING_DOWN,
                )
            )
        for handle in running:
            handle.cancel()
        if self._worker is not None:
            self._worker.join(timeout)
        self._pipelines.prefetcher.stop()

    def submit(
        self, job: GenerationJob, on_accept: Callable[[int], None] | None = None
    ) -> JobHandle:
        """Queues a job. `on_accept(position)` runs once the queue has room and before the job
        can start, so whatever it records (the Submitted event) precedes the job's own events;
        if it raises, nothing is queued."""
        handle = JobHandle(job, self._queue.withdraw)
        self._queue.put(handle, on_accept, self._estimate(job))
        cache = self._pipelines
        for lora in job.loras:  # read while the job waits, off the worker's path
            cache.prefetcher.want(lora.sha256, lora.path, cache.resident(lora.sha256))
        with self._handles_lock:
            self._handles[job.generation_id] = handle
            self._forget_old_locked()
        return handle

    def _estimate(self, job: GenerationJob) -> tuple[float, str]:
        """(seconds, warning) for the job's first event; the warning only when it is slow, so
        a user who asked for 256x256 on a CPU hears it will take minutes before it starts."""
        found = self._costs.estimate(job)
        if found is None:
            return 0.0, ""
        if found.seconds < self._slow_job:
            return found.seconds, ""
        return found.seconds, (
            f"this generation will take {describe_seconds(found.seconds)} once it starts "
            f"({found.seconds_per_step:.1f} s a step, from jobs this server ran); a smaller "
            "size, fewer steps or a GPU is faster"
        )

    def handle(self, generation_id: str) -> JobHandle | None:
        with self._handles_lock:
            return self._handles.get(generation_id)

    def loaded_models(self) -> list[str]:
        """Resident models, least recently used first."""
        return self._pipelines.names()

    def queue_depth(self) -> int:
        """Jobs waiting for the device (not counting the running batch)."""
        return self._queue.depth()

    def idle(self) -> bool:
        return self._queue.idle()

    @property
    def running(self) -> list[JobHandle]:
        """The batch on the device now."""
        return self._queue.running

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
            batch = self._queue.next_batch()
            if batch is None:
                return
            try:
                self._run_batch(batch)
            except Exception:  # a bug must not kill the worker
                log.exception("generation batch failed")
                for handle in batch:
                    handle.publish(Failed("the generation failed inside the server; see its log"))
            finally:
                self._queue.batch_done()
                if self._images is not None:
                    self._images.sweep_if_due()

    def _run_batch(self, batch: list[JobHandle]) -> None:
        # 1. Drop cancelled jobs
        live = [h for h in batch if not h.cancelled]
        for handle in batch:
            if handle.cancelled:
                handle.publish(Cancelled())
        if not live:
            return
        if live[0].job.upscale is not None:
            self._run_upscales(live, time.monotonic())
            return
        self._run_jobs(live, mix=self.mix_loras)

    def _run_jobs(self, live: list[JobHandle], *, mix: bool) -> None:
        job = live[0].job  # the fields every job of the batch shares
        started = time.monotonic()

        # 2. Resolve the pipeline, LoRAs and scheduler: the jobs' one LoRA set fused, or each
        #    row's own LoRAs as per-row deltas (row_loras.py) when the jobs ask for different
        #    ones; if those cannot be computed per row, each set runs on its own, fused. For a
        #    model this server has not timed yet, warn the batch if it will be slow.
        plan: MixedPlan | None = None
        if len(_lora_sets(live)) > 1:
            prepared = self._prepare_mixed(live, job) if mix else NotMixable("mixing is off")
            if prepared is None:
                return
            if isinstance(prepared, NotMixable):
                log.info("running a batch's LoRA sets one after another: %s", prepared)
                unfinished = [h for h in live if not h.finished]  # some may have failed
                for part in _lora_sets(unfinished).values():
                    self._run_jobs(part, mix=False)
                return
            live, loaded, plan = prepared
        else:
            loaded_or_none = self._prepare(live, job)
            if loaded_or_none is None:
                return
            loaded = loaded_or_none
        try:
            self._run_prepared(live, loaded, plan, started)
        finally:
            if plan is not None:
                plan.close()

    def _run_prepared(
        self,
        live: list[JobHandle],
        loaded: LoadedPipeline,
        plan: MixedPlan | None,
        started: float,
    ) -> None:
        import torch

        live = self._apply_embeddings(live, loaded)
        if not live:
            return
        if not self._warn_if_slow(live, loaded):
            return

        # 3. Announce the batch
        rows: list[Row] = [(h, i) for h in live for i in range(h.job.num_images)]
        self.stats.batches += 1
        self.stats.batch_sizes.append(len(rows))
        scope: RowScope = all_rows
        if plan is not None:
            slots = [plan.slot_of(_lora_key(h)) for h, _ in rows]
            scope = lambda part: plan.rows([slots[i] for i in part])  # noqa: E731
            self.stats.mixed_batches += 1
            self.stats.distinct_loras.append(len({x.sha256 for h in live for x in h.job.loras}))
        for handle in live:
            handle.publish(Started(len(rows)))

        # 4. Prepare input images (img2img, inpainting), encode the prompts (A1111 emphasis,
        #    chunks), then denoise: one call per group of rows whose conditioning has the
        #    same length (conditioning.py)
        prepared = {h: image_inputs.prepare(h.job) for h in live}
        inputs = [prepared[h] for h, _ in rows]
        images: list[Any] = [None] * len(rows)
        spans: list[tuple[float, float]] = []
        try:
            groups = loaded.family.encode(
                loaded.pipe,
                [loaded.embeddings.prompt(h.job.prompt, h.job.embeddings) for h, _ in rows],
                [
                    loaded.embeddings.prompt(h.job.negative_prompt, h.job.embeddings)
                    for h, _ in rows
                ],
                scope,
            )
            for group in groups:
                with scope(group.rows):
                    span = self._denoise(rows, inputs, group, loaded, started, images)
                if span is not None:
                    spans.append(span)
        except torch.OutOfMemoryError:
            self._out_of_memory(live, "denoising")
            return
        if not spans:
            return  # every job was cancelled

        # 5. Split timings: encoding ends at the first call's first step, denoising at the
        #    last call's last step
        first, last = spans[0][0], spans[-1][1]

        # 6. Encode and stream each image
        for row, (handle, index) in enumerate(rows):
            if handle.cancelled:
                handle.publish(Cancelled())  # images it finished earlier stay recorded
                continue
            self._deliver(handle, index, images[row], loaded)
        self.stats.images += len(rows)

        # 7. Complete
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

    def _denoise(
        self,
        rows: Sequence[Row],
        inputs: Sequence[image_inputs.RowInputs],
        group: ConditionedGroup,
        loaded: LoadedPipeline,
        started: float,
        images: list[Any],
    ) -> tuple[float, float] | None:
        """Runs the group's rows (one call; two with hires fix, the second over the first's
        upscaled output), puts their images in `images` and learns the step cost; returns
        the span of its steps, or None when every job of the group was cancelled during it."""
        import torch

        part = [rows[i] for i in group.rows]
        jobs = list(dict.fromkeys(handle for handle, _ in part))
        job = jobs[0].job
        controls = tuple(c.controlnet.name for c in job.controls)
        later = 0 if job.hires is None else hires.second_steps(job, loaded.family)
        watcher = _StepWatcher(jobs, part, loaded.family, started, job.steps, later)
        call = BatchRows(
            prompts=[h.job.prompt for h, _ in part],
            negative_prompts=[h.job.negative_prompt for h, _ in part],
            job=job,
            generators=[torch.Generator(device="cpu").manual_seed(h.job.seed + i) for h, i in part],
            conditioning=group.kwargs,
            images=[inputs[i].image for i in group.rows if inputs[i].image is not None],
            masks=[inputs[i].mask for i in group.rows if inputs[i].mask is not None],
            controls=[[inputs[i].controls[c] for i in group.rows] for c in range(len(controls))],
        )
        if loaded.inpainting:
            call = as_inpainting(call)
        try:
            out = loaded.family.denoise(loaded.for_mode(call.call.mode, controls), call, watcher)
            if job.hires is not None:
                second, upscaled = hires.second_pass(
                    job, out, loaded.pipe, self._hires_upscaler(job, loaded), loaded.family
                )
                watcher.next_pass(second.width, second.height)
                call = replace(
                    call,
                    denoise_pass=second,
                    images=upscaled,
                    controls=image_inputs.controls_at(
                        [rows[i][0].job for i in group.rows], second.width, second.height
                    ),
                )
                out = loaded.family.denoise(loaded.for_mode(second.mode, controls), call, watcher)
        except _Interrupted:
            return None
        first, last = watcher.denoising_span(time.monotonic())
        if job.hires is None:  # two passes at two sizes are not a step cost at one
            self._costs.record(
                job.model.name, job.width * job.height, len(part), job.steps, last - first
            )
        for i, image in zip(group.rows, out, strict=True):
            images[i] = inputs[i].finish(image)
        return first, last

    def _hires_upscaler(
        self, job: GenerationJob, loaded: LoadedPipeline
    ) -> Callable[[Any], Any] | None:
        """The hires fix's upscaler model as a function of one image (None: built in)."""
        if job.hires is None or job.hires.model is None:
            return None
        from server.infrastructure.diffusion.upscaler_models import upscale

        denoiser = loaded.denoiser
        net, scale = self._pipelines.upscaler(job.hires.model, str(denoiser.device), denoiser.dtype)
        return lambda image: upscale(net, scale, image)

    def _run_upscales(self, live: Sequence[JobHandle], started: float) -> None:
        """Upscale jobs, one after another: an upscale has no denoising call to share."""
        import torch

        self.stats.batches += 1
        self.stats.batch_sizes.append(len(live))
        for handle in live:
            if handle.cancelled:
                handle.publish(Cancelled())
                continue
            handle.publish(Started(1))
            began = time.monotonic()
            try:
                image = self._upscaled(handle, began)
            except _Interrupted:
                handle.publish(Cancelled())
                continue
            except UpscalerLoadError as exc:
                handle.publish(Failed(str(exc), Reason.MODEL_LOAD_FAILED))
                continue
            except torch.OutOfMemoryError:
                self._out_of_memory([handle], "upscaling")
                continue
            upscaled = time.monotonic()
            data = encode_upscaled(image, handle.job)
            self._send(handle, 0, data)
            self.stats.images += 1
            handle.publish(
                Completed(
                    Timings(
                        queue_seconds=started - handle.submitted,
                        denoising_seconds=upscaled - began,
                        decoding_seconds=time.monotonic() - upscaled,
                    )
                )
            )

    def _upscaled(self, handle: JobHandle, began: float) -> Any:
        """The job's image upscaled, progress counting tiles (one step for a built-in
        upscaler); cancellation stops it between tiles."""
        from PIL import Image

        from server.infrastructure.diffusion.upscaler_models import upscale, upscale_tiles

        job = handle.job
        spec, source = job.upscale, job.init_image
        assert spec is not None
        assert source is not None
        image = open_rgb(source.data)
        if spec.model is None:
            filters = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
            handle.publish(Progress(1, 1, time.monotonic() - began))
            return image.resize((job.width, job.height), filters[spec.upscaler])
        net, scale = self._pipelines.upscaler(spec.model)
        total = upscale_tiles(image.width, image.height, scale, job.width, job.height)
        done = 0

        def on_tile(_done: int, _total: int) -> None:
            nonlocal done
            done += 1
            if handle.cancelled:
                raise _Interrupted
            handle.publish(Progress(done, total, time.monotonic() - began))

        return hires.with_model(
            lambda im: upscale(net, scale, im, on_tile=on_tile), image, job.width, job.height
        )

    def _prepare(self, live: Sequence[JobHandle], job: GenerationJob) -> LoadedPipeline | None:
        """The pipeline ready for the batch, or None once the batch has been failed."""
        return self._failing_batch(live, job, lambda: self._pipelines.prepare(job))

    def _prepare_mixed(
        self, live: list[JobHandle], job: GenerationJob
    ) -> tuple[list[JobHandle], LoadedPipeline, MixedPlan] | NotMixable | None:
        """The pipeline and per-row LoRA plan for jobs asking for different LoRAs; the jobs
        needing a LoRA that cannot be loaded fail (LORA_LOAD_FAILED, its file's hash) and the
        others go on. NotMixable: run the LoRA sets apart. None: every job has failed."""
        while len(_lora_sets(live)) > 1:
            sets = {key: part[0].job.loras for key, part in _lora_sets(live).items()}

            def ready(sets: dict[_LoraKey, tuple[ResolvedLora, ...]] = sets) -> _Mixed:
                try:
                    return self._pipelines.prepare_mixed(job, sets)
                except (NotMixable, AdapterLoadError) as exc:
                    return exc

            began = time.monotonic()
            outcome = self._failing_batch(live, job, ready)
            self.stats.adapter_wait_seconds += time.monotonic() - began
            if outcome is None or isinstance(outcome, NotMixable):
                return outcome
            if isinstance(outcome, AdapterLoadError):
                failed = [h for h in live if any(x.sha256 == outcome.sha256 for x in h.job.loras)]
                for handle in failed or live:
                    handle.publish(Failed(str(outcome), Reason.LORA_LOAD_FAILED, outcome.sha256))
                live = [h for h in live if h not in failed] if failed else []
                continue
            return (live, *outcome)
        return NotMixable("one LoRA set is left") if live else None

    def _failing_batch(
        self, live: Sequence[JobHandle], job: GenerationJob, ready: Callable[[], _T]
    ) -> _T | None:
        """`ready()`, or None once its error has failed every job of the batch."""
        import torch

        try:
            return ready()
        except AdapterLoadError as exc:
            for handle in live:
                handle.publish(Failed(str(exc), Reason.LORA_LOAD_FAILED, exc.sha256))
        except UpscalerLoadError as exc:
            for handle in live:
                handle.publish(Failed(str(exc), Reason.MODEL_LOAD_FAILED))
        except ControlNetLoadError as exc:
            log.warning("%s", exc, exc_info=exc.__cause__ is not None)
            for handle in live:
                handle.publish(Failed(str(exc), Reason.CONTROLNET_LOAD_FAILED))
        except torch.OutOfMemoryError:
            self._out_of_memory(live, "loading the model")
        except (OSError, ValueError):
            log.exception("could not prepare model %s", job.model.name)
            for handle in live:
                handle.publish(
                    Failed(
                        f"model {job.model.name!r} could not be loaded; see the server's log",
                        Reason.MODEL_LOAD_FAILED,
                    )
                )
        return None

    def _apply_embeddings(self, live: list[JobHandle], loaded: LoadedPipeline) -> list[JobHandle]:
        """Loads exactly the embeddings the batch's prompts name (jobs that name different
        ones share a batch: embeddings.py). A job whose embedding cannot be used fails with
        LORA_LOAD_FAILED and the file's hash; the others go on without it."""
        while live:
            wanted = {e.sha256: e for h in live for e in h.job.embeddings}
            try:
                self._pipelines.verify_loras(wanted.values(), "embedding")
                loaded.embeddings.apply([EmbeddingSpec.of(e) for e in wanted.values()])
                return live
            except AdapterLoadError as exc:
                failed = [h for h in live if any(e.sha256 == exc.sha256 for e in h.job.embeddings)]
                if not failed:  # not one file's fault
                    failed = [h for h in live if h.job.embeddings]
                for handle in failed:
                    handle.publish(Failed(str(exc), Reason.LORA_LOAD_FAILED, exc.sha256))
                live = [h for h in live if h not in failed]
        return live

    def _warn_if_slow(self, live: Sequence[JobHandle], loaded: LoadedPipeline) -> bool:
        """A job on a model never timed here was queued without an estimate. Two steps at
        each of two small sizes time it (milliseconds on a GPU, a few seconds for the
        placeholder on a CPU), so the jobs hear a warning, as a last `queued` event, before
        minutes of work start. False when the device ran out of memory (the batch is failed)."""
        import torch

        job = live[0].job
        larger = job.width * job.height > max(self._calibration_sides, default=0) ** 2
        if not larger or job.model.name in self._timed or self._costs.estimate(job) is not None:
            return True  # the jobs were queued with an estimate, or need none
        self._timed.add(job.model.name)  # once per model, whether or not it works
        try:
            self._calibrate(loaded, job)
        except torch.OutOfMemoryError:
            self._out_of_memory(live, "denoising")
            return False
        except Exception:  # only an estimate: the batch itself will show what is wrong
            log.exception("could not time a step of %s", job.model.name)
        for handle in live:
            seconds, warning = self._estimate(handle.job)
            if warning:
                handle.publish(Queued(0, seconds, warning))
        return True

    def _calibrate(self, loaded: LoadedPipeline, job: GenerationJob) -> None:
        import torch

        marks: list[float] = []

        def on_step(_pipe: Any, _i: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            marks.append(time.monotonic())
            return tensors

        for side in self._calibration_sides:
            probe = replace(
                job,
                width=side,
                height=side,
                steps=2,
                num_images=1,
                init_image=None,  # timed as text to image
                mask_image=None,
                strength=0.0,
                hires=None,
                controls=(),
            )
            marks.clear()
            (group,) = loaded.family.encode(loaded.pipe, [job.prompt], [job.negative_prompt])
            rows = BatchRows(
                prompts=[job.prompt],
                negative_prompts=[job.negative_prompt],
                job=probe,
                generators=[torch.Generator(device="cpu").manual_seed(0)],
                conditioning=group.kwargs,
            )
            if loaded.inpainting:
                rows = as_inpainting(rows)
            loaded.family.denoise(loaded.for_mode(rows.call.mode), rows, on_step)
            if len(marks) >= 2:  # between the two step ends: one step, nothing else
                self._costs.record(job.model.name, side * side, 1, 1, marks[-1] - marks[-2])

    def _deliver(self, handle: JobHandle, index: int, image: Any, loaded: LoadedPipeline) -> None:
        self._send(handle, index, encode_image(image, handle.job, index, loaded))

    def _send(self, handle: JobHandle, index: int, data: bytes) -> None:
        """Keeps the encoded image and streams it in chunks, then its checksum record."""
        job = handle.job
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
                    Reason.OUT_OF_DEVICE_MEMORY,
                )
            )
        self._pipelines.restore_base_weights()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class _Interrupted(Exception):
    """Raised from the step callback: diffusers' interrupt flag would still decode."""


class _StepWatcher:
    """diffusers' callback_on_step_end for one batch: reports progress, honours cancellation
    (stopping the call once every job is cancelled), publishes previews, and marks when the
    steps ran, to split prompt encoding from denoising. With hires fix it follows both passes:
    `later` steps are still to come during the first, and `next_pass` counts on from it."""

    def __init__(
        self,
        live: Sequence[JobHandle],
        rows: Sequence[Row],
        family: ModelFamily,
        started: float,
        steps: int,
        later: int = 0,
    ) -> None:
        self._live = live
        self._rows = rows
        self._family = family
        self._started = started
        self._steps = steps
        self._later = later
        self._offset = 0  # steps of the passes before this one
        self._done = 0  # steps of this pass
        job = rows[0][0].job if rows else None
        self._size = (job.width, job.height) if job is not None else (0, 0)  # this pass's
        self.first_step: float | None = None
        self.last_step: float | None = None

    def next_pass(self, width: int, height: int) -> None:
        self._offset += self._done
        self._done = 0
        self._later = 0
        self._size = (width, height)

    def __call__(
        self, pipe: Any, step: int, _timestep: Any, tensors: dict[str, Any]
    ) -> dict[str, Any]:
        now = time.monotonic()
        if self.first_step is None:
            self.first_step = now
        self.last_step = now
        active = [h for h in self._live if not h.cancelled]
        for handle in self._live:
            if handle.cancelled:
                handle.publish(Cancelled())
        if not active:
            raise _Interrupted
        self._done = step + 1
        done = self._offset + self._done
        # The loop runs once per scheduler timestep: PLMS adds one, Heun nearly doubles
        # them, so the scheduler's count is the honest total. img2img runs only the last
        # `strength` of them: the pipeline's own count of the loop it is in, where it has one.
        in_pass = (
            getattr(pipe, "num_timesteps", 0)
            or len(getattr(pipe.scheduler, "timesteps", ()))
            or self._steps
        )
        total = self._offset + in_pass + self._later
        for handle in active:
            handle.publish(Progress(done, max(total, done), now - self._started))
        latents = tensors.get("latents")
        if latents is not None and any(h.job.preview_every for h, _ in self._rows):
            latents = self._family.preview_latents(pipe, latents, *self._size)
        for row, (handle, index) in enumerate(self._rows):
            every = handle.job.preview_every
            due = bool(every) and done % every == 0 and done < total
            if due and latents is not None and not handle.cancelled:
                jpeg = preview_jpeg(
                    latents[row], self._family.preview_factors, self._family.preview_bias
                )
                handle.publish(Preview(index, done, jpeg))
        return tensors

    def denoising_span(self, denoised: float) -> tuple[float, float]:
        """(start, end) of denoising. The callback fires after a step, so the first mark
        includes step 1; one average step is taken off it to split prompt encoding from
        denoising."""
        last = denoised if self.last_step is None else self.last_step
        first = self._started if self.first_step is None else self.first_step
        if self._steps > 1 and last > first:
            first = max(self._started, first - (last - first) / (self._steps - 1))
        return first, last


_T = TypeVar("_T")
# What preparing a mixed batch gives: the pipeline and its plan, or why not.
_Mixed = tuple[LoadedPipeline, MixedPlan] | NotMixable | AdapterLoadError


# A job's LoRA set: its files and weights, in any order.
_LoraKey = tuple[tuple[str, float], ...]


def _lora_key(handle: JobHandle) -> _LoraKey:
    return tuple(sorted((x.sha256, float(x.weight)) for x in handle.job.loras))


def _lora_sets(live: Sequence[JobHandle]) -> dict[_LoraKey, list[JobHandle]]:
    """The jobs by LoRA set, in order of first appearance."""
    sets: dict[_LoraKey, list[JobHandle]] = {}
    for handle in live:
        sets.setdefault(_lora_key(handle), []).append(handle)
    return sets
