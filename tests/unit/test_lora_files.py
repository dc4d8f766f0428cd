"""The LoRA file reader: header parsing, metadata precedence, shape detection and path safety."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from server.devtools.synthetic_loras import write_demo_loras, write_synthetic_lora
from server.domain.errors import BadLoraFileError, ValidationError
from server.domain.models import Architecture, BaseModelRef, LoraKind
from server.infrastructure.lora_files import LoraFileReader, sha256_file


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "loras"
    r.mkdir()
    return r


@pytest.fixture
def reader(root: Path) -> LoraFileReader:
    return LoraFileReader([root])


def _lora_tensors(ctx: int = 768) -> dict[str, np.ndarray]:
    block = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    return {
        f"{block}.lora_down.weight": np.zeros((4, ctx), np.float16),
        f"{block}.lora_up.weight": np.zeros((320, 4), np.float16),
        f"{block}.alpha": np.array(4.0, np.float16),
    }


def _write_raw(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def _bad(reader: LoraFileReader, path: str) -> str:
    with pytest.raises(BadLoraFileError) as info:
        reader.read(path)
    return info.value.why


def _invalid_path(reader: LoraFileReader, path: str) -> str:
    with pytest.raises(ValidationError) as info:
        reader.read(path)
    (violation,) = info.value.violations
    assert violation.field == "path"
    return violation.description


# --- metadata -----------------------------------------------------------------------------------


def test_kohya_and_modelspec_metadata(reader: LoraFileReader, root: Path) -> None:
    write_synthetic_lora(
        root / "sub" / "water color.safetensors",
        architecture=Architecture.SD1,
        name="Watercolor",
        trigger_words=("wtr style", " wtr style ", "washes"),
        tags=("watercolor", "painting"),
        rank=8,
    )
    scanned = reader.read("sub/water color.safetensors")
    m = scanned.metadata
    assert scanned.root == root.resolve()
    assert scanned.file.path == "sub/water color.safetensors"
    assert m.name == "Watercolor"
    assert m.file_name == "water color"
    assert m.base_model == BaseModelRef(Architecture.SD1, "sd_v1")
    assert m.rank == 8
    assert m.trigger_words == ("wtr style", "washes")
    assert m.tags == ("watercolor", "painting")
    # The writer counted "wtr style" and " wtr style " apart; the reader merges them.
    assert m.training_tags[0] == ("wtr style", 48)
    assert {t for t, _ in m.training_tags} == {"wtr style", "washes", "watercolor", "painting"}
    assert m.preferred_weight is None
    assert scanned.header_metadata["ss_output_name"] == "Watercolor"


def test_modelspec_only_metadata_and_kohya_precedence(reader: LoraFileReader, root: Path) -> None:
    meta = {
        "modelspec.title": "Neon Nights",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.trigger_phrase": "neon city, , rainy night,neon city",
        "modelspec.tags": "cyberpunk,  night ,",
        "modelspec.description": "Glowing streets.",
        "ss_network_dim": "not a number",
        "ss_tag_frequency": "{broken json",
    }
    save_file(_lora_tensors(ctx=768), str(root / "neon.safetensors"), metadata=meta)
    m = reader.read("neon.safetensors").metadata
    assert m.name == "Neon Nights"
    # The declared architecture wins over shapes (the tensors here look SD1).
    assert m.base_model == BaseModelRef(Architecture.SDXL, "stable-diffusion-xl-v1-base")
    assert m.trigger_words == ("neon city", "rainy night")
    assert m.tags == ("cyberpunk", "night")
    assert m.description == "Glowing streets."
    assert m.rank == 4  # bad ss_network_dim ignored; taken from the lora_down shape
    assert m.training_tags == ()

    kohya = {**meta, "ss_output_name": "neon_v2", "ss_base_model_version": "sd_v2_768_v"}
    save_file(_lora_tensors(), str(root / "both.safetensors"), metadata=kohya)
    m = reader.read("both.safetensors").metadata
    assert m.name == "neon_v2"
    assert m.base_model == BaseModelRef(Architecture.SD2, "sd_v2_768_v")


def test_name_defaults_to_stem_and_none_values_are_empty(
    reader: LoraFileReader, root: Path
) -> None:
    meta = {"ss_output_name": "None", "ss_training_comment": "None", "ss_network_dim": "16"}
    save_file(_lora_tensors(), str(root / "plain.safetensors"), metadata=meta)
    m = reader.read("plain.safetensors").metadata
    assert m.name == "plain"
    assert m.description == ""
    assert m.rank == 16


def test_tag_frequency_sums_over_datasets(reader: LoraFileReader, root: Path) -> None:
    frequency = {
        "10_cats": {"cat": 3, " dog ": 2, "": 5, "  ": 1, "bad": "x"},
        "5_dogs": {"dog": 4, "bird": 3, "ant": 3},
    }
    meta = {"ss_tag_frequency": json.dumps(frequency)}
    save_file(_lora_tensors(), str(root / "pets.safetensors"), metadata=meta)
    m = reader.read("pets.safetensors").metadata
    assert m.training_tags == (("dog", 6), ("ant", 3), ("bird", 3), ("cat", 3))


def test_tag_frequency_keeps_top_200(reader: LoraFileReader, root: Path) -> None:
    frequency = {f"tag{i:03d}": i + 1 for i in range(250)}
    write_synthetic_lora(
        root / "many.safetensors",
        architecture=Architecture.SD1,
        name="many",
        tag_frequency=frequency,
    )
    tags = reader.read("many.safetensors").metadata.training_tags
    assert len(tags) == 200
    assert tags[0] == ("tag249", 250)
    assert tags[-1] == ("tag050", 51)


def test_sidecars_override_header(reader: LoraFileReader, root: Path) -> None:
    write_synthetic_lora(
        root / "aiko.safetensors",
        architecture=Architecture.SD1,
        name="header name",
        trigger_words=("header_word",),
        tags=("header tag",),
    )
    civitai = {
        "description": "<p>version notes</p>",
        "baseModel": "SDXL 1.0",
        "trainedWords": ["aiko_oc", " ", "blue hair, twin tails"],
        "model": {
            "name": "Aiko",
            "tags": ["anime", "character", "anime"],
            "description": "<p>Hello <b>there</b> &amp; welcome.</p><p>Second</p>",
        },
    }
    (root / "aiko.civitai.info").write_text(json.dumps(civitai))
    m = reader.read("aiko.safetensors").metadata
    assert m.name == "Aiko"
    assert m.tags == ("anime", "character")
    assert m.trigger_words == ("aiko_oc", "blue hair, twin tails")
    assert m.description == "Hello there & welcome.\nSecond"
    assert m.base_model == BaseModelRef(Architecture.SDXL, "SDXL 1.0")

    a1111 = {
        "description": "From the card editor",
        "activation text": "aiko, cute smile, aiko",
        "preferred weight": 0.7,
        "sd version": "SDXL",
        "notes": "private",
    }
    (root / "aiko.json").write_text(json.dumps(a1111))
    m = reader.read("aiko.safetensors").metadata
    assert m.name == "Aiko"  # A1111 cards have no name; Civitai's stays
    assert m.trigger_words == ("aiko", "cute smile")
    assert m.description == "From the card editor"
    assert m.preferred_weight == pytest.approx(0.7)
    # Same architecture as Civitai's: the more specific lineage stays.
    assert m.base_model == BaseModelRef(Architecture.SDXL, "SDXL 1.0")


def test_a1111_sidecar_fields(reader: LoraFileReader, root: Path) -> None:
    write_synthetic_lora(root / "w.safetensors", architecture=Architecture.SD1, name="w")
    a1111 = {"preferred weight": 0, "sd version": "SD2", "notes": "use at 0.6"}
    (root / "w.json").write_text(json.dumps(a1111))
    m = reader.read("w.safetensors").metadata
    assert m.preferred_weight is None
    assert m.base_model.architecture == Architecture.SD2
    assert m.description == "use at 0.6"

    (root / "w.json").write_text(json.dumps({"sd version": "Unknown"}))
    assert reader.read("w.safetensors").metadata.base_model == BaseModelRef(
        Architecture.SD1, "sd_v1"
    )


def test_bad_sidecars_are_ignored(reader: LoraFileReader, root: Path, tmp_path: Path) -> None:
    write_synthetic_lora(root / "a.safetensors", architecture=Architecture.SD1, name="A")
    (root / "a.json").write_text("{not json")
    big = {"description": "x" * (1024 * 1024 + 10)}
    (root / "a.civitai.info").write_text(json.dumps(big))
    m = reader.read("a.safetensors").metadata
    assert m.name == "A"
    assert m.description == ""

    outside = tmp_path / "secret.json"
    outside.write_text(json.dumps({"description": "secret"}))
    (root / "a.json").unlink()
    (root / "a.json").symlink_to(outside)
    assert reader.read("a.safetensors").metadata.description == ""


# --- architecture from shapes -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
@pytest.mark.parametrize("arch", [Architecture.SD1, Architecture.SD2, Architecture.SDXL])
def test_architecture_from_shapes_without_metadata(
    reader: LoraFileReader, root: Path, arch: Architecture, fmt: str
) -> None:
    assert fmt in ("kohya", "peft")
    write_synthetic_lora(
        root / "x.safetensors",
        architecture=arch,
        name="ignored",
        rank=6,
        fmt="kohya" if fmt == "kohya" else "peft",
        with_metadata=False,
    )
    scanned = reader.read("x.safetensors")
    assert scanned.header_metadata == {}
    assert scanned.metadata.base_model == BaseModelRef(arch, "")
    assert scanned.metadata.rank == 6
    assert scanned.metadata.name == "x"


@pytest.mark.parametrize(
    ("tensors", "expected"),
    [
        # Text encoders only: te2 means SDXL whatever te1 says.
        (
            {
                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 768),
                "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 1280),
            },
            Architecture.SDXL,
        ),
        (
            {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 768)},
            Architecture.SD1,
        ),
        (
            {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": (4, 1024)},
            Architecture.SD2,
        ),
        (
            {"unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": (4, 99)},
            Architecture.UNSPECIFIED,
        ),
    ],
)
def test_architecture_from_text_encoder_shapes(
    reader: LoraFileReader,
    root: Path,
    tensors: dict[str, tuple[int, int]],
    expected: Architecture,
) -> None:
    arrays = {k: np.zeros(shape, np.float16) for k, shape in tensors.items()}
    save_file(arrays, str(root / "te.safetensors"))
    assert reader.read("te.safetensors").metadata.base_model == BaseModelRef(expected, "")


# Real widths: FLUX and Qwen-Image 3072, SD3.5 Large 2432, SD3 Medium 1536, Z-Image 3840.
@pytest.mark.parametrize(
    ("key", "width", "expected"),
    [
        ("transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight", 3072, "FLUX"),
        ("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", 3072, "FLUX"),
        ("double_blocks.0.processor.qkv_lora1.down.weight", 3072, "FLUX"),  # xlabs
        ("diffusion_model.single_blocks.0.linear1.lora_A.weight", 3072, "FLUX"),  # BFL
        ("transformer.transformer_blocks.0.attn.to_q.lora_A.weight", 2432, "SD3"),
        ("transformer.transformer_blocks.3.attn.to_q.lora_A.weight", 1536, "SD3"),
        ("lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight", 2432, "SD3"),
        ("transformer.transformer_blocks.0.attn.to_q.lora_A.weight", 3072, "QWEN_IMAGE"),
        ("transformer_blocks.45.attn.to_q.lora_A.weight", 64, "QWEN_IMAGE"),  # past SD3's 38
        ("lora_unet_transformer_blocks_0_img_mlp_net_0_proj.lora_down.weight", 3072, "QWEN_IMAGE"),
        ("diffusion_model.transformer_blocks.7.txt_mod.1.lora_A.weight", 3072, "QWEN_IMAGE"),
        ("diffusion_model.layers.0.attention.to_q.lora_A.weight", 3840, "Z_IMAGE"),
        ("lora_unet_layers_12_feed_forward_w1.lora_down.weight", 3840, "Z_IMAGE"),
        ("transformer.context_refiner.0.attention.to_k.lora_A.weight", 3840, "Z_IMAGE"),
        ("transformer.transformer_blocks.0.attn.to_q.lora_A.weight", 64, "UNSPECIFIED"),
    ],
)
def test_transformer_families_from_their_keys(
    reader: LoraFileReader, root: Path, key: str, width: int, expected: str
) -> None:
    """kohya, diffusers/peft, BFL/xlabs and diffusion_model (ai-toolkit, musubi) keys of
    each transformer family, without metadata."""
    up = key.replace("lora_A", "lora_B").replace("lora_down", "lora_up").replace("down", "up")
    tensors = {key: np.zeros((4, width), np.float16), up: np.zeros((width, 4), np.float16)}
    save_file(tensors, str(root / "t.safetensors"))
    detected = reader.read("t.safetensors").metadata.base_model
    assert detected == BaseModelRef(Architecture(expected), "")


def test_unknown_lineage_gives_way_to_shapes(reader: LoraFileReader, root: Path) -> None:
    meta = {"ss_sd_model_name": "myMergedModel_v3.safetensors"}
    save_file(_lora_tensors(ctx=1024), str(root / "m.safetensors"), metadata=meta)
    assert reader.read("m.safetensors").metadata.base_model == BaseModelRef(Architecture.SD2, "")


# --- file facts ---------------------------------------------------------------------------------


def test_hash_size_and_mtime(reader: LoraFileReader, root: Path) -> None:
    path = write_synthetic_lora(root / "h.safetensors", architecture=Architecture.SDXL, name="h")
    os.utime(path, (1_700_000_000, 1_700_000_000))
    scanned = reader.read(str(path))
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert scanned.file.sha256 == expected
    assert sha256_file(path) == expected
    assert scanned.file.autov2 == expected[:10].upper()
    assert scanned.file.size_bytes == path.stat().st_size
    assert scanned.file.modified_time == datetime.fromtimestamp(1_700_000_000, tz=UTC)
    assert scanned.file.modified_time.tzinfo is not None


def test_synthetic_files_are_deterministic_and_tiny(tmp_path: Path) -> None:
    a = write_synthetic_lora(tmp_path / "a.safetensors", architecture=Architecture.SDXL, name="n")
    b = write_synthetic_lora(tmp_path / "b.safetensors", architecture=Architecture.SDXL, name="n")
    c = write_synthetic_lora(
        tmp_path / "c.safetensors", architecture=Architecture.SDXL, name="n", seed=1
    )
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    assert a.stat().st_size < 100_000


def test_demo_loras(tmp_path: Path) -> None:
    paths = write_demo_loras(tmp_path)
    reader = LoraFileReader([tmp_path])
    assert len(paths) >= 6
    assert sorted(paths) == list(reader.scan(str(tmp_path)))
    scanned = {p.stem: reader.read(str(p)) for p in paths}
    assert all(p.stat().st_size < 100_000 for p in paths)
    architectures = {s.metadata.base_model.architecture for s in scanned.values()}
    assert architectures == {Architecture.SD1, Architecture.SD2, Architecture.SDXL}
    assert any(s.metadata.preferred_weight is not None for s in scanned.values())  # A1111 card
    assert any(s.metadata.name != s.header_metadata.get("ss_output_name") for s in scanned.values())
    assert any(not s.header_metadata for s in scanned.values())


# --- refusals -----------------------------------------------------------------------------------


def test_refuses_empty_file(reader: LoraFileReader, root: Path) -> None:
    (root / "empty.safetensors").write_bytes(b"")
    assert _bad(reader, "empty.safetensors") == "empty file"


def test_refuses_truncated_file(reader: LoraFileReader, root: Path) -> None:
    path = write_synthetic_lora(root / "t.safetensors", architecture=Architecture.SD1, name="t")
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    path.write_bytes(data[:100])
    assert (
        _bad(reader, "t.safetensors")
        == f"truncated: header says {header_len} bytes but file has 100"
    )


def test_refuses_tensor_data_past_the_end(reader: LoraFileReader, root: Path) -> None:
    path = write_synthetic_lora(root / "t.safetensors", architecture=Architecture.SD1, name="t")
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    assert "data_offsets outside the file" in _bad(reader, "t.safetensors")


def test_refuses_random_bytes(reader: LoraFileReader, root: Path) -> None:
    data = bytearray(np.random.default_rng(7).bytes(4096))
    data[8] = ord("x")  # never accidentally a '{'
    (root / "noise.safetensors").write_bytes(bytes(data))
    (root / "tiny.safetensors").write_bytes(b"abc")
    assert _bad(reader, "noise.safetensors") == "not a safetensors file"
    assert _bad(reader, "tiny.safetensors") == "not a safetensors file (only 3 bytes)"


def test_refuses_oversized_header(reader: LoraFileReader, root: Path) -> None:
    huge = struct.pack("<Q", 20 * 1024 * 1024) + b'{"a": 1}'
    (root / "huge.safetensors").write_bytes(huge)
    assert _bad(reader, "huge.safetensors") == "header too large (20 MB > 16 MB limit)"

    write_synthetic_lora(root / "ok.safetensors", architecture=Architecture.SD1, name="ok")
    strict = LoraFileReader([root], max_header_bytes=100)
    assert _bad(strict, "ok.safetensors").startswith("header too large (")
    assert _bad(strict, "ok.safetensors").endswith(" > 100 bytes limit)")


def test_refuses_header_that_is_not_json(reader: LoraFileReader, root: Path) -> None:
    _write_raw(root / "bad.safetensors", b"{this is not json}")
    _write_raw(root / "list.safetensors", b"[1, 2]")
    _write_raw(root / "zero.safetensors", b"")
    _write_raw(root / "latin.safetensors", b'{"\xff": 1}')
    assert _bad(reader, "bad.safetensors").startswith("header is not valid JSON")
    assert _bad(reader, "list.safetensors") == "not a safetensors file"
    assert _bad(reader, "zero.safetensors") == "not a safetensors file (header length is 0)"
    assert _bad(reader, "latin.safetensors") == "header is not UTF-8"


def test_refuses_malformed_tensor_entries(reader: LoraFileReader, root: Path) -> None:
    key = "x.lora_down.weight"
    cases = {
        "no_dtype": {key: {"shape": [1], "data_offsets": [0, 2]}},
        "bad_shape": {key: {"dtype": "F16", "shape": [-1], "data_offsets": [0, 2]}},
        "wrong_size": {key: {"dtype": "F16", "shape": [2], "data_offsets": [0, 2]}},
    }
    for name, header in cases.items():
        _write_raw(root / f"{name}.safetensors", json.dumps(header).encode(), b"\0" * 4)
    assert "has no dtype" in _bad(reader, "no_dtype.safetensors")
    assert "invalid shape" in _bad(reader, "bad_shape.safetensors")
    assert "does not match" in _bad(reader, "wrong_size.safetensors")


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin", ".CKPT"])
def test_refuses_pickle_formats(reader: LoraFileReader, root: Path, suffix: str) -> None:
    (root / f"model{suffix}").write_bytes(b"\x80\x02}q\x00.")
    why = _bad(reader, f"model{suffix}")
    assert "pickle" in why
    assert suffix.lower() in why


def test_refuses_other_extensions(reader: LoraFileReader, root: Path) -> None:
    (root / "notes.txt").write_text("hi")
    assert _bad(reader, "notes.txt").startswith("not a safetensors file")


def test_refuses_full_model_without_lora_keys(reader: LoraFileReader, root: Path) -> None:
    tensors: dict[str, np.ndarray] = {
        "model.diffusion_model.input_blocks.0.0.weight": np.zeros((8, 4, 3, 3), np.float16),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": np.zeros((1, 77)),
    }
    save_file(tensors, str(root / "full.safetensors"), metadata={"ss_output_name": "x"})
    save_file({}, str(root / "nothing.safetensors"))
    expected = "no LoRA or embedding tensors (looks like a full model)"
    assert _bad(reader, "full.safetensors") == expected
    assert _bad(reader, "nothing.safetensors") == expected


# --- paths --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["../x.safetensors", "a/../b.safetensors", "a/..", "..", "a\\..\\b.safetensors"]
)
def test_refuses_dot_dot(reader: LoraFileReader, root: Path, path: str) -> None:
    assert "'..'" in _invalid_path(reader, path)


def test_refuses_dot_dot_in_absolute_path(reader: LoraFileReader, root: Path) -> None:
    write_synthetic_lora(root / "a.safetensors", architecture=Architecture.SD1, name="a")
    assert "'..'" in _invalid_path(reader, f"{root}/sub/../a.safetensors")


def test_refuses_empty_and_nul(reader: LoraFileReader) -> None:
    assert "empty" in _invalid_path(reader, "")
    assert "NUL" in _invalid_path(reader, "a\0.safetensors")


def test_refuses_absolute_path_outside_roots(
    reader: LoraFileReader, root: Path, tmp_path: Path
) -> None:
    outside = write_synthetic_lora(
        tmp_path / "outside.safetensors", architecture=Architecture.SD1, name="o"
    )
    assert "outside the configured LoRA roots" in _invalid_path(reader, str(outside))
    # A sibling whose name merely starts with the root's name is still outside.
    sibling = write_synthetic_lora(
        tmp_path / "loras2" / "s.safetensors", architecture=Architecture.SD1, name="s"
    )
    assert "outside" in _invalid_path(reader, str(sibling))


def test_refuses_symlink_escaping_root(reader: LoraFileReader, root: Path, tmp_path: Path) -> None:
    outside = write_synthetic_lora(
        tmp_path / "outside.safetensors", architecture=Architecture.SD1, name="o"
    )
    (root / "link.safetensors").symlink_to(outside)
    (root / "dirlink").symlink_to(tmp_path)
    assert "outside the configured LoRA roots" in _invalid_path(reader, "link.safetensors")
    assert "outside" in _invalid_path(reader, "dirlink/outside.safetensors")


def test_symlink_within_root_is_read(reader: LoraFileReader, root: Path) -> None:
    write_synthetic_lora(root / "real.safetensors", architecture=Architecture.SD1, name="r")
    (root / "alias.safetensors").symlink_to(root / "real.safetensors")
    assert reader.read("alias.safetensors").file.path == "real.safetensors"


def test_missing_file(reader: LoraFileReader) -> None:
    assert "does not exist" in _invalid_path(reader, "missing.safetensors")


def test_resolve_and_relative(tmp_path: Path) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    (first / "sub").mkdir(parents=True)
    second.mkdir()
    target = write_synthetic_lora(second / "b.safetensors", architecture=Architecture.SD1, name="b")
    reader = LoraFileReader([first, second, first])
    assert reader.roots == (first.resolve(), second.resolve())
    assert reader.resolve("sub") == (first.resolve(), (first / "sub").resolve())
    assert reader.resolve(str(target)) == (second.resolve(), target.resolve())
    assert reader.read(str(target)).root == second.resolve()
    assert reader.relative(target) == "b.safetensors"
    assert reader.relative(first / "sub" / "x.safetensors") == "sub/x.safetensors"
    with pytest.raises(ValidationError):
        reader.relative(tmp_path / "elsewhere.safetensors")


# --- scan ---------------------------------------------------------------------------------------


def test_scan_order_recursion_and_filters(
    reader: LoraFileReader, root: Path, tmp_path: Path
) -> None:
    for rel in (
        "b.safetensors",
        "a/z.ckpt",
        "a/deep/y.PT",
        "a/x.safetensors",
        "c.Safetensors",
        "c.bin",
        "c.pth",
        "readme.txt",
        "c.json",
        ".hidden.safetensors",
        ".cache/h.safetensors",
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "e.safetensors").write_bytes(b"")
    (root / "linked_dir").symlink_to(elsewhere, target_is_directory=True)
    (root / "linked.safetensors").symlink_to(elsewhere / "e.safetensors")

    found = [p.relative_to(root.resolve()).as_posix() for p in reader.scan(str(root))]
    assert found == [
        "a/deep/y.PT",
        "a/x.safetensors",
        "a/z.ckpt",
        "b.safetensors",
        "c.Safetensors",
        "c.bin",
        "c.pth",
        "linked.safetensors",
    ]
    assert all(p.is_absolute() for p in reader.scan("a"))
    assert [p.name for p in reader.scan("a/deep")] == ["y.PT"]
    # The symlinked file is listed but read() refuses it.
    assert "outside" in _invalid_path(reader, "linked.safetensors")


def test_scan_refuses_non_directories(reader: LoraFileReader, root: Path) -> None:
    write_synthetic_lora(root / "f.safetensors", architecture=Architecture.SD1, name="f")
    with pytest.raises(ValidationError, match="not a directory"):
        reader.scan("f.safetensors")
    with pytest.raises(ValidationError, match="does not exist"):
        reader.scan("nope")
    with pytest.raises(ValidationError, match=r"'\.\.'"):
        reader.scan("..")


# --- textual-inversion embeddings ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("tensors", "architecture"),
    [
        # A1111's safetensors form, 2 vectors for SD1's CLIP ViT-L
        ({"emb_params": np.zeros((2, 768), np.float32)}, Architecture.SD1),
        # diffusers' {token: vector}: one vector, SD2's OpenCLIP ViT-H width
        ({"<cat-toy>": np.zeros((1024,), np.float16)}, Architecture.SD2),
        # SDXL's two-part form
        (
            {"clip_l": np.zeros((4, 768), np.float16), "clip_g": np.zeros((4, 1280), np.float16)},
            Architecture.SDXL,
        ),
        # A width no known text encoder has: an embedding of an unknown architecture
        ({"emb_params": np.zeros((3, 32), np.float32)}, Architecture.UNSPECIFIED),
    ],
)
def test_embeddings_are_detected_by_their_tensors(
    reader: LoraFileReader, root: Path, tensors: dict[str, np.ndarray], architecture: Architecture
) -> None:
    save_file(tensors, str(root / "EasyNegative.safetensors"))
    scanned = reader.read("EasyNegative.safetensors")
    assert scanned.metadata.kind is LoraKind.EMBEDDING
    assert scanned.metadata.base_model.architecture is architecture
    assert scanned.metadata.file_name == "EasyNegative"
    assert scanned.metadata.rank == 0


def test_an_embeddings_metadata_names_its_architecture(reader: LoraFileReader, root: Path) -> None:
    save_file(
        {"emb_params": np.zeros((3, 32), np.float32)},
        str(root / "tiny.safetensors"),
        metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base/textual-inversion"},
    )
    scanned = reader.read("tiny.safetensors")
    assert scanned.metadata.kind is LoraKind.EMBEDDING
    assert scanned.metadata.base_model.architecture is Architecture.SDXL


def test_a_lora_stays_a_lora(reader: LoraFileReader, root: Path) -> None:
    save_file(_lora_tensors(), str(root / "lora.safetensors"))
    scanned = reader.read("lora.safetensors")
    assert scanned.metadata.kind is LoraKind.LORA
    assert scanned.metadata.base_model.architecture is Architecture.SD1


@pytest.mark.parametrize(
    "tensors",
    [
        {"emb_params": np.zeros((2, 768), np.int32)},  # not floating point
        {"emb_params": np.zeros((2, 3, 768), np.float32)},  # not token vectors
        {"emb_params": np.zeros((200, 768), np.float32)},  # more vectors than a chunk
        {"clip_l": np.zeros((2, 768), np.float16), "clip_g": np.zeros((3, 1280), np.float16)},
        {"clip_l": np.zeros((2, 768), np.float16)} | {"x": np.zeros((2, 768), np.float16)},
    ],
)
def test_tensors_that_are_neither_are_refused(
    reader: LoraFileReader, root: Path, tensors: dict[str, np.ndarray]
) -> None:
    save_file(tensors, str(root / "odd.safetensors"))
    assert _bad(reader, "odd.safetensors") == (
        "no LoRA or embedding tensors (looks like a full model)"
    )


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_pickle_embeddings_stay_refused(reader: LoraFileReader, root: Path, suffix: str) -> None:
    (root / f"EasyNegative{suffix}").write_bytes(b"\x80\x02}q\x00.")
    assert "pickle" in _bad(reader, f"EasyNegative{suffix}")
