"""FLUX and SD3 transformers as people download them: one file in the original layout
(BFL's `double_blocks.*`, Stability's `joint_blocks.*`, ComfyUI's `model.diffusion_model.`
prefix) or a Q8_0 GGUF of it, beside a config_dir that lends everything else. Written from
the tiny pipelines (tests/original_layouts.py), loaded through `load_pipeline` while any
network use fails, and run: the same image as the folder they came from (GGUF: a close one).
Files that are not the family's transformer are reported not ready at start-up."""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter, dequantize_gguf_tensor
from PIL import Image

from server.application.commands import (
    GenerateImageCommand,
    GenerationRequest,
    ImportLoRAsCommand,
    LoraChoice,
)
from server.application.context import DispatchContext
from server.application.queries import ListBaseModelsQuery
from server.bootstrap import Container, bootstrap
from server.config import Settings
from server.devtools.single_file import write_single_file_checkpoint
from server.devtools.tiny_loras import write_lora_for_pipeline
from server.domain import generation_events as gen
from server.domain.models import Architecture, BaseModelConfig
from server.infrastructure.diffusion.placeholder import (
    build_tiny_flux,
    build_tiny_sd3,
    build_tiny_sd15,
)
from server.infrastructure.diffusion.registry import inspect_model, load_pipeline, weights_bytes
from tests.integration.test_single_file import no_network  # noqa: F401 (autouse fixture)
from tests.original_layouts import (
    COMFY_PREFIX,
    flux_to_bfl,
    sd3_to_mmdit,
    transformer_state,
    write_gguf,
    write_safetensors,
)

torch.set_num_threads(1)

FLUX, SD3 = Architecture.FLUX, Architecture.SD3
GENERATE = DispatchContext(principal="alice", scopes=frozenset({"read", "generate"}))


def _lender(source: Path, folder: Path) -> Path:
    """source's folder without its transformer weights (transformer/ keeps config.json), so
    a transformer that loads can only have come from the file."""
    shutil.copytree(source, folder)
    for weights in (folder / "transformer").glob("*.safetensors"):
        weights.unlink()
    return folder


@pytest.fixture(scope="module")
def flux(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flux_files")
    source = build_tiny_flux(root / "source")
    state = transformer_state(source)
    other = flux_to_bfl(transformer_state(build_tiny_flux(root / "other", seed=1)))
    return {
        "source": source,
        "config_dir": _lender(source, root / "config_dir"),
        "bfl": write_safetensors(flux_to_bfl(state), root / "flux1-tiny.safetensors"),
        "comfy": write_safetensors(
            flux_to_bfl(state, prefix=COMFY_PREFIX), root / "flux1-tiny-comfy.safetensors"
        ),
        "gguf": write_gguf(flux_to_bfl(state), root / "flux1-tiny-Q8_0.gguf"),
        "other": write_safetensors(other, root / "flux1-other.safetensors"),
    }


@pytest.fixture(scope="module")
def sd3(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Without T5, so the file's pipeline is told there is none, as the folder's is."""
    root = tmp_path_factory.mktemp("sd3_files")
    source = build_tiny_sd3(root / "source", t5=False)
    mmdit = sd3_to_mmdit(transformer_state(source))
    return {
        "source": source,
        "config_dir": _lender(source, root / "config_dir"),
        "mmdit": write_safetensors(mmdit, root / "sd3.5-tiny.safetensors"),
        "gguf": write_gguf(mmdit, root / "sd3.5-tiny-Q8_0.gguf", arch="sd3"),
    }


def _config(arch: Architecture, path: Path, config_dir: Path | None) -> BaseModelConfig:
    return BaseModelConfig("m", arch, path, config_dir=config_dir)


def _render(pipe: Any, seed: int = 5) -> np.ndarray[Any, np.dtype[np.int16]]:
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red fox",
        num_inference_steps=3,
        width=64,
        height=64,
        guidance_scale=3.5,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]
    return np.asarray(image, dtype=np.int16)


def _max_diff(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> int:
    return int(np.abs(a - b).max())


@pytest.mark.parametrize("layout", ["bfl", "comfy"])
def test_a_bfl_flux_transformer_file_renders_as_its_folder(
    flux: dict[str, Path], layout: str
) -> None:
    config = _config(FLUX, flux[layout], flux["config_dir"])
    assert inspect_model(config)[0] == ""
    pipe = load_pipeline(config)
    folder = load_pipeline(_config(FLUX, flux["source"], None))
    mine, theirs = pipe.transformer.state_dict(), folder.transformer.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    # Same weights; the fused-then-split linears may take another matmul path: one level.
    assert _max_diff(_render(pipe), _render(folder)) <= 1


def test_an_sd3_mmdit_file_renders_as_its_folder(sd3: dict[str, Path]) -> None:
    config = _config(SD3, sd3["mmdit"], sd3["config_dir"])
    assert inspect_model(config)[0] == ""
    pipe = load_pipeline(config)
    assert pipe.text_encoder_3 is None
    folder = load_pipeline(_config(SD3, sd3["source"], None))
    mine, theirs = pipe.transformer.state_dict(), folder.transformer.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert _max_diff(_render(pipe), _render(folder)) <= 1


def test_a_q8_gguf_stays_quantized_and_renders_close_to_its_source(
    flux: dict[str, Path],
) -> None:
    config = _config(FLUX, flux["gguf"], flux["config_dir"])
    assert inspect_model(config)[0] == ""
    assert flux["gguf"].stat().st_size < 0.35 * flux["bfl"].stat().st_size
    quantized = load_pipeline(config)
    attention = quantized.transformer.transformer_blocks[0].attn
    assert isinstance(attention.to_q, GGUFLinear)
    assert isinstance(attention.to_q.weight, GGUFParameter)
    assert attention.to_q.weight.quant_type == gguf.GGMLQuantizationType.Q8_0
    assert attention.to_q.weight.dtype == torch.uint8  # 34 bytes per 32 weights
    single = quantized.transformer.single_transformer_blocks[0]  # split from linear1
    assert isinstance(single.proj_mlp.weight, GGUFParameter)
    folder = load_pipeline(_config(FLUX, flux["source"], None))
    other = load_pipeline(_config(FLUX, flux["other"], flux["config_dir"]))
    # Every weight where it belongs (the image alone hardly sees, say, q and k swapped in
    # the one single block): within Q8_0's step, at most the tensor's largest / 127.
    loaded = dict(quantized.transformer.named_parameters())
    for key, weight in folder.transformer.named_parameters():
        value = dequantize_gguf_tensor(loaded[key]).float()
        assert torch.allclose(value, weight, rtol=0, atol=float(weight.abs().max()) / 127), key

    # Q8_0 keeps each block of 32 weights as int8 times one scale (per weight at most 1/254
    # of the block's largest): measured, the tiny transformer's output moves 0.6%, and the
    # image one level on about one pixel in ten. Another seed's transformer moves pixels by
    # about 24 levels on average (over 120 at most), so these bounds tell them apart.
    inputs = _transformer_inputs()
    with torch.no_grad():
        exact = folder.transformer(**inputs).sample
        approx = quantized.transformer(**inputs).sample
    relative = float((approx - exact).norm() / exact.norm())
    assert 1e-4 < relative < 0.02  # quantized for real, and close
    image, reference, foreign = _render(quantized), _render(folder), _render(other)
    assert _max_diff(image, reference) <= 2
    assert float(np.abs(image - reference).mean()) < 0.5
    assert float(np.abs(foreign - reference).mean()) > 10


def _transformer_inputs() -> dict[str, Any]:
    """One call of the tiny FLUX transformer: 16 packed latent patches of 64 channels,
    8 T5 tokens 32 wide, a pooled CLIP vector 32 wide."""
    generator = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, 16, 64, generator=generator),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=generator),
        "pooled_projections": torch.randn(1, 32, generator=generator),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(8, 3),
        "guidance": torch.tensor([3.5]),
    }


def test_an_sd3_gguf_loads_quantized(sd3: dict[str, Path]) -> None:
    config = _config(SD3, sd3["gguf"], sd3["config_dir"])
    assert inspect_model(config)[0] == ""
    pipe = load_pipeline(config)
    assert isinstance(pipe.transformer.transformer_blocks[0].attn.to_q.weight, GGUFParameter)
    folder = load_pipeline(_config(SD3, sd3["source"], None))
    image, reference = _render(pipe), _render(folder)
    assert _max_diff(image, reference) <= 2  # as FLUX's Q8_0 above


def test_a_transformer_file_honours_quantize(flux: dict[str, Path]) -> None:
    """diffusers' torchao quantizer skips every weight loaded by from_single_file on the
    CPU; the loader quantizes the transformer itself, and nothing else."""
    pytest.importorskip("torchao", reason="torchao is a dev dependency (loracle[quantization])")
    config = BaseModelConfig("q", FLUX, flux["bfl"], config_dir=flux["config_dir"], quantize="int8")
    pipe = load_pipeline(config)
    assert type(pipe.transformer.transformer_blocks[0].attn.to_q.weight).__name__ == "Int8Tensor"
    assert type(next(pipe.text_encoder.parameters())) is (torch.nn.Parameter)
    folder = load_pipeline(_config(FLUX, flux["source"], None))
    image, reference = _render(pipe), _render(folder)
    assert _max_diff(image, reference) <= 2  # int8 per channel: finer than Q8_0's blocks
    assert float(np.abs(image - reference).mean()) < 0.5


def test_weights_bytes_counts_the_file_and_what_config_dir_lends(flux: dict[str, Path]) -> None:
    lent = [
        f
        for f in flux["config_dir"].glob("*/*.safetensors")
        if f.parent.name in ("vae", "text_encoder", "text_encoder_2")
    ]
    assert lent
    for file in (flux["bfl"], flux["gguf"]):
        expected = file.stat().st_size + sum(f.stat().st_size for f in lent)
        assert weights_bytes(_config(FLUX, file, flux["config_dir"])) == expected


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory, sd3: dict[str, Path]) -> dict[str, Path]:
    """Files that are not a FLUX transformer: SD1 weights, an SD3 GGUF, an LLM-like GGUF, a
    GGUF cut short, one quantized in a type diffusers cannot dequantize (TQ2_0)."""
    root = tmp_path_factory.mktemp("foreign")
    sd15 = write_single_file_checkpoint(build_tiny_sd15(root / "sd15"), root / "sd15.safetensors")
    writer = gguf.GGUFWriter(str(root / "llm.gguf"), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    _close(writer)
    cut = root / "cut.gguf"
    cut.write_bytes(sd3["gguf"].read_bytes()[:-4096])
    return {"sd15": sd15, "sd3_gguf": sd3["gguf"], "llm": root / "llm.gguf", "cut": cut}


def _close(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _unsupported_quant(flux: dict[str, Path], path: Path) -> Path:
    """The tiny FLUX transformer with one more tensor stored as TQ2_0 (ternary, 66 bytes
    per 256 weights), which diffusers' GGUF loader refuses."""
    writer = gguf.GGUFWriter(str(path), "flux")
    for key, tensor in flux_to_bfl(transformer_state(flux["source"])).items():
        writer.add_tensor(key, tensor.float().numpy())
    ternary = gguf.GGMLQuantizationType.TQ2_0
    writer.add_tensor("extra.weight", np.zeros((4, 66), dtype=np.uint8), raw_dtype=ternary)
    _close(writer)
    return path


@pytest.mark.parametrize(
    ("file", "arch", "words"),
    [
        ("sd15", FLUX, "is not an original-layout FLUX checkpoint: lacks the FLUX transformer"),
        ("sd15", SD3, "is not an original-layout SD3 checkpoint: lacks the MMDiT"),
        ("sd3_gguf", FLUX, "lacks the FLUX transformer (double_blocks.*)"),
        ("llm", FLUX, "lacks the FLUX transformer (double_blocks.*)"),
        ("cut", SD3, "not a readable GGUF file"),
    ],
)
def test_a_file_that_is_not_the_familys_transformer_is_not_ready(
    foreign: dict[str, Path], flux: dict[str, Path], file: str, arch: Architecture, words: str
) -> None:
    error, _ = inspect_model(_config(arch, foreign[file], flux["config_dir"]))
    assert error.startswith(str(foreign[file])), error
    assert words in error


def test_a_gguf_quantized_in_a_type_diffusers_cannot_read_is_not_ready(
    flux: dict[str, Path], tmp_path: Path
) -> None:
    path = _unsupported_quant(flux, tmp_path / "ternary.gguf")
    error, _ = inspect_model(_config(FLUX, path, flux["config_dir"]))
    assert "holds tensors quantized as TQ2_0, which diffusers cannot dequantize" in error


def test_gguf_is_for_transformer_files_only(tmp_path: Path, flux: dict[str, Path]) -> None:
    path = shutil.copy(flux["gguf"], tmp_path / "sd15.gguf")
    error, _ = inspect_model(_config(Architecture.SD1, Path(path), flux["config_dir"]))
    assert error.endswith("SD1 checkpoints are read from .safetensors, not GGUF")
    pickle = tmp_path / "flux1-dev.ckpt"
    pickle.write_bytes(b"\x80\x04")
    error, _ = inspect_model(_config(FLUX, pickle, flux["config_dir"]))
    assert "only .safetensors or .gguf checkpoints are accepted" in error


@pytest.mark.parametrize("file", ["bfl", "gguf"])
def test_a_transformer_file_needs_a_config_dir_of_its_family(
    flux: dict[str, Path], sd3: dict[str, Path], file: str, tmp_path: Path
) -> None:
    error, _ = inspect_model(_config(FLUX, flux[file], None))
    assert error.startswith("a single FLUX file holds the transformer alone and needs config_dir")
    error, _ = inspect_model(_config(FLUX, flux[file], tmp_path / "nowhere"))
    assert error.startswith(f"config_dir {tmp_path / 'nowhere'} is not a folder")
    error, _ = inspect_model(_config(FLUX, flux[file], sd3["config_dir"]))
    assert error == (
        f"config_dir: {sd3['config_dir']} holds a StableDiffusion3Pipeline, not a FLUX pipeline"
    )


def test_list_base_models_says_which_files_are_ready_and_why_not(
    tmp_path: Path, flux: dict[str, Path], foreign: dict[str, Path]
) -> None:
    models = (
        _named("flux-q8", flux["gguf"], flux["config_dir"]),
        _named("flux-sd15", foreign["sd15"], flux["config_dir"]),
        _named("flux-alone", flux["bfl"], None),
    )
    with _container(Settings(data_dir=tmp_path, storage_url="memory://", models=models)) as c:
        listed = c.queries.dispatch(ListBaseModelsQuery(), GENERATE).data.models
    infos = {info.config.name: info for info in listed}
    assert infos["flux-q8"].ready, infos["flux-q8"].error
    assert infos["flux-q8"].weights_bytes > flux["gguf"].stat().st_size
    assert not infos["flux-sd15"].ready
    assert "lacks the FLUX transformer (double_blocks.*)" in infos["flux-sd15"].error
    assert not infos["flux-alone"].ready
    assert "needs config_dir" in infos["flux-alone"].error


def _named(name: str, path: Path, config_dir: Path | None) -> BaseModelConfig:
    return BaseModelConfig(name, FLUX, path, config_dir=config_dir)


def test_a_gguf_model_generates_with_a_lora_through_the_bus(
    tmp_path: Path, flux: dict[str, Path]
) -> None:
    """peft cannot merge a LoRA into quantized bytes: on a GGUF model LoRAs run unfused, and
    taking one off gives the plain image back exactly."""
    root = tmp_path / "loras"
    root.mkdir()
    write_lora_for_pipeline(
        load_pipeline(_config(FLUX, flux["source"], None)), root / "ink.safetensors", seed=4
    )
    models = (_named("flux-q8", flux["gguf"], flux["config_dir"]),)
    settings = Settings(
        data_dir=tmp_path, storage_url="memory://", models=models, lora_roots=(root,)
    )
    with _container(settings) as c:
        updates = list(c.commands.stream(ImportLoRAsCommand(directory=""), GENERATE))
        assert updates[-1].totals.registered == 1, updates[-1]
        c.projector.catch_up()
        plain = _generated(c)
        with_lora = _generated(c, loras=(LoraChoice("ink", 1.0),))
        assert float(np.abs(with_lora - plain).mean()) > 1
        assert np.array_equal(_generated(c), plain)


@contextmanager
def _container(settings: Settings) -> Iterator[Container]:
    c = bootstrap(settings)
    try:
        yield c
    finally:
        c.close()


def _generated(c: Container, **spec: Any) -> np.ndarray[Any, np.dtype[np.int16]]:
    request = GenerationRequest(
        model="flux-q8", prompt="a red fox", steps=3, seed=5, width=64, height=64, **spec
    )
    events = list(c.commands.stream(GenerateImageCommand(request=request), GENERATE))
    failed = [e.payload for e in events if isinstance(e.payload, gen.Failed)]
    assert not failed, failed
    data = b"".join(e.payload.data for e in events if isinstance(e.payload, gen.ImageChunk))
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16)
