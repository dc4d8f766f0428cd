"""The path every generation command shares: validate the request, resolve the model and the
LoRAs (with the architecture check) before anything is queued, record the Submitted event in
the same step that takes a queue slot, and follow the job for its caller."""

from __future__ import annotations

import hashlib
import logging
import random
import uuid
from collections.abc import Callable, Generator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from server.application.commands.idempotency import Replay, note_answer, record_for, replay
from server.application.context import DispatchContext, current_context
from server.application.generation.lifecycle import GenerationRecorder
from server.application.generation.request import (
    DEFAULT_BUILTIN_UPSCALE,
    DEFAULT_CONTROL_SCALE,
    DEFAULT_HIRES_STRENGTH,
    DEFAULT_INPAINT_PADDING,
    DEFAULT_LIMITS,
    DEFAULT_MASK_BLUR,
    DEFAULT_STRENGTH,
    MIME_TYPES,
    GenerationLimits,
    GenerationRequest,
    ImageInput,
    LoraChoice,
    UpscaleRequest,
    family_control_violations,
    fit_size,
    strip_lora_tags,
    validate,
    validate_upscale,
)
from server.application.generation.unloadable import UnloadableLoras
from server.application.ownership import require_visible
from server.application.ports import (
    CatalogRepository,
    Executor,
    GenerationOutcomes,
    ImageReader,
    JobStream,
    LoraFiles,
    LoraLookup,
    ModelLookup,
    StoredImages,
)
from server.domain.embeddings import named_in
from server.domain.errors import (
    DomainError,
    FieldViolation,
    NotFoundError,
    PreconditionError,
    Reason,
    ValidationError,
)
from server.domain.generation import Generation, GenerationView
from server.domain.generation_events import TERMINAL, Failed, GenerationEvent
from server.domain.generation_job import (
    NO_MODEL,
    ControlInput,
    GenerationJob,
    HiresFix,
    InputImage,
    ResolvedLora,
    UpscaleJob,
)
from server.domain.lora import CommandRecord
from server.domain.models import (
    BaseModelInfo,
    GenerationDefaults,
    LoraKind,
    LoraView,
    UpscalerModelConfig,
    is_uuid,
)
from server.domain.recommend.prompt import parse_prompt
from server.domain.upscalers import UPSCALERS, builtin_names, find_upscaler

log = logging.getLogger("loracle.generation")

PLACEHOLDER_SIDE = 256
# Its images are noise, so a request left at zero gets the cheapest ones.
PLACEHOLDER_DEFAULTS = GenerationDefaults(64, 64, 4, 7.0)
# How long a cancel waits for the outcome another replica records (cluster mode).
OUTCOME_WAIT_SECONDS = 10.0
# How soon a client may retry a request for a model that is still loading.
MODEL_LOADING_RETRY_SECONDS = 2.0


def _defaults(model: BaseModelInfo) -> GenerationDefaults:
    """What a request gets for the values it leaves at zero: its model family's defaults, as
    the model's registry reports them."""
    return PLACEHOLDER_DEFAULTS if model.config.placeholder else model.defaults


class GenerationJobs:
    """The shared path of every generation command."""

    def __init__(
        self,
        *,
        models: ModelLookup,
        executor: Executor,
        catalog: CatalogRepository,
        loras: LoraLookup,
        files: LoraFiles,
        recorder: GenerationRecorder,
        outcomes: GenerationOutcomes,
        images: ImageReader,
        stored: StoredImages,
        limits: GenerationLimits = DEFAULT_LIMITS,
    ) -> None:
        self._images = images
        self._stored = stored
        self._models = models
        self._executor = executor
        self._catalog = catalog
        self._loras = loras
        self._files = files
        self.recorder = recorder
        self._outcomes = outcomes
        self.limits = limits
        self.unloadable = UnloadableLoras()

    # -- preparing ---------------------------------------------------------------------------

    def prepare(self, request: GenerationRequest) -> GenerationJob:
        violations = validate(request, self.limits)
        parsed = parse_prompt(request.prompt)
        choices = [*request.loras, *(LoraChoice(t.name, t.weight) for t in parsed.lora_tags)]
        if len(choices) > self.limits.loras:
            violations.append(FieldViolation("spec.loras", f"at most {self.limits.loras} LoRAs"))
        if violations:
            raise ValidationError(violations)
        # 1. Input images: read, measured and fully decoded before anything is queued
        init = self._input_image(request.init_image, "spec.init_image")
        mask = self._input_image(request.mask_image, "spec.mask_image")
        if (
            init is not None
            and mask is not None
            and (mask.width, mask.height)
            != (
                init.width,
                init.height,
            )
        ):
            raise ValidationError(
                FieldViolation(
                    "spec.mask_image",
                    f"is {mask.width}x{mask.height}; it must be the size of spec.init_image "
                    f"({init.width}x{init.height})",
                )
            )
        if mask is not None and self._images.blank(mask.data):
            raise ValidationError(
                FieldViolation("spec.mask_image", "is black everywhere: it would paint nothing")
            )
        # 2. The model, the size (an init image's own when none is asked for) and the LoRAs
        model = self.model(request.model)
        defaults = _defaults(model)
        width, height = request.width, request.height
        if init is not None and not (width or height):
            width, height = fit_size(init.width, init.height, self.limits, model.size_multiple)
        width, height = width or defaults.width, height or defaults.height
        self._check_family(request, model)
        if request.hires is not None and model.inpainting:
            raise ValidationError(
                FieldViolation(
                    "spec.hires",
                    f"model {model.config.name!r} is an inpainting checkpoint; the hires fix "
                    "needs a text-to-image model",
                )
            )
        hires = self._hires(request, width, height, model)
        final = (width, height) if hires is None else hires.size(width, height)
        if model.config.placeholder and max(final) > PLACEHOLDER_SIDE:
            # Its 2x VAE makes large images cost minutes per step, for noise: one such job
            # would hold the queue for everyone.
            raise ValidationError(
                FieldViolation(
                    "spec.width",
                    f"the placeholder model {model.config.name!r} makes images of at most "
                    f"{PLACEHOLDER_SIDE}x{PLACEHOLDER_SIDE}",
                )
            )
        loras = self._resolve_loras(choices, model, tagged_from=len(request.loras))
        prompt = strip_lora_tags(request.prompt)
        embeddings = self._resolve_embeddings((prompt, request.negative_prompt), model)
        controls = self._controls(request, model)
        return GenerationJob(
            generation_id=str(uuid.uuid4()),
            model=model.config,
            prompt=prompt,
            original_prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            width=width,
            height=height,
            steps=request.steps or defaults.steps,
            guidance_scale=(
                defaults.guidance_scale
                if request.guidance_scale is None
                else request.guidance_scale
            ),
            seed=request.seed if request.seed is not None else random.randrange(2**31),
            num_images=request.num_images,
            true_cfg_scale=request.true_cfg_scale or 0.0,
            scheduler=request.scheduler,
            loras=loras,
            output_format=request.output_format,
            chunk_size=request.chunk_size_bytes or 64 * 1024,
            preview_every=request.preview_every_n_steps,
            owner=current_context().principal,
            init_image=init,
            strength=(
                0.0
                if init is None
                else request.strength
                if request.strength is not None
                else DEFAULT_STRENGTH
            ),
            mask_image=mask,
            mask_blur=(
                0
                if mask is None
                else request.mask_blur
                if request.mask_blur is not None
                else DEFAULT_MASK_BLUR
            ),
            inpaint_only_masked=mask is not None and request.inpaint_only_masked,
            inpaint_padding=(
                0
                if mask is None or not request.inpaint_only_masked
                else request.inpaint_padding
                if request.inpaint_padding is not None
                else DEFAULT_INPAINT_PADDING
            ),
            hires=hires,
            embeddings=embeddings,
            controls=controls,
        )

    def _check_family(self, request: GenerationRequest, model: BaseModelInfo) -> None:
        """What the model's family cannot take: a sampler of another kind, a negative prompt
        for a guidance-distilled model, the hires fix where it is not built."""
        name, arch = model.config.name, model.config.architecture.value
        violations = []
        if request.scheduler and request.scheduler not in model.schedulers:
            violations.append(
                FieldViolation(
                    "spec.scheduler",
                    f"model {name!r} ({arch}) samples with {', '.join(model.schedulers)}, "
                    "or empty (its own)",
                )
            )
        true_cfg = request.true_cfg_scale or 0.0
        if request.negative_prompt and not model.takes_negative_prompt and true_cfg <= 1:
            violations.append(
                FieldViolation(
                    "spec.negative_prompt",
                    f"model {name!r} ({arch}) is guidance-distilled and takes no negative prompt "
                    "unless true_cfg_scale is above 1",
                )
            )
        if true_cfg > 1 and request.controls:
            violations.append(
                FieldViolation(
                    "spec.true_cfg_scale",
                    "true CFG with ControlNets is not built (diffusers' FLUX ControlNet "
                    "img2img and inpainting pipelines take no negative prompt)",
                )
            )
        if request.true_cfg_scale is not None and model.takes_negative_prompt:
            violations.append(
                FieldViolation(
                    "spec.true_cfg_scale",
                    f"model {name!r} ({arch}) is not guidance-distilled: its guidance_scale is "
                    "classifier-free guidance already",
                )
            )
        multiple = model.size_multiple
        for side in ("width", "height"):
            value = getattr(request, side)
            if value % multiple:
                violations.append(
                    FieldViolation(
                        f"spec.{side}",
                        f"model {name!r} ({arch}) takes sizes in multiples of {multiple}",
                    )
                )
        if request.hires is not None and not model.hires_fix:
            violations.append(
                FieldViolation("spec.hires", f"the hires fix is not built for {arch} models yet")
            )
        violations += family_control_violations(request, model)
        if violations:
            raise ValidationError(violations)

    def prepare_upscale(self, request: UpscaleRequest) -> GenerationJob:
        """An upscale as a job of the generation path (queued on the device, streamed,
        recorded): the image checked like any input image, the upscaler resolved, the
        result within the size limits."""
        violations = validate_upscale(request)
        if violations:
            raise ValidationError(violations)
        image = self._input_image(request.image, "image")
        assert image is not None  # validated
        name, model = self.upscaler(request.upscaler, "upscaler")
        builtin = find_upscaler(name)
        if builtin is not None and builtin.latent:
            pixel = ", ".join(u.name for u in UPSCALERS if not u.latent)
            raise ValidationError(
                FieldViolation(
                    "upscaler",
                    f"{name!r} resizes latents, which only a hires fix has; use an upscaler "
                    f"model or {pixel}",
                )
            )
        native = next((m.scale for m in self._models.upscaler_models() if m.config == model), 0)
        scale = request.scale or float(native or DEFAULT_BUILTIN_UPSCALE)
        upscale = UpscaleJob(upscaler=name, scale=scale, model=model)
        width, height = upscale.size(image.width, image.height)
        side, pixels = self.limits.side * 4, self.limits.input_pixels * 4
        if max(width, height) > side or width * height > pixels:
            raise ValidationError(
                FieldViolation(
                    "scale",
                    f"makes {width}x{height}; at most {side} a side and {pixels:,} pixels",
                )
            )
        return GenerationJob(
            generation_id=str(uuid.uuid4()),
            model=NO_MODEL,
            prompt="",
            original_prompt="",
            width=width,
            height=height,
            steps=0,
            guidance_scale=0.0,
            seed=0,
            output_format=request.output_format,
            chunk_size=request.chunk_size_bytes or 64 * 1024,
            owner=current_context().principal,
            init_image=image,
            upscale=upscale,
        )

    def _controls(
        self, request: GenerationRequest, model: BaseModelInfo
    ) -> tuple[ControlInput, ...]:
        """The request's ControlNets, each configured, ready and of the model's architecture,
        with its image checked like any input image."""
        if not request.controls:
            return ()
        known = {c.config.name: c for c in self._models.controlnets()}
        out = []
        for i, choice in enumerate(request.controls):
            name = choice.controlnet
            info = known.get(name)
            if info is None:
                raise NotFoundError("controlnet", name, list(known))
            if not info.ready:
                raise PreconditionError(
                    f"ControlNet {name!r} is not ready: {info.error}",
                    reason=Reason.CONTROLNET_NOT_READY,
                    metadata={"controlnet": name},
                )
            wanted, have = info.config.architecture, model.config.architecture
            if wanted is not have:
                raise PreconditionError(
                    f"ControlNet {name!r} is for {wanted.value} models; model "
                    f"{model.config.name!r} is {have.value}",
                    reason=Reason.CONTROLNET_ARCHITECTURE_MISMATCH,
                    metadata={
                        "controlnet": name,
                        "controlnet_architecture": wanted.value,
                        "model": model.config.name,
                        "model_architecture": have.value,
                    },
                )
            image = self._input_image(choice.image, f"spec.controls[{i}].image")
            assert image is not None  # validated: a control has an image
            out.append(
                ControlInput(
                    controlnet=info.config,
                    image=image,
                    scale=(
                        DEFAULT_CONTROL_SCALE
                        if choice.conditioning_scale is None
                        else choice.conditioning_scale
                    ),
                    guidance_start=choice.guidance_start,
                    guidance_end=1.0 if choice.guidance_end is None else choice.guidance_end,
                )
            )
        return tuple(out)

    def _hires(
        self, request: GenerationRequest, width: int, height: int, base: BaseModelInfo
    ) -> HiresFix | None:
        """The hires fix with its defaults filled in; its upscaled size must stay within the
        limits a plain request's size has."""
        given = request.hires
        if given is None:
            return None
        name, model = self.upscaler(given.upscaler, "spec.hires.upscaler")
        builtin = find_upscaler(name)
        takes_latents = base.latent_hires and (base.latent_hires_controlled or not request.controls)
        if builtin is not None and builtin.latent and not takes_latents:
            pixel = ", ".join(u.name for u in UPSCALERS if not u.latent)
            arch = base.config.architecture.value
            raise ValidationError(
                FieldViolation(
                    "spec.hires.upscaler",
                    f"model {base.config.name!r} ({arch}) takes no latents in its second pass"
                    f"{' with ControlNets' if base.latent_hires else ''}; use {pixel} or an "
                    "upscaler model",
                )
            )
        hires = HiresFix(
            scale=given.scale,
            steps=given.steps,
            denoising_strength=(
                DEFAULT_HIRES_STRENGTH
                if given.denoising_strength is None
                else given.denoising_strength
            ),
            upscaler=name,
            model=model,
            multiple=base.size_multiple,
        )
        up_width, up_height = hires.size(width, height)
        side, pixels = self.limits.side, self.limits.pixels
        if max(up_width, up_height) > side or up_width * up_height > pixels:
            raise ValidationError(
                FieldViolation(
                    "spec.hires.scale",
                    f"makes {up_width}x{up_height}; at most {side} a side and {pixels:,} pixels",
                )
            )
        return hires

    def upscaler(self, name: str, field: str) -> tuple[str, UpscalerModelConfig | None]:
        """A built-in upscaler's A1111 name, or a configured model's name and config (case
        aside). Unknown: INVALID_ARGUMENT listing both kinds; a model that is not ready:
        FAILED_PRECONDITION."""
        builtin = find_upscaler(name)
        if builtin is not None:
            return builtin.name, None
        models = self._models.upscaler_models()
        found = next(
            (m for m in models if m.config.name.casefold() == name.strip().casefold()), None
        )
        if found is None:
            names = ", ".join([*builtin_names(), *(m.config.name for m in models)])
            raise ValidationError(FieldViolation(field, f"one of {names}, or empty"))
        if not found.ready:
            raise PreconditionError(
                f"upscaler {found.config.name!r} is not ready: {found.error}",
                reason=Reason.UPSCALER_NOT_READY,
                metadata={"upscaler": found.config.name},
            )
        return found.config.name, found.config

    def _input_image(self, given: ImageInput | None, field: str) -> InputImage | None:
        """The image a request names, checked: inline bytes, or one of the caller's own
        earlier images (another principal's is the NOT_FOUND of an unknown id)."""
        if given is None:
            return None
        data = given.data
        if given.generation_id:
            data = self._stored_image(given, field)
        if not data:
            raise ValidationError(
                FieldViolation(field, "is empty: send an image's bytes or name an earlier image")
            )
        if len(data) > self.limits.input_bytes:
            raise ValidationError(
                FieldViolation(
                    field, f"is {len(data):,} bytes; at most {self.limits.input_bytes:,}"
                )
            )
        try:
            width, height = self._images.measure(data, self.limits.input_pixels)
        except ValueError as exc:
            raise ValidationError(FieldViolation(field, str(exc))) from None
        return InputImage(
            data=data,
            sha256=hashlib.sha256(data).hexdigest(),
            width=width,
            height=height,
            generation_id=given.generation_id,
            image_index=given.image_index,
        )

    def _stored_image(self, given: ImageInput, field: str) -> bytes:
        gid = given.generation_id
        self.require_visible(gid)
        generation = self._catalog.get(uuid.UUID(gid))
        assert isinstance(generation, Generation)
        view = generation.view()
        records = {r.index: r for r in view.images}
        record = records.get(given.image_index)
        # An image is stored before the stream announces it, and recorded a moment later:
        # "vary my last result" right after the stream ended finds it by trying each type.
        mimes = [record.mime_type] if record is not None else list(MIME_TYPES)
        data = next(
            (d for m in mimes if (d := self._stored.read(gid, given.image_index, m)) is not None),
            None,
        )
        if data is None and record is None:
            made = "made" if generation.finished else "has made"
            raise ValidationError(
                FieldViolation(
                    f"{field}.generated.image_index",
                    f"generation {gid} {made} {len(records)} image(s) (indexes from 0)",
                )
            )
        if data is None:
            raise PreconditionError(
                f"image {given.image_index} of generation {gid} is no longer kept on this "
                "server (image_retention_hours); send its bytes instead",
                reason=Reason.IMAGE_NOT_KEPT,
                metadata={"generation_id": gid, "image_index": str(given.image_index)},
            )
        return data

    def model(self, name: str) -> BaseModelInfo:
        statuses = self._models.statuses()
        if name:
            found = next((m for m in statuses if m.config.name == name), None)
            if found is None:
                raise NotFoundError("model", name, [m.config.name for m in statuses])
        else:
            found = next((m for m in statuses if m.ready), statuses[0] if statuses else None)
            if found is None:
                raise PreconditionError("no base model is configured", reason=Reason.NO_MODEL)
        if not found.ready:
            error = PreconditionError(
                f"model {found.config.name!r} is not ready: {found.error}",
                reason=Reason.MODEL_NOT_READY,
                metadata={"model": found.config.name},
                # RetryInfo only while it loads: a client may wait; a broken model gets none.
                retry_after_seconds=MODEL_LOADING_RETRY_SECONDS if found.loading else None,
            )
            raise error
        return found

    def _resolve_loras(
        self, choices: Sequence[LoraChoice], model: BaseModelInfo, *, tagged_from: int
    ) -> tuple[ResolvedLora, ...]:
        """`choices` from `tagged_from` on come from `<lora:…>` tags in the prompt."""
        resolved: dict[str, ResolvedLora] = {}
        for index, choice in enumerate(choices):
            view = self._find_lora(choice.lora)
            if view.kind is LoraKind.EMBEDDING:
                where = "a <lora:…> tag" if index >= tagged_from else "spec.loras"
                raise ValidationError(
                    FieldViolation(
                        "spec.prompt" if index >= tagged_from else "spec.loras",
                        f"{choice.lora!r} is a textual-inversion embedding, not a LoRA: write "
                        f"{view.metadata.file_name!r} in the prompt or negative prompt instead "
                        f"of naming it in {where}",
                    )
                )
            if view.file is None or not view.available:
                raise PreconditionError(
                    f"LoRA {view.name!r} has no file on this server (a catalog record only)",
                    reason=Reason.LORA_UNAVAILABLE,
                    metadata={"lora": view.id},
                )
            arch = view.metadata.base_model.architecture
            if arch is not model.config.architecture:
                raise PreconditionError(
                    f"LoRA {view.name!r} is for {arch.value} models; "
                    f"{model.config.name!r} is {model.config.architecture.value}",
                    reason=Reason.LORA_ARCHITECTURE_MISMATCH,
                    metadata={
                        "lora": view.id,
                        "lora_architecture": arch.value,
                        "model": model.config.name,
                        "model_architecture": model.config.architecture.value,
                    },
                )
            weight = choice.weight
            if weight is None:
                weight = view.metadata.preferred_weight
            resolved[view.id] = ResolvedLora(
                lora_id=view.id,
                name=view.name,
                file_name=view.metadata.file_name,
                sha256=view.file.sha256,
                path=self._locate(view),
                weight=1.0 if weight is None else float(weight),
                file_path=view.file.path,
            )
        return tuple(resolved.values())

    def _resolve_embeddings(
        self, prompts: Sequence[str], model: BaseModelInfo
    ) -> tuple[ResolvedLora, ...]:
        """The textual-inversion embeddings the prompts name (domain.embeddings), among the
        available ones of the model's architecture: A1111 skips an embedding whose shape the
        model cannot take, so a word that happens to be the name of another family's
        embedding stays a word. Their files are located now, as a LoRA's are."""
        views = self._loras.embeddings(model.config.architecture)
        by_name: dict[str, LoraView] = {}
        for view in sorted(views, key=lambda v: v.id):  # several with one name: one wins
            by_name.setdefault(view.metadata.file_name.casefold(), view)
        named: set[str] = set()
        for prompt in prompts:
            named |= {n.casefold() for n in named_in(prompt, by_name)}
        resolved = []
        for key in sorted(named):
            view = by_name[key]
            assert view.file is not None  # available
            resolved.append(
                ResolvedLora(
                    lora_id=view.id,
                    name=view.name,
                    file_name=view.metadata.file_name,
                    sha256=view.file.sha256,
                    path=self._locate(view),
                    weight=1.0,
                    file_path=view.file.path,
                )
            )
        return tuple(resolved)

    def _find_lora(self, reference: str) -> LoraView:
        """A LoRA by id, by file name (without its extension) or by the name `loras list`
        shows, in that order; among several, those with a file win, and still several is an
        error listing them."""
        view = self._loras.get(reference) if is_uuid(reference) else None
        if view is not None:
            return view
        for find in (self._loras.find_by_file_name, self._loras.find_by_name):
            found = find(reference)
            matches = [v for v in found if v.available] or found
            # A LoRA and an embedding of one name: `loras` and tags mean the LoRA.
            matches = [v for v in matches if v.kind is LoraKind.LORA] or matches
            if len(matches) > 1:
                candidates = ", ".join(f"{m.metadata.name} ({m.id})" for m in matches[:5])
                raise ValidationError(
                    FieldViolation(
                        "spec.loras",
                        f"{reference!r} names {len(matches)} LoRAs; use one of their ids: "
                        + candidates,
                    )
                )
            if matches:
                return matches[0]
        raise NotFoundError("lora", reference)

    def _locate(self, view: LoraView) -> Path:
        assert view.file is not None
        path = self._files.locate(view.file.path)
        if path is None:
            raise PreconditionError(
                f"LoRA {view.name!r}: its file {view.file.path!r} is missing under the LoRA roots",
                reason=Reason.LORA_FILE_MISSING,
                metadata={"lora": view.id},
            )
        return path

    # -- queuing -----------------------------------------------------------------------------

    def submit(
        self, job: GenerationJob, command: object, *, idempotent: bool = True
    ) -> tuple[JobStream, int, int]:
        """Queues the job and records it; returns (stream, queue position, log position).
        `idempotent=False` records no request id (a job a handler starts again itself)."""
        ctx = current_context()
        if job.owner != ctx.principal:
            job = replace(job, owner=ctx.principal)
        accepted: dict[str, int] = {}
        records: list[CommandRecord] = []

        def record(position: int) -> None:
            generation = Generation(
                generation_id=job.generation_id,
                spec=job.spec(),
                principal=ctx.principal,
                request_id=ctx.request_id,
                queue_position=position,
            )
            pending: list[Any] = [generation]
            rec = (
                record_for(command, {"generation_id": job.generation_id, "position": position})
                if idempotent
                else None
            )
            if rec is not None:
                pending.append(rec)
                records.append(rec)
            accepted["log"] = self._catalog.save(*pending)
            accepted["queue"] = position

        try:
            handle = self._executor.submit(job, record)
        except Exception as exc:
            if "log" in accepted:  # recorded as queued but never queued: say so
                reason = exc.message if isinstance(exc, DomainError) else type(exc).__name__
                self._fail_unqueued(job.generation_id, ctx, reason)
            raise
        for rec in records:
            note_answer(self._catalog, rec, accepted["log"])
        self.recorder.follow(handle, job, ctx)
        handle.on_transition(lambda _, payload: self.note_failure(job.model.name, payload))
        return handle, accepted["queue"], accepted["log"]

    def note_failure(self, model: str, payload: object) -> None:
        """Remembers a LoRA file that would not load on `model` (see UnloadableLoras)."""
        if (
            isinstance(payload, Failed)
            and payload.reason == Reason.LORA_LOAD_FAILED
            and payload.lora_sha256
        ):
            self.unloadable.remember(model, payload.lora_sha256)

    def _fail_unqueued(self, generation_id: str, ctx: DispatchContext, reason: str) -> None:
        try:
            generation = self._catalog.get(uuid.UUID(generation_id))
            if isinstance(generation, Generation) and not generation.finished:
                generation.fail(
                    f"it could not be queued: {reason}",
                    [],
                    ctx.principal,
                    ctx.request_id,
                )
                self._catalog.save(generation)
        except DomainError:
            log.exception("could not record that generation %s was not queued", generation_id)

    def replay(self, command: object) -> Replay | None:
        """The first answer of a retried request (same principal and request_id), if any."""
        return replay(self._catalog, command)

    def retried(self, command: object) -> JobStream | None:
        """The live job of an earlier request with this request_id, so a retry re-attaches
        instead of generating twice; None for a first request. Only the job's owner (or an
        admin) re-attaches; anyone else gets the NOT_FOUND of an unknown id."""
        previous = self.replay(command)
        if previous is None:
            return None
        generation_id = str(previous.result["generation_id"])
        handle = self._executor.handle(generation_id)
        if handle is not None:
            require_visible(current_context(), generation_id, handle.owner)
        else:
            self.require_visible(generation_id)
            raise PreconditionError(
                "this request's generation is no longer streaming here; use "
                "WatchGeneration or GetGeneration with its id",
                reason=Reason.GENERATION_NOT_LIVE,
                metadata={"generation_id": generation_id},
            )
        return handle

    @staticmethod
    def stream(
        handle: JobStream,
        ctx: DispatchContext,
        after: int = 0,
        swallow: Callable[[Failed], bool] | None = None,
    ) -> Generator[GenerationEvent, None, Failed | None]:
        """A job's events for one caller; the caller going away cancels the job. A job that
        failed ends the call, after its `failed` event, with the error its reason maps to
        (`Failed.as_error`: out of memory is RESOURCE_EXHAUSTED with RetryInfo, a LoRA that
        does not load FAILED_PRECONDITION, ...), not OK. A LoRA load failure that `swallow`
        accepts is neither sent nor raised but returned, for the caller to start again."""
        try:
            for event in handle.events(after=after, stop=ctx.abandoned):
                p = event.payload
                if (
                    isinstance(p, Failed)
                    and swallow is not None
                    and p.reason == Reason.LORA_LOAD_FAILED
                    and swallow(p)
                ):
                    return p
                yield event
                if isinstance(p, Failed):
                    raise p.as_error()
            return None
        finally:
            if not handle.finished:
                handle.cancel()

    def handle(self, generation_id: str) -> JobStream | None:
        return self._executor.handle(generation_id)

    def require_visible(self, generation_id: str) -> None:
        """NOT_FOUND unless the stored generation is the caller's (or the caller is admin)."""
        try:
            generation = self._catalog.get(uuid.UUID(generation_id))
        except ValueError:
            generation = None
        owner = generation.owner if isinstance(generation, Generation) else None
        require_visible(current_context(), generation_id, owner)

    # -- cancelling --------------------------------------------------------------------------

    def cancel(self, generation: Generation) -> GenerationView:
        """Stops a live job (within one denoising step) and answers once its outcome is
        recorded; a job no process runs any more (its process died) is cancelled in the
        store. A finished one is left as it is."""
        gid = str(generation.id)
        handle = self._executor.handle(gid)
        if handle is not None and not handle.finished:
            handle.cancel()
            for event in handle.events(after=handle.last_sequence, poll=0.1):
                if isinstance(event.payload, TERMINAL):
                    break
            self.recorder.flush()
        elif not generation.finished:
            ctx = current_context()
            generation.cancel(list(generation.images), ctx.principal, ctx.request_id)
            self._catalog.save(generation)
        fresh = self._catalog.get(generation.id)
        if isinstance(fresh, Generation) and not fresh.finished and handle is not None:
            # In cluster mode another replica may record the outcome a moment after it ended.
            self._outcomes.wait_finished(gid, OUTCOME_WAIT_SECONDS)
            fresh = self._catalog.get(generation.id)
        assert isinstance(fresh, Generation)
        return fresh.view()
