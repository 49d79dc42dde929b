"""Builtin backbones (headless feature extractors) and the registry that names them.

Each builtin mirrors torchvision's module tree so torchvision ImageNet weights
load by key; all of them are ``torch.fx``-traceable, which the compiler needs.
"""
from .mnasnet import MNASNet, mnasnet1_0
from .external import list_external
from .mobilenet import MobileNetV2, mobilenet_v2
from .registry import (
    BACKBONES,
    BackboneSpec,
    build_backbone,
    count_convs,
    count_parameters,
    list_backbones,
    load_weights,
)
from .resnet import ResNet, deeplab_resnet34, resnet18, resnet34, resnet50
from .tiny import TinyCNN
from .vgg import VGG, vgg16_bn

__all__ = [
    "BACKBONES", "BackboneSpec", "build_backbone", "count_convs", "count_parameters", "list_backbones",
    "list_external", "load_weights", "MNASNet", "mnasnet1_0", "MobileNetV2", "mobilenet_v2", "ResNet", "deeplab_resnet34",
    "resnet18", "resnet34", "resnet50", "TinyCNN", "VGG", "vgg16_bn",
]
