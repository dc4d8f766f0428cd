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

1x1 convolutions (SD1's `proj_in`/`proj_out`) are linear layers over channels and take the
same two bmm. Other convolution LoRAs (LoCon on resnet blocks) take a slower path that is
still exact: one pair of convolutions per distinct LoRA set present in the call.

A denoising call runs the rows of one conditioning group, and classifier-free guidance doubles
them ([unconditional rows, conditional rows], as diffusers concatenates them), so the plan is
told which batch rows the next calls run (`MixedPlan.rows`) and a layer that sees k times
that many inputs repeats the row order k times.

The hooks are installed once per layer and only their contents change between batches, so a
compiled denoiser (`[[models]] compile = true`) keeps its graphs whatever LoRAs a batch mixes;
ranks are padded to buckets so that the stacks take few shapes.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

__all__ = ["RANK_BUCKETS", "MixedPlan", "NotMixable", "RowLoras", "rank_bucket"]

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


class _RowState:
    """The rows the next calls run: each one's slot (distinct LoRA set), as a list (the
    convolution path) and as an index tensor on the model's device (the batched path), also
    repeated for classifier-free guidance's doubled batch; None outside a mixed call. Made once
    per call, so the hundreds of LoRA layers a step runs copy nothing to the device."""

    def __init__(self) -> None:
        self.slots: list[int] = []
        self.index: torch.Tensor | None = None
        self.doubled: torch.Tensor | None = None


def _row_index(state: _RowState, inputs: int, device: torch.device) -> torch.Tensor:
    """The slot of each of a layer's `inputs` rows: the call's rows, repeated when
    classifier-free guidance concatenated them (k times as many inputs)."""
    index = state.index
    assert index is not None
    rows = index.shape[0]
    if inputs % rows:
        raise RuntimeError(
            f"a LoRA layer saw {inputs} inputs in a call over {rows} rows; the mixed batch "
            "cannot tell which row each input belongs to"
        )
    if inputs == 2 * rows and state.doubled is not None:
        index = state.doubled
    elif inputs != rows:
        index = index.repeat(inputs // rows)
    return index.to(device)  # a no-op on the model's device


class _LinearDelta:
    """Stacks (slots, rank, in) and (slots, out, rank) for one linear layer; slot 0 is zeros."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.a = a
        self.b = b

    def __call__(self, x: torch.Tensor, output: torch.Tensor, state: _RowState) -> torch.Tensor:
        n = x.shape[0]
        index = _row_index(state, n, self.a.device)
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


class _PointwiseConvDelta(_LinearDelta):
    """A 1x1 convolution (SD1's proj_in/proj_out) is a linear layer over channels: the same
    stacks and two bmm per call, on (rows, channels, pixels)."""

    def __call__(self, x: torch.Tensor, output: torch.Tensor, state: _RowState) -> torch.Tensor:
        n = x.shape[0]
        index = _row_index(state, n, self.a.device)
        a = self.a.index_select(0, index)  # (n, rank, in)
        b = self.b.index_select(0, index)  # (n, out, rank)
        inner = torch.bmm(a, x.reshape(n, x.shape[1], -1).to(a.dtype))  # (n, rank, pixels)
        if output.dtype == b.dtype and output.is_contiguous():
            output.view(n, output.shape[1], -1).baddbmm_(b, inner)
            return output
        return output + torch.bmm(b, inner).reshape(output.shape).to(output.dtype)


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

    def __call__(self, x: torch.Tensor, output: torch.Tensor, state: _RowState) -> torch.Tensor:
        n = x.shape[0]
        _row_index(state, n, x.device)  # checks the row count
        slots = state.slots * (n // len(state.slots))
        delta = torch.zeros_like(output)
        for slot, pair in self.pairs.items():
            rows = [i for i, s in enumerate(slots) if s == slot]
            if not rows:
                continue
            picked = x[rows].to(pair.a.dtype)
            inner = F.conv2d(picked, pair.a, None, pair.stride, pair.padding, pair.dilation)
            delta[rows] = F.conv2d(inner, pair.b).to(output.dtype)
        return output + delta


class _LayerHook:
    """The forward hook of one peft LoRA layer, installed once: it adds the current batch's
    per-row delta, and nothing outside a mixed call. One object for the layer's lifetime, so
    a compiled graph that traced it stays valid whatever LoRAs the next batch mixes."""

    def __init__(self, state: _RowState) -> None:
        self.state = state
        self.delta: _LinearDelta | _ConvDelta | None = None

    def __call__(self, _module: Any, args: tuple[Any, ...], output: Any) -> Any:
        if self.state.index is None or self.delta is None:
            return output
        return self.delta(args[0], output, self.state)


class RowLoras:
    """The per-row LoRA hooks of one pipeline's LoRA components. `plan` fills them for a
    batch's LoRA sets; `MixedPlan.rows` says which slots the next calls run; `MixedPlan.close`
    empties them again. `uniform` (for compiled models) gives every hooked layer a delta,
    zeros where the batch's LoRAs do not reach it, so graphs never see a layer with and
    without one."""

    def __init__(self, pipe: Any, components: Sequence[str], *, uniform: bool = False) -> None:
        self._pipe = pipe
        self._components = tuple(components)
        self._uniform = uniform
        self._state = _RowState()
        self._hooks: dict[int, tuple[Any, _LayerHook]] = {}  # id(layer) -> (layer, hook)

    def plan(self, labelled: Mapping[K, RowSet]) -> MixedPlan:
        """Fills the hooks for the distinct LoRA sets of `labelled` (adapters loaded; an
        empty set gets zeros). Raises NotMixable, leaving every hook empty, for an adapter
        this module cannot compute per row."""
        from peft.tuners.lora import layer as lora_layer

        sets = list(labelled.values())
        layers = [(la, n) for la, n in _lora_layers(self._pipe, self._components) if la.lora_A]
        widest = 0
        for layer, _name in layers:
            for loras in sets:
                widest = max(widest, sum(_rank(layer, a) for a, _ in loras if a in layer.lora_A))
        plan = MixedPlan(list(labelled), rank_bucket(max(widest, 1)), self)
        try:
            for layer, name in layers:
                used = any(a in layer.lora_A for loras in sets for a, _ in loras)
                if not used and not self._uniform:
                    continue
                for loras in sets:
                    for adapter, _ in loras:
                        if adapter in layer.lora_A:
                            _check(layer, adapter, name)
                if isinstance(layer, lora_layer.Linear):
                    delta: _LinearDelta | _ConvDelta = _linear_delta(layer, sets, plan.rank)
                elif isinstance(layer, lora_layer.Conv2d) and _pointwise(layer):
                    a, b = _stacks(layer, sets, plan.rank, _flat)
                    delta = _PointwiseConvDelta(a, b)
                elif isinstance(layer, lora_layer.Conv2d):
                    delta = _conv_delta(layer, sets)
                else:
                    raise NotMixable(f"{name} is a {type(layer).__name__} LoRA layer")
                self._hook(layer).delta = delta
                plan.layers += 1
        except BaseException:
            self.clear()
            raise
        return plan

    def clear(self) -> None:
        """Every hook empty: the layers compute as peft alone would."""
        for _layer, hook in self._hooks.values():
            hook.delta = None
        self._state.index = self._state.doubled = None
        self._state.slots = []

    def _hook(self, layer: Any) -> _LayerHook:
        entry = self._hooks.get(id(layer))
        if entry is None or entry[0] is not layer:
            hook = _LayerHook(self._state)
            layer.register_forward_hook(hook)
            entry = (layer, hook)
            self._hooks[id(layer)] = entry
        return entry[1]

    @contextmanager
    def rows(self, slots: Sequence[int]) -> Iterator[None]:
        """The next calls run rows of these slots (0: no LoRA)."""
        state = self._state
        previous = (state.slots, state.index, state.doubled)
        state.slots = list(slots)
        state.index = state.doubled = None
        if any(slots):
            device = getattr(self._pipe, "device", "cpu")
            state.index = torch.tensor(state.slots, dtype=torch.long, device=device)
            state.doubled = state.index.repeat(2)
        try:
            yield
        finally:
            state.slots, state.index, state.doubled = previous


class MixedPlan:
    """One batch's per-row LoRAs: `rows(...)` says which slots the next calls run (the
    executor wraps text encoding and denoising in it); `close()` empties the hooks, leaving
    the layers computing exactly as before."""

    def __init__(self, labels: Sequence[Hashable], rank: int, owner: RowLoras) -> None:
        self.labels = list(labels)  # slot i + 1 -> the caller's label of its LoRA set
        self.rank = rank
        self.layers = 0
        self._owner = owner

    def slot_of(self, label: Hashable) -> int:
        """The slot of the LoRA set labelled `label` when the plan was built."""
        return self.labels.index(label) + 1

    def rows(self, slots: Sequence[int]) -> AbstractContextManager[None]:
        return self._owner.rows(slots)

    def close(self) -> None:
        self._owner.clear()


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
    a, b = _stacks(layer, sets, rank, lambda w: w)
    return _LinearDelta(a, b)


def _pointwise(layer: Any) -> bool:
    """A 1x1 convolution with stride 1 and no padding, in the layer and its LoRA."""
    base = layer.get_base_layer()
    return (
        tuple(base.kernel_size) == (1, 1)
        and tuple(base.stride) == (1, 1)
        and all(
            tuple(down.kernel_size) == (1, 1) and tuple(down.padding) == (0, 0)
            for down in layer.lora_A.values()
        )
    )


def _flat(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], weight.shape[1])


def _stacks(
    layer: Any, sets: Sequence[RowSet], rank: int, shape: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots, rank, in) and (slots, out, rank): each set's A matrices stacked along the rank,
    its B matrices beside each other with weight and scaling folded in, zeros to `rank`."""
    base = layer.get_base_layer()
    out_features, in_features = layer.out_features, layer.in_features
    dtype = next(iter(layer.lora_A.values())).weight.dtype
    device = base.weight.device
    a = torch.zeros(len(sets) + 1, rank, in_features, dtype=dtype, device=device)
    b = torch.zeros(len(sets) + 1, out_features, rank, dtype=dtype, device=device)
    with torch.no_grad():
        for slot, loras in enumerate(sets, start=1):
            at = 0
            for adapter, weight in loras:
                if adapter not in layer.lora_A:
                    continue
                down = shape(layer.lora_A[adapter].weight)
                up = shape(layer.lora_B[adapter].weight)
                r = down.shape[0]
                a[slot, at : at + r] = down.to(device, dtype)
                b[slot, :, at : at + r] = (up * _scale(layer, adapter, weight)).to(device, dtype)
                at += r
    return a, b


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
