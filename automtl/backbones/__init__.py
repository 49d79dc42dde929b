"""Builtin backbones (headless feature extractors) and the registry that names them.

Each builtin mirrors torchvision's module tree so torchvision ImageNet weights
load by key; all of them are ``torch.fx``-traceable, which the compiler needs. A family file
registers its factories with :func:`register_backbone` when it is imported, so the import
order below is the order ``automtl backbones`` lists them in.
"""
from .registry import (
    BACKBONES,
    BackboneSpec,
    build_backbone,
    count_convs,
    count_parameters,
    list_backbones,
    load_weights,
    register_backbone,
)
from .tiny import TinyCNN
from .resnet import ResNet, deeplab_resnet34, resnet18, resnet34, resnet50
from .mobilenet import MobileNetV2, mobilenet_v2
from .mnasnet import MNASNet, mnasnet1_0
from .vgg import VGG, vgg16_bn
from .external import list_external

__all__ = [
    "BACKBONES", "BackboneSpec", "build_backbone", "count_convs", "count_parameters", "list_backbones",
    "list_external", "load_weights", "register_backbone", "MNASNet", "mnasnet1_0", "MobileNetV2", "mobilenet_v2",
    "ResNet", "deeplab_resnet34", "resnet18", "resnet34", "resnet50", "TinyCNN", "VGG", "vgg16_bn",
]
