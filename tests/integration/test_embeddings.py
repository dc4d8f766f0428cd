"""Textual-inversion embeddings on the tiny SD1.5 and SDXL pipelines, loaded through the real
loading code and diffusers' own load/unload: naming one changes the conditioning and the
image, unloading gives the model back exactly, an image does not depend on the embeddings
other jobs of its batch named, and the image's metadata records them."""

from __future__ import annotations

import io
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from server.application.commands import GenerateImageCommand, GenerationRequest
from server.application.commands.generation import LoraChoice
from server.application.commands.import_loras import ImportLoRAsCommand, ImportOutcome
from server.application.context import DispatchContext
from server.bootstrap import Container, bootstrap
from server.config import Settings
from server.devtools.tiny_embeddings import write_embedding_for_pipeline
from server.domain import generation_events as gen
from server.domain.errors import ValidationError
from server.domain.generation_job import ResolvedLora
from server.domain.models import Architecture, BaseModelConfig, LoraKind
from server.infrastructure.diffusion.embeddings import EmbeddingCache, EmbeddingSpec
from server.infrastructure.diffusion.families import family_for
from server.infrastructure.diffusion.placeholder import build_tiny_sd15, build_tiny_sdxl
from server.infrastructure.diffusion.registry import load_pipeline
from server.infrastructure.lora_files import sha256_file

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"sd": build_tiny_sd15(root / "sd"), "xl": build_tiny_sdxl(root / "xl")}


def pipeline(models: dict[str, Path], name: str) -> Any:
    arch = Architecture.SD1 if name == "sd" else Architecture.SDXL
    pipe = load_pipeline(BaseModelConfig(name, arch, models[name]), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def embedding_files(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> Path:
    """SD1 embeddings in A1111's form (3 vectors) and diffusers' (1), an SDXL two-part one."""
    folder = tmp_path_factory.mktemp("embeddings")
    sd, xl = pipeline(models, "sd"), pipeline(models, "xl")
    write_embedding_for_pipeline(
        sd, folder / "EasyNeg.safetensors", vectors=3, architecture="SD1", seed=1
    )
    write_embedding_for_pipeline(
        sd, folder / "glowy.safetensors", vectors=1, fmt="diffusers", architecture="SD1", seed=2
    )
    write_embedding_for_pipeline(
        xl, folder / "xlneg.safetensors", vectors=2, architecture="SDXL", seed=3
    )
    return folder


def resolved(path: Path) -> ResolvedLora:
    return ResolvedLora("id-" + path.stem, path.stem, path.stem, sha256_file(path), path, 1.0)


def encode(pipe: Any, prompt: str) -> dict[str, Any]:
    family = family_for(Architecture.SDXL if hasattr(pipe, "text_encoder_2") else Architecture.SD1)
    assert family is not None
    (group,) = family.encode(pipe, [prompt], ["blurry"])
    return group.kwargs


def token_weights(pipe: Any, name: str = "text_encoder") -> torch.Tensor:
    weights: torch.Tensor = getattr(pipe, name).get_input_embeddings().weight
    return weights.detach().clone()


# -- the cache, on its own -------------------------------------------------------------------


@pytest.mark.parametrize("file", ["EasyNeg", "glowy"])
def test_naming_an_embedding_changes_the_conditioning_and_clearing_restores_the_model(
    models: dict[str, Path], embedding_files: Path, file: str
) -> None:
    pipe = pipeline(models, "sd")
    embedding = resolved(embedding_files / f"{file}.safetensors")
    cache = EmbeddingCache(pipe, family_for(Architecture.SD1).text_encoders)  # type: ignore[union-attr]
    prompt = f"a red fox, {file.lower()}"  # named whatever its case
    vocabulary, weights = len(pipe.tokenizer), token_weights(pipe)
    plain = encode(pipe, cache.prompt(prompt, [embedding]))

    cache.apply([EmbeddingSpec.of(embedding)])
    rewritten = cache.prompt(prompt, [embedding])
    vectors = 3 if file == "EasyNeg" else 1
    assert rewritten.count("<ti-") == vectors  # one token per vector, in the prompt's place
    assert (
        len(pipe.tokenizer(rewritten)["input_ids"])
        == len(pipe.tokenizer("a red fox, ")["input_ids"]) + vectors
    )
    named = encode(pipe, rewritten)
    assert not torch.equal(named["prompt_embeds"], plain["prompt_embeds"])
    # The negative prompt, which names nothing, is untouched.
    assert torch.equal(named["negative_prompt_embeds"], plain["negative_prompt_embeds"])

    cache.clear()
    assert len(pipe.tokenizer) == vocabulary
    assert torch.equal(token_weights(pipe), weights)
    again = encode(pipe, cache.prompt(prompt, [embedding]))
    assert torch.equal(again["prompt_embeds"], plain["prompt_embeds"])


def test_sdxls_two_part_embedding_goes_into_both_text_encoders(
    models: dict[str, Path], embedding_files: Path
) -> None:
    pipe = pipeline(models, "xl")
    embedding = resolved(embedding_files / "xlneg.safetensors")
    cache = EmbeddingCache(pipe, family_for(Architecture.SDXL).text_encoders)  # type: ignore[union-attr]
    weights = (token_weights(pipe), token_weights(pipe, "text_encoder_2"))
    plain = encode(pipe, "a lighthouse xlneg")
    cache.apply([EmbeddingSpec.of(embedding)])
    named = encode(pipe, cache.prompt("a lighthouse xlneg", [embedding]))
    width = pipe.text_encoder.get_input_embeddings().weight.shape[-1]
    first, second = named["prompt_embeds"][..., :width], named["prompt_embeds"][..., width:]
    assert not torch.equal(first, plain["prompt_embeds"][..., :width])
    assert not torch.equal(second, plain["prompt_embeds"][..., width:])
    assert not torch.equal(named["pooled_prompt_embeds"], plain["pooled_prompt_embeds"])
    cache.clear()
    assert torch.equal(token_weights(pipe), weights[0])
    assert torch.equal(token_weights(pipe, "text_encoder_2"), weights[1])


def test_only_the_batchs_embeddings_stay_loaded(
    models: dict[str, Path], embedding_files: Path
) -> None:
    pipe = pipeline(models, "sd")
    cache = EmbeddingCache(pipe, family_for(Architecture.SD1).text_encoders)  # type: ignore[union-attr]
    easy, glowy = (resolved(embedding_files / f"{n}.safetensors") for n in ("EasyNeg", "glowy"))
    vocabulary = len(pipe.tokenizer)
    cache.apply([EmbeddingSpec.of(easy), EmbeddingSpec.of(glowy)])
    assert len(pipe.tokenizer) == vocabulary + 4
    cache.apply([EmbeddingSpec.of(glowy)])
    assert cache.loaded == {glowy.sha256}
    assert len(pipe.tokenizer) == vocabulary + 1
    swaps = cache.swaps
    cache.apply([EmbeddingSpec.of(glowy)])  # the same set: nothing to do
    assert cache.swaps == swaps
    assert cache.loads == 2  # each file read once
    # A job's prompt only gets its own embeddings' tokens, and cannot spell another's.
    assert cache.prompt("EasyNeg glowy", [glowy]).startswith("EasyNeg <ti-")
    assert "<ti-" not in cache.prompt(f"<ti-{glowy.sha256[:16]}>", [])


# -- through the executor ----------------------------------------------------------------------


def make(tmp_path: Path, models: dict[str, Path], **settings: Any) -> Container:
    root = tmp_path / "loras"
    root.mkdir(parents=True, exist_ok=True)
    c = bootstrap(
        Settings(
            data_dir=tmp_path,
            storage_url=f"sqlite:///{tmp_path / 'loracle.db'}",
            lora_roots=(root,),
            models=(
                BaseModelConfig("sd", Architecture.SD1, models["sd"]),
                BaseModelConfig("xl", Architecture.SDXL, models["xl"]),
            ),
            **settings,
        ),
        build_embedded_model=False,
    )
    return c


def import_all(c: Container) -> list[Any]:
    updates = list(c.commands.stream(ImportLoRAsCommand(directory=""), DispatchContext()))
    c.projector.catch_up()
    return [u.file for u in updates if u.file is not None]


def add(c: Container, embedding_files: Path, *names: str) -> None:
    for name in names:
        shutil.copy(embedding_files / f"{name}.safetensors", c.files.roots[0])
    import_all(c)


def run(c: Container, ctx: DispatchContext | None = None, **spec: Any) -> list[Any]:
    base: dict[str, Any] = {"model": "sd", "prompt": "a red fox", "steps": 3, "seed": 11}
    request = GenerationRequest(**{**base, "width": 64, "height": 64, **spec})
    return list(c.commands.stream(GenerateImageCommand(request=request), ctx))


def png(events: list[Any]) -> Image.Image:
    data = b"".join(e.payload.data for e in events if isinstance(e.payload, gen.ImageChunk))
    return Image.open(io.BytesIO(data))


def pixels(events: list[Any]) -> np.ndarray:
    return np.asarray(png(events), dtype=np.int16)


@pytest.fixture
def c(tmp_path: Path, models: dict[str, Path]) -> Iterator[Container]:
    container = make(tmp_path, models)
    yield container
    container.close()


def test_an_embedding_named_in_the_negative_prompt_changes_the_image_and_is_recorded(
    c: Container, embedding_files: Path
) -> None:
    before = run(c, negative_prompt="EasyNeg, blurry")  # not catalogued yet: a plain word
    add(c, embedding_files, "EasyNeg")
    (view,) = [v for v in c.read_model.all_views() if v.kind is LoraKind.EMBEDDING]
    assert view.metadata.base_model.architecture is Architecture.SD1
    named = run(c, negative_prompt="EasyNeg, blurry")
    assert isinstance(named[-1].payload, gen.Completed)
    assert np.abs(pixels(named) - pixels(before)).mean() > 1.0
    image = png(named)
    assert view.file is not None
    assert f'TI hashes: "EasyNeg: {view.file.sha256[:12]}"' in image.info["parameters"]
    assert image.info["parameters"].splitlines()[1] == "Negative prompt: EasyNeg, blurry"
    manifest = json.loads(image.info["loracle"])
    assert manifest["embeddings"] == [
        {"id": view.id, "name": "EasyNeg", "sha256": view.file.sha256}
    ]
    # A prompt that names none is the model's own again.
    plain = run(c, negative_prompt="blurry")
    assert "TI hashes" not in png(plain).info["parameters"]
    assert np.array_equal(pixels(run(c, negative_prompt="blurry")), pixels(plain))


def test_an_image_does_not_depend_on_the_embeddings_its_batch_named(
    tmp_path: Path, models: dict[str, Path], embedding_files: Path
) -> None:
    c = make(tmp_path, models, batch_wait_ms=400.0)
    try:
        add(c, embedding_files, "EasyNeg", "glowy")
        prompts = {21: "a red fox, glowy", 22: "a red fox", 23: "a red fox"}
        negatives = {21: "EasyNeg", 22: "EasyNeg", 23: "blurry"}
        alone = {s: pixels(run(c, prompt=prompts[s], negative_prompt=negatives[s], seed=s))
                 for s in prompts}  # fmt: skip
        results: dict[int, list[Any]] = {}

        def client(seed: int) -> None:
            results[seed] = run(
                c, DispatchContext(), prompt=prompts[seed], negative_prompt=negatives[seed],
                seed=seed,
            )  # fmt: skip

        threads = [threading.Thread(target=client, args=(s,)) for s in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for seed, events in results.items():
            started = next(e.payload for e in events if isinstance(e.payload, gen.Started))
            assert started.batch_size == 3
            assert np.abs(pixels(events) - alone[seed]).max() <= 1
        assert "TI hashes" not in png(results[23]).info["parameters"]
        assert '"EasyNeg: ' in png(results[22]).info["parameters"]
    finally:
        c.close()


def test_sdxl_takes_its_two_part_embedding(c: Container, embedding_files: Path) -> None:
    before = run(c, model="xl", prompt="a lighthouse xlneg")
    add(c, embedding_files, "xlneg", "EasyNeg")
    named = run(c, model="xl", prompt="a lighthouse xlneg")
    assert np.abs(pixels(named) - pixels(before)).mean() > 1.0
    assert "TI hashes" in png(named).info["parameters"]
    # An SD1 embedding's name is a plain word on an SDXL model (A1111 skips it too).
    other = run(c, model="xl", prompt="a lighthouse EasyNeg")
    assert "TI hashes" not in png(other).info["parameters"]


def test_an_embedding_is_not_a_lora(c: Container, embedding_files: Path) -> None:
    add(c, embedding_files, "EasyNeg")
    with pytest.raises(ValidationError) as by_field:
        run(c, loras=(LoraChoice("EasyNeg"),))
    (violation,) = by_field.value.field_violations
    assert violation.field == "spec.loras"
    assert "textual-inversion embedding" in violation.description
    with pytest.raises(ValidationError) as by_tag:
        run(c, prompt="a red fox <lora:EasyNeg:0.8>")
    assert by_tag.value.field_violations[0].field == "spec.prompt"


def test_pickled_embeddings_are_refused_by_the_import(c: Container, embedding_files: Path) -> None:
    root = c.files.roots[0]
    shutil.copy(embedding_files / "glowy.safetensors", root)
    for suffix in (".pt", ".bin"):
        (root / f"EasyNeg{suffix}").write_bytes(b"\x80\x02}q\x00.")
    results = {Path(r.path).name: r for r in import_all(c)}
    assert results["glowy.safetensors"].outcome is ImportOutcome.REGISTERED
    for name in ("EasyNeg.pt", "EasyNeg.bin"):
        assert results[name].outcome is ImportOutcome.FAILED
        assert "pickle" in results[name].error
