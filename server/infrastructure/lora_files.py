"""Reads LoRA and textual-inversion embedding `.safetensors` files without loading tensors.

Files come from disk trees that users fill with downloads, so everything here is hostile input:
paths are confined to the configured roots, pickle formats are refused outright, the header is
bounded before it is read, and metadata is parsed defensively (bad values are dropped, never
raised).
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import os
import re
import stat
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, TypeGuard

from server.domain.errors import BadLoraFileError, FieldViolation, ValidationError
from server.domain.models import (
    Architecture,
    BaseModelRef,
    LoraFile,
    LoraKind,
    LoraMetadata,
    ScannedLora,
    clean_terms,
)

__all__ = [
    "LoraFileReader",
    "ScannedLora",
    "detect_architecture",
    "detect_embedding",
    "sha256_file",
]

SAFETENSORS_SUFFIX = ".safetensors"
# Formats a LoRA is commonly shipped in; all but safetensors are pickles that can run code on load.
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin"})
CANDIDATE_SUFFIXES = PICKLE_SUFFIXES | {SAFETENSORS_SUFFIX}

_CHUNK = 1024 * 1024
_MAX_SIDECAR_BYTES = 1024 * 1024
_MAX_TRAINING_TAGS = 200

# Bytes per element; unknown (newer) dtypes are accepted without a size check.
_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip

# kohya (lora_down/lora_up), peft (lora_A/lora_B), and the older diffusers attention-processor
# spellings (to_k_lora.down, lora_linear_layer.down).
# kohya/peft (lora_down, lora_A), diffusers' old attention processors (lora_linear_layer) and
# xlabs' FLUX processors (qkv_lora1.down, proj_lora2.up).
_LORA_KEY = re.compile(
    r"lora[._](?:down|up|A|B)\b|lora_linear_layer\.(?:down|up)\b|_lora\d\.(?:down|up)\b"
)
_LORA_DOWN_KEY = re.compile(r"lora[._](?:down|A)\b|lora_linear_layer\.down\b|_lora\d\.down\b")
_FLUX_KEY = re.compile(r"single_transformer_blocks|(?:^|[._])(?:single|double)_blocks[._]")
# Z-Image's refiners and single-stream layers (`layers.N.attention`, `.feed_forward`,
# `.adaLN_modulation`), dotted or kohya-flattened; SD's kohya text-encoder keys have
# `layers_N_self_attn`, never these.
_Z_IMAGE_KEY = re.compile(
    r"(?:^|[._])(?:context_refiner|noise_refiner)[._]"
    r"|(?:^|[._])layers[._]\d+[._](?:attention|feed_forward|adaLN_modulation)[._]"
)
# Qwen-Image's joint blocks have their own MLP and modulation names (SD3's and FLUX's are
# ff/ff_context and norm1/norm1_context); blocks past SD3.5 Large's 38 are Qwen-Image's 60.
_QWEN_IMAGE_KEY = re.compile(r"transformer_blocks[._]\d+[._](?:img|txt)_(?:mlp|mod)[._]")
_JOINT_BLOCK = re.compile(r"(?:^|[._])transformer_blocks[._](\d+)[._]attn[._]to_q[._]")
_SD3_KEY = re.compile(r"(?:^|[._])joint_blocks[._]|context_block[._]")
# The joint blocks' inner width (what to_q takes in): SD3 Medium's 1536, SD3.5 Large's 2432;
# 3072 is Qwen-Image's (and FLUX's, whose single blocks are matched first).
_JOINT_WIDTHS = {1536: Architecture.SD3, 2432: Architecture.SD3, 3072: Architecture.QWEN_IMAGE}
_SD3_BLOCKS = 38
_CONTEXT_DIMS = {768: Architecture.SD1, 1024: Architecture.SD2, 2048: Architecture.SDXL}
_TEXT_ENCODER_DIMS = {768: Architecture.SD1, 1024: Architecture.SD2}
# SDXL's two-part textual-inversion embeddings: one tensor per text encoder (CLIP ViT-L, 768
# wide; OpenCLIP bigG, 1280).
_SDXL_EMBEDDING_KEYS = frozenset({"clip_l", "clip_g"})
_FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
_MAX_EMBEDDING_VECTORS = 75  # one CLIP chunk; A1111 trains at most that many
_A1111_SD_VERSIONS = {"SD1": Architecture.SD1, "SD2": Architecture.SD2, "SDXL": Architecture.SDXL}
# kohya writes the string "None" for settings that were not given.
_NULLISH = frozenset({"", "none", "null"})
_UNKNOWN_ARCHITECTURES = (Architecture.UNSPECIFIED, Architecture.OTHER)


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return _sha256_stream(f)


def update_digest(digest: Any, f: BinaryIO) -> None:
    """Feeds a file to a hashlib digest in bounded chunks (LoRAs and checkpoints are GBs)."""
    while chunk := f.read(_CHUNK):
        digest.update(chunk)


def _sha256_stream(f: BinaryIO) -> str:
    digest = hashlib.sha256()
    update_digest(digest, f)
    return digest.hexdigest()


class LoraFileReader:
    def __init__(self, roots: Sequence[Path], *, max_header_bytes: int = 16 * 1024 * 1024) -> None:
        resolved: list[Path] = []
        for root in roots:
            r = Path(root).expanduser().resolve()
            if r not in resolved:
                resolved.append(r)
        self._roots = tuple(resolved)
        self._max_header_bytes = max_header_bytes

    @property
    def roots(self) -> tuple[Path, ...]:
        return self._roots

    def resolve(self, path: str) -> tuple[Path, Path]:
        """Confines `path` to the roots after following symlinks, so a link can't leak files."""
        if not path:
            raise _bad_path("must not be empty")
        if "\0" in path:
            raise _bad_path("must not contain NUL characters")
        if ".." in re.split(r"[\\/]", path):
            raise _bad_path(f"{path!r} must not contain '..' components")
        if not self._roots:
            raise _bad_path("no LoRA roots are configured")
        candidate = Path(path)
        if not candidate.is_absolute():
            candidate = self._roots[0] / candidate
        real = Path(os.path.realpath(candidate))
        root = self._root_of(real)
        if root is None:
            raise _bad_path(f"{path!r} is outside the configured LoRA roots")
        try:
            exists = real.exists()
        except OSError as e:  # e.g. a name longer than the file system allows
            raise _bad_path(f"{path!r} cannot be accessed: {e.strerror}") from None
        if not exists:
            raise _bad_path(f"{path!r} does not exist")
        return root, real

    def relative(self, absolute: Path) -> str:
        lexical = Path(os.path.abspath(absolute))
        for candidate in (lexical, Path(os.path.realpath(absolute))):
            root = self._root_of(candidate)
            if root is not None:
                return candidate.relative_to(root).as_posix()
        raise _bad_path(f"{str(absolute)!r} is outside the configured LoRA roots")

    def locate(self, relative: str) -> Path | None:
        for root in self._roots:
            candidate = root / relative
            if candidate.is_file():
                return candidate
        return None

    def read(self, path: str) -> ScannedLora:
        root, absolute = self.resolve(path)
        rel = absolute.relative_to(root).as_posix()
        suffix = absolute.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            raise BadLoraFileError(
                rel, f"{suffix} is a pickle-based format that can run code; use .safetensors"
            )
        if suffix != SAFETENSORS_SUFFIX:
            raise BadLoraFileError(rel, f"not a safetensors file (extension {suffix or 'none'!r})")
        try:
            # Non-blocking, so a FIFO (even one swapped in after a check) cannot hang the open;
            # only plain files are read: a FIFO or device would block or stream forever.
            fd = os.open(absolute, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as e:
            raise BadLoraFileError(rel, f"cannot be read: {e.strerror}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise BadLoraFileError(rel, "not a regular file")
        with os.fdopen(fd, "rb") as f:
            try:
                tensors, header_metadata = _read_header(f, st.st_size, self._max_header_bytes, rel)
                f.seek(0)
                sha256 = _sha256_stream(f)
            except OSError as e:  # an I/O error on a damaged disk is the file's fault
                raise BadLoraFileError(rel, f"cannot be read: {e.strerror}") from None
        lora_file = LoraFile(
            path=rel,
            size_bytes=st.st_size,
            sha256=sha256,
            modified_time=datetime.fromtimestamp(st.st_mtime, tz=UTC),
        )
        metadata = _extract_metadata(absolute, root, tensors, header_metadata)
        return ScannedLora(root, lora_file, metadata, header_metadata)

    def scan(self, directory: str) -> Iterator[Path]:
        """Validates eagerly (errors surface at the call, not at the first `next`)."""
        _, absolute = self.resolve(directory)
        if not absolute.is_dir():
            raise _bad_path(f"{directory!r} is not a directory")
        try:
            entries = _sorted_entries(absolute)
        except OSError as e:
            raise _bad_path(f"{directory!r} cannot be listed: {e.strerror}") from e
        return _walk(entries)

    def _root_of(self, real: Path) -> Path | None:
        """The most specific root holding `real`: nested roots give the shortest relative path."""
        matches = [r for r in self._roots if real == r or real.is_relative_to(r)]
        return max(matches, key=lambda r: len(r.parts)) if matches else None


def _bad_path(description: str) -> ValidationError:
    return ValidationError(FieldViolation("path", description))


def _sorted_entries(directory: Path) -> list[os.DirEntry[str]]:
    with os.scandir(directory) as it:
        return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)


def _walk(entries: list[os.DirEntry[str]]) -> Iterator[Path]:
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            try:
                children = _sorted_entries(Path(entry.path))
            except OSError:
                continue  # an unreadable subdirectory must not abort the whole scan
            yield from _walk(children)
        elif os.path.splitext(entry.name)[1].lower() in CANDIDATE_SUFFIXES:
            # Symlinks (even dangling or looping ones) are yielded so read() can say why they
            # are refused; links to directories are neither followed nor yielded.
            if entry.is_symlink():
                if not _links_to_directory(entry):
                    yield Path(entry.path)
            elif entry.is_file(follow_symlinks=False):
                yield Path(entry.path)


def _links_to_directory(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a symlink loop (ELOOP) or an unreadable target
        return False


# --- header -------------------------------------------------------------------------------------


def _human_size(n: int) -> str:
    for unit, scale in (("MB", 1024 * 1024), ("KB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f}".removesuffix(".0") + f" {unit}"
    return f"{n} bytes"


def _read_header(
    f: BinaryIO, size: int, max_header_bytes: int, rel: str
) -> tuple[dict[str, dict[str, object]], dict[str, str]]:
    """Bounds the declared header length before reading it, so a hostile file can't make us
    allocate gigabytes."""
    if size == 0:
        raise BadLoraFileError(rel, "empty file")
    prefix = f.read(9)
    if len(prefix) < 8:
        raise BadLoraFileError(rel, f"not a safetensors file (only {size} bytes)")
    (n,) = struct.unpack("<Q", prefix[:8])
    # safetensors headers are JSON objects; anything else is some other format or garbage.
    if len(prefix) == 9 and prefix[8:9] != b"{":
        raise BadLoraFileError(rel, "not a safetensors file")
    if n == 0:
        raise BadLoraFileError(rel, "not a safetensors file (header length is 0)")
    if n > max_header_bytes:
        raise BadLoraFileError(
            rel, f"header too large ({_human_size(n)} > {_human_size(max_header_bytes)} limit)"
        )
    if 8 + n > size:
        raise BadLoraFileError(rel, f"truncated: header says {n} bytes but file has {size}")
    raw = prefix[8:] + f.read(n - len(prefix[8:]))
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadLoraFileError(rel, "header is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise BadLoraFileError(rel, f"header is not valid JSON ({e.msg})") from None
    if not isinstance(header, dict):
        raise BadLoraFileError(rel, "header is not a JSON object")

    raw_metadata = header.pop("__metadata__", None)
    metadata: dict[str, str] = {}
    if isinstance(raw_metadata, dict):
        metadata = {k: v for k, v in raw_metadata.items() if isinstance(v, str)}

    data_size = size - 8 - n
    tensors: dict[str, dict[str, object]] = {}
    for key, entry in header.items():
        tensors[key] = _check_tensor(rel, key, entry, data_size)
    if not any(_LORA_KEY.search(k) for k in tensors) and detect_embedding(tensors) is None:
        raise BadLoraFileError(rel, "no LoRA or embedding tensors (looks like a full model)")
    return tensors, metadata


def _check_tensor(rel: str, key: str, entry: object, data_size: int) -> dict[str, object]:
    if not isinstance(entry, dict):
        raise BadLoraFileError(rel, f"tensor {key!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise BadLoraFileError(rel, f"tensor {key!r} has no dtype")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise BadLoraFileError(rel, f"tensor {key!r} has an invalid shape")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or not offsets[0] <= offsets[1] <= data_size
    ):
        raise BadLoraFileError(rel, f"tensor {key!r} has data_offsets outside the file")
    element_size = _DTYPE_SIZES.get(dtype)
    if element_size is not None and offsets[1] - offsets[0] != math.prod(shape) * element_size:
        raise BadLoraFileError(rel, f"tensor {key!r} size does not match its shape and dtype")
    return entry


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# --- metadata -----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Draft:
    name: str = ""
    base_model: BaseModelRef = field(default_factory=lambda: BaseModelRef(Architecture.UNSPECIFIED))
    trigger_words: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    description: str = ""
    preferred_weight: float | None = None
    training_tags: tuple[tuple[str, int], ...] = ()
    rank: int = 0

    def fill_base_model(self, ref: BaseModelRef) -> None:
        """Fills an unknown base model; an OTHER one gives way to any known architecture."""
        current = self.base_model.architecture
        if current == Architecture.UNSPECIFIED or (
            current == Architecture.OTHER and ref.architecture not in _UNKNOWN_ARCHITECTURES
        ):
            self.base_model = ref

    def override_base_model(self, ref: BaseModelRef) -> None:
        """A sidecar names the architecture; the existing, more specific lineage stays when they
        agree."""
        if ref.architecture == Architecture.UNSPECIFIED:
            return
        if ref.architecture == Architecture.OTHER:
            self.fill_base_model(ref)
        elif ref.architecture != self.base_model.architecture:
            self.base_model = ref


def _extract_metadata(
    absolute: Path, root: Path, tensors: Mapping[str, Mapping[str, object]], meta: Mapping[str, str]
) -> LoraMetadata:
    d = _Draft()
    _apply_kohya(d, meta)
    _apply_modelspec(d, meta)
    # Civitai first, then A1111: the A1111 card is what the user edited locally, so it wins.
    civitai = _read_sidecar(absolute.with_name(absolute.stem + ".civitai.info"), root)
    if civitai is not None:
        _apply_civitai(d, civitai)
    a1111 = _read_sidecar(absolute.with_name(absolute.stem + ".json"), root)
    if a1111 is not None:
        _apply_a1111(d, a1111)
    # A LoRA file stays a LoRA, whatever else it holds.
    embedding = None if any(_LORA_KEY.search(k) for k in tensors) else detect_embedding(tensors)
    if d.base_model.architecture in _UNKNOWN_ARCHITECTURES:
        detected = detect_architecture(tensors) if embedding is None else embedding
        if detected not in (None, Architecture.UNSPECIFIED):
            d.base_model = BaseModelRef(detected, "")
    if d.rank <= 0 and embedding is None:
        d.rank = _rank_from_shapes(tensors)
    return LoraMetadata(
        name=d.name or absolute.stem,
        base_model=d.base_model,
        file_name=absolute.stem,
        trigger_words=d.trigger_words,
        tags=d.tags,
        description=d.description,
        preferred_weight=d.preferred_weight,
        training_tags=d.training_tags,
        rank=d.rank,
        kind=LoraKind.LORA if embedding is None else LoraKind.EMBEDDING,
    )


def _value(meta: Mapping[str, str], key: str) -> str:
    v = meta.get(key, "").strip()
    return "" if v.lower() in _NULLISH else v


def _apply_kohya(d: _Draft, meta: Mapping[str, str]) -> None:
    d.name = d.name or _value(meta, "ss_output_name")
    for key in ("ss_base_model_version", "ss_sd_model_name"):
        if lineage := _value(meta, key):
            d.fill_base_model(BaseModelRef.parse(lineage))
    if d.rank <= 0:
        d.rank = _parse_int(_value(meta, "ss_network_dim")) or 0
    if not d.training_tags:
        d.training_tags = _tag_frequency(_value(meta, "ss_tag_frequency"))
    d.description = d.description or _value(meta, "ss_training_comment")


def _apply_modelspec(d: _Draft, meta: Mapping[str, str]) -> None:
    d.name = d.name or _value(meta, "modelspec.title")
    if architecture := _value(meta, "modelspec.architecture"):
        # "stable-diffusion-xl-v1-base/lora": the part after the slash is the adapter kind.
        d.fill_base_model(BaseModelRef.parse(architecture.split("/", 1)[0]))
    d.trigger_words = d.trigger_words or clean_terms(
        _value(meta, "modelspec.trigger_phrase").split(",")
    )
    d.tags = d.tags or clean_terms(_value(meta, "modelspec.tags").split(","))
    d.description = d.description or _value(meta, "modelspec.description")


def _apply_a1111(d: _Draft, sidecar: Mapping[str, object]) -> None:
    if description := _str(sidecar.get("description")):
        d.description = description
    if words := clean_terms(_str(sidecar.get("activation text")).split(",")):
        d.trigger_words = words
    weight = sidecar.get("preferred weight")
    if _is_number(weight) and math.isfinite(weight) and weight != 0:
        d.preferred_weight = float(weight)
    version = _str(sidecar.get("sd version"))
    if version.upper() in _A1111_SD_VERSIONS:
        d.override_base_model(BaseModelRef.parse(version))
    # Notes are the user's own; they stand in only when nothing describes the LoRA.
    d.description = d.description or _str(sidecar.get("notes"))


def _apply_civitai(d: _Draft, info: Mapping[str, object]) -> None:
    model = info.get("model")
    model = model if isinstance(model, dict) else {}
    if name := _str(model.get("name")):
        d.name = name
    description = _strip_html(_str(model.get("description"))) or _strip_html(
        _str(info.get("description"))
    )
    if description:
        d.description = description
    if words := clean_terms(_strs(info.get("trainedWords"))):
        d.trigger_words = words
    if tags := clean_terms(_strs(model.get("tags"))):
        d.tags = tags
    if base := _str(info.get("baseModel")):
        d.override_base_model(BaseModelRef.parse(base))


def _read_sidecar(path: Path, root: Path) -> dict[str, object] | None:
    """Sidecars are optional hints: anything odd (too big, bad JSON, a link out of the root) is
    ignored rather than failing the LoRA."""
    try:
        real = Path(os.path.realpath(path))
        if not (real == root or real.is_relative_to(root)):
            return None
        st = real.stat()
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_SIDECAR_BYTES:
            return None
        with real.open("rb") as f:
            data = f.read(_MAX_SIDECAR_BYTES + 1)
        if len(data) > _MAX_SIDECAR_BYTES:
            return None
        parsed = json.loads(data.decode("utf-8-sig"))
    except (OSError, ValueError):
        return None
    return parsed if isinstance(parsed, dict) else None


def _tag_frequency(raw: str) -> tuple[tuple[str, int], ...]:
    if not raw:
        return ()
    try:
        datasets = json.loads(raw)
    except ValueError:
        return ()
    if not isinstance(datasets, dict):
        return ()
    totals: dict[str, int] = {}
    for tags in datasets.values():
        if not isinstance(tags, dict):
            continue
        for tag, count in tags.items():
            tag = tag.strip()
            if tag and isinstance(count, int) and not isinstance(count, bool) and count > 0:
                totals[tag] = totals.get(tag, 0) + count
    ranked = sorted(totals.items(), key=lambda tc: (-tc[1], tc[0]))
    return tuple(ranked[:_MAX_TRAINING_TAGS])


def detect_architecture(tensors: Mapping[str, Mapping[str, object]]) -> Architecture | None:
    """Infers the family from tensor shapes, for files whose metadata was stripped."""
    keys = sorted(tensors)
    # FLUX's single-stream blocks, as diffusers/peft (single_transformer_blocks), kohya
    # (lora_unet_single_blocks_) and BFL/xlabs (single_blocks., double_blocks.) name them; SD3
    # has joint blocks only, so `transformer_blocks` alone says nothing.
    if any(_FLUX_KEY.search(k) for k in keys):
        return Architecture.FLUX
    if any(_Z_IMAGE_KEY.search(k) for k in keys):
        return Architecture.Z_IMAGE
    if any(_QWEN_IMAGE_KEY.search(k) for k in keys):
        return Architecture.QWEN_IMAGE
    if any(_SD3_KEY.search(k) for k in keys):
        return Architecture.SD3
    for key in keys:
        if (block := _JOINT_BLOCK.search(key)) and ("lora_A" in key or "lora_down" in key):
            if int(block.group(1)) >= _SD3_BLOCKS:
                return Architecture.QWEN_IMAGE
            if arch := _JOINT_WIDTHS.get(_dim(tensors[key], 1)):
                return arch
    for key in keys:
        is_cross_k = ("attn2_to_k" in key and "lora_down" in key) or (
            "attn2.to_k" in key and "lora_A" in key
        )
        if is_cross_k and (arch := _CONTEXT_DIMS.get(_dim(tensors[key], 1))):
            return arch
    if any(k.startswith("lora_te2_") or "text_encoder_2" in k for k in keys):
        return Architecture.SDXL
    for key in keys:
        is_te_q = "q_proj" in key and (
            (key.startswith("lora_te_") and "lora_down" in key)
            or ("text_encoder" in key and "lora_A" in key)
        )
        if is_te_q and (arch := _TEXT_ENCODER_DIMS.get(_dim(tensors[key], 1))):
            return arch
    return None


def detect_embedding(tensors: Mapping[str, Mapping[str, object]]) -> Architecture | None:
    """Whether the tensors are a textual-inversion embedding, and for which architecture:
    None when they are not one, UNSPECIFIED for an embedding of a width no known text encoder
    has (the file's metadata or sidecar may still say). The forms: one tensor of token
    vectors under any key (A1111's `emb_params`, diffusers' `{token: vectors}`, a converted
    .pt's `*`), and SDXL's `clip_l` + `clip_g`."""
    keys = frozenset(tensors)
    if keys == _SDXL_EMBEDDING_KEYS:
        clip_l, clip_g = _vectors_shape(tensors["clip_l"]), _vectors_shape(tensors["clip_g"])
        # Both parts hold the same tokens: one vector per token for each encoder.
        same = clip_l is not None and clip_g is not None and clip_l[0] == clip_g[0]
        return Architecture.SDXL if same else None
    if len(keys) != 1:
        return None
    shape = _vectors_shape(next(iter(tensors.values())))
    if shape is None:
        return None
    return _TEXT_ENCODER_DIMS.get(shape[1], Architecture.UNSPECIFIED)


def _vectors_shape(entry: Mapping[str, object]) -> tuple[int, int] | None:
    """(vectors, width) of a tensor shaped like token vectors ([width] or [vectors, width],
    floating point), else None."""
    shape, dtype = entry.get("shape"), entry.get("dtype")
    if dtype not in _FLOAT_DTYPES or not isinstance(shape, list):
        return None
    dims = [d for d in shape if isinstance(d, int)]
    if len(dims) != len(shape) or not 1 <= len(dims) <= 2:
        return None
    vectors, width = (1, dims[0]) if len(dims) == 1 else (dims[0], dims[1])
    if not 1 <= vectors <= _MAX_EMBEDDING_VECTORS or width < 1:
        return None
    return vectors, width


def _rank_from_shapes(tensors: Mapping[str, Mapping[str, object]]) -> int:
    for key in sorted(tensors):
        if _LORA_DOWN_KEY.search(key):
            return _dim(tensors[key], 0)
    return 0


def _dim(entry: Mapping[str, object], index: int) -> int:
    shape = entry.get("shape")
    if isinstance(shape, list) and len(shape) > index and isinstance(shape[index], int):
        return int(shape[index])
    return 0


def _parse_int(raw: str) -> int | None:
    try:
        value = float(raw)
    except ValueError:
        return None
    if not math.isfinite(value) or value != int(value) or value <= 0:
        return None
    return int(value)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _str(value: object) -> str:
    return value.strip() if isinstance(value, str) else ""


def _strs(value: object) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


_BLOCK_END = re.compile(r"<\s*(?:br|/p|/div|/li|/h[1-6])\b[^>]*>", re.IGNORECASE)
_TAG = re.compile(r"<[^>]*>")


def _strip_html(text: str) -> str:
    text = _TAG.sub("", _BLOCK_END.sub("\n", text))
    lines = (" ".join(html.unescape(line).split()) for line in text.splitlines())
    return "\n".join(line for line in lines if line)
