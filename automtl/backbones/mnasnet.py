"""MNASNet-1.0 feature extractor.

``layers`` mirrors torchvision's ``mnasnet1_0().layers`` index for index, so its
ImageNet checkpoint loads once ``classifier.*`` is dropped. The network's own
forward pools; here we return the 4-D map so dense heads can use it.
"""
from __future__ import annotations

from torch import Tensor, nn

from ._init import torchvision_init
from .registry import register_backbone

__all__ = ["MNASNet", "mnasnet1_0"]

#: The paper's TensorFlow momentum 0.9997, in PyTorch's convention.
_BN_MOMENTUM = 1 - 0.9997


class _InvertedResidual(nn.Module):
    """Pointwise expand -> depthwise kxk -> linear pointwise; adds the input when shape is kept."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int,
                 expansion_factor: int, bn_momentum: float = 0.1) -> None:
        super().__init__()
        mid = in_ch * expansion_factor
        self.apply_residual = in_ch == out_ch and stride == 1
        self.layers = nn.Sequential(
            nn.Conv2d(in_ch, mid, 1, bias=False),
            nn.BatchNorm2d(mid, momentum=bn_momentum),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, kernel_size, stride=stride, padding=kernel_size // 2, groups=mid, bias=False),
            nn.BatchNorm2d(mid, momentum=bn_momentum),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch, momentum=bn_momentum),
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.apply_residual:  # fixed at construction, so fx traces one branch
            return self.layers(x) + x
        return self.layers(x)


def _stack(in_ch: int, out_ch: int, kernel_size: int, stride: int, exp: int, repeats: int) -> nn.Sequential:
    """``repeats`` blocks; only the first changes width/resolution, the rest are residual."""
    blocks = [_InvertedResidual(in_ch, out_ch, kernel_size, stride, exp, _BN_MOMENTUM)]
    blocks += [_InvertedResidual(out_ch, out_ch, kernel_size, 1, exp, _BN_MOMENTUM) for _ in range(1, repeats)]
    return nn.Sequential(*blocks)


class MNASNet(nn.Module):
    """MNASNet-1.0 trunk; ``forward`` returns ``layers(x)``: 1280 channels at stride 32."""

    def __init__(self) -> None:
        super().__init__()
        m = _BN_MOMENTUM
        self.layers = nn.Sequential(
            # stem: full conv, then a depthwise-separable conv without skip
            nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(32, momentum=m),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3, stride=1, padding=1, groups=32, bias=False),
            nn.BatchNorm2d(32, momentum=m),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 16, 1, stride=1, padding=0, bias=False),
            nn.BatchNorm2d(16, momentum=m),
            # (in, out, kernel, stride, expansion, repeats)
            _stack(16, 24, 3, 2, 3, 3),
            _stack(24, 40, 5, 2, 3, 3),
            _stack(40, 80, 5, 2, 6, 3),
            _stack(80, 96, 3, 1, 6, 2),
            _stack(96, 192, 5, 2, 6, 4),
            _stack(192, 320, 3, 1, 6, 1),
            # final 1x1 mapping to the classifier width
            nn.Conv2d(320, 1280, 1, stride=1, padding=0, bias=False),
            nn.BatchNorm2d(1280, momentum=m),
            nn.ReLU(inplace=True),
        )
        self.out_channels = 1280
        self.output_stride = 32
        torchvision_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


@register_backbone("mnasnet1_0", description="MNASNet 1.0 features (1280 ch at stride 32)")
def mnasnet1_0() -> MNASNet:
    """MNASNet with depth multiplier 1.0, features only."""
    return MNASNet()
