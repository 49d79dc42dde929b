"""The builtin loss of each task kind, masked so that missing labels never count.

Every loss returns a scalar that stays finite when some (or all) samples of a batch lack a
label: it is the sum over labelled entries divided by max(count, 1), so an all-missing batch
gives a zero that still reaches every parameter (``backward()`` and DDP's gradient bucketing
see the same graph on every rank), and no loss ever syncs the device to count labels.
Targets are cleaned (NaN replaced) *before* any arithmetic, because a NaN that enters the
graph poisons the gradient even where the forward value is masked out.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError

if TYPE_CHECKING:
    from .tasks import Task

__all__ = [
    "loss_for",
    "ClassificationLoss",
    "MultilabelLoss",
    "RegressionLoss",
    "SegmentationLoss",
    "DepthLoss",
    "NormalLoss",
    "match_size",
]

LossFn = Callable[[Tensor, Tensor], Tensor]


def _masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``values`` over ``valid`` entries; 0 (with a grad path) when none is valid.

    Written as sum / max(count, 1) rather than indexing with the mask, so it never asks the
    device how many labels there are: no host sync, and one graph for every batch.
    """
    valid = valid.to(values.dtype)
    return (values * valid).sum() / valid.sum().clamp_min(1.0)


def match_size(pred: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize a dense prediction to the target's size, so heads may predict at a lower stride."""
    if tuple(pred.shape[-2:]) == tuple(size):
        return pred
    return F.interpolate(pred, size=tuple(size), mode="bilinear", align_corners=False)


def _label_target(target: Tensor, ignore_index: int) -> Tensor:
    """Integer labels; a float target (e.g. from .npy files) with NaN becomes ignore_index."""
    if target.is_floating_point():
        target = torch.where(torch.isnan(target), torch.full_like(target, ignore_index), target)
    return target.long()


def normal_pixels(target: Tensor) -> Tensor:
    """(B, H, W) mask of the pixels of a (B, 3, H, W) normal map that have a normal: every channel finite, not all
    zero. What the normal loss and metric average over, and what counts as a label."""
    return torch.isfinite(target).all(dim=1) & (torch.nan_to_num(target).abs().sum(dim=1) > 0)


def _clean(target: Tensor, valid: Tensor) -> Tensor:
    """Zero out invalid entries so no NaN enters the graph (0 * NaN would poison gradients)."""
    return torch.where(valid, target, torch.zeros_like(target))


class ClassificationLoss:
    """Cross-entropy over the labelled samples (label != ignore_index)."""

    def __init__(self, ignore_index: int = -1):
        self.ignore_index = ignore_index

    def __call__(self, pred: Tensor, target: Tensor) -> Tensor:
        target = _label_target(target, self.ignore_index).reshape(-1)
        ce = F.cross_entropy(pred, target, ignore_index=self.ignore_index, reduction="none")
        return _masked_mean(ce, target != self.ignore_index)


class MultilabelLoss:
    """Binary cross-entropy with logits over labelled entries (NaN marks a missing label)."""

    def __call__(self, pred: Tensor, target: Tensor) -> Tensor:
        target = target.to(pred.dtype).reshape(pred.shape)
        valid = ~torch.isnan(target)
        bce = F.binary_cross_entropy_with_logits(pred, _clean(target, valid), reduction="none")
        return _masked_mean(bce, valid)


class RegressionLoss:
    """L1 (default) or MSE over the labelled outputs (NaN marks a missing value)."""

    def __init__(self, kind: str = "l1"):
        if kind not in ("l1", "mse"):
            raise ConfigError(f"regression loss {kind!r} is unknown; use options={{'loss': 'l1'}} or 'mse'")
        self.kind = kind

    def __call__(self, pred: Tensor, target: Tensor) -> Tensor:
        target = target.to(pred.dtype).reshape(pred.shape)
        valid = ~torch.isnan(target)
        err = pred - _clean(target, valid)
        return _masked_mean(err.abs() if self.kind == "l1" else err * err, valid)


class SegmentationLoss:
    """Per-pixel cross-entropy; void pixels (ignore_index, 255 by default) do not count."""

    def __init__(self, ignore_index: int = 255):
        self.ignore_index = ignore_index

    def __call__(self, pred: Tensor, target: Tensor) -> Tensor:
        target = _label_target(target, self.ignore_index)
        if target.dim() == 4:  # (B, 1, H, W)
            target = target[:, 0]
        pred = match_size(pred, target.shape[-2:])
        # reduction="mean" with ignore_index is NaN when every pixel is void; this is 0.
        ce = F.cross_entropy(pred, target, ignore_index=self.ignore_index, reduction="none")
        return _masked_mean(ce, target != self.ignore_index)


def _dense_target(target: Tensor, pred: Tensor, channels: int) -> Tensor:
    target = target.to(pred.dtype)
    if target.dim() == 3 and channels == 1:  # (B, H, W) depth
        target = target.unsqueeze(1)
    return target


class DepthLoss:
    """L1 over valid pixels; a pixel is invalid when its depth is 0 or not finite."""

    def __call__(self, pred: Tensor, target: Tensor) -> Tensor:
        target = _dense_target(target, pred, 1)
        pred = match_size(pred, target.shape[-2:])
        valid = torch.isfinite(target) & (target != 0)
        return _masked_mean((pred - _clean(target, valid)).abs(), valid)


class NormalLoss:
    """1 - cosine similarity over valid pixels; an all-zero or non-finite normal is invalid."""

    def __call__(self, pred: Tensor, target: Tensor) -> Tensor:
        target = _dense_target(target, pred, 3)
        pred = match_size(pred, target.shape[-2:])
        valid = normal_pixels(target)  # (B, H, W)
        target = _clean(target, torch.isfinite(target))
        cos = F.cosine_similarity(pred, target, dim=1, eps=1e-8)
        return _masked_mean(1.0 - cos, valid)


def loss_for(task: "Task") -> LossFn:
    """The loss callable ``(pred, target) -> scalar`` of a task: its own (checked to return one number at each call,
    :class:`CheckedLoss`), or its kind's builtin."""
    if task.loss is not None:
        return CheckedLoss(task.name, task.loss)
    return task.builtin("loss").loss(task)


class CheckedLoss:
    """A task's own loss, whose every value must be one number as a tensor (shape ``()`` or one element).

    Raises (on call):
        ConfigError: the loss returned something else (a per-sample vector, a Python float: no gradient).
    """

    def __init__(self, task: str, fn: LossFn):
        self.task, self.fn = task, fn

    def __call__(self, pred: Tensor, target) -> Tensor:
        value = self.fn(pred, target)
        if isinstance(value, Tensor) and value.numel() == 1 and value.is_floating_point():
            return value.reshape(())
        what = (f"a {str(value.dtype).split('.')[-1]} tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor)
                else f"a {type(value).__name__}")
        raise ConfigError(f"the loss of task {self.task!r} returned {what}; a loss returns one number, a floating "
                          "tensor of shape () computed from the prediction (reduce a per-sample loss with .mean())")
