"""Jobs and job events as broker messages. A job names its model and LoRA files by name and
catalog-relative path: each machine resolves them under its own roots."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.domain.batching import BatchKey, batch_key
from server.domain.errors import Reason
from server.domain.generation_events import (
    FAILURE_REASONS,
    Cancelled,
    Completed,
    Failed,
    ImageChunk,
    ImageComplete,
    Payload,
    Preview,
    Progress,
    Queued,
    Started,
    Timings,
)
from server.domain.generation_job import (
    ControlInput,
    GenerationJob,
    HiresFix,
    InputImage,
    ResolvedLora,
    UpscaleJob,
)
from server.domain.models import BaseModelConfig, ControlNetConfig, UpscalerModelConfig
from server.domain.upscalers import find_upscaler
from server.infrastructure.broker.port import EventRecord


@dataclass(frozen=True, slots=True)
class Who:
    """Who asked, carried with the job so whichever replica records its outcome can say so."""

    principal: str = ""
    request_id: str = ""
    prompt: str = ""
    lora_ids: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "principal": self.principal,
            "request_id": self.request_id,
            "prompt": self.prompt,
            "lora_ids": list(self.lora_ids),
        }

    @staticmethod
    def from_dict(doc: Any) -> Who:
        doc = doc if isinstance(doc, dict) else {}
        return Who(
            str(doc.get("principal", "")),
            str(doc.get("request_id", "")),
            str(doc.get("prompt", "")),
            tuple(str(x) for x in doc.get("lora_ids", ())),
        )


@dataclass(frozen=True, slots=True)
class JobMessage:
    """A queued job as a worker receives it (the model by name, LoRAs by relative path)."""

    generation_id: str
    model: str
    fields: dict[str, Any]
    loras: tuple[ResolvedLora, ...]
    who: Who
    # As the replica derived it (server.domain.batching): jobs with equal keys batch.
    batch_key: BatchKey = ""
    # The submitter, so the job's handle on the worker answers only to it (and admins).
    owner: str = ""
    # The textual-inversion embeddings its prompts name, by relative path as LoRAs travel.
    embeddings: tuple[ResolvedLora, ...] = ()

    @property
    def num_images(self) -> int:
        return int(self.fields.get("num_images", 1))

    @property
    def chunk_size(self) -> int:
        """The chunk size the client asked for (the broker carries bigger pieces)."""
        return int(self.fields.get("chunk_size", 64 * 1024))

    @property
    def upscaler_model(self) -> str:
        """The upscaler model the hires fix or the upscale names ("" for none or a built-in
        upscaler)."""
        given = self.fields.get("hires") or self.fields.get("upscale")
        name = str(given.get("upscaler", "")) if isinstance(given, dict) else ""
        return "" if find_upscaler(name) is not None else name

    @property
    def is_upscale(self) -> bool:
        """An upscale (UpscaleImage): it runs no base model."""
        return isinstance(self.fields.get("upscale"), dict)

    @property
    def controlnet_names(self) -> list[str]:
        return [str(c["controlnet"]) for c in self.fields.get("controls", ())]

    def job(
        self,
        model: BaseModelConfig,
        loras: tuple[ResolvedLora, ...],
        chunk_size: int,
        embeddings: tuple[ResolvedLora, ...] = (),
        controlnets: Mapping[str, ControlNetConfig] | None = None,
        upscalers: Mapping[str, UpscalerModelConfig] | None = None,
    ) -> GenerationJob:
        """The job again, on the machine that runs it: with that machine's model config,
        LoRA (and embedding) paths and ControlNets (by name), and the chunk size the broker
        carries."""
        f = self.fields
        found = controlnets or {}
        return GenerationJob(
            generation_id=self.generation_id,
            model=model,
            prompt=str(f["prompt"]),
            original_prompt=str(f["original_prompt"]),
            negative_prompt=str(f.get("negative_prompt", "")),
            width=int(f["width"]),
            height=int(f["height"]),
            steps=int(f["steps"]),
            guidance_scale=float(f["guidance_scale"]),
            true_cfg_scale=float(f.get("true_cfg_scale", 0.0)),
            seed=int(f["seed"]),
            num_images=self.num_images,
            scheduler=str(f.get("scheduler", "")),
            loras=loras,
            output_format=str(f.get("output_format", "png")),
            chunk_size=chunk_size,
            preview_every=int(f.get("preview_every", 0)),
            owner=self.owner,
            init_image=_image_from(f.get("init_image")),
            strength=float(f.get("strength", 0.0)),
            mask_image=_image_from(f.get("mask_image")),
            mask_blur=int(f.get("mask_blur", 0)),
            inpaint_only_masked=bool(f.get("inpaint_only_masked", False)),
            inpaint_padding=int(f.get("inpaint_padding", 0)),
            hires=_hires_from(f.get("hires"), upscalers or {}),
            upscale=_upscale_from(f.get("upscale"), upscalers or {}),
            embeddings=embeddings,
            controls=tuple(
                ControlInput(
                    controlnet=found[str(c["controlnet"])],
                    image=_required_image(c["image"]),
                    scale=float(c["conditioning_scale"]),
                    guidance_start=float(c["guidance_start"]),
                    guidance_end=float(c["guidance_end"]),
                )
                for c in f.get("controls", ())
            ),
        )


def encode_job(job: GenerationJob, who: Who) -> bytes:
    """LoRA paths travel relative to the catalog roots."""
    doc = {
        "generation_id": job.generation_id,
        "model": job.model.name,
        "fields": {
            "prompt": job.prompt,
            "original_prompt": job.original_prompt,
            "negative_prompt": job.negative_prompt,
            "width": job.width,
            "height": job.height,
            "steps": job.steps,
            "guidance_scale": job.guidance_scale,
            **({"true_cfg_scale": job.true_cfg_scale} if job.true_cfg_scale else {}),
            "seed": job.seed,
            "num_images": job.num_images,
            "scheduler": job.scheduler,
            "output_format": job.output_format,
            "chunk_size": job.chunk_size,
            "preview_every": job.preview_every,
            **_image_fields(job),
            **_control_fields(job),
        },
        "loras": [_file_doc(x) for x in job.loras],
        "embeddings": [_file_doc(x) for x in job.embeddings],
        "who": who.to_dict(),
        "batch_key": batch_key(job),
        "owner": job.owner,
    }
    return json.dumps(doc).encode()


def _file_doc(x: ResolvedLora) -> dict[str, Any]:
    return {
        "lora_id": x.lora_id,
        "name": x.name,
        "file_name": x.file_name,
        "sha256": x.sha256,
        "file_path": x.file_path or x.path.name,
        "weight": x.weight,
    }


def _file_from(x: dict[str, Any]) -> ResolvedLora:
    return ResolvedLora(
        lora_id=str(x["lora_id"]),
        name=str(x["name"]),
        file_name=str(x["file_name"]),
        sha256=str(x["sha256"]),
        path=Path(str(x["file_path"])),
        weight=float(x["weight"]),
        file_path=str(x["file_path"]),
    )


def _image_fields(job: GenerationJob) -> dict[str, Any]:
    """A job's input images travel inside the job message (base64), with their settings;
    none for text to image."""
    if job.hires is not None:
        return {"hires": job.hires.record()}
    if job.init_image is None:
        return {}
    if job.upscale is not None:
        return {"init_image": _image_doc(job.init_image), "upscale": job.upscale.record()}
    out: dict[str, Any] = {"init_image": _image_doc(job.init_image), "strength": job.strength}
    if job.mask_image is not None:
        out |= {
            "mask_image": _image_doc(job.mask_image),
            "mask_blur": job.mask_blur,
            "inpaint_only_masked": job.inpaint_only_masked,
            "inpaint_padding": job.inpaint_padding,
        }
    return out


def _control_fields(job: GenerationJob) -> dict[str, Any]:
    """ControlNets travel by name (a worker has its own paths), control images inline."""
    if not job.controls:
        return {}
    return {"controls": [c.record() | {"image": _image_doc(c.image)} for c in job.controls]}


def _required_image(doc: Any) -> InputImage:
    image = _image_from(doc)
    if image is None:
        raise ValueError("a control without its image")
    return image


def _image_doc(image: InputImage) -> dict[str, Any]:
    return {**image.record(), "data": base64.b64encode(image.data).decode("ascii")}


def _image_from(doc: Any) -> InputImage | None:
    if not isinstance(doc, dict):
        return None
    return InputImage(
        data=base64.b64decode(str(doc["data"])),
        sha256=str(doc["sha256"]),
        width=int(doc["width"]),
        height=int(doc["height"]),
        generation_id=str(doc.get("generation_id", "")),
        image_index=int(doc.get("image_index", 0)),
    )


def _upscale_from(doc: Any, upscalers: Mapping[str, UpscalerModelConfig]) -> UpscaleJob | None:
    if not isinstance(doc, dict):
        return None
    name = str(doc["upscaler"])
    return UpscaleJob(upscaler=name, scale=float(doc["scale"]), model=upscalers.get(name))


def _hires_from(doc: Any, upscalers: Mapping[str, UpscalerModelConfig]) -> HiresFix | None:
    if not isinstance(doc, dict):
        return None
    return HiresFix(
        scale=float(doc["scale"]),
        steps=int(doc["steps"]),
        denoising_strength=float(doc["denoising_strength"]),
        upscaler=str(doc["upscaler"]),
        model=upscalers.get(str(doc["upscaler"])),
        multiple=int(doc.get("multiple", 8)),
    )


def decode_job(body: bytes) -> JobMessage:
    doc = json.loads(body)
    loras = tuple(_file_from(x) for x in doc["loras"])
    embeddings = tuple(_file_from(x) for x in doc.get("embeddings", ()))
    return JobMessage(
        str(doc["generation_id"]), str(doc["model"]), dict(doc["fields"]), loras,
        Who.from_dict(doc.get("who")), str(doc["batch_key"]), str(doc.get("owner", "")),
        embeddings,
    )  # fmt: skip


def image_meta(image: ImageComplete) -> dict[str, Any]:
    return {
        "index": image.image_index,
        "sha256": image.sha256,
        "size": image.size_bytes,
        "mime": image.mime_type,
        "seed": image.seed,
    }


def image_from_meta(doc: dict[str, Any]) -> ImageComplete:
    return ImageComplete(
        int(doc["index"]), str(doc["sha256"]), int(doc["size"]), str(doc["mime"]), int(doc["seed"])
    )


def to_record(
    generation_id: str,
    attempt: int,
    payload: Payload,
    *,
    images: list[ImageComplete] | None = None,
    who: Who | None = None,
) -> EventRecord:
    """A payload as an event record; state events carry who asked and, when final, the
    records of every image the job produced."""
    meta: dict[str, Any] = {}
    data = b""
    kind: str
    match payload:
        case Queued(position, estimated, warning):
            kind = "queued"
            meta = {"position": position, "estimated": estimated, "warning": warning}
        case Started(batch_size):
            kind, meta = "started", {"batch_size": batch_size}
        case Progress(step, total, elapsed):
            kind, meta = "progress", {"step": step, "total": total, "elapsed": elapsed}
        case Preview(index, step, jpeg):
            kind, meta, data = "preview", {"index": index, "step": step}, jpeg
        case ImageChunk(index, offset, piece, last):
            kind, meta, data = "chunk", {"index": index, "offset": offset, "last": last}, piece
        case ImageComplete():
            kind, meta = "image", image_meta(payload)
        case Completed(t):
            kind, meta = "completed", {"timings": t.to_dict()}
        case Failed(error, reason, lora_sha256):
            kind, meta = "failed", {"error": error, "reason": reason, "lora_sha256": lora_sha256}
        case Cancelled():
            kind = "cancelled"
    if who is not None:
        meta["who"] = who.to_dict()
    if images is not None:
        meta["images"] = [image_meta(i) for i in images]
    return EventRecord(generation_id, kind, attempt, meta, data)


def to_payload(record: EventRecord) -> Payload | None:
    m = record.meta
    match record.kind:
        case "queued":
            return Queued(int(_num(m, "position")), _num(m, "estimated"), str(m.get("warning", "")))
        case "started":
            return Started(int(_num(m, "batch_size")))
        case "progress":
            return Progress(int(_num(m, "step")), int(_num(m, "total")), _num(m, "elapsed"))
        case "preview":
            return Preview(int(_num(m, "index")), int(_num(m, "step")), record.data)
        case "chunk":
            return ImageChunk(
                int(_num(m, "index")), int(_num(m, "offset")), record.data, bool(m.get("last"))
            )
        case "image":
            return image_from_meta(m)
        case "completed":
            t = m.get("timings")
            return Completed(Timings.from_dict(t if isinstance(t, dict) else {}))
        case "failed":
            return Failed(
                str(m.get("error", "")), _failure_reason(m), str(m.get("lora_sha256", ""))
            )
        case "cancelled":
            return Cancelled()
    return None


def recorded_images(record: EventRecord) -> list[ImageComplete]:
    images = record.meta.get("images")
    return [image_from_meta(i) for i in images] if isinstance(images, list) else []


def _num(meta: dict[str, Any], key: str) -> float:
    value = meta.get(key, 0)
    return float(value) if isinstance(value, (int, float)) else 0.0


def _failure_reason(meta: Mapping[str, object]) -> str:
    """Records before reasons carried `code`, "RESOURCE_EXHAUSTED" only for out of memory."""
    reason = meta.get("reason")
    if isinstance(reason, str) and reason in FAILURE_REASONS:
        return reason
    if meta.get("code") == "RESOURCE_EXHAUSTED":
        return Reason.OUT_OF_DEVICE_MEMORY
    return Reason.GENERATION_FAILED
