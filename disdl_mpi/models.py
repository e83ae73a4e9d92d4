"""Small models for data-isolated training; each takes a norm factory ``norm_layer(C)``.

Inputs arrive standardized float32: (N,C,H,W) images or (N,D) flat features. Initialization
uses only torch's global RNG, so ``torch.manual_seed(s)`` before ``build_model`` gives the
same weights on every rank.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from disdl_mpi.norms.registry import is_norm_layer

NormFactory = Callable[[int], nn.Module]


def _has_stats(norm: nn.Module) -> bool:
    """A real norm layer follows, so the preceding conv/linear needs no bias of its own."""
    return is_norm_layer(norm)


def _conv_block(cin: int, cout: int, norm_layer: NormFactory, stride: int = 1) -> nn.Sequential:
    norm = norm_layer(cout)
    conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=not _has_stats(norm))
    return nn.Sequential(conv, norm, nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """3 conv layers (16/32/64) with norm + ReLU, max pool(s), global average pool, linear.

    Sized for 8x8 digits; on 28x28 / 32x32 inputs an extra 2x2 pool after the first block keeps
    the cost low, and the global average pool makes the head independent of the input size.
    From 64 px on, the first conv has stride 2, as ImageNet stems do: at full resolution a
    224x224 batch of 64 would keep about 1 GiB of activations for backward (each 16-channel
    map is 205 MB), more than the partition the rank holds (issue 17).
    """

    STEM_STRIDE_FROM = 64  # image size from which the first conv downsamples

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        norm_layer: NormFactory,
        image_size: int = 8,
        widths: Sequence[int] = (16, 32, 64),
    ):
        super().__init__()
        w1, w2, w3 = widths
        stride = 2 if image_size >= self.STEM_STRIDE_FROM else 1
        layers: list[nn.Module] = [_conv_block(in_channels, w1, norm_layer, stride)]
        size = -(-image_size // stride)
        if size >= 16:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        layers.append(_conv_block(w1, w2, norm_layer))
        if size >= 2:
            layers.append(nn.MaxPool2d(2))
        layers.append(_conv_block(w2, w3, norm_layer))
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(w3, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.head(self.features(x))


class MLP(nn.Module):
    """Flatten, then hidden linear layers each followed by norm + ReLU, then a linear head."""

    def __init__(
        self, in_features: int, num_classes: int, norm_layer: NormFactory, hidden: Sequence[int] = (128, 64)
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        d = in_features
        for h in hidden:
            norm = norm_layer(h)
            layers += [nn.Linear(d, h, bias=not _has_stats(norm)), norm, nn.ReLU(inplace=True)]
            d = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(d, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.head(self.body(x))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with norm; option-A (parameter-free) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, norm_layer: NormFactory):
        super().__init__()
        self.norm1 = norm_layer(cout)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=not _has_stats(self.norm1))
        self.norm2 = norm_layer(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=not _has_stats(self.norm2))
        self.stride = stride
        self.pad = cout - cin

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        # Option A of He et al. 2016: subsample, then zero-pad the new channels (no parameters,
        # so no extra norm layer and nothing that fedbn or syncbn must treat specially).
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self._shortcut(x))


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (He et al. 2016): stem, 3 stages x 3 basic blocks (16/32/64), GAP, linear."""

    def __init__(
        self, in_channels: int, num_classes: int, norm_layer: NormFactory, blocks_per_stage: int = 3
    ):
        super().__init__()
        norm = norm_layer(16)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=not _has_stats(norm)), norm, nn.ReLU(inplace=True)
        )
        blocks: list[nn.Module] = []
        cin = 16
        for stage, cout in enumerate((16, 32, 64)):
            for i in range(blocks_per_stage):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(BasicBlock(cin, cout, stride, norm_layer))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(64, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(self.pool(x), 1))


class WideCNN(nn.Module):
    """A network-bound model for small images: two conv blocks with norm layers, then an
    8.4 M-parameter classifier head (2048 -> 4096, normalized, -> classes). About 8.5 M
    parameters in all, 34 MB of float32 gradients per step, for little compute: the regime
    where the allreduce, not the arithmetic, sets the step time."""

    def __init__(self, in_channels: int, num_classes: int, norm_layer: NormFactory, hidden: int = 4096):
        super().__init__()
        self.features = nn.Sequential(
            _conv_block(in_channels, 64, norm_layer),
            nn.MaxPool2d(2),
            _conv_block(64, 128, norm_layer),
            nn.AdaptiveAvgPool2d(4),
        )
        norm = norm_layer(hidden)
        self.head = nn.Sequential(
            nn.Linear(128 * 16, hidden, bias=not _has_stats(norm)),
            norm,
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.head(torch.flatten(self.features(x), 1))


def _init(model: nn.Module) -> None:
    """Kaiming-normal convs, default linear init, norm weight 1 / bias 0 (deterministic)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif is_norm_layer(m):
            if getattr(m, "weight", None) is not None:
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


MODELS = ("cnn", "mlp", "resnet20", "widecnn")


def build_model(
    name: str, sample_shape: Sequence[int], num_classes: int, norm_layer: NormFactory
) -> nn.Module:
    """Build ``cnn``, ``mlp``, ``resnet20``, ``widecnn`` or ``auto`` (cnn for (C,H,W), mlp for
    (D,))."""
    shape = tuple(int(s) for s in sample_shape)
    if num_classes < 2:
        raise ValueError(f"build_model: num_classes must be >= 2, got {num_classes}")
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"build_model: bad sample_shape {list(shape)}")
    key = name.strip().lower()
    if key == "auto":
        key = "cnn" if len(shape) == 3 else "mlp"
    if key == "mlp":
        return MLP(math.prod(shape), num_classes, norm_layer)
    if key in ("cnn", "resnet20", "widecnn"):
        if len(shape) != 3:
            raise ValueError(
                f"model '{key}' needs (C,H,W) samples, got sample_shape "
                f"{list(shape)}; use --model mlp for flat features"
            )
        if key == "cnn":
            return SmallCNN(shape[0], num_classes, norm_layer, image_size=min(shape[1:]))
        if key == "widecnn":
            return WideCNN(shape[0], num_classes, norm_layer)
        return ResNet20(shape[0], num_classes, norm_layer)
    raise ValueError(f"unknown model '{name}'; choose from auto, {', '.join(MODELS)}")
