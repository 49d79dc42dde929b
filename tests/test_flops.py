"""MAC counting through torch's FlopCounterMode: every op that runs, MACs = FLOPs / 2, shapes-only mode."""
import torch
import torch.nn.functional as F
from torch import nn

from automtl.flops import macs_of
from automtl.report import count_macs


class _Mixed(nn.Module):
    """Module convs, a transposed conv, a functional conv and a matmul: hooks on modules saw only the first two."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, groups=1)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.w = nn.Parameter(torch.randn(4, 4, 1, 1))
        self.proj = nn.Parameter(torch.randn(4, 5))

    def forward(self, x):
        x = self.up(self.conv(x))                         # (N, 4, 2H, 2W)
        x = F.conv2d(x, self.w)                           # functional: no module to hook
        return x.flatten(2).transpose(1, 2) @ self.proj   # a matmul


def _hand(n, h, w):
    conv = h * w * 8 * 3 * 9
    up = h * w * 8 * 4 * 4          # input elements x out_channels x kh x kw
    fconv = 4 * h * w * 4 * 4
    matmul = 4 * h * w * 4 * 5
    return n * (conv + up + fconv + matmul)


def test_every_op_counts_per_sample():
    x = torch.randn(2, 3, 6, 6)
    assert count_macs(_Mixed(), x) == _hand(2, 6, 6) // 2


def test_static_counts_the_same_on_fake_tensors():
    model, x = _Mixed(), torch.randn(3, 3, 8, 8)
    assert count_macs(model, x, static=True) == count_macs(model, x) == _hand(1, 8, 8)


def test_macs_of_is_half_the_flops_of_a_linear():
    lin = nn.Linear(7, 3)
    assert macs_of(lambda: lin(torch.randn(5, 7))) == 5 * 7 * 3
