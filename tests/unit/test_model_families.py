"""The pipeline-family seam (server/infrastructure/diffusion/families): which architectures
are served and by whom, each family's defaults as requests get them, and a made-up family
added to FAMILIES alone being enough for the registry, the worker adverts, batching and the
executor to serve its architecture. No real pipeline is built."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from server.application.generation.jobs import PLACEHOLDER_DEFAULTS, _defaults
from server.application.generation.request import GenerationLimits, fit_size
from server.domain.batching import batch_key
from server.domain.generation_events import Completed, Progress
from server.domain.generation_job import GenerationJob, HiresFix
from server.domain.models import (
    Architecture,
    BaseModelConfig,
    BaseModelInfo,
    GenerationDefaults,
    architecture_of,
)
from server.infrastructure.broker.replica import _model_info, model_document
from server.infrastructure.diffusion import families
from server.infrastructure.diffusion import images as images_module
from server.infrastructure.diffusion.executor import DiffusionExecutor
from server.infrastructure.diffusion.families import FAMILIES, family_for
from server.infrastructure.diffusion.families.base import (
    BatchRows,
    CheckpointPart,
    ModelFamily,
    StepCallback,
)
from server.infrastructure.diffusion.registry import (
    ModelRegistry,
    _traits,
    inspect_model,
    load_pipeline,
)

SERVED = {
    Architecture.SD1,
    Architecture.SD2,
    Architecture.SDXL,
    Architecture.FLUX,
    Architecture.SD3,
    Architecture.QWEN_IMAGE,
    Architecture.Z_IMAGE,
}
DECLARATIONS = (
    "architectures",
    "pipeline_classes",
    "components",
    "defaults",
    "lora_components",
    "preview_factors",
    "preview_bias",
    "batch_fields",
)


def unsupported(architecture: Architecture, tmp_path: Path) -> bool:
    error, _ = inspect_model(BaseModelConfig("m", architecture, tmp_path / "absent"))
    return "is not supported yet" in error


# -- the registered families ----------------------------------------------------------------------


def test_every_architecture_the_registry_accepts_has_exactly_one_family(tmp_path: Path) -> None:
    accepted = {a for a in Architecture if not unsupported(a, tmp_path)}
    assert accepted == SERVED
    for architecture in Architecture:
        serving = [f for f in FAMILIES if architecture in f.architectures]
        assert len(serving) == (1 if architecture in accepted else 0), architecture
        assert family_for(architecture) is (serving[0] if serving else None)


def test_no_two_families_serve_one_architecture() -> None:
    served = [a for family in FAMILIES for a in family.architectures]
    assert len(served) == len(set(served))
    assert len({type(f) for f in FAMILIES}) == len(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: type(f).__name__)
def test_every_family_makes_every_declaration(family: ModelFamily) -> None:
    for name in DECLARATIONS:
        assert hasattr(family, name), f"{type(family).__name__} does not declare {name}"
    assert family.architectures
    assert family.pipeline_classes
    assert family.lora_components
    assert "scheduler" in family.components  # the registry reads its default scheduler there
    assert all(len(row) == 3 for row in family.preview_factors)
    job_fields = {f.name for f in fields(GenerationJob)}
    assert set(family.batch_fields) <= job_fields
    for architecture in family.architectures:
        assert family.checkpoint_parts(architecture)


@pytest.mark.parametrize(
    ("architecture", "expected"),
    [
        (Architecture.SD1, GenerationDefaults(512, 512, 25, 7.0)),
        (Architecture.SD2, GenerationDefaults(512, 512, 25, 7.0)),
        (Architecture.SDXL, GenerationDefaults(1024, 1024, 30, 5.0)),
        (Architecture.FLUX, GenerationDefaults(1024, 1024, 28, 3.5)),
        (Architecture.SD3, GenerationDefaults(1024, 1024, 28, 3.5)),
        (Architecture.QWEN_IMAGE, GenerationDefaults(1328, 1328, 50, 4.0)),
        (Architecture.Z_IMAGE, GenerationDefaults(1024, 1024, 9, 0.0)),
    ],
)
def test_defaults_per_family_reach_requests(
    architecture: Architecture, expected: GenerationDefaults, tmp_path: Path
) -> None:
    family = family_for(architecture)
    assert family is not None
    assert family.defaults == expected
    config = BaseModelConfig("m", architecture, tmp_path / "absent")
    (info,) = ModelRegistry((config,), data_dir=tmp_path).statuses()
    assert info.defaults == expected
    assert _defaults(info) == expected
    # The placeholder rule stays the application's, whatever the family.
    placeholder = replace(info, config=replace(config, placeholder=True))
    assert _defaults(placeholder) == PLACEHOLDER_DEFAULTS == GenerationDefaults(64, 64, 4, 7.0)


def test_derived_sizes_follow_the_familys_multiple() -> None:
    """An init image's size and a hires fix's second pass, for a family that packs 2x2
    patches of an 8x VAE's latents (16) and one that does not (8)."""
    limits = GenerationLimits()
    assert fit_size(1000, 700, limits) == (1000, 696)
    assert fit_size(1000, 700, limits, 16) == (992, 688)
    hires = HiresFix(scale=1.5, steps=4, denoising_strength=0.5, upscaler="Lanczos")
    assert hires.size(1000, 1000) == (1496, 1496)
    packed = replace(hires, multiple=16)
    assert packed.size(1000, 1000) == (1488, 1488)
    assert packed.record()["multiple"] == 16
    assert "multiple" not in hires.record()
    assert {f.size_multiple for f in FAMILIES if f.denoiser == "transformer"} == {16}


def test_a_model_entry_overrides_its_familys_defaults(tmp_path: Path) -> None:
    """FLUX.1 schnell runs 4 steps, a Z-Image base model guidance 4: the entry says so."""
    schnell = BaseModelConfig(
        "schnell",
        Architecture.FLUX,
        tmp_path / "absent",
        default_steps=4,
        default_guidance_scale=0.0,
    )
    base = BaseModelConfig(
        "zbase",
        Architecture.Z_IMAGE,
        tmp_path / "absent",
        default_steps=28,
        default_guidance_scale=4.0,
        default_width=768,
    )
    infos = ModelRegistry((schnell, base), data_dir=tmp_path).statuses()
    assert [i.defaults for i in infos] == [
        GenerationDefaults(1024, 1024, 4, 0.0),
        GenerationDefaults(768, 1024, 28, 4.0),
    ]


@pytest.mark.parametrize(
    "architecture",
    [
        Architecture.SD1,
        Architecture.SDXL,
        Architecture.FLUX,
        Architecture.SD3,
        Architecture.QWEN_IMAGE,
        Architecture.Z_IMAGE,
    ],
)
def test_worker_adverts_carry_defaults_and_older_ones_get_the_familys(
    architecture: Architecture,
) -> None:
    config = BaseModelConfig("m", architecture, Path("/models/m"))
    custom = GenerationDefaults(320, 192, 9, 3.5)
    document = json.loads(json.dumps(model_document(BaseModelInfo(config, True, defaults=custom))))
    assert _model_info(document).defaults == custom
    for key in ("defaults", "batch_fields"):
        del document[key]  # an advert from a worker that predates them
    family = family_for(architecture)
    assert family is not None
    assert _model_info(document).defaults == family.defaults
    assert _model_info(document).config.batch_fields == family.batch_fields
    # What the family takes travels too: a replica checks requests against it.
    taken = _traits(config)
    assert taken["controlnet_modes"] == tuple(family.controlnet_pipelines)
    again = _model_info(
        json.loads(json.dumps(model_document(BaseModelInfo(config, True, **taken))))
    )
    assert {name: getattr(again, name) for name in taken} == taken
    for name in set(taken) - {"schedulers", "takes_negative_prompt", "hires_fix"}:
        del document[name]  # an older worker's advert: its family's
        assert getattr(_model_info(document), name) == taken[name]


def test_a_folder_of_a_pipeline_no_family_accepts_is_reported(tmp_path: Path) -> None:
    folder = tmp_path / "flux"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    for architecture in (Architecture.SD1, Architecture.SDXL):
        error, _ = inspect_model(BaseModelConfig("f", architecture, folder))
        assert f"holds a FluxPipeline, not a {architecture.value} pipeline" in error


# -- a family added to FAMILIES -------------------------------------------------------------------


class FakeScheduler:
    config: dict[str, object] = {"num_train_timesteps": 1000}
    timesteps: Sequence[int] = ()


class FakePipeline:
    """What the executor needs from a loaded pipeline; the family makes the call."""

    def __init__(self) -> None:
        self.scheduler = FakeScheduler()
        self.components: dict[str, object] = {}
        self.device = ""

    def set_progress_bar_config(self, **_: object) -> None:
        pass

    def to(self, device: str) -> FakePipeline:
        self.device = device
        return self


class Flowing(ModelFamily):
    """A made-up family for OTHER folders (an architecture no family serves) holding a
    `FakeFlowPipeline`."""

    architectures = (Architecture.OTHER,)
    pipeline_classes = frozenset({"FakeFlowPipeline"})
    components = ("transformer", "vae", "scheduler")
    defaults = GenerationDefaults(768, 640, 12, 3.0)
    lora_components = ("transformer",)
    preview_factors = ((0.1, 0.2, 0.3),) * 16
    batch_fields = ("preview_every",)

    def __init__(self) -> None:
        self.loaded: list[Path] = []
        self.calls: list[BatchRows] = []

    def checkpoint_parts(self, architecture: Architecture) -> tuple[CheckpointPart, ...]:
        return (CheckpointPart("the transformer", ("model.diffusion_model.",)),)

    def pipeline_class(self) -> Any:
        raise AssertionError("folders only in this test")

    def load_folder(self, config: BaseModelConfig, torch_dtype: Any) -> Any:
        self.loaded.append(config.path)
        return FakePipeline()

    def denoise(self, pipe: Any, rows: BatchRows, on_step: StepCallback) -> Sequence[Any]:
        self.calls.append(rows)
        for step in range(rows.job.steps):
            on_step(pipe, step, 0, {})
        side = (rows.job.width, rows.job.height)
        return [Image.new("RGB", side, (i * 40, 0, 0)) for i in range(len(rows.prompts))]


@pytest.fixture
def flowing(monkeypatch: pytest.MonkeyPatch) -> Flowing:
    family = Flowing()
    monkeypatch.setattr(families, "FAMILIES", (*FAMILIES, family))
    return family


@pytest.fixture
def flux_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "flux"
    for component in Flowing.components:
        (folder / component).mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FakeFlowPipeline"}))
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler"}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return folder


def flux_job(model: BaseModelConfig, **fields: Any) -> GenerationJob:
    base: dict[str, Any] = {
        "generation_id": str(uuid.uuid4()),
        "model": model,
        "prompt": "a fox",
        "original_prompt": "a fox",
        "width": 16,
        "height": 8,
        "steps": 3,
        "guidance_scale": 3.0,
        "seed": 5,
    }
    return GenerationJob(**{**base, **fields})


def test_without_its_family_an_architecture_is_refused(flux_folder: Path) -> None:
    error, _ = inspect_model(BaseModelConfig("flux", Architecture.OTHER, flux_folder))
    assert error == "architecture OTHER is not supported yet"


def test_a_family_in_families_is_all_the_registry_needs(
    flowing: Flowing, flux_folder: Path, tmp_path: Path
) -> None:
    config = BaseModelConfig("flux", Architecture.OTHER, flux_folder)
    assert inspect_model(config) == ("", "FlowMatchEulerDiscreteScheduler")
    (info,) = ModelRegistry((config,), data_dir=tmp_path).statuses()
    assert info.ready, info.error
    assert info.defaults == Flowing.defaults
    assert info.config.batch_fields == ("preview_every",)
    # Its own folder rules, not SD's: without the transformer it is not a model.
    (flux_folder / "transformer").rmdir()
    assert "lacks transformer" in inspect_model(config)[0]
    (flux_folder / "transformer").mkdir()
    pipe = load_pipeline(config, device="cpu")
    assert isinstance(pipe, FakePipeline)
    assert flowing.loaded == [flux_folder]


def test_a_familys_batch_fields_keep_jobs_apart(flowing: Flowing, tmp_path: Path) -> None:
    plain = BaseModelConfig("flux", Architecture.OTHER, tmp_path)
    (info,) = ModelRegistry((plain,), data_dir=tmp_path).statuses()
    model = info.config
    assert batch_key(flux_job(model, preview_every=1)) != batch_key(flux_job(model))
    assert batch_key(flux_job(plain, preview_every=1)) == batch_key(flux_job(plain))
    assert batch_key(flux_job(model, seed=1)) == batch_key(flux_job(model, seed=2))


def test_the_executor_runs_a_batch_through_its_familys_call(
    flowing: Flowing, flux_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The manifest names the diffusers version, and importing diffusers is slow.
    monkeypatch.setattr(images_module, "manifest", lambda job, index, loaded: {})
    model = BaseModelConfig("flux", Architecture.OTHER, flux_folder)
    executor = DiffusionExecutor(
        loader=lambda m, device, dtype: load_pipeline(m, device=device, dtype=dtype)
    )
    executor.start()
    try:
        handle = executor.submit(flux_job(model, num_images=2, negative_prompt="blur"))
        payloads = [e.payload for e in handle.events(poll=0.05)]
    finally:
        executor.stop(timeout=10.0)
    assert isinstance(payloads[-1], Completed), payloads[-1]
    assert [p.step for p in payloads if isinstance(p, Progress)] == [1, 2, 3]
    assert len(handle.images) == 2
    (rows,) = flowing.calls
    assert rows.prompts == ["a fox", "a fox"]
    assert rows.negative_prompts == ["blur", "blur"]
    assert [g.initial_seed() for g in rows.generators] == [5, 6]
    assert executor.loaded_models() == ["flux"]


@pytest.mark.parametrize(
    ("lineage", "architecture"),
    [
        ("Flux.1 D", Architecture.FLUX),
        ("Flux.1 S", Architecture.FLUX),
        ("SD 3.5", Architecture.SD3),
        ("SD 3.5 Large", Architecture.SD3),
        ("SD 3.5 Medium", Architecture.SD3),
        ("Qwen", Architecture.QWEN_IMAGE),
        ("ZImageTurbo", Architecture.Z_IMAGE),
        ("Z-Image", Architecture.Z_IMAGE),
        ("Illustrious", Architecture.SDXL),
    ],
)
def test_civitai_lineage_names_of_the_newer_families(
    lineage: str, architecture: Architecture
) -> None:
    assert architecture_of(lineage) is architecture
