"""Proto messages <-> application messages. Pure translation, no decisions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import timestamp_pb2

from loracle.v1 import command_service_pb2 as cmd_pb
from loracle.v1 import query_service_pb2 as qry_pb
from loracle.v1 import types_pb2
from server.application.commands import (
    CatalogRecordInput,
    ControlChoice,
    GenerationRequest,
    HiresRequest,
    ImageInput,
    ImportOutcome,
    ImportTotals,
    ImportUpdate,
    LoraChoice,
    LoRARecommendation,
    UpscaleRequest,
)
from server.application.queries import ModelListing
from server.domain import generation_events as gen
from server.domain.generation import GenerationState, GenerationView
from server.domain.generation_events import GenerationEvent
from server.domain.models import (
    Architecture,
    AuditEntry,
    BaseModelInfo,
    LoraKind,
    LoraSource,
    LoraView,
)
from server.domain.tokens import TokenSigner

_ARCH = {
    Architecture.UNSPECIFIED: types_pb2.ARCHITECTURE_UNSPECIFIED,
    Architecture.SD1: types_pb2.ARCHITECTURE_SD1,
    Architecture.SD2: types_pb2.ARCHITECTURE_SD2,
    Architecture.SDXL: types_pb2.ARCHITECTURE_SDXL,
    Architecture.SD3: types_pb2.ARCHITECTURE_SD3,
    Architecture.FLUX: types_pb2.ARCHITECTURE_FLUX,
    Architecture.QWEN_IMAGE: types_pb2.ARCHITECTURE_QWEN_IMAGE,
    Architecture.Z_IMAGE: types_pb2.ARCHITECTURE_Z_IMAGE,
    Architecture.OTHER: types_pb2.ARCHITECTURE_OTHER,
}
_SOURCE = {
    LoraSource.FILE: types_pb2.LORA_SOURCE_FILE,
    LoraSource.CATALOG: types_pb2.LORA_SOURCE_CATALOG,
}
_KIND = {
    LoraKind.LORA: types_pb2.LORA_KIND_LORA,
    LoraKind.EMBEDDING: types_pb2.LORA_KIND_EMBEDDING,
}
_KIND_FILTER = {
    types_pb2.LORA_KIND_UNSPECIFIED: None,
    types_pb2.LORA_KIND_LORA: LoraKind.LORA,
    types_pb2.LORA_KIND_EMBEDDING: LoraKind.EMBEDDING,
}
_OUTCOME = {
    ImportOutcome.REGISTERED: cmd_pb.IMPORT_OUTCOME_REGISTERED,
    ImportOutcome.UPDATED: cmd_pb.IMPORT_OUTCOME_UPDATED,
    ImportOutcome.UNCHANGED: cmd_pb.IMPORT_OUTCOME_UNCHANGED,
    ImportOutcome.FAILED: cmd_pb.IMPORT_OUTCOME_FAILED,
    ImportOutcome.MARKED_UNAVAILABLE: cmd_pb.IMPORT_OUTCOME_MARKED_UNAVAILABLE,
}
_FORMATS = {
    types_pb2.IMAGE_FORMAT_UNSPECIFIED: "png",
    types_pb2.IMAGE_FORMAT_PNG: "png",
    types_pb2.IMAGE_FORMAT_JPEG: "jpeg",
    types_pb2.IMAGE_FORMAT_WEBP: "webp",
}


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_FIRST = datetime.min.replace(tzinfo=UTC)
_LAST = datetime.max.replace(tzinfo=UTC)
_SECOND = timedelta(seconds=1)


def time_bound_from_proto(value: timestamp_pb2.Timestamp) -> datetime:
    """A Timestamp used as the bound of a time range, as an aware datetime. Values a datetime
    cannot hold (seconds outside years 1 to 9999, which Timestamp.ToDatetime refuses with a
    ValueError) are clamped to those years: no event lies beyond them, so the range means
    the same. Nanos outside [0, 1e9) carry into the seconds."""
    seconds, nanos = divmod(value.seconds * 10**9 + value.nanos, 10**9)
    if seconds < (_FIRST - _EPOCH) // _SECOND:
        return _FIRST
    if seconds > (_LAST - _EPOCH) // _SECOND:
        return _LAST
    return _EPOCH + timedelta(seconds=seconds, microseconds=nanos // 1000)


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """What `Timestamp.FromDatetime` makes (a naive time taken as UTC), by subtraction: its
    time-tuple route took a third of building a `Lora`."""
    if value is None:
        return None
    delta = (value if value.tzinfo is not None else value.replace(tzinfo=UTC)) - _EPOCH
    return timestamp_pb2.Timestamp(
        seconds=delta.days * 86400 + delta.seconds, nanos=delta.microseconds * 1000
    )


def kind_filter_from_proto(kind: types_pb2.LoraKind.ValueType) -> LoraKind | None:
    """A ListLoras `kind` as a filter (unspecified: every kind). Undefined numbers never get
    here: the enum interceptor refuses them."""
    return _KIND_FILTER.get(kind)


def lora_to_proto(view: LoraView) -> types_pb2.Lora:
    m = view.metadata
    msg = types_pb2.Lora(
        id=view.id,
        name=m.name,
        base_model=types_pb2.BaseModelRef(
            architecture=_ARCH[m.base_model.architecture], lineage=m.base_model.lineage
        ),
        trigger_words=m.trigger_words,
        tags=m.tags,
        description=m.description,
        source=_SOURCE[view.source],
        source_id=view.source_id,
        available=view.available,
        downloads=m.downloads,
        file_name=m.file_name,
        training_tags=[types_pb2.TagCount(tag=t, count=c) for t, c in m.training_tags],
        rank=m.rank,
        create_time=timestamp(view.create_time),
        update_time=timestamp(view.update_time),
        version=view.version,
        kind=_KIND[m.kind],
    )
    if m.preferred_weight is not None:
        msg.preferred_weight = m.preferred_weight
    if view.file is not None:
        msg.file.CopyFrom(
            types_pb2.LoraFile(
                path=view.file.path,
                size_bytes=view.file.size_bytes,
                sha256=view.file.sha256,
                autov2=view.file.autov2,
                modified_time=timestamp(view.file.modified_time),
            )
        )
    return msg


def base_model_to_proto(info: BaseModelInfo) -> types_pb2.BaseModel:
    return types_pb2.BaseModel(
        name=info.config.name,
        architecture=_ARCH[info.config.architecture],
        path=str(info.config.path),
        ready=info.ready,
        error=info.error,
        default_scheduler=info.default_scheduler,
        dtype=info.dtype,
        is_placeholder=info.config.placeholder,
        inpainting=info.inpainting,
        default_width=info.defaults.width,
        default_height=info.defaults.height,
        default_steps=info.defaults.steps,
        default_guidance_scale=info.defaults.guidance_scale,
        schedulers=info.schedulers,
        takes_negative_prompt=info.takes_negative_prompt,
        weights_bytes=info.weights_bytes,
        size_multiple=info.size_multiple,
        hires_fix=info.hires_fix,
    )


def model_listing_to_proto(listing: ModelListing) -> qry_pb.ListBaseModelsResponse:
    return qry_pb.ListBaseModelsResponse(
        models=[base_model_to_proto(m) for m in listing.models],
        controlnets=[
            types_pb2.ControlNet(
                name=c.config.name,
                architecture=_ARCH[c.config.architecture],
                path=str(c.config.path),
                ready=c.ready,
                error=c.error,
            )
            for c in listing.controlnets
        ],
        upscalers=[
            *(
                types_pb2.Upscaler(name=u.name, latent=u.latent, ready=True)
                for u in listing.upscalers
            ),
            *(
                types_pb2.Upscaler(
                    name=u.config.name,
                    path=str(u.config.path),
                    ready=u.ready,
                    error=u.error,
                    scale=u.scale,
                    architecture=u.architecture,
                )
                for u in listing.upscaler_models
            ),
        ],
    )


def recommendation_to_proto(rec: LoRARecommendation) -> types_pb2.Recommendation:
    return types_pb2.Recommendation(
        lora=lora_to_proto(rec.lora),
        confidence=rec.confidence,
        weight=rec.weight,
        trigger_words=rec.trigger_words,
        reasons=rec.reasons,
    )


def audit_to_proto(entry: AuditEntry) -> types_pb2.AuditEvent:
    import json

    return types_pb2.AuditEvent(
        position=entry.position,
        aggregate_id=entry.aggregate_id,
        aggregate_version=entry.aggregate_version,
        type=entry.type,
        principal=entry.principal,
        request_id=entry.request_id,
        occur_time=timestamp(entry.occurred_at),
        data_json=json.dumps(entry.data, default=str, sort_keys=True),
    )


def totals_to_proto(t: ImportTotals) -> cmd_pb.ImportProgress:
    return cmd_pb.ImportProgress(
        files_total=t.files_total,
        files_done=t.files_done,
        registered=t.registered,
        updated=t.updated,
        unchanged=t.unchanged,
        failed=t.failed,
        marked_unavailable=t.marked_unavailable,
    )


def import_update_to_proto(update: ImportUpdate, tokens: TokenSigner) -> cmd_pb.ImportLorasResponse:
    msg = cmd_pb.ImportLorasResponse(progress=totals_to_proto(update.totals), done=update.done)
    if update.file is not None:
        msg.file.CopyFrom(
            cmd_pb.ImportFileResult(
                path=update.file.path,
                outcome=_OUTCOME[update.file.outcome],
                lora_id=update.file.lora_id,
                error=update.file.error,
            )
        )
    if update.done:
        msg.consistency_token = token_for(update.position, tokens)
    return msg


def catalog_record_from_proto(r: cmd_pb.CatalogRecord) -> CatalogRecordInput:
    return CatalogRecordInput(
        source_id=r.source_id,
        name=r.name,
        base_model=r.base_model,
        tags=tuple(r.tags),
        trigger_words=tuple(r.trigger_words),
        file_name=r.file_name,
        description=r.description,
        downloads=r.downloads,
    )


def upscale_request_from_proto(request: cmd_pb.UpscaleImageRequest) -> UpscaleRequest:
    return UpscaleRequest(
        image=_image_input(request, "image"),
        upscaler=request.upscaler,
        scale=request.scale,
        output_format=_FORMATS.get(request.output_format, "png"),
        chunk_size_bytes=request.chunk_size_bytes,
    )


def generation_request_from_proto(spec: types_pb2.GenerationSpec) -> GenerationRequest:
    return GenerationRequest(
        upscale_given=spec.HasField("upscale"),
        model=spec.model,
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt,
        width=spec.width,
        height=spec.height,
        steps=spec.steps,
        guidance_scale=spec.guidance_scale if spec.HasField("guidance_scale") else None,
        true_cfg_scale=spec.true_cfg_scale if spec.HasField("true_cfg_scale") else None,
        seed=spec.seed if spec.HasField("seed") else None,
        num_images=spec.num_images or 1,
        scheduler=spec.scheduler,
        loras=tuple(
            LoraChoice(s.lora, s.weight if s.HasField("weight") else None) for s in spec.loras
        ),
        output_format=_FORMATS.get(spec.output_format, "png"),
        preview_every_n_steps=spec.preview_every_n_steps,
        chunk_size_bytes=spec.chunk_size_bytes,
        init_image=_image_input(spec, "init_image"),
        strength=spec.strength if spec.HasField("strength") else None,
        mask_image=_image_input(spec, "mask_image"),
        mask_blur=spec.mask_blur if spec.HasField("mask_blur") else None,
        inpaint_only_masked=spec.inpaint_only_masked,
        inpaint_padding=spec.inpaint_padding if spec.HasField("inpaint_padding") else None,
        hires=_hires(spec),
        controls=tuple(
            ControlChoice(
                controlnet=c.controlnet,
                image=_image_input(c, "image"),
                conditioning_scale=(
                    c.conditioning_scale if c.HasField("conditioning_scale") else None
                ),
                guidance_start=c.guidance_start,
                guidance_end=c.guidance_end if c.HasField("guidance_end") else None,
            )
            for c in spec.controls
        ),
    )


def _hires(spec: types_pb2.GenerationSpec) -> HiresRequest | None:
    if not spec.HasField("hires"):
        return None
    given = spec.hires
    return HiresRequest(
        scale=given.scale,
        steps=given.steps,
        denoising_strength=(
            given.denoising_strength if given.HasField("denoising_strength") else None
        ),
        upscaler=given.upscaler,
    )


def _recorded_hires(record: object) -> types_pb2.HiresFix | None:
    if not isinstance(record, dict):
        return None
    return types_pb2.HiresFix(
        scale=float(record["scale"]),
        steps=int(record["steps"]),
        denoising_strength=float(record["denoising_strength"]),
        upscaler=str(record["upscaler"]),
    )


def _recorded_upscale(record: object) -> types_pb2.UpscaleSpec | None:
    if not isinstance(record, dict):
        return None
    return types_pb2.UpscaleSpec(upscaler=str(record["upscaler"]), scale=float(record["scale"]))


def _recorded_control(record: dict[str, Any]) -> types_pb2.ControlInput:
    return types_pb2.ControlInput(
        controlnet=str(record["controlnet"]),
        image=_recorded_image(record["image"]),
        conditioning_scale=float(record["conditioning_scale"]),
        guidance_start=float(record["guidance_start"]),
        guidance_end=float(record["guidance_end"]),
    )


def _image_input(
    spec: types_pb2.GenerationSpec | types_pb2.ControlInput | cmd_pb.UpscaleImageRequest,
    name: str,
) -> ImageInput | None:
    """An InputImage field as the request's ImageInput; None when unset (a set but empty one
    is an empty image, which validation names)."""
    if not spec.HasField(name):  # type: ignore[arg-type]
        return None
    given: types_pb2.InputImage = getattr(spec, name)
    if given.HasField("generated"):
        return ImageInput(
            generation_id=given.generated.generation_id,
            image_index=given.generated.image_index,
        )
    return ImageInput(data=given.data)


def _recorded_image(record: object) -> types_pb2.InputImage | None:
    if not isinstance(record, dict):
        return None
    out = types_pb2.InputImage(sha256=str(record.get("sha256", "")))
    if record.get("generation_id"):
        out.generated.generation_id = str(record["generation_id"])
        out.generated.image_index = int(record.get("image_index", 0))
    return out


def generation_event_to_proto(event: GenerationEvent) -> types_pb2.GenerationEvent:
    msg = types_pb2.GenerationEvent(generation_id=event.generation_id, sequence=event.sequence)
    p = event.payload
    if isinstance(p, gen.Queued):
        msg.queued.position = p.position
        msg.queued.estimated_seconds = p.estimated_seconds
        msg.queued.warning = p.warning
    elif isinstance(p, gen.Started):
        msg.started.batch_size = p.batch_size
    elif isinstance(p, gen.Progress):
        msg.progress.CopyFrom(
            types_pb2.GenerationEvent.Progress(
                step=p.step, total_steps=p.total_steps, elapsed_seconds=p.elapsed_seconds
            )
        )
    elif isinstance(p, gen.Preview):
        msg.preview.CopyFrom(
            types_pb2.GenerationEvent.Preview(image_index=p.image_index, step=p.step, jpeg=p.jpeg)
        )
    elif isinstance(p, gen.ImageChunk):
        msg.image_chunk.CopyFrom(
            types_pb2.GenerationEvent.ImageChunk(
                image_index=p.image_index, offset=p.offset, data=p.data, last=p.last
            )
        )
    elif isinstance(p, gen.ImageComplete):
        msg.image_complete.CopyFrom(
            types_pb2.ImageInfo(
                index=p.image_index,
                sha256=p.sha256,
                size_bytes=p.size_bytes,
                mime_type=p.mime_type,
                seed=p.seed,
            )
        )
    elif isinstance(p, gen.Completed):
        t = p.timings
        msg.completed.timings.CopyFrom(
            types_pb2.StageTimings(
                queue_seconds=t.queue_seconds,
                text_encoding_seconds=t.text_encoding_seconds,
                denoising_seconds=t.denoising_seconds,
                decoding_seconds=t.decoding_seconds,
            )
        )
    elif isinstance(p, gen.Failed):
        msg.failed.error = p.error
    else:
        msg.cancelled.SetInParent()
    return msg


_STATES = {
    GenerationState.QUEUED: types_pb2.GENERATION_STATE_QUEUED,
    GenerationState.RUNNING: types_pb2.GENERATION_STATE_RUNNING,
    GenerationState.SUCCEEDED: types_pb2.GENERATION_STATE_SUCCEEDED,
    GenerationState.FAILED: types_pb2.GENERATION_STATE_FAILED,
    GenerationState.CANCELLED: types_pb2.GENERATION_STATE_CANCELLED,
}
STATE_NAMES = {v: k.value for k, v in _STATES.items()}
_FORMAT_ENUMS = {name: value for value, name in _FORMATS.items()}


def generation_to_proto(view: GenerationView) -> types_pb2.Generation:
    spec: dict[str, Any] = view.spec
    msg = types_pb2.Generation(
        id=view.id,
        state=_STATES[view.state],
        owner=view.owner,
        spec=types_pb2.GenerationSpec(
            model=str(spec.get("model", "")),
            prompt=str(spec.get("prompt", "")),
            negative_prompt=str(spec.get("negative_prompt", "")),
            width=int(spec.get("width", 0)),
            height=int(spec.get("height", 0)),
            steps=int(spec.get("steps", 0)),
            guidance_scale=float(spec.get("guidance_scale", 0.0)),
            true_cfg_scale=float(spec["true_cfg_scale"]) if "true_cfg_scale" in spec else None,
            seed=int(spec.get("seed", 0)),
            num_images=int(spec.get("num_images", 1)),
            scheduler=str(spec.get("scheduler", "")),
            loras=[
                types_pb2.LoraSelection(lora=str(item["lora"]), weight=float(item["weight"]))
                for item in spec.get("loras", ())
            ],
            output_format=_FORMAT_ENUMS.get(
                str(spec.get("output_format", "png")), types_pb2.IMAGE_FORMAT_PNG
            ),
            preview_every_n_steps=int(spec.get("preview_every_n_steps", 0)),
            chunk_size_bytes=int(spec.get("chunk_size_bytes", 0)),
            init_image=_recorded_image(spec.get("init_image")),
            strength=float(spec["strength"]) if "strength" in spec else None,
            mask_image=_recorded_image(spec.get("mask_image")),
            mask_blur=int(spec["mask_blur"]) if "mask_blur" in spec else None,
            inpaint_only_masked=bool(spec.get("inpaint_only_masked", False)),
            inpaint_padding=int(spec["inpaint_padding"]) if "inpaint_padding" in spec else None,
            hires=_recorded_hires(spec.get("hires")),
            controls=[_recorded_control(c) for c in spec.get("controls", ())],
            upscale=_recorded_upscale(spec.get("upscale")),
        ),
        images=[
            types_pb2.ImageInfo(
                index=i.index,
                sha256=i.sha256,
                size_bytes=i.size_bytes,
                mime_type=i.mime_type,
                seed=i.seed,
            )
            for i in view.images
        ],
        error=view.error,
        create_time=timestamp(view.create_time),
        end_time=timestamp(view.end_time),
    )
    if view.timings:
        msg.timings.CopyFrom(
            types_pb2.StageTimings(**{k: float(v) for k, v in view.timings.items()})
        )
    return msg


def token_for(position: int, tokens: TokenSigner) -> str:
    """Consistency tokens are opaque to clients: a signed log position ("" for none)."""
    return tokens.consistency_token(position)


def position_from_token(token: str, tokens: TokenSigner) -> int:
    """The log position a client's consistency token names (0 for none); a token this
    deployment did not sign is InvalidTokenError before anything parses it."""
    return tokens.consistency_position(token)
