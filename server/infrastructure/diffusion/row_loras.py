"""Batches whose rows ask for different LoRAs. The base weights stay as loaded (never
fused, never modified) and every LoRA-targeted layer adds each row's own low-rank delta:

    y = W x + B_row (A_row x)

as two batched matmuls over rank-padded stacks gathered per row, whatever the number of
distinct LoRAs (the idea of Punica's SGMV and S-LoRA, brought to diffusion). Several LoRAs on
one row are one delta: their ranks are concatenated and each one's weight and scaling is folded
into its B. A row with no LoRA gathers zeros.

peft parses and holds the adapters (every file format diffusers converts, loaded by
adapters.AdapterCache); this module only reads their A and B matrices and computes with them,
through forward hooks on peft's layers while those layers have no adapter active. Layers
whose adapters peft computes differently (DoRA and other variants, a LoRA bias, embedding or
attention layers) make a plan impossible (`NotMixable`): the executor then runs the batch's
LoRA sets one after another, fused, as before.

Convolution LoRAs (LoCon; SD1's 1x1 `proj_in`/`proj_out`) take a slower path that is still
exact: one pair of convolutions per distinct LoRA set present in the call.

A denoising call runs the rows of one conditioning group, and classifier-free guidance doubles
them ([unconditional rows, conditional rows], as diffusers concatenates them), so the plan is
told which batch rows the next calls run (`MixedPlan.rows`) and a layer that sees k times
that many inputs repeats the row order k times.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

__all__ = ["RANK_BUCKETS", "MixedPlan", "NotMixable", "build_plan", "rank_bucket"]

# Stacked ranks are padded up to one of these (then to a multiple of the largest), so that a
# compiled graph sees a handful of shapes whatever LoRAs a batch mixes.
RANK_BUCKETS = (16, 32, 64, 128)

K = TypeVar("K", bound=Hashable)
# A row's LoRAs: (peft adapter name, weight) pairs.
RowSet = tuple[tuple[str, float], ...]


class NotMixable(Exception):
    """A LoRA this module cannot compute per row; the message says which layer and why."""


def rank_bucket(rank: int) -> int:
    for bucket in RANK_BUCKETS:
        if rank <= bucket:
            return bucket
    top = RANK_BUCKETS[-1]
    return -(-rank // top) * top


@dataclass(slots=True)
class _Current:
    """The slot (distinct LoRA set) of each row the next calls run; per device, as an index
    tensor for each multiple of the row count seen."""

    slots: list[int]
    indices: dict[tuple[int, str], torch.Tensor]

    def index(self, inputs: int, device: torch.device) -> torch.Tensor:
        key = (inputs, str(device))
        cached = self.indices.get(key)
        if cached is None:
            rows = len(self.slots)
            if rows == 0 or inputs % rows:
                raise RuntimeError(
                    f"a LoRA layer saw {inputs} inputs in a call over {rows} rows; the mixed "
                    "batch cannot tell which row each input belongs to"
                )
            cached = torch.tensor(self.slots * (inputs // rows), dtype=torch.long, device=device)
            self.indices[key] = cached
        return cached


class _LinearDelta:
    """Stacks (slots, rank, in) and (slots, out, rank) for one linear layer; slot 0 is zeros."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.a = a
        self.b = b

    def __call__(self, x: torch.Tensor, output: torch.Tensor, current: _Current) -> torch.Tensor:
        n = x.shape[0]
        index = current.index(n, self.a.device)
        a = self.a.index_select(0, index)  # (n, rank, in)
        b = self.b.index_select(0, index)  # (n, out, rank)
        flat = x.reshape(n, -1, x.shape[-1]).to(a.dtype)
        inner = torch.bmm(flat, a.transpose(1, 2))  # (n, tokens, rank)
        if output.dtype == b.dtype and output.is_contiguous():
            # Added in place: the base layer's output is a fresh tensor of this call.
            output.view(n, -1, output.shape[-1]).baddbmm_(inner, b.transpose(1, 2))
            return output
        delta = torch.bmm(inner, b.transpose(1, 2))
        return output + delta.reshape(output.shape).to(output.dtype)


@dataclass(frozen=True, slots=True)
class _ConvPair:
    a: torch.Tensor  # (rank, in, kh, kw)
    b: torch.Tensor  # (out, rank, 1, 1), weights and scalings folded in
    stride: Any
    padding: Any
    dilation: Any


class _ConvDelta:
    """Per slot, the concatenated convolution pair; one pair of convolutions per slot present."""

    def __init__(self, pairs: dict[int, _ConvPair]) -> None:
        self.pairs = pairs

    def __call__(self, x: torch.Tensor, output: torch.Tensor, current: _Current) -> torch.Tensor:
        n = x.shape[0]
        slots = current.slots * (n // max(len(current.slots), 1))
        if len(slots) != n:
            current.index(n, x.device)  # raises the explanation
        delta = torch.zeros_like(output)
        for slot, pair in self.pairs.items():
            rows = [i for i, s in enumerate(slots) if s == slot]
            if not rows:
                continue
            picked = x[rows].to(pair.a.dtype)
            inner = F.conv2d(picked, pair.a, None, pair.stride, pair.padding, pair.dilation)
            delta[rows] = F.conv2d(inner, pair.b).to(output.dtype)
        return output + delta


class MixedPlan:
    """The hooks computing one batch's per-row deltas. `rows(...)` says which slots the next
    calls run (the executor wraps text encoding and denoising in it); `close()` removes the
    hooks, leaving the modules exactly as they were."""

    def __init__(self, labels: Sequence[Hashable], rank: int) -> None:
        self.labels = list(labels)  # slot i + 1 -> the caller's label of its LoRA set
        self.rank = rank
        self.layers = 0
        self._handles: list[Any] = []
        self._current: _Current | None = None

    def slot_of(self, label: Hashable) -> int:
        """The slot of the LoRA set labelled `label` when the plan was built."""
        return self.labels.index(label) + 1

    @contextmanager
    def rows(self, slots: Sequence[int]) -> Iterator[None]:
        previous = self._current
        self._current = _Current(list(slots), {})
        try:
            yield
        finally:
            self._current = previous

    def _hook(self, delta: _LinearDelta | _ConvDelta) -> Any:
        def hook(_module: Any, args: tuple[Any, ...], output: Any) -> Any:
            current = self._current
            if current is None or not any(current.slots):
                return output  # outside a mixed call, or only rows without LoRAs
            return delta(args[0], output, current)

        return hook

    def attach(self, layer: Any, delta: _LinearDelta | _ConvDelta) -> None:
        self._handles.append(layer.register_forward_hook(self._hook(delta)))
        self.layers += 1

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def build_plan(pipe: Any, components: Sequence[str], labelled: Mapping[K, RowSet]) -> MixedPlan:
    """Hooks every peft LoRA layer of `components` that one of the distinct LoRA sets of
    `labelled` (adapters already loaded; an empty set gets zeros) touches. Raises NotMixable,
    with no hook left attached, for an adapter this module cannot compute per row."""
    from peft.tuners.lora import layer as lora_layer

    sets = list(labelled.values())
    layers = _lora_layers(pipe, components)
    widest = 0
    for layer, _name in layers:
        for loras in sets:
            widest = max(widest, sum(_rank(layer, a) for a, _ in loras if a in layer.lora_A))
    plan = MixedPlan(list(labelled), rank_bucket(max(widest, 1)))
    try:
        for layer, name in layers:
            used = [loras for loras in sets if any(a in layer.lora_A for a, _ in loras)]
            if not used:
                continue
            for loras in used:
                for adapter, _ in loras:
                    if adapter in layer.lora_A:
                        _check(layer, adapter, name)
            if isinstance(layer, lora_layer.Linear):
                plan.attach(layer, _linear_delta(layer, sets, plan.rank))
            elif isinstance(layer, lora_layer.Conv2d):
                plan.attach(layer, _conv_delta(layer, sets))
            else:
                raise NotMixable(f"{name} is a {type(layer).__name__} LoRA layer")
    except BaseException:
        plan.close()
        raise
    return plan


def _lora_layers(pipe: Any, components: Sequence[str]) -> list[tuple[Any, str]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    found: list[tuple[Any, str]] = []
    for component in components:
        model = getattr(pipe, component, None)
        if isinstance(model, torch.nn.Module):
            found += [
                (m, f"{component}.{n}")
                for n, m in model.named_modules()
                if isinstance(m, BaseTunerLayer) and hasattr(m, "lora_A")
            ]
    return found


def _rank(layer: Any, adapter: str) -> int:
    return int(layer.lora_A[adapter].weight.shape[0])


def _check(layer: Any, adapter: str, name: str) -> None:
    if layer.use_dora.get(adapter) or adapter in getattr(layer, "lora_variant", {}):
        raise NotMixable(f"{name}: a DoRA (or other variant) layer")
    if layer.lora_bias.get(adapter):
        raise NotMixable(f"{name}: a LoRA with a bias")
    if getattr(layer.get_base_layer(), "groups", 1) != 1:
        raise NotMixable(f"{name}: a grouped convolution")


def _scale(layer: Any, adapter: str, weight: float) -> float:
    """peft's scaling at weight 1 (lora_alpha / r, or / sqrt(r) for rsLoRA: set_scale's rule,
    undoing whatever weight set_adapters last gave it), times the row's weight."""
    r = layer.r[adapter]
    alpha = layer.lora_alpha[adapter]
    base = alpha / r**0.5 if layer.use_rslora.get(adapter, False) else alpha / r
    return float(base) * weight


def _linear_delta(layer: Any, sets: Sequence[RowSet], rank: int) -> _LinearDelta:
    base = layer.get_base_layer()
    out_features, in_features = layer.out_features, layer.in_features
    dtype = next(layer.lora_A[a].weight.dtype for s in sets for a, _ in s if a in layer.lora_A)
    device = base.weight.device
    a = torch.zeros(len(sets) + 1, rank, in_features, dtype=dtype, device=device)
    b = torch.zeros(len(sets) + 1, out_features, rank, dtype=dtype, device=device)
    with torch.no_grad():
        for slot, loras in enumerate(sets, start=1):
            at = 0
            for adapter, weight in loras:
                if adapter not in layer.lora_A:
                    continue
                down = layer.lora_A[adapter].weight
                up = layer.lora_B[adapter].weight
                r = down.shape[0]
                a[slot, at : at + r] = down.to(device, dtype)
                b[slot, :, at : at + r] = (up * _scale(layer, adapter, weight)).to(device, dtype)
                at += r
    return _LinearDelta(a, b)


def _conv_delta(layer: Any, sets: Sequence[RowSet]) -> _ConvDelta:
    pairs: dict[int, _ConvPair] = {}
    with torch.no_grad():
        for slot, loras in enumerate(sets, start=1):
            present = [(a, w) for a, w in loras if a in layer.lora_A]
            if not present:
                continue
            first = layer.lora_A[present[0][0]]
            downs = [layer.lora_A[a].weight for a, _ in present]
            ups = [layer.lora_B[a].weight * _scale(layer, a, w) for a, w in present]
            pairs[slot] = _ConvPair(
                torch.cat(downs, dim=0),
                torch.cat(ups, dim=1),
                first.stride,
                first.padding,
                first.dilation,
            )
    return _ConvDelta(pairs)
