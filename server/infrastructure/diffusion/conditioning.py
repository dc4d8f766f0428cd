"""Prompt conditioning as A1111 builds it: the prompt's emphasis (domain/emphasis.py) becomes
per-token weights, its tokens are cut into chunks of 75 (at the last comma of a chunk's last
20 tokens, as A1111 does, or at `BREAK`), each chunk is encoded on its own between the start
and end tokens, the hidden states are scaled by the weights and brought back to their mean,
and the chunks are concatenated. Prompt and negative prompt are padded with empty chunks to
the same length (A1111's "pad prompt/negative prompt to be same length").

A prompt without emphasis that fits one chunk gives exactly the tokens, and so the tensors,
of diffusers' own `encode_prompt` (tests/integration/test_conditioning.py): nothing changes
for plain prompts. The text encoders are the family's (`ModelFamily.text_encoders`): SD's
one CLIP reads its last hidden state; SDXL's two read their penultimate ones, concatenated,
and the second's pooled output of the first chunk is the pooled embedding.

Rows whose conditioning needs a different number of chunks cannot share a denoising call
without changing each other's cross-attention, so `encode_batch` groups them; the executor
runs one call per group, which keeps every image independent of its batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from server.domain.emphasis import parse_emphasis

CHUNK = 75  # tokens between the start and end tokens of CLIP's 77
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default

# What runs around a model call over some rows of the batch (their indices): a batch that
# mixes LoRAs says there which LoRAs each input row gets (row_loras.MixedPlan.rows).
RowScope = Callable[[Sequence[int]], AbstractContextManager[None]]


def all_rows(_rows: Sequence[int]) -> AbstractContextManager[None]:
    """The scope of a batch whose rows all compute alike."""
    return nullcontext()


@dataclass(frozen=True, slots=True)
class TextEncoder:
    """A tokenizer and text encoder of a pipeline, by attribute name, and what is read from
    the encoder: the penultimate hidden state (SDXL) or the last (SD); `pooled` for the
    encoder whose projected output is SDXL's pooled embedding."""

    tokenizer: str
    encoder: str
    penultimate: bool = False
    pooled: bool = False


@dataclass(slots=True)
class Chunked:
    """One prompt for one tokenizer: chunks of 77 token ids and their weights."""

    tokens: list[list[int]] = field(default_factory=list)
    weights: list[list[float]] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)  # each chunk's first end token


@dataclass(frozen=True, slots=True)
class ConditionedGroup:
    """Rows (indices into the batch) that share a denoising call, and the keyword arguments
    that give the pipeline their embeddings."""

    rows: list[int]
    kwargs: dict[str, Any]


def chunk_prompt(tokenizer: Any, prompt: str) -> Chunked:
    """The prompt's tokens in chunks of 77, with per-token weights, as A1111's tokenize_line
    makes them (start token, 75 tokens padded with the end token, end token; then the pad
    token after the first end token, which the encoder sees)."""
    start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    comma = tokenizer.get_vocab().get(",</w>")
    fragments = parse_emphasis(prompt)
    texts = [f.text for f in fragments]
    ids = tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]
    out = Chunked()
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal tokens, weights, last_comma
        padded = [start, *tokens, *[end] * (CHUNK - len(tokens)), end]
        first_end = padded.index(end, 1)
        padded[first_end + 1 :] = [pad] * (len(padded) - first_end - 1)
        out.tokens.append(padded)
        out.ends.append(first_end)
        out.weights.append([1.0, *weights, *[1.0] * (CHUNK - len(weights)), 1.0])
        tokens, weights, last_comma = [], [], -1

    for fragment, fragment_ids in zip(fragments, ids, strict=True):
        if fragment.brk:
            close()
            continue
        for token in fragment_ids:
            if token == comma:
                last_comma = len(tokens)
            elif (
                len(tokens) == CHUNK and last_comma != -1 and CHUNK - last_comma <= COMMA_BACKTRACK
            ):
                # Move the words after the chunk's last comma to the next chunk.
                cut = last_comma + 1
                moved, moved_weights = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                close()
                tokens, weights = moved, moved_weights
            if len(tokens) == CHUNK:
                close()
            tokens.append(token)
            weights.append(fragment.weight)
    if tokens or not out.tokens:
        close()
    return out


def _empty(tokenizer: Any) -> Chunked:
    return chunk_prompt(tokenizer, "")


def pad_chunks(chunked: Chunked, count: int, empty: Chunked) -> Chunked:
    missing = count - len(chunked.tokens)
    return Chunked(
        chunked.tokens + empty.tokens * missing,
        chunked.weights + empty.weights * missing,
        chunked.ends + empty.ends * missing,
    )


def encode_chunks(pipe: Any, spec: TextEncoder, rows: Sequence[Chunked]) -> tuple[Any, Any]:
    """(hidden states [rows, 77*chunks, width], pooled [rows, width] or None) for rows that
    all have the same number of chunks."""
    import torch

    encoder = getattr(pipe, spec.encoder)
    device = next(encoder.parameters()).device
    chunks = len(rows[0].tokens)
    hidden_parts = []
    pooled = None
    for c in range(chunks):
        ids = torch.tensor([row.tokens[c] for row in rows], dtype=torch.long, device=device)
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):  # as the tokenizer marks it
            ends = torch.tensor([[row.ends[c]] for row in rows], device=device)
            mask = (torch.arange(ids.shape[1], device=device) <= ends).long()
        with torch.no_grad():
            output = encoder(ids, attention_mask=mask, output_hidden_states=spec.penultimate)
        hidden = output.hidden_states[-2] if spec.penultimate else output[0]
        if spec.pooled and c == 0:
            # CLIPTextModelWithProjection's projected output (SDXL, SD3), else CLIPTextModel's
            # pooled one (FLUX).
            pooled = getattr(output, "text_embeds", None)
            pooled = output.pooler_output if pooled is None else pooled
        weights = [row.weights[c] for row in rows]
        if any(w != 1.0 for chunk in weights for w in chunk):
            hidden = emphasize(hidden, torch.tensor(weights, dtype=hidden.dtype, device=device))
        hidden_parts.append(hidden)
    return torch.cat(hidden_parts, dim=1), pooled


def emphasize(hidden: Any, weights: Any) -> Any:
    """A1111's original emphasis, per row: scale each token's hidden state by its weight,
    then restore the row's mean (so emphasis shifts attention between tokens, not the whole
    conditioning's magnitude)."""
    original = hidden.mean(dim=(1, 2), keepdim=True)
    scaled = hidden * weights.unsqueeze(-1)
    return scaled * (original / scaled.mean(dim=(1, 2), keepdim=True))


def encode_batch(
    pipe: Any,
    encoders: Sequence[TextEncoder],
    prompts: Sequence[str],
    negative_prompts: Sequence[str],
    scope: RowScope = all_rows,
) -> list[ConditionedGroup]:
    """The embeddings of every row, grouped by chunk count (the largest of prompt and
    negative prompt, over every text encoder). With no negative prompt in the batch, a
    pipeline that zeroes the unconditional embedding (SDXL's force_zeros_for_empty_prompt)
    is left to do so, as without emphasis. Each encoder call runs inside `scope(rows)`, the
    rows it encodes (a batch mixing LoRAs computes each row's text-encoder LoRAs there)."""
    import torch

    zero_negative = not any(negative_prompts) and bool(
        getattr(pipe.config, "force_zeros_for_empty_prompt", False)
    )
    per_encoder: list[tuple[list[Chunked], list[Chunked], Chunked]] = []
    lengths = [1] * len(prompts)
    for spec in encoders:
        tokenizer = getattr(pipe, spec.tokenizer)
        cond = [chunk_prompt(tokenizer, p) for p in prompts]
        uncond = [chunk_prompt(tokenizer, n) for n in negative_prompts]
        per_encoder.append((cond, uncond, _empty(tokenizer)))
        for i in range(len(prompts)):
            lengths[i] = max(lengths[i], len(cond[i].tokens), len(uncond[i].tokens))
    groups: list[ConditionedGroup] = []
    for length in sorted(set(lengths)):
        rows = [i for i, n in enumerate(lengths) if n == length]
        cond_parts, uncond_parts = [], []
        pooled = negative_pooled = None
        for spec, (cond, uncond, empty) in zip(encoders, per_encoder, strict=True):
            with scope(rows):
                hidden, pool = encode_chunks(
                    pipe, spec, [pad_chunks(cond[i], length, empty) for i in rows]
                )
            cond_parts.append(hidden)
            pooled = pool if spec.pooled else pooled
            if not zero_negative:
                with scope(rows):
                    hidden, pool = encode_chunks(
                        pipe, spec, [pad_chunks(uncond[i], length, empty) for i in rows]
                    )
                uncond_parts.append(hidden)
                negative_pooled = pool if spec.pooled else negative_pooled
        kwargs: dict[str, Any] = {"prompt_embeds": torch.cat(cond_parts, dim=-1)}
        if uncond_parts:
            kwargs["negative_prompt_embeds"] = torch.cat(uncond_parts, dim=-1)
        if pooled is not None:
            kwargs["pooled_prompt_embeds"] = pooled
            if negative_pooled is not None:
                kwargs["negative_pooled_prompt_embeds"] = negative_pooled
        groups.append(ConditionedGroup(rows, kwargs))
    return groups
