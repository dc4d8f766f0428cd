"""The textual-inversion embeddings of one loaded pipeline: exactly those the running batch's
prompts name are in its tokenizers and text encoders, put there by diffusers'
`load_textual_inversion` and taken out by its `unload_textual_inversion`.

Why exactly the batch's: an added token changes nothing for a prompt that does not contain
it, so jobs naming different embeddings share a batch and each image is what it would be
alone; but tokens kept from earlier batches would pile up in every tokenizer and encoder. So
a batch that names another set unloads the previous set first (consecutive batches with the
same set keep it), and the vectors read from the files are kept in a small LRU, as LoRAs are.

Each embedding gets tokens of its own, `<ti-SHA16>` (diffusers adds `<ti-SHA16>_1`, ... for
further vectors), so no embedding name can collide with a word of the vocabulary or with
another embedding; a prompt's mention of the name is replaced by those tokens
(`domain.embeddings.substitute`) before it is encoded. The file is read with safetensors
(never a pickle) into the state dict `load_textual_inversion` takes: one tensor, or SDXL's
`clip_l` for the first text encoder and `clip_g` for the second.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.domain.embeddings import substitute
from server.domain.generation_job import ResolvedLora
from server.infrastructure.diffusion.adapters import AdapterLoadError
from server.infrastructure.diffusion.conditioning import TextEncoder

__all__ = ["EmbeddingCache", "EmbeddingSpec"]

# Files whose vectors are kept in memory (each a few KB to a few hundred KB).
DEFAULT_KEPT = 64
# A user's prompt cannot reach another job's embedding by spelling its token.
_OWN_TOKEN = re.compile(r"<ti-", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class EmbeddingSpec:
    key: str  # the file's sha256
    path: Path
    name: str  # for messages only

    @staticmethod
    def of(embedding: ResolvedLora) -> EmbeddingSpec:
        return EmbeddingSpec(embedding.sha256, embedding.path, embedding.file_name)

    @property
    def token(self) -> str:
        return f"<ti-{self.key[:16]}>"


class EmbeddingCache:
    """Not thread-safe: the executor's worker thread is the only caller."""

    def __init__(
        self, pipe: Any, encoders: Sequence[TextEncoder], *, kept: int = DEFAULT_KEPT
    ) -> None:
        self._pipe = pipe
        self._encoders = tuple(encoders)
        self._kept = kept
        self._vectors: OrderedDict[str, tuple[Any, ...]] = OrderedDict()
        # What is in the tokenizers now: each embedding's tokens, in prompt order.
        self._loaded: dict[str, tuple[str, ...]] = {}
        self.loads = 0  # files read
        self.swaps = 0  # apply() calls that changed the loaded set

    @property
    def loaded(self) -> frozenset[str]:
        return frozenset(self._loaded)

    def apply(self, specs: Sequence[EmbeddingSpec]) -> None:
        """Makes `specs` exactly the loaded embeddings. Raises AdapterLoadError (naming the
        file's sha256) for one that cannot be used; the tokenizers then hold none."""
        wanted = {s.key: s for s in specs}
        if set(wanted) == set(self._loaded):
            return
        self.swaps += 1
        self.clear()
        if not wanted:
            return
        if not self._encoders:
            raise AdapterLoadError(
                "this model family encodes prompts itself: it takes no embeddings",
                next(iter(wanted)),
            )
        parts = {key: self._read(spec) for key, spec in wanted.items()}
        for index, encoder in enumerate(self._encoders):
            tokenizer = getattr(self._pipe, encoder.tokenizer)
            text_encoder = getattr(self._pipe, encoder.encoder)
            width = text_encoder.get_input_embeddings().weight.shape[-1]
            for key, spec in wanted.items():
                got = parts[key][index].shape[-1]
                if got != width:
                    raise AdapterLoadError(
                        f"embedding {spec.name!r}: its vectors are {got} wide; this model's "
                        f"{encoder.encoder} takes {width}",
                        key,
                    )
            try:
                self._pipe.load_textual_inversion(
                    [parts[key][index] for key in wanted],
                    token=[spec.token for spec in wanted.values()],
                    tokenizer=tokenizer,
                    text_encoder=text_encoder,
                )
            except ValueError as exc:
                self.clear()
                key = next(iter(wanted))
                raise AdapterLoadError(f"embeddings could not be loaded: {exc}", key) from None
            # Recorded per encoder as it loads, so a failure part-way unloads what it did.
            for key, spec in wanted.items():
                count = parts[key][index].shape[0]
                self._loaded[key] = (spec.token, *(f"{spec.token}_{i}" for i in range(1, count)))

    def clear(self) -> None:
        """Every embedding out of the tokenizers and text encoders: their vocabularies and
        token embedding matrices are the model's own again, row for row."""
        if not self._loaded:
            return
        tokens = [t for group in self._loaded.values() for t in group]
        for encoder in self._encoders:
            tokenizer = getattr(self._pipe, encoder.tokenizer)
            present = [t for t in tokens if t in tokenizer.get_added_vocab()]
            if present:
                self._pipe.unload_textual_inversion(
                    tokens=present,
                    tokenizer=tokenizer,
                    text_encoder=getattr(self._pipe, encoder.encoder),
                )
        self._loaded = {}

    def prompt(self, text: str, embeddings: Sequence[ResolvedLora]) -> str:
        """`text` as the text encoders must see it: each of the job's embeddings' names
        replaced by its loaded tokens (a multi-vector embedding by all of them)."""
        text = _OWN_TOKEN.sub("< ti-", text)
        replacements = {
            e.file_name: " ".join(self._loaded[e.sha256])
            for e in embeddings
            if e.sha256 in self._loaded
        }
        return substitute(text, replacements)

    def _read(self, spec: EmbeddingSpec) -> tuple[Any, ...]:
        """The file's vectors for each text encoder, [vectors, width] each."""
        cached = self._vectors.get(spec.key)
        if cached is not None:
            self._vectors.move_to_end(spec.key)
            return cached
        from safetensors.torch import load_file

        try:
            state = load_file(str(spec.path), device="cpu")
        except (OSError, ValueError, RuntimeError) as exc:
            raise AdapterLoadError(
                f"embedding {spec.name!r}: cannot read its file ({exc})", spec.key
            ) from None
        if set(state) == {"clip_l", "clip_g"}:
            tensors: tuple[Any, ...] = (state["clip_l"], state["clip_g"])
        elif len(state) == 1:
            tensors = (next(iter(state.values())),)
        else:
            raise AdapterLoadError(f"embedding {spec.name!r}: not an embedding file", spec.key)
        if len(tensors) != len(self._encoders):
            raise AdapterLoadError(
                f"embedding {spec.name!r} has vectors for {len(tensors)} text encoder(s); "
                f"this model has {len(self._encoders)}",
                spec.key,
            )
        vectors = tuple(t.reshape(1, -1) if t.dim() == 1 else t for t in tensors)
        self._vectors[spec.key] = vectors
        self.loads += 1
        while len(self._vectors) > self._kept:
            self._vectors.popitem(last=False)
        return vectors
