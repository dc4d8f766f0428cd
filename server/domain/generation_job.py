"""A generation job as the executor runs it: the request with defaults filled in and its
LoRAs resolved to files, and the key that says which jobs may share a batch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from server.domain.models import BaseModelConfig


@dataclass(frozen=True, slots=True)
class ResolvedLora:
    """A catalogued LoRA as a job applies it: resolved to a file and a weight before queuing."""

    lora_id: str
    name: str
    file_name: str
    sha256: str
    path: Path
    weight: float
    # Relative to a LoRA root: where another machine (a cluster worker) finds the same file.
    file_path: str = ""


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
    scheduler: str = ""
    loras: tuple[ResolvedLora, ...] = ()
    output_format: str = "png"
    chunk_size: int = 64 * 1024
    preview_every: int = 0
    # The principal that submitted it (the live job's handle answers only to it and admins).
    owner: str = ""

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
        }
