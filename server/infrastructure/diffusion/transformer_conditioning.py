"""A1111's prompt syntax for FLUX.1 and SD3.5, read as Forge reads it: their CLIPs through
conditioning.py (75-token chunks, emphasis, the pooled output of the first chunk), their T5
with the same per-token weights applied to its hidden states ("multiply, then restore the
mean", A1111's original emphasis) and no 75-token chunks: a T5 segment is the pipeline's
`max_sequence_length` tokens (512 for FLUX, 256 for SD3), truncated as diffusers truncates.
`BREAK` starts a new T5 segment, encoded on its own and joined after the previous one along
the sequence, as it starts a new CLIP chunk.

FLUX reads only CLIP's pooled vector, which A1111's emphasis never touches (it scales hidden
states), so on FLUX emphasis acts through T5; the syntax still leaves CLIP's text. SD3 reads
both CLIPs' penultimate hidden states (chunks joined, then padded to T5's width) before T5's
sequence, and their pooled vectors joined; a folder without T5 gets the zeros diffusers puts
in its place.

A prompt without syntax that fits one CLIP chunk and one T5 segment gives exactly the
tensors of diffusers' own `encode_prompt` (tests/integration/test_transformer_conditioning.py).
Rows whose CLIP chunks or T5 segments differ in number make sequences of different lengths,
so they are grouped as conditioning.py groups them, one denoising call per group; a prompt and
its negative prompt are padded to the same shape with the empty prompt's chunks and segments."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from server.domain.emphasis import parse_emphasis
from server.infrastructure.diffusion.conditioning import (
    Chunked,
    ConditionedGroup,
    RowScope,
    TextEncoder,
    all_rows,
    chunk_prompt,
    emphasize,
    encode_chunks,
    pad_chunks,
)

FLUX_CLIP = TextEncoder("tokenizer", "text_encoder", pooled=True)
SD3_CLIPS = (
    TextEncoder("tokenizer", "text_encoder", penultimate=True, pooled=True),
    TextEncoder("tokenizer_2", "text_encoder_2", penultimate=True, pooled=True),
)


@dataclass(slots=True)
class Segments:
    """One prompt for T5: segments of `max_sequence_length` token ids (the text, the end
    token, padding) and their weights."""

    tokens: list[list[int]] = field(default_factory=list)
    weights: list[list[float]] = field(default_factory=list)


def t5_segments(tokenizer: Any, prompt: str, length: int) -> Segments:
    """The prompt's T5 tokens with per-token weights, one segment per `BREAK`, each as
    diffusers tokenizes a prompt: at most `length - 1` tokens, the end token, then padding
    to `length`."""
    end, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    fragments = parse_emphasis(prompt)
    ids = tokenizer([f.text for f in fragments], truncation=False, add_special_tokens=False)[
        "input_ids"
    ]
    out = Segments()
    tokens: list[int] = []
    weights: list[float] = []

    def close() -> None:
        nonlocal tokens, weights
        kept, kept_weights = tokens[: length - 1], weights[: length - 1]
        padding = length - len(kept) - 1
        out.tokens.append([*kept, end, *[pad] * padding])
        out.weights.append([*kept_weights, *[1.0] * (padding + 1)])
        tokens, weights = [], []

    for fragment, fragment_ids in zip(fragments, ids, strict=True):
        if fragment.brk:
            close()
            continue
        tokens += fragment_ids
        weights += [fragment.weight] * len(fragment_ids)
    if tokens or not out.tokens:
        close()
    return out


def max_sequence_length(pipe: Any) -> int:
    """The T5 length the pipeline encodes prompts to when its caller does not say (the
    service never says): its `__call__`'s default."""
    default = inspect.signature(type(pipe).__call__).parameters["max_sequence_length"].default
    return int(default)


def _pad_segments(segments: Segments, count: int, empty: Segments) -> Segments:
    missing = count - len(segments.tokens)
    return Segments(
        segments.tokens + empty.tokens * missing, segments.weights + empty.weights * missing
    )


def _encode_t5(pipe: Any, name: str, rows: Sequence[Segments]) -> Any:
    """[rows, length x segments, width] for rows with the same number of segments."""
    import torch

    encoder = getattr(pipe, name)
    device = next(encoder.parameters()).device
    parts = []
    for s in range(len(rows[0].tokens)):
        ids = torch.tensor([row.tokens[s] for row in rows], dtype=torch.long, device=device)
        with torch.no_grad():
            hidden = encoder(ids, output_hidden_states=False)[0]
        weights = [row.weights[s] for row in rows]
        if any(w != 1.0 for segment in weights for w in segment):
            hidden = emphasize(hidden, torch.tensor(weights, dtype=hidden.dtype, device=device))
        parts.append(hidden)
    return torch.cat(parts, dim=1).to(dtype=encoder.dtype)


def _first_chunk(chunked: Chunked) -> Chunked:
    return Chunked(chunked.tokens[:1], chunked.weights[:1], chunked.ends[:1])


def _groups(lengths: Sequence[tuple[int, ...]]) -> list[tuple[tuple[int, ...], list[int]]]:
    return [(key, [i for i, k in enumerate(lengths) if k == key]) for key in sorted(set(lengths))]


def encode_flux(
    pipe: Any,
    prompts: Sequence[str],
    negative_prompts: Sequence[str],
    scope: RowScope = all_rows,
) -> list[ConditionedGroup]:
    """FLUX's `prompt_embeds` (T5) and `pooled_prompt_embeds` (CLIP), grouped by T5
    segments; the negative ones too when some row has a negative prompt (true CFG). Each
    group's encoder calls run in `scope` of its rows."""
    length = max_sequence_length(pipe)
    tokenizer, t5_tokenizer = pipe.tokenizer, pipe.tokenizer_2
    negatives = any(negative_prompts)
    sides = [list(prompts)] + ([list(negative_prompts)] if negatives else [])
    clip = [[_first_chunk(chunk_prompt(tokenizer, p)) for p in side] for side in sides]
    t5 = [[t5_segments(t5_tokenizer, p, length) for p in side] for side in sides]
    empty = t5_segments(t5_tokenizer, "", length)
    lengths = [(max(len(side[i].tokens) for side in t5),) for i in range(len(prompts))]
    groups = []
    for (count,), rows in _groups(lengths):
        kwargs: dict[str, Any] = {}
        for prefix, side_clip, side_t5 in zip(("", "negative_"), clip, t5, strict=False):
            padded = [_pad_segments(side_t5[i], count, empty) for i in rows]
            with scope(rows):
                _, pooled = encode_chunks(pipe, FLUX_CLIP, [side_clip[i] for i in rows])
                hidden = _encode_t5(pipe, "text_encoder_2", padded)
            kwargs[f"{prefix}prompt_embeds"] = hidden
            kwargs[f"{prefix}pooled_prompt_embeds"] = pooled.to(dtype=pipe.text_encoder.dtype)
        groups.append(ConditionedGroup(rows, kwargs))
    return groups


def encode_sd3(
    pipe: Any,
    prompts: Sequence[str],
    negative_prompts: Sequence[str],
    scope: RowScope = all_rows,
) -> list[ConditionedGroup]:
    """SD3's embeddings of prompts and negative prompts (an empty negative prompt is encoded
    as diffusers encodes it), grouped by CLIP chunks and T5 segments. Each group's encoder
    calls run in `scope` of its rows."""

    length = max_sequence_length(pipe)
    sides = [list(prompts), list(negative_prompts)]
    clips = [
        [[chunk_prompt(getattr(pipe, spec.tokenizer), p) for p in side] for side in sides]
        for spec in SD3_CLIPS
    ]
    clip_empty = [chunk_prompt(getattr(pipe, spec.tokenizer), "") for spec in SD3_CLIPS]
    t5_tokenizer = pipe.tokenizer_3 if pipe.text_encoder_3 is not None else None
    t5 = [
        [t5_segments(t5_tokenizer, p, length) if t5_tokenizer else Segments() for p in side]
        for side in sides
    ]
    t5_empty = t5_segments(t5_tokenizer, "", length) if t5_tokenizer else Segments()
    lengths = [
        (
            max(len(side[i].tokens) for encoder in clips for side in encoder),
            max(len(side[i].tokens) for side in t5),
        )
        for i in range(len(prompts))
    ]
    groups = []
    for (chunks, segments), rows in _groups(lengths):
        kwargs = _encode_sd3_group(
            pipe, rows, chunks, segments, clips, clip_empty, t5, t5_empty, length, scope
        )
        groups.append(ConditionedGroup(rows, kwargs))
    return groups


def _encode_sd3_group(
    pipe: Any,
    rows: list[int],
    chunks: int,
    segments: int,
    clips: Any,
    clip_empty: Any,
    t5: Any,
    t5_empty: Segments,
    length: int,
    scope: RowScope,
) -> dict[str, Any]:
    import torch

    t5_tokenizer = pipe.tokenizer_3 if pipe.text_encoder_3 is not None else None
    kwargs: dict[str, Any] = {}
    with scope(rows):
        for s, prefix in enumerate(("", "negative_")):
            hidden_parts, pooled_parts = [], []
            for spec, encoder, empty in zip(SD3_CLIPS, clips, clip_empty, strict=True):
                padded = [pad_chunks(encoder[s][i], chunks, empty) for i in rows]
                hidden, pooled = encode_chunks(pipe, spec, padded)
                hidden_parts.append(hidden.to(dtype=pipe.text_encoder.dtype))
                pooled_parts.append(pooled)
            clip_hidden = torch.cat(hidden_parts, dim=-1)
            if t5_tokenizer is not None:
                padded_t5 = [_pad_segments(t5[s][i], segments, t5_empty) for i in rows]
                t5_hidden = _encode_t5(pipe, "text_encoder_3", padded_t5)
            else:
                t5_hidden = torch.zeros(
                    (len(rows), length, pipe.transformer.config.joint_attention_dim),
                    device=clip_hidden.device,
                    dtype=pipe.text_encoder.dtype,
                )
            clip_hidden = torch.nn.functional.pad(
                clip_hidden, (0, t5_hidden.shape[-1] - clip_hidden.shape[-1])
            )
            kwargs[f"{prefix}prompt_embeds"] = torch.cat([clip_hidden, t5_hidden], dim=-2)
            kwargs[f"{prefix}pooled_prompt_embeds"] = torch.cat(pooled_parts, dim=-1)
    return kwargs
