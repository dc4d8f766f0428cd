"""A generation job as the executor runs it: the request with defaults filled in and its
LoRAs resolved to files, and the key that says which jobs may share a batch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from server.domain.models import (
    Architecture,
    BaseModelConfig,
    ControlNetConfig,
    UpscalerModelConfig,
)


@dataclass(frozen=True, slots=True)
class ResolvedLora:
    """A catalogued LoRA as a job applies it: resolved to a file and a weight before queuing.
    A textual-inversion embedding the prompts name is resolved the same way (the same
    catalog, file checks and cluster paths); its `file_name` is the word the prompts name it
    by, and its weight is unused."""

    lora_id: str
    name: str
    file_name: str
    sha256: str
    path: Path
    weight: float
    # Relative to a LoRA root: where another machine (a cluster worker) finds the same file.
    file_path: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class InputImage:
    """An image a job reads (init image, mask), checked before queuing: its bytes as the
    client sent them (or as this server stored them), their SHA-256 (recorded, so the
    generation can be reproduced), its size, and the earlier image it is, if it is one."""

    data: bytes
    sha256: str
    width: int
    height: int
    generation_id: str = ""
    image_index: int = 0

    def record(self) -> dict[str, object]:
        """What the generation's record keeps of it: never the bytes."""
        out: dict[str, object] = {"sha256": self.sha256, "width": self.width, "height": self.height}
        if self.generation_id:
            out["generation_id"] = self.generation_id
            out["image_index"] = self.image_index
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class HiresFix:
    """A1111's hires fix as a job runs it: the upscale factor, the second pass's steps and
    strength, and the upscaler: an A1111 name (domain.upscalers) or a configured model's."""

    scale: float
    steps: int
    denoising_strength: float
    upscaler: str
    # The configured upscaler model `upscaler` names (None: a built-in one).
    model: UpscalerModelConfig | None = None
    # What the model's sizes are multiples of (16 where transformers pack 2x2 patches).
    multiple: int = 8

    def size(self, width: int, height: int) -> tuple[int, int]:
        """The upscaled size of a width x height first pass, rounded down to the model's
        multiple."""
        m = self.multiple
        return int(width * self.scale) // m * m, int(height * self.scale) // m * m

    def record(self) -> dict[str, object]:
        out: dict[str, object] = {
            "scale": self.scale,
            "steps": self.steps,
            "denoising_strength": self.denoising_strength,
            "upscaler": self.upscaler,
        }
        if self.multiple != 8:  # a worker sizes the second pass as the server did
            out["multiple"] = self.multiple
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlInput:
    """One ControlNet steering a job: which, its control image, how strongly and over which
    fraction of the steps (A1111's Control Weight, Starting and Ending Control Step)."""

    controlnet: ControlNetConfig
    image: InputImage
    scale: float
    guidance_start: float
    guidance_end: float

    def shared(self) -> list[object]:
        """What rows must share to be in one call (the image is per row)."""
        return [self.controlnet.name, self.scale, self.guidance_start, self.guidance_end]

    def record(self) -> dict[str, object]:
        return {
            "controlnet": self.controlnet.name,
            "image": self.image.record(),
            "conditioning_scale": self.scale,
            "guidance_start": self.guidance_start,
            "guidance_end": self.guidance_end,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class UpscaleJob:
    """An image made larger, no diffusion (UpscaleImage; A1111's Extras tab): by a configured
    upscaler model (`model`) or a built-in image upscaler (Lanczos, Nearest), by `scale`."""

    upscaler: str
    scale: float
    model: UpscalerModelConfig | None = None

    def size(self, width: int, height: int) -> tuple[int, int]:
        return round(width * self.scale), round(height * self.scale)

    def record(self) -> dict[str, object]:
        return {"upscaler": self.upscaler, "scale": self.scale}


# The base model of a job that runs none (an upscale).
NO_MODEL = BaseModelConfig("", Architecture.UNSPECIFIED, Path())


class Mode:
    """What a job does with its input images."""

    TEXT_TO_IMAGE = "txt2img"
    IMAGE_TO_IMAGE = "img2img"
    INPAINT = "inpaint"
    UPSCALE = "upscale"


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationJob:
    """Everything that determines a generation, with defaults filled in and LoRAs resolved.
    `prompt` is what the text encoders see (A1111 `<lora:…>` tags removed); `original_prompt`
    is what the client sent, written into the image's parameters."""

    generation_id: str
    model: BaseModelConfig
    prompt: str
    original_prompt: str
    negative_prompt: str = ""
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    num_images: int = 1
    # FLUX's true classifier-free guidance with the negative prompt (0: off).
    true_cfg_scale: float = 0.0
    scheduler: str = ""
    loras: tuple[ResolvedLora, ...] = ()
    output_format: str = "png"
    chunk_size: int = 64 * 1024
    preview_every: int = 0
    # The principal that submitted it (the live job's handle answers only to it and admins).
    owner: str = ""
    # img2img: the image to start from and how much of it is noised again.
    init_image: InputImage | None = None
    strength: float = 0.0
    # Inpainting: the mask (white is painted again), its blur, and A1111's "only masked".
    mask_image: InputImage | None = None
    mask_blur: int = 0
    inpaint_only_masked: bool = False
    inpaint_padding: int = 0
    # Hires fix (text to image): the second pass over the upscaled first one.
    hires: HiresFix | None = None
    # Textual-inversion embeddings the prompt or negative prompt names (domain.embeddings),
    # of the model's architecture. Not part of the batch key: a batch loads every embedding
    # its jobs name, and a prompt that names none is encoded as if none were loaded.
    embeddings: tuple[ResolvedLora, ...] = ()
    # ControlNets, in the order the request gave them (any mode).
    controls: tuple[ControlInput, ...] = ()
    # An upscale (UpscaleImage) of init_image instead of a generation; `model` is NO_MODEL.
    upscale: UpscaleJob | None = None

    @property
    def mode(self) -> str:
        if self.upscale is not None:
            return Mode.UPSCALE
        if self.mask_image is not None:
            return Mode.INPAINT
        if self.init_image is not None:
            return Mode.IMAGE_TO_IMAGE
        return Mode.TEXT_TO_IMAGE

    def spec(self) -> dict[str, object]:
        """The filled-in request as recorded on the Generation aggregate."""
        return {
            "model": self.model.name,
            "prompt": self.original_prompt,
            "negative_prompt": self.negative_prompt,
            "width": self.width,
            "height": self.height,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            **({"true_cfg_scale": self.true_cfg_scale} if self.true_cfg_scale else {}),
            "seed": self.seed,
            "num_images": self.num_images,
            "scheduler": self.scheduler,
            "loras": [
                {"lora": lora.lora_id, "name": lora.name, "weight": lora.weight}
                for lora in self.loras
            ],
            "output_format": self.output_format,
            "preview_every_n_steps": self.preview_every,
            "chunk_size_bytes": self.chunk_size,
            **self._image_spec(),
            **self._embedding_spec(),
            **({"controls": [c.record() for c in self.controls]} if self.controls else {}),
        }

    def _embedding_spec(self) -> dict[str, object]:
        """The embeddings, only when the prompts name some (other records are unchanged)."""
        if not self.embeddings:
            return {}
        return {
            "embeddings": [
                {"lora": x.lora_id, "name": x.file_name, "sha256": x.sha256}
                for x in self.embeddings
            ]
        }

    @property
    def output_size(self) -> tuple[int, int]:
        """The size of the images the job delivers (the upscaled one with hires fix)."""
        if self.hires is None:
            return self.width, self.height
        return self.hires.size(self.width, self.height)

    def _image_spec(self) -> dict[str, object]:
        """The hires, image-to-image, inpainting and upscale fields, only when the job uses
        them (a plain text-to-image record is unchanged)."""
        if self.upscale is not None and self.init_image is not None:
            return {"init_image": self.init_image.record(), "upscale": self.upscale.record()}
        if self.hires is not None:
            return {"hires": self.hires.record()}
        if self.init_image is None:
            return {}
        out: dict[str, object] = {
            "init_image": self.init_image.record(),
            "strength": self.strength,
        }
        if self.mask_image is not None:
            out |= {
                "mask_image": self.mask_image.record(),
                "mask_blur": self.mask_blur,
                "inpaint_only_masked": self.inpaint_only_masked,
            }
            if self.inpaint_only_masked:
                out["inpaint_padding"] = self.inpaint_padding
        return out
