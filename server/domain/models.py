"""The catalog's vocabulary: pure values, no I/O, no grpc, no torch."""

from __future__ import annotations

import enum
import functools
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Generic, TypeVar

from server.domain.errors import FieldViolation, ValidationError
from server.domain.schedulers import NOISE_SCHEDULERS

T = TypeVar("T")


def is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def aware(value: datetime) -> datetime:
    """Stores may hand back naive UTC datetimes (SQLite); everything here is aware UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def clean_terms(values: Iterable[str]) -> tuple[str, ...]:
    """Tags and trigger words as stored: inner whitespace folded, empties dropped, duplicates
    removed in first-seen order, so every source of terms agrees on one form."""
    return tuple(dict.fromkeys(s for v in values if (s := " ".join(v.split()))))


class Architecture(enum.StrEnum):
    """Network family; LoRAs apply only to models of the same family."""

    UNSPECIFIED = "UNSPECIFIED"
    SD1 = "SD1"
    SD2 = "SD2"
    SDXL = "SDXL"
    SD3 = "SD3"
    FLUX = "FLUX"
    QWEN_IMAGE = "QWEN_IMAGE"
    Z_IMAGE = "Z_IMAGE"
    OTHER = "OTHER"


class LoraKind(enum.StrEnum):
    """What a catalogued file is: a LoRA (weights added to the model, applied by `loras` or
    `<lora:NAME:W>`) or a textual-inversion embedding (new token vectors for the text
    encoders, applied by naming it in a prompt, as A1111 does)."""

    LORA = "LORA"
    EMBEDDING = "EMBEDDING"


class LoraSource(enum.StrEnum):
    FILE = "FILE"
    CATALOG = "CATALOG"


# Civitai, kohya (ss_base_model_version) and modelspec (architecture) spell base models many
# ways; the first pattern that matches wins, so specific names come before generic ones.
_LINEAGE_PATTERNS: tuple[tuple[re.Pattern[str], Architecture], ...] = tuple(
    (re.compile(p, re.IGNORECASE), a)
    for p, a in (
        (r"flux", Architecture.FLUX),
        (r"qwen", Architecture.QWEN_IMAGE),
        (r"z[ _-]?image", Architecture.Z_IMAGE),
        (r"sd[ _-]?3|stable-diffusion-v3", Architecture.SD3),
        (
            r"sdxl|sd[ _-]?xl|stable-diffusion-xl|pony|illustrious|noobai|playground|sd[ _]?1?0?24",
            Architecture.SDXL,
        ),
        (r"sd[ _-]?v?2|stable-diffusion-v2|stable-diffusion-2", Architecture.SD2),
        (r"sd[ _-]?v?1|stable-diffusion-v1|stable-diffusion-1|^sd$", Architecture.SD1),
    )
)


@functools.lru_cache(maxsize=4096)
def architecture_of(lineage: str) -> Architecture:
    """Maps a base-model name from any source to its architecture (OTHER when unknown).
    Memoised: a catalog spells its base models a few dozen ways, and an import asks for each
    of them thousands of times."""
    name = lineage.strip()
    if not name:
        return Architecture.UNSPECIFIED
    try:
        return Architecture(name.upper())
    except ValueError:
        pass
    for pattern, arch in _LINEAGE_PATTERNS:
        if pattern.search(name):
            return arch
    return Architecture.OTHER


def resolve_architecture(base_model: str) -> Architecture:
    """The architecture a request's `base_model` names; refuses names we cannot place."""
    arch = architecture_of(base_model)
    if arch in (Architecture.UNSPECIFIED, Architecture.OTHER):
        raise ValidationError(
            FieldViolation(
                "base_model",
                f"{base_model!r} is not a known base model; use an architecture "
                "(SD1, SD2, SDXL, SD3, FLUX, QWEN_IMAGE, Z_IMAGE) or a lineage such as "
                "'SD 1.5' or 'Pony'",
            )
        )
    return arch


@dataclass(frozen=True, slots=True)
class BaseModelRef:
    architecture: Architecture
    lineage: str = ""

    @staticmethod
    def parse(lineage: str) -> BaseModelRef:
        return BaseModelRef(architecture_of(lineage), lineage.strip())

    def is_compatible_with(self, architecture: Architecture) -> bool:
        return self.architecture == architecture and architecture not in (
            Architecture.UNSPECIFIED,
            Architecture.OTHER,
        )


@dataclass(frozen=True, slots=True)
class LoraFile:
    path: str  # relative to its LoRA root, POSIX separators
    size_bytes: int
    sha256: str
    modified_time: datetime

    @property
    def autov2(self) -> str:
        """Civitai's AutoV2 hash: the first ten hex digits of the SHA-256."""
        return self.sha256[:10].upper()


@dataclass(frozen=True, slots=True)
class LoraMetadata:
    """What a file's header and sidecars, or a catalog record, say about a LoRA."""

    name: str
    base_model: BaseModelRef
    file_name: str = ""
    trigger_words: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    description: str = ""
    preferred_weight: float | None = None
    training_tags: tuple[tuple[str, int], ...] = ()
    rank: int = 0
    downloads: int = 0
    kind: LoraKind = LoraKind.LORA


@dataclass(frozen=True, slots=True)
class LoraView:
    """A LoRA as readers see it: the read model's row and the API's `Lora`."""

    id: str
    metadata: LoraMetadata
    source: LoraSource
    source_id: str = ""
    file: LoraFile | None = None
    available: bool = False
    create_time: datetime | None = None
    update_time: datetime | None = None
    version: int = 0

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def kind(self) -> LoraKind:
        return self.metadata.kind


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: tuple[T, ...]
    next_page_token: str = ""
    total_size: int = 0

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[T]:
        return iter(self.items)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    position: int
    aggregate_id: str
    aggregate_version: int
    type: str
    principal: str
    request_id: str
    occurred_at: datetime
    data: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LoraFilter:
    architecture: Architecture | None = None
    tag: str = ""
    available_only: bool = False
    kind: LoraKind | None = None  # None: every kind


@dataclass(frozen=True, slots=True)
class EventFilter:
    aggregate_id: str = ""
    type: str = ""
    principal: str = ""
    start_time: datetime | None = None
    end_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class FileEntry:
    """What an import needs to know about a catalogued file to skip re-hashing it."""

    lora_id: str
    path: str
    size_bytes: int
    modified_time: datetime
    sha256: str
    available: bool


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """A past generation as the read model keeps it."""

    position: int
    prompt: str
    lora_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ScannedLora:
    """A LoRA file as read from disk: where it lives, its identity and what it says."""

    root: Path
    file: LoraFile
    metadata: LoraMetadata
    header_metadata: dict[str, str] = field(default_factory=dict)


# torchao weight-only quantization of a model's denoiser on load: int8, or fp8 (fast on CUDA
# GPUs of compute capability 8.9 or newer).
QUANTIZATIONS = ("", "int8", "fp8")
# diffusers' offloading: "model" moves whole components (text encoders, denoiser, VAE) to the
# GPU while each runs; "sequential" moves layer by layer (least memory, slowest).
OFFLOADS = ("", "model", "sequential")


@dataclass(frozen=True, slots=True)
class BaseModelConfig:
    """A base model as configured: a local diffusers folder or a single-file checkpoint."""

    name: str
    architecture: Architecture
    path: Path
    scheduler: str = ""
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on the CPU
    vram_budget_gb: float = 0.0
    placeholder: bool = False
    # A local diffusers folder of the same architecture whose configs and tokenizers a
    # single-file checkpoint is loaded with (a checkpoint holds only weights).
    config_dir: Path | None = None
    # GenerationJob fields that must also be equal for two jobs to share a batch, beyond
    # those every model shares (server.domain.batching); the registry fills them in from the
    # model's family.
    batch_fields: tuple[str, ...] = ()
    # What requests that leave them at 0 get, instead of the family's defaults (0 / None:
    # the family's): a distilled checkpoint's few steps, a base model's guidance.
    default_width: int = 0
    default_height: int = 0
    default_steps: int = 0
    default_guidance_scale: float | None = None
    # The denoiser's weights quantized on load ("": as stored): QUANTIZATIONS.
    quantize: str = ""
    # Components kept in host memory and moved to the GPU only while they run: OFFLOADS.
    offload: str = ""
    # The denoiser's repeated blocks compiled with torch.compile on load.
    compile: bool = False


@dataclass(frozen=True, slots=True)
class ControlNetConfig:
    """A ControlNet as configured (`[[controlnets]]`): a local diffusers folder, or a
    single file with `config_dir` (a folder holding its config.json) beside it."""

    name: str
    architecture: Architecture
    path: Path
    config_dir: Path | None = None


@dataclass(frozen=True, slots=True)
class ControlNetInfo:
    config: ControlNetConfig
    ready: bool
    error: str = ""


@dataclass(frozen=True, slots=True)
class UpscalerModelConfig:
    """An upscaler model as configured (`[[upscalers]]`): one `.safetensors` file."""

    name: str
    path: Path


@dataclass(frozen=True, slots=True)
class UpscalerModelInfo:
    config: UpscalerModelConfig
    ready: bool
    error: str = ""
    architecture: str = ""  # "ESRGAN" or "Compact" when ready
    scale: int = 0  # its native factor when ready


@dataclass(frozen=True, slots=True)
class GenerationDefaults:
    """What a request that leaves size, steps or guidance at zero gets, per model family."""

    width: int
    height: int
    steps: int
    guidance_scale: float


# For a model no family claims (it cannot run, but is still listed).
FALLBACK_DEFAULTS = GenerationDefaults(512, 512, 25, 7.0)


@dataclass(frozen=True, slots=True)
class BaseModelInfo:
    config: BaseModelConfig
    ready: bool
    error: str = ""
    dtype: str = ""
    default_scheduler: str = ""
    defaults: GenerationDefaults = FALLBACK_DEFAULTS
    # Not ready yet but on its way (the embedded placeholder being built): worth retrying.
    loading: bool = False
    # A dedicated inpainting checkpoint (9-channel UNet): every mode runs as inpainting.
    inpainting: bool = False
    # The `scheduler` names its family can sample with ("" is always its own).
    schedulers: tuple[str, ...] = NOISE_SCHEDULERS
    # False for guidance-distilled families (FLUX): a negative prompt would be ignored.
    takes_negative_prompt: bool = True
    # False where the hires fix is not built for the family yet.
    hires_fix: bool = True
    # False where the family's img2img takes no latents: hires fix with image upscalers only
    # (`latent_hires_controlled`: with ControlNets).
    latent_hires: bool = True
    latent_hires_controlled: bool = True
    # The modes (generation_job.Mode values) its family runs ControlNets in; whether several
    # ControlNets run at once (`several_control_images`: several images, each through its own
    # ControlNet or, where `several_controlnets` is False, all through one Union ControlNet);
    # whether they take a step range (guidance_start/end).
    controlnet_modes: tuple[str, ...] = ("txt2img", "img2img", "inpaint")
    several_control_images: bool = True
    several_controlnets: bool = True
    controlnet_step_range: bool = True
    # Its weights files' bytes on disk (0: not known).
    weights_bytes: int = 0
    # What width and height must be multiples of.
    size_multiple: int = 8
