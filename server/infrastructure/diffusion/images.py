"""Finished images: encoded with the metadata that makes them reproducible (A1111's
`parameters` text and Loracle's JSON manifest), and kept on disk
(<data dir>/generations/<id>/<index>.<ext>), so WatchGeneration can replay a generation after
its in-memory stream is gone, until the retention period ends."""

from __future__ import annotations

import io
import json
import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.domain.generation_job import GenerationJob
from server.domain.recommend.prompt import parse_prompt
from server.domain.schedulers import a1111_label

if TYPE_CHECKING:
    from server.infrastructure.diffusion.pipelines import LoadedPipeline

log = logging.getLogger("loracle.images")

VERSION = "loracle 0.1.0"
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
# The spec's img2img and inpainting fields, as the manifest repeats them (input images by
# SHA-256, and the earlier image each is, if it is one).
IMAGE_FIELDS = (
    "hires",
    "init_image",
    "strength",
    "mask_image",
    "mask_blur",
    "inpaint_only_masked",
    "inpaint_padding",
)


class ImageStore:
    def __init__(
        self,
        root: Path,
        *,
        retention_seconds: float = 24 * 3600,
        sweep_interval_seconds: float = 60.0,
    ) -> None:
        self._root = root
        self._retention = retention_seconds
        self._sweep_interval = sweep_interval_seconds
        self._last_sweep = float("-inf")

    def _folder(self, generation_id: str) -> Path:
        # Ids are server-made UUIDs; refuse anything else rather than build a path from it.
        if not generation_id or any(c not in "0123456789abcdef-" for c in generation_id):
            raise ValueError("not a generation id")
        return self._root / generation_id

    def save(self, generation_id: str, index: int, mime_type: str, data: bytes) -> Path:
        folder = self._folder(generation_id)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{index}.{EXTENSIONS[mime_type]}"
        partial = path.with_suffix(".part")
        partial.write_bytes(data)
        partial.replace(path)  # readers never see half an image
        return path

    def read(self, generation_id: str, index: int, mime_type: str) -> bytes | None:
        try:
            return (self._folder(generation_id) / f"{index}.{EXTENSIONS[mime_type]}").read_bytes()
        except (OSError, ValueError, KeyError):
            return None

    def sweep_if_due(self) -> int:
        """Sweeps at most once per interval: listing every kept generation after each batch
        would put directory scans on the worker's path for nothing."""
        now = time.monotonic()
        if now - self._last_sweep < self._sweep_interval:
            return 0
        self._last_sweep = now
        return self.sweep()

    def sweep(self, now: float | None = None) -> int:
        """Deletes generations older than the retention period; returns how many."""
        if not self._root.is_dir():
            return 0
        cutoff = (time.time() if now is None else now) - self._retention
        removed = 0
        for folder in self._root.iterdir():
            try:
                if folder.is_dir() and folder.stat().st_mtime < cutoff:
                    shutil.rmtree(folder)
                    removed += 1
            except OSError:
                log.warning("could not remove expired images in %s", folder)
        return removed


def a1111_parameters(
    job: GenerationJob,
    index: int,
    model_hash: str,
    default_scheduler: str,
    controlnet_hashes: Mapping[str, str] | None = None,
    *,
    distilled_guidance: bool = False,
) -> str:
    """The `parameters` text A1111, ComfyUI importers and Civitai read from PNGs (ControlNets
    as sd-webui-controlnet writes them: no preprocessor, so "Module: none")."""
    lines = [prompt_with_lora_tags(job)]
    if job.negative_prompt:
        lines.append(f"Negative prompt: {job.negative_prompt}")
    fields = [
        f"Steps: {job.steps}",
        f"Sampler: {a1111_label(job.scheduler, default_scheduler)}",
        # A guidance-distilled model (FLUX) runs without CFG (unless true CFG is asked for);
        # Forge writes its guidance so.
        f"CFG scale: {job.true_cfg_scale or 1:g}"
        if distilled_guidance
        else f"CFG scale: {job.guidance_scale:g}",
        *([f"Distilled CFG Scale: {job.guidance_scale:g}"] if distilled_guidance else []),
        f"Seed: {job.seed + index}",
        f"Size: {job.width}x{job.height}",
        f"Model hash: {model_hash}",
        f"Model: {job.model.name}",
    ]
    if job.init_image is not None:
        fields.append(f"Denoising strength: {job.strength:g}")
    if job.hires is not None:  # as A1111 writes them; Size stays the first pass's
        fields.append(f"Denoising strength: {job.hires.denoising_strength:g}")
        fields.append(f"Hires upscale: {job.hires.scale:g}")
        if job.hires.steps:
            fields.append(f"Hires steps: {job.hires.steps}")
        fields.append(f"Hires upscaler: {job.hires.upscaler}")
    if job.mask_image is not None:
        fields.append(f"Mask blur: {job.mask_blur}")
        if job.inpaint_only_masked:
            fields += ["Inpaint area: Only masked", f"Masked area padding: {job.inpaint_padding}"]
    if job.loras:
        hashes = ", ".join(
            f"{lora.file_name or lora.name}: {lora.sha256[:12]}" for lora in job.loras
        )
        fields.append(f'Lora hashes: "{hashes}"')
    if job.embeddings:  # A1111's TI hashes: the name and the file's short SHA-256 (12 hex)
        hashes = ", ".join(f"{x.file_name}: {x.sha256[:12]}" for x in job.embeddings)
        fields.append(f'TI hashes: "{hashes}"')
    for i, control in enumerate(job.controls):
        name = control.controlnet.name
        model = f"{name} [{(controlnet_hashes or {}).get(name, '')}]"
        fields.append(
            f'ControlNet {i}: "Module: none, Model: {model}, Weight: {control.scale:g}, '
            f"Resize Mode: Crop and Resize, Guidance Start: {control.guidance_start:g}, "
            f'Guidance End: {control.guidance_end:g}, Control Mode: Balanced"'
        )
    fields.append(f"Version: {VERSION}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def prompt_with_lora_tags(job: GenerationJob) -> str:
    """The prompt as A1111 would have it: a LoRA the request's `loras` field applied (not a
    `<lora:…>` tag already in the prompt) is appended as `<lora:NAME:W>`, so pasting the
    prompt into A1111 applies the same LoRAs."""
    tagged = {tag.name.casefold() for tag in parse_prompt(job.original_prompt).lora_tags}
    extra = [
        f"<lora:{lora.file_name or lora.name}:{lora.weight:g}>"
        for lora in job.loras
        if not {(lora.file_name or lora.name).casefold(), lora.name.casefold()} & tagged
    ]
    return " ".join([job.original_prompt, *extra]) if extra else job.original_prompt


def manifest(job: GenerationJob, index: int, loaded: LoadedPipeline) -> dict[str, Any]:
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
        **({"true_cfg_scale": job.true_cfg_scale} if job.true_cfg_scale else {}),
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
        "embeddings": [
            {"id": x.lora_id, "name": x.file_name, "sha256": x.sha256} for x in job.embeddings
        ],
        "mode": job.mode,
        **{k: v for k, v in job.spec().items() if k in IMAGE_FIELDS},
        "controls": [
            c.record() | {"hash": loaded.controlnet_hashes.get(c.controlnet.name, "")}
            for c in job.controls
        ],
        "versions": {
            "loracle": VERSION,
            "diffusers": diffusers.__version__,
            "torch": torch.__version__,
        },
    }


def encode_upscaled(image: Any, job: GenerationJob) -> bytes:
    """An upscaled image, as A1111's Extras saves one: the input's `parameters` kept (so
    PNG Info still shows how it was made), `postprocessing` saying how it was upscaled, and
    Loracle's manifest."""
    import PIL
    import torch
    from PIL import Image, PngImagePlugin

    spec, source = job.upscale, job.init_image
    assert spec is not None
    assert source is not None
    with Image.open(io.BytesIO(source.data)) as original:
        parameters = original.info.get("parameters")
    postprocessing = (
        f"Postprocess upscale by: {spec.scale:g}, Postprocess upscaler: {spec.upscaler}"
    )
    document = {
        "generation_id": job.generation_id,
        "mode": job.mode,
        "upscale": spec.record(),
        "init_image": source.record(),
        "size": [job.width, job.height],
        "versions": {"loracle": VERSION, "pillow": PIL.__version__, "torch": torch.__version__},
    }
    buffer = io.BytesIO()
    if job.output_format == "png":
        info = PngImagePlugin.PngInfo()
        if isinstance(parameters, str):
            info.add_text("parameters", parameters)
        info.add_text("postprocessing", postprocessing)
        info.add_text("loracle", json.dumps(document, sort_keys=True))
        image.save(buffer, format="PNG", pnginfo=info)
    else:
        exif = image.getexif()
        exif[0x9286] = "\n".join(x for x in (parameters, postprocessing) if isinstance(x, str))
        image.save(buffer, format=job.output_format.upper(), quality=95, exif=exif)
    return buffer.getvalue()


def encode_image(image: Any, job: GenerationJob, index: int, loaded: LoadedPipeline) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    buffer = io.BytesIO()
    parameters = a1111_parameters(
        job,
        index,
        loaded.model_hash,
        loaded.default_scheduler,
        loaded.controlnet_hashes,
        distilled_guidance=loaded.family.distilled_guidance,
    )
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
