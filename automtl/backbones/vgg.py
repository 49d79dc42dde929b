"""VGG-16 with batch norm, feature extractor.

``features`` mirrors torchvision's ``vgg16_bn().features`` index for index
(conv, BN, ReLU per layer; max-pool between stages), so its ImageNet checkpoint
loads once ``classifier.*`` is dropped.
"""
from __future__ import annotations

from typing import List, Sequence, Union

from torch import Tensor, nn

from ._init import torchvision_init
from .registry import register_backbone

__all__ = ["VGG", "vgg16_bn"]

#: Configuration "D" of the VGG paper; "M" is a 2x2 max-pool.
_CFG_D: Sequence[Union[int, str]] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                     512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """VGG trunk; ``forward`` returns ``features(x)``: 512 channels at stride 32."""

    def __init__(self, cfg: Sequence[Union[int, str]] = _CFG_D) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        cin = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(cin, int(v), kernel_size=3, padding=1), nn.BatchNorm2d(int(v)),
                           nn.ReLU(inplace=True)]
                cin = int(v)
        self.features = nn.Sequential(*layers)
        self.out_channels = cin
        self.output_stride = 2 ** sum(1 for v in cfg if v == "M")
        torchvision_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


@register_backbone("vgg16_bn", description="VGG-16-BN features (512 ch at stride 32)")
def vgg16_bn() -> VGG:
    """VGG-16-BN features."""
    return VGG()
