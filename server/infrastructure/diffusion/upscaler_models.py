"""Upscaler models (`[[upscalers]]`): ESRGAN's RRDB network, in the original layout (A1111's
`ESRGAN/*.pth` converted to safetensors, 4x-UltraSharp...) and in BasicSR's (Real-ESRGAN
x4plus, x2plus), and Real-ESRGAN's compact network (realesr-general-x4v3, animevideov3). The
architecture and its sizes are read from the weights' names and shapes, as spandrel does;
spandrel itself cannot be imported beside a CPU build of torch (docs/decisions.md). Images are
upscaled in overlapping tiles, so memory stays bounded whatever the image's size."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.nn import functional

from server.infrastructure import safetensors_header

T = TypeVar("T")
SUPPORTED = "ESRGAN (RRDB, original or BasicSR layout) and Real-ESRGAN compact"


class UpscalerFileError(ValueError):
    """A file that is not an upscaler this server can load (the message says why)."""


# --- the networks -----------------------------------------------------------------------------


class _DenseBlock(nn.Module):
    """Five convolutions, each seeing every earlier output (ESRGAN's residual dense block)."""

    def __init__(self, feat: int, grow: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(feat, grow, 3, 1, 1)
        self.conv2 = nn.Conv2d(feat + grow, grow, 3, 1, 1)
        self.conv3 = nn.Conv2d(feat + 2 * grow, grow, 3, 1, 1)
        self.conv4 = nn.Conv2d(feat + 3 * grow, grow, 3, 1, 1)
        self.conv5 = nn.Conv2d(feat + 4 * grow, feat, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        seen = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            seen.append(functional.leaky_relu(conv(torch.cat(seen, 1)), 0.2))
        out: Tensor = self.conv5(torch.cat(seen, 1))
        return out * 0.2 + x


class _RRDB(nn.Module):
    def __init__(self, feat: int, grow: int) -> None:
        super().__init__()
        self.rdb1 = _DenseBlock(feat, grow)
        self.rdb2 = _DenseBlock(feat, grow)
        self.rdb3 = _DenseBlock(feat, grow)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.rdb3(self.rdb2(self.rdb1(x)))
        return out * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN: `blocks` RRDBs, then one nearest-neighbour x2 and a convolution per `ups`.
    Real-ESRGAN's x2 and x1 models first fold the image into channels (`unshuffle`)."""

    def __init__(
        self, *, channels: int, feat: int, grow: int, blocks: int, ups: int, unshuffle: int
    ) -> None:
        super().__init__()
        self.unshuffle = unshuffle
        self.conv_first = nn.Conv2d(channels * unshuffle**2, feat, 3, 1, 1)
        self.body = nn.Sequential(*(_RRDB(feat, grow) for _ in range(blocks)))
        self.conv_body = nn.Conv2d(feat, feat, 3, 1, 1)
        self.ups = nn.ModuleList(nn.Conv2d(feat, feat, 3, 1, 1) for _ in range(ups))
        self.conv_hr = nn.Conv2d(feat, feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(feat, channels, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.unshuffle > 1:
            x = functional.pixel_unshuffle(x, self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for conv in self.ups:
            feat = functional.leaky_relu(conv(functional.interpolate(feat, scale_factor=2.0)), 0.2)
        out: Tensor = self.conv_last(functional.leaky_relu(self.conv_hr(feat), 0.2))
        return out


class CompactNet(nn.Module):
    """Real-ESRGAN's SRVGGNetCompact: convolutions with PReLUs at low resolution, a pixel
    shuffle, plus the nearest-neighbour upscaled input."""

    def __init__(self, *, channels: int, feat: int, convs: int, scale: int) -> None:
        super().__init__()
        self.scale = scale
        layers: list[nn.Module] = [nn.Conv2d(channels, feat, 3, 1, 1), nn.PReLU(feat)]
        for _ in range(convs):
            layers += [nn.Conv2d(feat, feat, 3, 1, 1), nn.PReLU(feat)]
        layers.append(nn.Conv2d(feat, channels * scale**2, 3, 1, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = functional.pixel_shuffle(self.body(x), self.scale)
        return out + functional.interpolate(x, scale_factor=float(self.scale), mode="nearest")


# --- reading a file -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UpscalerShape:
    """What a file's tensor names and shapes say it is: the network and its sizes."""

    architecture: str  # "ESRGAN" or "Compact"
    scale: int
    sizes: tuple[tuple[str, int], ...]

    def network(self) -> nn.Module:
        sizes = dict(self.sizes)
        if self.architecture == "ESRGAN":
            return RRDBNet(**sizes)
        return CompactNet(**sizes)


Shapes = Mapping[str, Sequence[int]]
_OLD_RDB = re.compile(r"^model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$")
_OLD_TRUNK = re.compile(r"^model\.1\.sub\.(\d+)\.(weight|bias)$")
_OLD_CONV = re.compile(r"^model\.(\d+)\.(weight|bias)$")


def canonical(state: Mapping[str, T]) -> dict[str, T]:
    """The tensor names of RRDBNet and CompactNet: the original ESRGAN layout (`model.N`, a
    Sequential) and BasicSR's (`conv_up1`...) renamed; other names are kept."""
    if "model.0.weight" in state and any(_OLD_RDB.match(k) for k in state):
        return _original_to_basicsr(state)
    return {
        re.sub(r"^conv_up(\d+)\.", lambda m: f"ups.{int(m.group(1)) - 1}.", k): v
        for k, v in state.items()
    }


def _original_to_basicsr(state: Mapping[str, T]) -> dict[str, T]:
    """The first convolution, the RRDB trunk and its closing convolution, then each
    upsampling convolution in order, the HR convolution and the last one."""
    convs = sorted({int(m.group(1)) for k in state if (m := _OLD_CONV.match(k))} - {0})
    if len(convs) < 2:
        raise UpscalerFileError("an original-layout ESRGAN without its final convolutions")
    names = {0: "conv_first", convs[-2]: "conv_hr", convs[-1]: "conv_last"}
    names |= {index: f"ups.{i}" for i, index in enumerate(convs[:-2])}
    out: dict[str, T] = {}
    for key, value in state.items():
        if m := _OLD_RDB.match(key):
            block, rdb, conv, kind = m.groups()
            out[f"body.{block}.rdb{rdb}.conv{conv}.{kind}"] = value
        elif m := _OLD_TRUNK.match(key):
            out[f"conv_body.{m.group(2)}"] = value
        elif (m := _OLD_CONV.match(key)) and int(m.group(1)) in names:
            out[f"{names[int(m.group(1))]}.{m.group(2)}"] = value
        else:
            raise UpscalerFileError(f"an original-layout ESRGAN with an unexpected tensor {key}")
    return out


def describe(shapes: Shapes) -> UpscalerShape:
    """The network that tensors of these (canonical) names and shapes belong to."""
    if "conv_first.weight" in shapes and "body.0.rdb1.conv1.weight" in shapes:
        return _esrgan(shapes)
    if "body.0.weight" in shapes and len(shapes.get("body.1.weight", ())) == 1:
        return _compact(shapes)  # body.1 is a PReLU
    raise UpscalerFileError(f"not an upscaler architecture this server loads ({SUPPORTED})")


def _esrgan(shapes: Shapes) -> UpscalerShape:
    feat, folded = (int(n) for n in shapes["conv_first.weight"][:2])
    channels = int(shapes["conv_last.weight"][0])
    unshuffle = math.isqrt(folded // channels)
    if unshuffle**2 * channels != folded:
        raise UpscalerFileError(f"an ESRGAN whose {folded} input channels fold no image")
    ups = len({k.split(".")[1] for k in shapes if k.startswith("ups.")})
    scale, rest = divmod(2**ups, unshuffle)
    if scale < 1 or rest:
        raise UpscalerFileError("an ESRGAN that does not make images larger")
    sizes = {
        "channels": channels,
        "feat": feat,
        "grow": int(shapes["body.0.rdb1.conv1.weight"][0]),
        "blocks": len({k.split(".")[1] for k in shapes if k.startswith("body.")}),
        "ups": ups,
        "unshuffle": unshuffle,
    }
    return UpscalerShape("ESRGAN", scale, tuple(sizes.items()))


def _compact(shapes: Shapes) -> UpscalerShape:
    indexes = sorted({int(k.split(".")[1]) for k in shapes if k.startswith("body.")})
    feat, channels = (int(n) for n in shapes["body.0.weight"][:2])
    last = int(shapes[f"body.{indexes[-1]}.weight"][0])
    scale = math.isqrt(last // channels)
    convs = (len(indexes) - 3) // 2
    if scale < 1 or scale**2 * channels != last or indexes != list(range(2 * convs + 3)):
        raise UpscalerFileError("a compact upscaler whose layers do not fit together")
    sizes = {"channels": channels, "feat": feat, "convs": convs, "scale": scale}
    return UpscalerShape("Compact", scale, tuple(sizes.items()))


def build(state: Mapping[str, Tensor]) -> tuple[nn.Module, UpscalerShape]:
    """The network the state dict belongs to, built to its sizes, with the weights loaded."""
    weights = canonical(state)
    shape = describe({k: tuple(v.shape) for k, v in weights.items()})
    net = shape.network()
    try:
        net.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        lines = str(exc).splitlines()
        first = lines[1].strip() if len(lines) > 1 else lines[0]
        raise UpscalerFileError(f"its tensors do not fit the network ({first[:200]})") from None
    net.eval().requires_grad_(False)
    return net, shape


def read_header(path: Path) -> dict[str, Any]:
    """A safetensors file's header (names, shapes), read without the weights."""
    if path.suffix.lower() != ".safetensors":
        raise UpscalerFileError(
            "only .safetensors upscalers are loaded (a .pth is a pickle, which can run code; "
            "convert it once with safetensors' save_file)"
        )
    try:
        return safetensors_header.read_header(path)
    except safetensors_header.HeaderError as exc:
        raise UpscalerFileError(str(exc)) from None


def inspect_upscaler(path: Path) -> UpscalerShape:
    """Architecture and scale from the header alone (start-up checks load no weights)."""
    header = read_header(path)
    try:
        shapes = {k: tuple(int(n) for n in v["shape"]) for k, v in header.items()}
    except (KeyError, TypeError, ValueError):
        raise UpscalerFileError("a safetensors header without tensor shapes") from None
    return describe(canonical(shapes))


def load_upscaler(path: Path, device: str, dtype: torch.dtype) -> tuple[nn.Module, UpscalerShape]:
    from safetensors.torch import load_file

    read_header(path)
    net, shape = build(load_file(str(path)))
    return net.to(device=device, dtype=dtype), shape


# --- running one -----------------------------------------------------------------------------

TILE = 192  # A1111's default ESRGAN tile
OVERLAP = 8


def upscale_tiles(width: int, height: int, scale: int, target_w: int, target_h: int) -> int:
    """How many tiles upscaling a width x height image to the target takes: a pass by the
    native factor while the image does not cover it, at most three (hires.with_model)."""
    total = 0
    for _ in range(3):
        if width >= target_w and height >= target_h:
            break
        total += math.ceil(width / TILE) * math.ceil(height / TILE)
        width, height = width * scale, height * scale
    return total


def upscale(
    net: nn.Module, scale: int, image: Any, *, tile: int = TILE, on_tile: Any = None
) -> Any:
    """`image` (PIL, RGB) `scale` times larger, in tiles of `tile` pixels that overlap by
    OVERLAP on each side; each tile's overlap is dropped, so seams fall where both
    neighbours saw the same context. `on_tile(done, total)` is called after each tile (and
    may raise to stop)."""
    from PIL import Image

    parameter = next(net.parameters())
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    x = pixels.view(image.height, image.width, 3).permute(2, 0, 1)[None]
    x = x.to(device=parameter.device, dtype=parameter.dtype) / 255.0
    height, width = image.height, image.width
    out = torch.zeros((1, 3, height * scale, width * scale), dtype=torch.float32)
    boxes = [(top, left) for top in range(0, height, tile) for left in range(0, width, tile)]
    with torch.inference_mode():
        for done, (top, left) in enumerate(boxes, start=1):
            bottom, right = min(top + tile, height), min(left + tile, width)
            t0, l0 = max(top - OVERLAP, 0), max(left - OVERLAP, 0)
            b0, r0 = min(bottom + OVERLAP, height), min(right + OVERLAP, width)
            result = net(x[:, :, t0:b0, l0:r0]).float().cpu()
            out[:, :, top * scale : bottom * scale, left * scale : right * scale] = result[
                :,
                :,
                (top - t0) * scale : (bottom - t0) * scale,
                (left - l0) * scale : (right - l0) * scale,
            ]
            if on_tile is not None:
                on_tile(done, len(boxes))
    data = (out[0].clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    return Image.fromarray(data.numpy(), "RGB")
