"""MobileNetV2 (width 1.0) feature extractor.

``features`` mirrors torchvision's ``mobilenet_v2().features`` index for index
(``features.0.0.weight``, ``features.1.conv.0.0.weight``, ...), so its ImageNet
checkpoint loads directly once ``classifier.*`` is dropped.
"""
from __future__ import annotations

from typing import List

from torch import Tensor, nn

from ._init import torchvision_init
from .registry import register_backbone

__all__ = ["ConvBNReLU", "InvertedResidual", "MobileNetV2", "mobilenet_v2"]

#: (expansion t, output channels c, repeats n, first stride s), as in the paper.
_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class ConvBNReLU(nn.Sequential):
    """Conv (no bias) -> BN -> ReLU6; a Sequential so the keys are ``.0``/``.1`` like torchvision."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise 3x3 -> linear 1x1; adds the input when shape is kept."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.stride = stride
        self.use_res_connect = stride == 1 and inp == oup
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(inp, hidden, kernel_size=1))
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:  # fixed at construction, so fx traces one branch
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 trunk; ``forward`` returns ``features(x)``: 1280 channels at stride 32."""

    def __init__(self) -> None:
        super().__init__()
        cin = 32
        features: List[nn.Module] = [ConvBNReLU(3, cin, stride=2)]
        for t, c, n, s in _SETTING:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        self.last_channel = 1280
        features.append(ConvBNReLU(cin, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.out_channels = self.last_channel
        self.output_stride = 32
        torchvision_init(self)  # kaiming's default leaky_relu(0) gain is ReLU's

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


@register_backbone("mobilenet_v2", description="MobileNetV2 1.0 features (1280 ch at stride 32)")
def mobilenet_v2() -> MobileNetV2:
    """MobileNetV2 (width 1.0) features."""
    return MobileNetV2()
