"""What varies by pipeline family (SD, SDXL, later FLUX...): one `ModelFamily` per module,
registered once in `families.FAMILIES`. A family is declarations (which folders and
checkpoints are its own, its defaults, where its LoRAs go, its preview colours) plus the one
call that denoises a batch. Everything else (the queue, batching, the pipeline cache, LoRA
fusing, encoding) is shared and never asks which family it runs."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from server.domain.emphasis import plain_text
from server.domain.generation_job import GenerationJob, Mode
from server.domain.models import Architecture, BaseModelConfig, GenerationDefaults
from server.domain.schedulers import NOISE_SCHEDULERS
from server.domain.upscalers import find_upscaler
from server.infrastructure.diffusion.conditioning import (
    ConditionedGroup,
    RowScope,
    TextEncoder,
    all_rows,
    encode_batch,
)

# diffusers' callback_on_step_end: (pipeline, step index, timestep, tensors) -> tensors.
StepCallback = Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]
# Rows: latent channels; columns: R, G, B.
LatentToRGB = tuple[tuple[float, float, float], ...]


@dataclass(frozen=True, slots=True)
class CheckpointPart:
    """A part a single-file checkpoint must hold: described for messages, found by any key
    starting with one of `prefixes` (the keys diffusers itself recognises it by)."""

    description: str
    prefixes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DenoisePass:
    """What one pipeline call runs: its mode, size, steps and strength, and whether it
    returns images or latents (the first pass of a hires fix with a latent upscaler)."""

    mode: str
    width: int
    height: int
    steps: int
    strength: float = 0.0
    output_type: str = "pil"

    @staticmethod
    def first(job: GenerationJob) -> DenoisePass:
        """The job's own call (the first of two with hires fix)."""
        upscaler = None if job.hires is None else find_upscaler(job.hires.upscaler)
        latent = upscaler is not None and upscaler.latent
        return DenoisePass(
            job.mode,
            job.width,
            job.height,
            job.steps,
            job.strength,
            "latent" if latent else "pil",
        )


@dataclass(frozen=True, slots=True)
class BatchRows:
    """One denoising call: a prompt, negative prompt and seeded generator per image, the
    job whose shared fields (size, steps, guidance, mode, strength) all rows have in common,
    the rows' prompt embeddings (`ModelFamily.encode`; empty: the pipeline encodes
    `prompts`), and for img2img and inpainting each row's image and mask, already at the
    job's size (image_inputs.py)."""

    prompts: list[str]
    negative_prompts: list[str]
    job: GenerationJob
    generators: list[Any]
    conditioning: dict[str, Any] = field(default_factory=dict)
    images: list[Any] | Any = field(default_factory=list)  # a latent tensor, for hires
    masks: list[Any] = field(default_factory=list)
    # Per ControlNet of the job, each row's control image at the call's size.
    controls: list[list[Any]] = field(default_factory=list)
    # The call to make (None: the job's own, DenoisePass.first).
    denoise_pass: DenoisePass | None = None

    @property
    def call(self) -> DenoisePass:
        return self.denoise_pass or DenoisePass.first(self.job)


class ModelFamily(ABC):
    """The declarations a family must make, and its pipeline call. Instances are stateless;
    `families.family_for(architecture)` finds the one serving a model."""

    # The Architecture values this family serves (each belongs to exactly one family).
    architectures: ClassVar[tuple[Architecture, ...]]
    # The `_class_name`s a diffusers folder's model_index.json may name.
    pipeline_classes: ClassVar[frozenset[str]]
    # Subfolders a diffusers folder must have.
    components: ClassVar[tuple[str, ...]]
    # What a request that leaves size, steps or guidance at zero gets.
    defaults: ClassVar[GenerationDefaults]
    # The denoising component (its folder in a diffusers layout): A1111's model hash covers
    # its weights.
    denoiser: ClassVar[str] = "unet"
    # Pipeline components that LoRAs are loaded into (and whose weights fusing changes).
    lora_components: ClassVar[tuple[str, ...]]
    # The linear latent -> RGB map of cheap previews, and its bias (none: zero).
    preview_factors: ClassVar[LatentToRGB]
    preview_bias: ClassVar[tuple[float, float, float] | None] = None
    # GenerationJob fields beyond the shared ones that must match for two jobs to batch.
    batch_fields: ClassVar[tuple[str, ...]] = ()
    # The CLIP tokenizer/text encoder pairs A1111-style prompts are encoded with and
    # textual-inversion embeddings go into (none: `encode` says how the family's prompts are
    # encoded; by default the pipeline encodes them, A1111's syntax taken out).
    text_encoders: ClassVar[tuple[TextEncoder, ...]] = ()
    # The diffusers pipeline class of each mode beyond text to image (Mode values), built
    # from the loaded pipeline's components.
    mode_pipelines: ClassVar[dict[str, str]] = {}
    # The diffusers pipeline class of each mode (text to image too) with ControlNets; none:
    # the family takes no ControlNet.
    controlnet_pipelines: ClassVar[dict[str, str]] = {}
    # The diffusers classes of the family's ControlNets, one and several at once (None: no
    # class runs several).
    controlnet_class: ClassVar[str] = "ControlNetModel"
    multi_controlnet_class: ClassVar[str | None] = "MultiControlNetModel"
    # False where the several-ControlNets class runs one ControlNet over several control
    # images (Qwen-Image's, for Union ControlNets), not several ControlNets.
    several_controlnets: ClassVar[bool] = True
    # False where the ControlNet pipelines take no control_guidance_start/end (Z-Image's):
    # ControlNets steer every step.
    controlnet_step_range: ClassVar[bool] = True
    # The `scheduler` names the family samples with (flow-matching families: their own).
    schedulers: ClassVar[tuple[str, ...]] = NOISE_SCHEDULERS
    # Guidance-distilled families (FLUX) take no negative prompt: it would be ignored.
    takes_negative_prompt: ClassVar[bool] = True
    # `guidance_scale` is the distilled guidance the model embeds (A1111/Forge: "Distilled CFG
    # Scale"), not classifier-free guidance.
    distilled_guidance: ClassVar[bool] = False
    # Whether the hires fix is built for the family, and with the latent upscalers too.
    hires_fix: ClassVar[bool] = True
    latent_hires: ClassVar[bool] = True
    # ... and with latent upscalers when ControlNets steer the second pass.
    latent_hires_controlled: ClassVar[bool] = True
    # Whether single-file checkpoints of the family are loaded (else: diffusers folders only).
    single_file: ClassVar[bool] = True
    # Whether a single file holds the denoiser alone (safetensors or GGUF), the rest of the
    # pipeline coming from config_dir, rather than the whole pipeline (A1111's checkpoints).
    denoiser_file: ClassVar[bool] = False
    # What width and height must be multiples of: the VAE's downsampling times the
    # transformer's patch size (pipelines otherwise resize silently or fail).
    size_multiple: ClassVar[int] = 8
    # The denoiser's repeated blocks `[[models]] compile = true` compiles (a denoiser that
    # declares diffusers' `_repeated_blocks` is compiled by those instead).
    compiled_blocks: ClassVar[tuple[str, ...]] = ("BasicTransformerBlock", "ResnetBlock2D")

    @abstractmethod
    def checkpoint_parts(self, architecture: Architecture) -> tuple[CheckpointPart, ...]:
        """What a single-file checkpoint of `architecture` must contain."""

    def check_checkpoint_header(self, path: Path, header: dict[str, Any]) -> str:
        """A check beyond the parts' presence, on a header that has them all; "" when fine."""
        return ""

    @abstractmethod
    def pipeline_class(self) -> Any:
        """The diffusers pipeline class a single-file checkpoint is loaded as."""

    def pipeline_for_mode(self, mode: str, controlled: bool = False) -> Any | None:
        """The diffusers pipeline class running `mode` (with ControlNets when `controlled`)
        from the loaded text-to-image pipeline's components (`from_pipe`); None for that
        pipeline itself."""
        name = (self.controlnet_pipelines if controlled else self.mode_pipelines).get(mode)
        if name is None and controlled:  # GenerationJobs refuses it before queueing
            raise ValueError(f"{type(self).__name__} has no ControlNet pipeline for {mode}")
        if name is None:
            return None
        import diffusers

        return getattr(diffusers, name)

    def load_folder(self, config: BaseModelConfig, torch_dtype: Any) -> Any:
        """A local diffusers folder (never a hub id: local_files_only)."""
        from diffusers import DiffusionPipeline

        from server.infrastructure.diffusion.quantization import pipeline_quantization

        return DiffusionPipeline.from_pretrained(
            str(config.path),
            local_files_only=True,
            torch_dtype=torch_dtype,
            **pipeline_quantization(config, self.denoiser),
        )

    def load_single_file(self, config: BaseModelConfig, torch_dtype: Any) -> Any:
        """The weights, text encoders included, are converted from the file; config_dir gives
        only configs, tokenizers and the scheduler. A local folder as `config` plus
        local_files_only keeps diffusers off the hub (no snapshot_download, no CLIP config)."""
        return self.pipeline_class().from_single_file(
            str(config.path),
            config=str(config.config_dir),
            local_files_only=True,
            torch_dtype=torch_dtype,
        )

    def img2img_steps(self, steps: int, strength: float) -> int:
        """How many of `steps` an img2img call at `strength` runs: diffusers' Stable
        Diffusion pipelines (and A1111) run int(steps x strength), at least one."""
        return max(1, int(steps * strength))

    def preview_latents(self, pipe: Any, latents: Any, width: int, height: int) -> Any:
        """The pipeline's latents (a step callback's, or a pass's `output_type="latent"`) as
        (rows, channels, h, w), for previews and latent upscaling (a family whose pipeline
        packs its latents unpacks them here)."""
        return latents

    def img2img_latents(self, latents: Any) -> Any:
        """(rows, channels, h, w) latents as the family's img2img pipeline takes them for its
        `image` (a hires fix's latent second pass)."""
        return latents

    def encode(
        self,
        pipe: Any,
        prompts: Sequence[str],
        negative_prompts: Sequence[str],
        scope: RowScope = all_rows,
    ) -> list[ConditionedGroup]:
        """The rows' prompt embeddings, in groups that may share a denoising call (rows whose
        prompts need a different number of 77-token chunks may not: conditioning.py); each
        encoder call runs in `scope` of the rows it encodes."""
        if not self.text_encoders:
            return [ConditionedGroup(list(range(len(prompts))), {})]
        return encode_batch(pipe, self.text_encoders, prompts, negative_prompts, scope)

    @abstractmethod
    def denoise(self, pipe: Any, rows: BatchRows, on_step: StepCallback) -> Sequence[Any]:
        """Runs the pipeline once for every row and returns one PIL image per row, in order.
        `on_step` must be passed as diffusers' callback_on_step_end: it reports progress and
        stops the call by raising when every job in the batch is cancelled."""


def as_inpainting(rows: BatchRows) -> BatchRows:
    """The call for a dedicated inpainting model (9-channel UNet), which takes a mask and a
    masked image in every mode, as A1111 runs one: text to image paints a blank image under
    a white mask at strength 1, img2img its init image under a white mask at its strength."""
    call = rows.call
    if call.mode == Mode.INPAINT:
        return rows
    from PIL import Image

    size, count = (call.width, call.height), len(rows.prompts)
    text = call.mode == Mode.TEXT_TO_IMAGE
    return replace(
        rows,
        images=[Image.new("RGB", size)] * count if text else rows.images,
        masks=[Image.new("L", size, 255)] * count,
        denoise_pass=replace(call, mode=Mode.INPAINT, strength=1.0 if text else call.strength),
    )


def prompt_arguments(rows: BatchRows) -> dict[str, Any]:
    """The rows' embeddings when the family encoded them, else their prompts as plain text
    (`plain_prompts`). A negative prompt is passed only when some row has one (batching keeps
    rows with and without apart)."""
    if rows.conditioning:
        return dict(rows.conditioning)
    negative = plain_prompts(rows.negative_prompts) if any(rows.negative_prompts) else None
    return {"prompt": plain_prompts(rows.prompts), "negative_prompt": negative}


def plain_prompts(prompts: Sequence[str]) -> list[str]:
    """Prompts for a pipeline that encodes them itself with encoders that take no emphasis:
    A1111's syntax taken out (`(cat:1.3)` reaches the encoder as `cat`), plain prompts as
    they are."""
    return [plain_text(p) for p in prompts]


def image_arguments(
    rows: BatchRows, *, controls_row_first: bool = False, control_key: str | None = None
) -> dict[str, Any]:
    """What each mode adds to the call: the size (text to image, inpainting), the images
    and the strength (img2img), the masks too (inpainting); latents out for a hires fix's
    first pass."""
    call = rows.call
    out: dict[str, Any] = {"output_type": call.output_type}
    out |= control_arguments(rows, row_first=controls_row_first, key=control_key)
    if call.mode == Mode.TEXT_TO_IMAGE:
        return out | {
            "width": call.width,
            "height": call.height,
            "num_inference_steps": call.steps,
        }
    # diffusers runs int(steps x strength) steps, none when that rounds to 0 (and fails):
    # at least one, with a schedule just long enough for it, as the proto promises.
    steps = call.steps if call.steps * call.strength >= 1 else math.ceil(1 / call.strength)
    out |= {"image": rows.images, "strength": call.strength, "num_inference_steps": steps}
    if call.mode == Mode.INPAINT:
        out |= {"mask_image": rows.masks, "width": call.width, "height": call.height}
    elif rows.controls:
        out |= {"width": call.width, "height": call.height}
    return out


def control_arguments(
    rows: BatchRows, *, row_first: bool = False, key: str | None = None
) -> dict[str, Any]:
    """diffusers' ControlNet arguments: the control images are `image` in text to image and
    `control_image` beside the init image (`key`: one name for every mode); one ControlNet
    takes a list of rows, several a list (per ControlNet) of lists, or (`row_first`) a list
    per row of one image per ControlNet."""
    controls = rows.job.controls
    if not controls:
        return {}
    images: Any = rows.controls[0] if len(controls) == 1 else rows.controls
    if row_first and len(controls) > 1:
        images = [list(row) for row in zip(*rows.controls, strict=True)]
    key = key or ("image" if rows.call.mode == Mode.TEXT_TO_IMAGE else "control_image")

    def each(values: list[float]) -> Any:
        return values[0] if len(values) == 1 else values

    return {
        key: images,
        "controlnet_conditioning_scale": each([c.scale for c in controls]),
        "control_guidance_start": each([c.guidance_start for c in controls]),
        "control_guidance_end": each([c.guidance_end for c in controls]),
    }


def flow_matching_img2img_steps(steps: int, strength: float) -> int:
    """How many steps diffusers' flow-matching img2img pipelines (FLUX, SD3) run: they skip
    int(steps x (1 - strength)) and run the rest (4 at 0.7: 3, where SD runs 2)."""
    return max(1, steps - int(max(steps - steps * strength, 0)))


def transformer_call(
    pipe: Any,
    rows: BatchRows,
    on_step: StepCallback,
    *,
    guidance_argument: str = "guidance_scale",
    control_step_range: bool = True,
    **prompts: Any,
) -> Sequence[Any]:
    """The call of the transformer families' pipelines, which encode their own `prompts`.
    The size is always given: their img2img pipelines otherwise make their default size, not
    the init image's. `guidance_argument`: the pipeline's name for the request's guidance;
    `control_step_range`: False where the ControlNet pipeline takes no step range (the
    request's is then the whole run, GenerationJobs checks)."""
    call = rows.call
    # Their ControlNet pipelines take `control_image` in every mode.
    inputs = image_arguments(rows, control_key="control_image")
    if not control_step_range:
        inputs.pop("control_guidance_start", None)
        inputs.pop("control_guidance_end", None)
    result = pipe(
        **prompts,
        **({"width": call.width, "height": call.height} | inputs),
        **{guidance_argument: rows.job.guidance_scale},
        num_images_per_prompt=1,
        generator=rows.generators,
        callback_on_step_end=on_step,
    )
    images: Sequence[Any] = result.images
    return images


def text_to_image(
    pipe: Any, rows: BatchRows, on_step: StepCallback, *, controls_row_first: bool = False
) -> Sequence[Any]:
    """The call diffusers' Stable Diffusion pipelines share, for every mode (`pipe` is the
    mode's pipeline: LoadedPipeline.for_mode)."""
    job = rows.job
    result = pipe(
        **prompt_arguments(rows),
        **image_arguments(rows, controls_row_first=controls_row_first),
        guidance_scale=job.guidance_scale,
        num_images_per_prompt=1,
        generator=rows.generators,
        callback_on_step_end=on_step,
    )
    images: Sequence[Any] = result.images
    return images
