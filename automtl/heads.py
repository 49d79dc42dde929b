"""Builtin task heads: what turns the shared feature map into each task's prediction.

Heads are always task-owned. Dense heads predict at feature resolution; :func:`finish` (the
kind's ``finish``, see :mod:`automtl.kinds`) upsamples to the input size (and normalises surface
normals) outside the head, so a custom head only has to map features to its output.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .tasks import Task


class GlobalHead(nn.Module):
    """Global average pooling and one linear layer: classification, multilabel, regression."""

    def __init__(self, channels: int, outputs: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(channels, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(x)))


class DenseHead(nn.Module):
    """A light per-pixel head: 1x1 reduce, 3x3 context, 1x1 predict (kept small so that heads
    do not dominate the parameter budget of wide backbones such as ResNet-50)."""

    def __init__(self, channels: int, outputs: int, width: int = 128):
        super().__init__()
        mid = min(width, channels)
        self.reduce = nn.Sequential(nn.Conv2d(channels, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True))
        self.context = nn.Sequential(nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True))
        self.predict = nn.Conv2d(mid, outputs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict(self.context(self.reduce(x)))


def build_head(task: "Task", channels: int) -> nn.Module:
    """The task's own head if it brought one, else the builtin head of its kind."""
    if task.head is not None:
        return task.head
    return task.builtin("head").head(task, channels)


def finish(task: "Task", y: torch.Tensor, size) -> torch.Tensor:
    """A builtin head's output as the task's prediction (its kind's ``finish``); a custom head's as is.

    ``y`` is (B, C, h, w) or (B, C); ``size`` the input's (H, W). Also runs on ``torch.fx`` proxies.
    """
    if task.head is not None or task.spec is None:
        return y
    return task.spec.finish(y, size)
