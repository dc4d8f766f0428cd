"""Generation jobs through the buses, the real executor, the real event store (SQLite) and the
tiny SD1.5/SDXL pipelines: batching, LoRAs, schedulers, previews, submit/watch/cancel, the
recorded lifecycle and recovery after a restart."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from server.application.commands import GenerateImageCommand, GenerationRequest
from server.application.commands.generation import (
    CancelGenerationCommand,
    LoraChoice,
    QuickGenerateCommand,
    QuickGenerateHandler,
    SubmitGenerationCommand,
)
from server.application.commands.import_loras import ImportLoRAsCommand
from server.application.commands.recommend import LoRARecommendation, RecommendLoRAsCommand
from server.application.context import DispatchContext, use_context
from server.application.queries import (
    GetGenerationQuery,
    ListGenerationsQuery,
    WatchGenerationQuery,
)
from server.bootstrap import Container, bootstrap
from server.config import Settings
from server.devtools.tiny_loras import write_lora_for_pipeline
from server.domain import generation_events as gen
from server.domain.errors import PreconditionError, UnavailableError, ValidationError
from server.domain.generation import GenerationState
from server.domain.generation_job import GenerationJob
from server.domain.models import Architecture, BaseModelConfig, EventFilter, LoraView
from server.infrastructure.diffusion.placeholder import build_tiny_sd15, build_tiny_sdxl
from server.infrastructure.diffusion.registry import load_pipeline

torch.set_num_threads(1)

SD1_META = {"ss_base_model_version": "sd_v1"}
SDXL_META = {"ss_base_model_version": "sdxl_base_v1-0"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"sd": build_tiny_sd15(root / "sd"), "xl": build_tiny_sdxl(root / "xl")}


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> Path:
    """LoRAs fitted to the tiny pipelines, with metadata naming their architecture."""
    folder = tmp_path_factory.mktemp("lora-src")
    sd = load_pipeline(BaseModelConfig("sd", Architecture.SD1, models["sd"]))
    xl = load_pipeline(BaseModelConfig("xl", Architecture.SDXL, models["xl"]))
    write_lora_for_pipeline(
        sd, folder / "ink.safetensors", seed=1, metadata={**SD1_META, "ss_output_name": "ink"}
    )
    write_lora_for_pipeline(
        sd,
        folder / "glow.safetensors",
        fmt="kohya",
        seed=2,
        metadata={**SD1_META, "ss_output_name": "glow"},
    )
    write_lora_for_pipeline(
        xl, folder / "neon_xl.safetensors", seed=3, metadata={**SDXL_META, "ss_output_name": "neon"}
    )
    return folder


def make(tmp_path: Path, models: dict[str, Path], lora_files: Path, **settings: Any) -> Container:
    roots = (tmp_path / "loras",)
    roots[0].mkdir(parents=True, exist_ok=True)
    for f in lora_files.iterdir():
        (roots[0] / f.name).write_bytes(f.read_bytes())
    c = bootstrap(
        Settings(
            data_dir=tmp_path,
            storage_url=f"sqlite:///{tmp_path / 'loracle.db'}",
            lora_roots=roots,
            models=(
                BaseModelConfig("sd", Architecture.SD1, models["sd"]),
                BaseModelConfig("xl", Architecture.SDXL, models["xl"]),
                # Marked as a placeholder so requests without a size get 64 px, 4 steps.
                BaseModelConfig("tiny", Architecture.SD1, models["sd"], placeholder=True),
            ),
            **settings,
        ),
        build_embedded_model=False,
    )
    list(c.commands.stream(ImportLoRAsCommand(directory=""), DispatchContext()))
    c.projector.catch_up()
    return c


@pytest.fixture
def c(tmp_path: Path, models: dict[str, Path], lora_files: Path) -> Iterator[Container]:
    container = make(tmp_path, models, lora_files)
    yield container
    container.close()


def request(**spec: Any) -> GenerationRequest:
    base: dict[str, Any] = {
        "model": "sd",
        "prompt": "a red fox",
        "steps": 3,
        "seed": 11,
        "width": 64,
        "height": 64,
    }
    return GenerationRequest(**{**base, **spec})


def run(c: Container, ctx: DispatchContext | None = None, **spec: Any) -> list[gen.GenerationEvent]:
    return list(c.commands.stream(GenerateImageCommand(request=request(**spec)), ctx))


def image_bytes(events: list[gen.GenerationEvent]) -> dict[int, bytes]:
    out: dict[int, bytearray] = {}
    for e in events:
        if isinstance(e.payload, gen.ImageChunk):
            out.setdefault(e.payload.image_index, bytearray()).extend(e.payload.data)
    return {k: bytes(v) for k, v in out.items()}


def pixels(events: list[gen.GenerationEvent], index: int = 0) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image_bytes(events)[index])), dtype=np.int16)


def final(events: list[gen.GenerationEvent]) -> gen.Payload:
    return events[-1].payload


# -- LoRAs ----------------------------------------------------------------------------------


def test_a_lora_changes_the_image_and_the_base_model_comes_back_exactly(c: Container) -> None:
    before = run(c)
    with_lora = run(c, loras=(LoraChoice("ink", 1.0),))
    after = run(c)
    assert isinstance(final(with_lora), gen.Completed)
    assert np.abs(pixels(with_lora) - pixels(before)).mean() > 1.0
    # Fused weights were restored bit for bit: the same request gives the same pixels.
    assert np.array_equal(pixels(after), pixels(before))
    png = Image.open(io.BytesIO(image_bytes(with_lora)[0]))
    assert 'Lora hashes: "ink: ' in png.info["parameters"]
    manifest = json.loads(png.info["loracle"])
    assert [(x["name"], x["weight"]) for x in manifest["loras"]] == [("ink", 1.0)]


def test_prompt_tags_select_loras_and_are_not_encoded(c: Container) -> None:
    by_field = run(c, loras=(LoraChoice("glow", 0.7),))
    by_tag = run(c, prompt="a red fox <lora:glow:0.7>")
    assert not np.array_equal(pixels(by_tag), pixels(run(c)))
    # Same LoRA, same weight, same encoded text: the same pixels, and the same A1111 prompt
    # (a LoRA from the field is written as the tag A1111 would read).
    assert np.array_equal(pixels(by_tag), pixels(by_field))
    for events in (by_field, by_tag):
        png = Image.open(io.BytesIO(image_bytes(events)[0]))
        assert png.info["parameters"].splitlines()[0] == "a red fox <lora:glow:0.7>"


def test_a_lora_for_another_architecture_is_refused_before_queuing(c: Container) -> None:
    with pytest.raises(PreconditionError) as err:
        run(c, loras=(LoraChoice("neon_xl"),))
    assert err.value.reason == "LORA_ARCHITECTURE_MISMATCH"
    assert err.value.metadata["lora_architecture"] == "SDXL"
    assert err.value.metadata["model_architecture"] == "SD1"
    page = c.queries.dispatch(ListGenerationsQuery()).data
    assert page.items == ()  # nothing was queued or recorded


def test_sdxl_with_its_lora(c: Container) -> None:
    plain = run(c, model="xl")
    styled = run(c, model="xl", loras=(LoraChoice("neon_xl", 0.9),))
    assert isinstance(final(styled), gen.Completed)
    assert np.abs(pixels(styled) - pixels(plain)).mean() > 1.0
    assert np.array_equal(pixels(run(c, model="xl")), pixels(plain))


# -- batching -------------------------------------------------------------------------------


def test_a_lora_is_named_by_the_name_loras_list_shows(c: Container, tmp_path: Path) -> None:
    """neon_xl.safetensors is listed as "neon"; a second file with that name makes it
    ambiguous, and the error lists both."""
    neon = c.read_model.find_by_file_name("neon_xl")[0]
    assert neon.metadata.name == "neon"
    events = run(c, model="xl", loras=(LoraChoice("NEON", 0.9),))
    assert isinstance(final(events), gen.Completed)
    root = tmp_path / "loras"
    with safe_open(str(root / "neon_xl.safetensors"), framework="pt") as f:
        metadata = {**(f.metadata() or {}), "ss_seed": "2"}  # other bytes, the same name
    save_file(load_file(root / "neon_xl.safetensors"), root / "neon_b.safetensors", metadata)
    list(c.commands.stream(ImportLoRAsCommand(directory=""), DispatchContext()))
    c.projector.catch_up()
    with pytest.raises(ValidationError) as ambiguous:
        run(c, model="xl", loras=(LoraChoice("neon"),))
    message = ambiguous.value.field_violations[0].description
    assert "names 2 LoRAs" in message
    assert neon.id in message
    assert isinstance(final(run(c, model="xl", loras=(LoraChoice("neon_b"),))), gen.Completed)


def test_compatible_jobs_run_as_one_batch_with_the_images_they_would_get_alone(
    tmp_path: Path, models: dict[str, Path], lora_files: Path
) -> None:
    c = make(tmp_path, models, lora_files, batch_wait_ms=300.0)
    try:
        alone = {seed: pixels(run(c, seed=seed)) for seed in (21, 22, 23)}
        results: dict[int, list[gen.GenerationEvent]] = {}

        def client(seed: int) -> None:
            results[seed] = run(c, DispatchContext(), seed=seed)

        threads = [threading.Thread(target=client, args=(s,)) for s in (21, 22, 23)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for seed, events in results.items():
            started = next(e.payload for e in events if isinstance(e.payload, gen.Started))
            assert started.batch_size == 3
            assert np.abs(pixels(events) - alone[seed]).max() <= 1
        assert c.executor.stats.batch_sizes[-1] == 3
        # A different size is a different batch.
        other = run(c, width=72, height=64)
        started = next(e.payload for e in other if isinstance(e.payload, gen.Started))
        assert started.batch_size == 1
    finally:
        c.close()


# -- schedulers and previews ----------------------------------------------------------------


def test_the_scheduler_is_chosen_per_request(c: Container) -> None:
    default = run(c)
    ancestral = run(c, scheduler="euler_a")
    assert not np.array_equal(pixels(ancestral), pixels(default))
    png = Image.open(io.BytesIO(image_bytes(ancestral)[0]))
    assert "Sampler: Euler a" in png.info["parameters"]
    assert np.array_equal(pixels(run(c)), pixels(default))  # the model's own is back
    plms = run(c, scheduler="pndm")  # one more timestep than steps: progress says so
    progress = [e.payload for e in plms if isinstance(e.payload, gen.Progress)]
    assert isinstance(final(plms), gen.Completed)
    assert [(p.step, p.total_steps) for p in progress] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    with pytest.raises(ValidationError) as err:
        run(c, scheduler="warp_drive")
    assert err.value.violations[0].field == "spec.scheduler"


def test_previews_every_n_steps(c: Container) -> None:
    events = run(c, steps=4, preview_every_n_steps=2)
    previews = [e.payload for e in events if isinstance(e.payload, gen.Preview)]
    assert [(p.image_index, p.step) for p in previews] == [(0, 2)]
    preview = Image.open(io.BytesIO(previews[0].jpeg))
    assert preview.format == "JPEG"
    # Latent resolution: the tiny VAE downsamples by 2 (real SD VAEs by 8).
    assert preview.size == (32, 32)
    assert not any(isinstance(e.payload, gen.Preview) for e in run(c))


# -- submit, watch, cancel, record --------------------------------------------------------


def submit(c: Container, **spec: Any) -> tuple[str, int]:
    result = c.commands.dispatch(SubmitGenerationCommand(request=request(**spec)))
    generation_id, _ = result.unwrap()
    return generation_id, result.position


def watch(c: Container, generation_id: str, after: int = 0) -> list[gen.GenerationEvent]:
    return list(
        c.queries.stream(WatchGenerationQuery(generation_id=generation_id, after_sequence=after))
    )


def test_submit_then_watch_from_anywhere_and_resume(c: Container) -> None:
    generation_id, position = submit(c)
    assert position > 0
    everything = watch(c, generation_id)
    assert isinstance(final(everything), gen.Completed)
    # A second watcher, resuming after event 3, gets exactly the rest.
    assert watch(c, generation_id, after=3) == everything[3:]
    c.recorder.flush()
    c.projector.catch_up()
    view = c.queries.dispatch(GetGenerationQuery(generation_id=generation_id)).data
    assert view.state is GenerationState.SUCCEEDED
    assert view.spec["steps"] == 3
    data = image_bytes(everything)[0]
    assert view.images[0].sha256 == hashlib.sha256(data).hexdigest()
    assert set(view.timings) >= {"queue_seconds", "denoising_seconds"}


def test_a_finished_generation_replays_from_its_stored_images(
    tmp_path: Path, models: dict[str, Path], lora_files: Path
) -> None:
    c = make(tmp_path, models, lora_files)
    generation_id, _ = submit(c, num_images=2)
    live = watch(c, generation_id)
    c.close()
    again = make(tmp_path, models, lora_files)  # a new process: nothing live
    try:
        replayed = watch(again, generation_id)
        assert image_bytes(replayed) == image_bytes(live)
        assert isinstance(final(replayed), gen.Completed)
        done = [e.payload for e in replayed if isinstance(e.payload, gen.ImageComplete)]
        assert [d.seed for d in done] == [11, 12]
    finally:
        again.close()


def test_cancel_a_running_and_a_queued_generation(c: Container) -> None:
    running, _ = submit(c, steps=150, prompt="slow")
    queued, _ = submit(c, steps=150, prompt="slower", width=72)
    for event in watch_live(c, running):
        if isinstance(event.payload, gen.Progress):
            break
    view = c.commands.dispatch(CancelGenerationCommand(generation_id=queued)).unwrap()
    assert view is not None
    assert view.state is GenerationState.CANCELLED
    view = c.commands.dispatch(CancelGenerationCommand(generation_id=running)).unwrap()
    assert view is not None
    assert view.state is GenerationState.CANCELLED
    events = watch(c, running)
    assert isinstance(final(events), gen.Cancelled)
    assert not any(isinstance(e.payload, gen.ImageChunk) for e in events)
    steps = [e.payload.step for e in events if isinstance(e.payload, gen.Progress)]
    assert max(steps) < 150
    # Cancelling again changes nothing; the executor serves the next job normally.
    again = c.commands.dispatch(CancelGenerationCommand(generation_id=running)).unwrap()
    assert again is not None
    assert again.state is GenerationState.CANCELLED
    assert isinstance(final(run(c)), gen.Completed)
    c.recorder.flush()
    c.projector.catch_up()
    page = c.queries.dispatch(ListGenerationsQuery(state="CANCELLED")).data
    assert {g.id for g in page.items} == {running, queued}


def watch_live(c: Container, generation_id: str) -> Iterator[gen.GenerationEvent]:
    handle = c.executor.handle(generation_id)
    assert handle is not None
    return handle.events()


def test_generations_are_listed_newest_first_and_paged(c: Container) -> None:
    ids = [submit(c, seed=s)[0] for s in (1, 2, 3)]
    for gid in ids:
        watch(c, gid)
    c.recorder.flush()
    c.projector.catch_up()
    first = c.queries.dispatch(ListGenerationsQuery(page_size=2)).data
    assert [g.id for g in first.items] == [ids[2], ids[1]]
    second = c.queries.dispatch(
        ListGenerationsQuery(page_size=2, page_token=first.next_page_token)
    ).data
    assert [g.id for g in second.items] == [ids[0]]
    assert second.next_page_token == ""
    assert all(g.state is GenerationState.SUCCEEDED for g in (*first.items, *second.items))


def test_lifecycle_events_are_the_audit_trail_and_lora_use_is_learned(c: Container) -> None:
    events = run(c, prompt="ink fox", loras=(LoraChoice("ink"),))
    generation_id = events[0].generation_id
    c.recorder.flush()
    c.projector.catch_up()
    trail = [e.type for e in c.read_model.events(EventFilter(aggregate_id=generation_id), 100)]
    assert trail == ["GenerationSubmitted", "GenerationStarted", "GenerationSucceeded"]
    history = list(c.read_model.history())
    assert [h.prompt for h in history] == ["ink fox"]


def test_a_recommendation_answered_by_generate_image_is_learned_across_a_restart(
    tmp_path: Path, models: dict[str, Path], lora_files: Path
) -> None:
    """RecommendLoRAs, then GenerateImage by the same principal with one of the LoRAs: the
    one used ranks first for that prompt next time, the one not used loses confidence, and
    both hold after a restart."""
    c = make(tmp_path, models, lora_files)
    alice = DispatchContext(principal="alice")
    prompt = "ink glow, a red fox"

    def ranked(container: Container) -> dict[str, float]:
        found = container.recommender.search(prompt, Architecture.SD1, 10)
        return {r.lora.name: r.confidence for r in found}

    try:
        before = ranked(c)
        made = c.commands.dispatch(
            RecommendLoRAsCommand(prompt=prompt, base_model="SD 1.5", max_loras=2), alice
        ).unwrap()
        names = [r.lora.name for r in made]
        assert sorted(names) == ["glow", "ink"]
        chosen, other = names[1], names[0]
        assert next(iter(before)) == other
        events = run(c, alice, prompt=prompt, loras=(LoraChoice(chosen, 0.8),))
        assert isinstance(final(events), gen.Completed)
        c.recorder.flush()
        c.projector.catch_up()
        [learned] = list(c.read_model.feedback())
        assert learned.recommendation_id == made.recommendation_id
        assert len(learned.accepted) == len(learned.skipped) == 1
        after = ranked(c)
        assert next(iter(after)) == chosen
        assert after[other] < before[other]
    finally:
        c.close()
    again = make(tmp_path, models, lora_files)
    try:
        assert ranked(again) == after
    finally:
        again.close()


def test_jobs_a_dead_process_left_running_are_marked_failed_on_start(
    tmp_path: Path, models: dict[str, Path], lora_files: Path
) -> None:
    c = make(tmp_path, models, lora_files)
    generation_id, _ = submit(c, steps=150)
    for event in watch_live(c, generation_id):
        if isinstance(event.payload, gen.Progress):
            break
    c.recorder.flush()
    # The process dies here: nothing records the end. (Stopping the worker without letting
    # it publish is what a kill does; the recorder is closed first so it saves nothing.)
    c.recorder.close()
    c.executor.stop()
    c.projector.stop()
    c.store.close()
    again = make(tmp_path, models, lora_files)
    try:
        again.projector.catch_up()
        deadline = time.monotonic() + 10
        while True:
            view = again.queries.dispatch(GetGenerationQuery(generation_id=generation_id)).data
            if view.state is not GenerationState.RUNNING or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert view.state is GenerationState.FAILED
        assert "restarted" in view.error
    finally:
        again.close()


class ConfidentAbout:
    """A recommender that is sure about one LoRA (the engine itself is tested elsewhere)."""

    def __init__(self, view: LoraView, trigger: str) -> None:
        self.view = view
        self.trigger = trigger
        self.asked: list[tuple[str, str]] = []

    def recommend(
        self,
        prompt: str,
        base_model: str,
        *,
        max_loras: int,
        min_confidence: float | None,
        include_unavailable: bool,
    ) -> list[LoRARecommendation]:
        self.asked.append((prompt, base_model))
        return [LoRARecommendation(self.view, 0.9, 0.7, (self.trigger,))]


def test_quick_generate_uses_confident_loras_and_their_trigger_words(c: Container) -> None:
    ink = c.read_model.find_by_file_name("ink")[0]
    recommender = ConfidentAbout(ink, "inkwash")
    handler = QuickGenerateHandler(c.generations, recommender)
    command = QuickGenerateCommand(prompt="a fox", model="tiny", seed=3)
    req = handler.request_for(command)
    assert recommender.asked == [("a fox", "SD1")]
    assert req.prompt == "a fox, inkwash"
    assert req.loras == (LoraChoice(ink.id, 0.7),)
    with use_context(DispatchContext()):
        events = list(handler.handle(command))
    assert isinstance(final(events), gen.Completed)
    png = Image.open(io.BytesIO(image_bytes(events)[0]))
    # The picked LoRA is in the A1111 prompt as a tag: pasted into A1111, it applies.
    assert png.info["parameters"].startswith("a fox, inkwash <lora:ink:0.7>\n")
    assert "Lora hashes" in png.info["parameters"]
    # A retry with the same request_id re-attaches to that generation; nothing runs twice.
    batches = c.executor.stats.batches
    with use_context(DispatchContext(request_id="quick-1")):
        first = list(handler.handle(command))
    with use_context(DispatchContext(request_id="quick-1")):
        again = list(handler.handle(command))
    assert again == first
    assert c.executor.stats.batches == batches + 1
    # An explicit <lora:…> tag is the user's choice: nothing is added.
    explicit = handler.request_for(QuickGenerateCommand(prompt="a fox <lora:glow>", model="tiny"))
    assert explicit.loras == ()
    assert explicit.prompt == "a fox <lora:glow>"


class _BrokerDownAfterAccept:
    """An executor whose queue takes the job's slot, then fails to hand it on (a broker
    that stops answering between the two steps)."""

    def submit(self, job: GenerationJob, on_accept: Any = None) -> Any:
        on_accept(0)
        raise UnavailableError("the job broker is unavailable (queue the job); retry shortly")

    def handle(self, generation_id: str) -> None:
        return None


def test_a_job_recorded_but_never_queued_is_failed_with_the_reason(c: Container) -> None:
    c.generations._executor = _BrokerDownAfterAccept()
    with pytest.raises(UnavailableError):
        c.commands.dispatch(SubmitGenerationCommand(request=request())).unwrap()
    c.projector.catch_up()
    [view] = c.read_model.list_generations((), 10).items
    assert view.state is GenerationState.FAILED
    assert "could not be queued: the job broker is unavailable" in view.error


class Recommends:
    """A recommender sure about these LoRAs, in this order."""

    def __init__(self, *views: LoraView) -> None:
        self.views = views

    def recommend(
        self,
        prompt: str,
        base_model: str,
        *,
        max_loras: int,
        min_confidence: float | None,
        include_unavailable: bool,
    ) -> list[LoRARecommendation]:
        return [LoRARecommendation(v, 0.9 - i / 10, 0.7) for i, v in enumerate(self.views)]


def test_quick_generate_never_fails_because_of_its_own_pick(
    tmp_path: Path, models: dict[str, Path], lora_files: Path
) -> None:
    """A file catalogued as SD1 whose tensors fit another model fails to load; QuickGenerate
    remembers it for that model, goes on with its next pick, and never picks it again."""
    xl = load_pipeline(BaseModelConfig("xl", Architecture.SDXL, models["xl"]))
    misfit = tmp_path / "loras" / "misfit.safetensors"
    write_lora_for_pipeline(xl, misfit, seed=5, metadata={**SD1_META, "ss_output_name": "misfit"})
    c = make(tmp_path, models, lora_files)
    try:
        bad = c.read_model.find_by_file_name("misfit")[0]
        ink = c.read_model.find_by_file_name("ink")[0]
        assert bad.metadata.base_model.architecture is Architecture.SD1
        handler = QuickGenerateHandler(c.generations, Recommends(bad, ink), max_loras=1)
        command = QuickGenerateCommand(prompt="a fox", model="tiny", seed=3)
        with use_context(DispatchContext()):
            events = list(handler.handle(command))
        assert not any(isinstance(e.payload, gen.Failed) for e in events)
        assert isinstance(final(events), gen.Completed)
        png = Image.open(io.BytesIO(image_bytes(events)[0]))
        assert ink.file is not None
        assert bad.file is not None
        assert ink.file.sha256[:10] in png.info["parameters"]  # A1111's Lora hashes
        assert c.generations.unloadable.of("tiny") == {bad.file.sha256}
        assert c.generations.unloadable.of("sd") == frozenset()
        # The first job was the misfit's: recorded as failed, with the reason.
        c.recorder.flush()
        c.projector.wait_for(c.store.max_position(), 5.0)
        tried = c.queries.dispatch(GetGenerationQuery(generation_id=events[0].generation_id))
        assert tried.data.state is GenerationState.FAILED
        assert "misfit" in tried.data.error
        # Next time the misfit is not offered: one job, with ink.
        assert handler.request_for(command).loras == (LoraChoice(ink.id, 0.7),)
        batches = c.executor.stats.batches
        with use_context(DispatchContext()):
            again = list(handler.handle(command))
        assert len({e.generation_id for e in again}) == 1
        assert isinstance(final(again), gen.Completed)
        assert c.executor.stats.batches == batches + 1
        # Only the misfit on offer: the second job runs without recommended LoRAs.
        alone = QuickGenerateHandler(c.generations, Recommends(bad), max_loras=1)
        assert alone.request_for(command).loras == ()
    finally:
        c.close()


def test_a_lora_the_prompt_names_still_fails_the_quick_generate_stream(
    tmp_path: Path, models: dict[str, Path], lora_files: Path
) -> None:
    xl = load_pipeline(BaseModelConfig("xl", Architecture.SDXL, models["xl"]))
    misfit = tmp_path / "loras" / "misfit.safetensors"
    write_lora_for_pipeline(xl, misfit, seed=5, metadata={**SD1_META, "ss_output_name": "misfit"})
    c = make(tmp_path, models, lora_files)
    try:
        handler = QuickGenerateHandler(c.generations, Recommends())
        seen: list[gen.GenerationEvent] = []
        with use_context(DispatchContext()), pytest.raises(PreconditionError) as failed:
            seen.extend(
                handler.handle(QuickGenerateCommand(prompt="a fox <lora:misfit>", model="tiny"))
            )
        assert failed.value.reason == "LORA_LOAD_FAILED"
        assert isinstance(seen[-1].payload, gen.Failed)
    finally:
        c.close()
