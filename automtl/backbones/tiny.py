"""A tiny residual CNN that builds and runs in milliseconds.

It is for tests and examples: small as it is, it has every pattern the compiler
must handle in real backbones (residual adds, a stride change, a channel change
with a 1x1 projection shortcut).
"""
from __future__ import annotations

from torch import Tensor, nn

from .registry import register_backbone

__all__ = ["TinyCNN"]


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout))


@register_backbone("tiny", description="tiny residual CNN for tests (29k params, 32 ch at stride 4)",
                   default_input=(3, 32, 32))
class TinyCNN(nn.Module):
    """stem (3->w, stride 2) -> residual block (w) -> stride-2 block (w->2w, 1x1 shortcut) -> 3x3 conv.

    ``forward`` returns ``2*width`` channels at stride 4. With ``width=16``:
    7 convs, 28,944 parameters.
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        w, w2 = width, 2 * width
        self.stem = _conv_bn(3, w, stride=2)
        self.block1_conv1 = _conv_bn(w, w)
        self.block1_conv2 = _conv_bn(w, w)
        self.block2_conv1 = _conv_bn(w, w2, stride=2)
        self.block2_conv2 = _conv_bn(w2, w2)
        self.block2_down = _conv_bn(w, w2, k=1, stride=2)
        self.head = _conv_bn(w2, w2)
        self.relu = nn.ReLU(inplace=True)
        self.out_channels = w2
        self.output_stride = 4
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.stem(x))
        y = self.relu(self.block1_conv1(x))
        x = self.relu(self.block1_conv2(y) + x)
        y = self.relu(self.block2_conv1(x))
        x = self.relu(self.block2_conv2(y) + self.block2_down(x))
        return self.relu(self.head(x))
