"""Tiny random-weight upscaler files in the layouts real ones come in, for tests and benches:
ESRGAN in the original layout (A1111's ESRGAN folder, 4x-UltraSharp) and in BasicSR's
(Real-ESRGAN x4plus, and x2plus's folded input), and Real-ESRGAN's compact network."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from server.infrastructure.diffusion.upscaler_models import CompactNet, RRDBNet

Layout = Literal["original", "basicsr"]


def write_tiny_esrgan(
    path: Path, *, layout: Layout = "original", scale: int = 4, blocks: int = 2, seed: int = 0
) -> Path:
    """An ESRGAN of `scale` 4 (two upsampling convolutions) or 2 (BasicSR only: its input
    folded 2x2 into channels, as Real-ESRGAN x2plus)."""
    from safetensors.torch import save_file

    if scale == 2 and layout != "basicsr":
        raise ValueError("a x2 ESRGAN in the original layout has one upsampling step; use basicsr")
    torch.manual_seed(seed)
    net = RRDBNet(channels=3, feat=8, grow=4, blocks=blocks, ups=2, unshuffle=4 // scale)
    bias = net.conv_last.bias
    assert bias is not None
    with torch.no_grad():  # around mid-grey, so the output is not clamped flat
        bias.add_(0.5)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    names = _original_name if layout == "original" else _basicsr_name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({names(k, blocks): v for k, v in state.items()}, str(path))
    return path


def write_tiny_compact(path: Path, *, scale: int = 4, convs: int = 2, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    net = CompactNet(channels=3, feat=8, convs=convs, scale=scale)
    _perturb(net)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def _perturb(net: torch.nn.Module) -> None:
    """Small weights: a random network's output stays within the image's range."""
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.mul_(0.5)


def _basicsr_name(key: str, blocks: int) -> str:
    if key.startswith("ups."):
        index, rest = key[4:].split(".", 1)
        return f"conv_up{int(index) + 1}.{rest}"
    return key


def _original_name(key: str, blocks: int) -> str:
    """RRDBNet's names in the original ESRGAN Sequential: conv 0, the trunk (RRDBs, then its
    convolution) 1, an (upsample, conv, lrelu) triple per step, HR conv, lrelu, last conv."""
    head, _, rest = key.partition(".")
    if head == "conv_first":
        return f"model.0.{rest}"
    if head == "body":
        block, rdb, conv, kind = rest.split(".")
        return f"model.1.sub.{block}.{rdb.upper()}.{conv}.0.{kind}"
    if head == "conv_body":
        return f"model.1.sub.{blocks}.{rest}"
    if head == "ups":
        index, kind = rest.split(".")
        return f"model.{3 + 3 * int(index)}.{kind}"
    hr = 3 + 3 * 2 - 1  # after two upsampling triples
    return f"model.{hr if head == 'conv_hr' else hr + 2}.{rest}"
