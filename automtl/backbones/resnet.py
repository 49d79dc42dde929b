"""ResNet-18/34/50 feature extractors and the Deeplab-ResNet-34 of AdaShare/AutoMTL.

The module tree and attribute names follow torchvision's ``resnet`` exactly, so an
ImageNet checkpoint from torchvision loads key-for-key (its ``fc.*`` head is what
:func:`automtl.backbones.load_weights` drops). There is no ``avgpool``/``fc``: the
multi-task compiler attaches its own heads to the last feature map.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Type, Union

from torch import Tensor, nn

from ._init import torchvision_init
from .registry import register_backbone

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet34", "resnet50", "deeplab_resnet34"]


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 conv whose padding equals its dilation, so stride 1 keeps the spatial size."""
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs plus identity (ResNet-18/34); ``downsample`` matches the shortcut's shape."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:  # structural, not data-dependent: fx-traceable
            identity = self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride, as torchvision's V1.5), 1x1 expand by 4, plus identity."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


_Block = Union[Type[BasicBlock], Type[Bottleneck]]


class ResNet(nn.Module):
    """ResNet trunk up to ``layer4``; ``forward`` returns the last feature map.

    ``dilations`` gives, per stage, the dilation of its 3x3 convs; a stage with
    dilation > 1 runs at stride 1 instead of 2 (Deeplab style), which raises the
    output resolution without changing any parameter shape.
    """

    def __init__(self, block: _Block, layers: Sequence[int],
                 dilations: Sequence[int] = (1, 1, 1, 1)) -> None:
        super().__init__()
        if len(layers) != 4 or len(dilations) != 4:
            raise ValueError("layers and dilations need one entry per stage (4)")
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stride = 4
        stages: List[nn.Sequential] = []
        for i, (planes, blocks, dil) in enumerate(zip((64, 128, 256, 512), layers, dilations)):
            s = 1 if i == 0 or dil > 1 else 2
            stride *= s
            stages.append(self._make_layer(block, planes, blocks, s, dil))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        #: Channels and downsampling factor of the returned feature map.
        self.out_channels = 512 * block.expansion
        self.output_stride = stride
        torchvision_init(self)

    def _make_layer(self, block: _Block, planes: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, dilation)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, None, dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


@register_backbone("resnet18", description="ResNet-18 features (512 ch at stride 32)")
def resnet18() -> ResNet:
    """ResNet-18 features: 512 channels at stride 32."""
    return ResNet(BasicBlock, (2, 2, 2, 2))


@register_backbone("resnet34", description="ResNet-34 features (512 ch at stride 32)")
def resnet34() -> ResNet:
    """ResNet-34 features: 512 channels at stride 32."""
    return ResNet(BasicBlock, (3, 4, 6, 3))


@register_backbone("resnet50", description="ResNet-50 features (2048 ch at stride 32)")
def resnet50() -> ResNet:
    """ResNet-50 features: 2048 channels at stride 32."""
    return ResNet(Bottleneck, (3, 4, 6, 3))


@register_backbone("deeplab_resnet34",
                   description="Deeplab-ResNet-34 of AdaShare/AutoMTL, dilated layer3/4 (512 ch at stride 8)")
def deeplab_resnet34() -> ResNet:
    """Deeplab-ResNet-34 (AdaShare/AutoMTL): layer3/layer4 dilated 2/4 at stride 1, output stride 8.

    Parameter names and shapes equal :func:`resnet34`, so torchvision resnet34 weights load.
    """
    return ResNet(BasicBlock, (3, 4, 6, 3), dilations=(1, 1, 2, 4))
