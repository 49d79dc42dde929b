"""Streaming metrics of each task kind, and the multi-task gain Δ_MTL.

A metric accumulates sufficient statistics batch by batch (``update``) and reduces them once
(``compute``), so a validation pass costs no more memory than one batch for every kind except
multilabel mAP, which keeps the scores. Only labelled samples and pixels count, with the same
notion of "missing" as :mod:`automtl.losses`. A metric with nothing counted computes to NaN:
a number would claim a measurement that was never made. So does a metric whose prediction is not finite (NaN or
inf) at any counted entry: every value it computes is NaN, as a mean of NaN errors is, where an argmax, a
threshold or a histogram bin would otherwise turn the NaN into a plausible number (NaN logits pick a class, a NaN
angle fell into the 0-degree bin of the median, a NaN score dropped out of mAP as a missing entry).
"""
from __future__ import annotations

import functools

import math
from typing import TYPE_CHECKING, Mapping, Optional

import torch
from torch import Tensor

from .errors import ConfigError
from .losses import _label_target, match_size, normal_pixels

if TYPE_CHECKING:
    from .tasks import Task

__all__ = [
    "HIGHER_IS_BETTER",
    "Metric",
    "Accuracy",
    "MultilabelMetric",
    "RegressionMetric",
    "SegmentationMetric",
    "DepthMetric",
    "NormalMetric",
    "metric_for",
    "delta_mtl",
]

#: Direction of every metric name a registered task kind computes: True when a larger value is better.
#: Each kind declares its own (``TaskKind.higher_is_better``); :func:`automtl.kinds.register_kind` adds them here.
HIGHER_IS_BETTER: dict[str, bool] = {}

_NAN = float("nan")


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else _NAN


class Metric:
    """Base of the builtin metrics: ``update`` per batch, ``compute`` at the end, ``reset``.

    ``primary`` is the headline metric name, the one a search selects on.
    """

    primary: str = ""
    names: tuple[str, ...] = ()
    nonfinite = 0  # counted entries whose prediction is not finite: every value computes to NaN (module docstring)

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def update(self, pred: Tensor, target: Tensor) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def compute(self) -> dict[str, float]:  # pragma: no cover - overridden
        raise NotImplementedError

    def _not_finite(self, finite: Tensor, counted: Tensor) -> bool:
        """Count the entries where ``counted`` is set and ``finite`` (the prediction is finite there) is not (bool
        tensors of one shape); True once any counted prediction was not finite."""
        self.nonfinite += int((counted & ~finite).sum())
        return self.nonfinite > 0

    def _unmeasured(self) -> dict[str, float]:
        return dict.fromkeys(self.names, _NAN)


def _finite_at(pred: Tensor, scored_dims: int) -> Tensor:
    """Where :func:`_class_ids` picks from finite values (same shape as its result): all scores of a position finite."""
    if not pred.is_floating_point():
        return torch.ones_like(_class_ids(pred, scored_dims), dtype=torch.bool)
    finite = torch.isfinite(pred)
    return finite.all(dim=1) if pred.dim() == scored_dims else finite


def _class_ids(pred: Tensor, scored_dims: int) -> Tensor:
    """The class each prediction picks: the argmax over dimension 1 of scores (``scored_dims`` dimensions, e.g.
    (B, C) or (B, C, H, W)), or the prediction itself where it already holds class ids (an integer tensor, with or
    without a dimension 1 of size 1). Scores of one class pick it everywhere."""
    if pred.is_floating_point():
        return pred.argmax(dim=1) if pred.dim() == scored_dims else pred.long()
    if pred.dim() == scored_dims and pred.shape[1] == 1:
        pred = pred[:, 0]
    return pred.long()


class Accuracy(Metric):
    """Top-1 accuracy (percent) over labelled samples."""

    primary = "accuracy"
    names = ("accuracy",)

    def __init__(self, ignore_index: int = -1):
        self.ignore_index = ignore_index
        super().__init__()

    def reset(self) -> None:
        self.correct = 0
        self.count = 0
        self.nonfinite = 0

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        target = _label_target(target, self.ignore_index).reshape(-1)
        labels = _class_ids(pred, 2)
        valid = target != self.ignore_index
        self._not_finite(_finite_at(pred.detach(), 2).reshape(-1), valid)
        self.correct += int((labels[valid] == target[valid]).sum())
        self.count += int(valid.sum())

    def compute(self) -> dict[str, float]:
        if self.nonfinite:
            return self._unmeasured()
        return {"accuracy": 100.0 * _ratio(self.correct, self.count)}


def average_precision(scores: Tensor, labels: Tensor) -> float:
    """Area under the precision-recall step curve (scikit-learn's ``average_precision_score``).

    Tied scores form one threshold, so the value does not depend on the order of ties.
    """
    positives = int(labels.sum())
    if positives == 0:
        return _NAN
    order = torch.argsort(scores, descending=True, stable=True)
    s, y = scores[order], labels[order].double()
    tp = torch.cumsum(y, 0)
    fp = torch.cumsum(1.0 - y, 0)
    # last index of each group of equal scores = one threshold
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    tp, fp = tp[last], fp[last]
    precision = tp / (tp + fp)
    recall = tp / positives
    recall_prev = torch.cat([recall.new_zeros(1), recall[:-1]])
    return float(((recall - recall_prev) * precision).sum())


class MultilabelMetric(Metric):
    """Mean per-class F1 at logit threshold 0 and mean average precision, both in percent.

    Classes without any positive label or prediction have no F1 and are left out of the mean;
    classes without any positive label have no AP and are left out of mAP. Rows or entries
    that are NaN in the target are missing and do not count.
    """

    primary = "f1"
    names = ("f1", "map")

    def __init__(self, classes: Optional[int] = None):
        self.classes = classes
        super().__init__()

    def reset(self) -> None:
        self.tp = self.fp = self.fn = None
        self.nonfinite = 0
        self.scores: list[Tensor] = []
        self.labels: list[Tensor] = []

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        pred = pred.detach().float().cpu()
        target = target.detach().float().cpu().reshape(pred.shape)
        valid = ~torch.isnan(target)
        self._not_finite(torch.isfinite(pred), valid)
        t = torch.where(valid, target, torch.zeros_like(target)) > 0.5
        p = pred > 0
        if self.tp is None:
            c = pred.shape[1]
            self.tp, self.fp, self.fn = (torch.zeros(c, dtype=torch.long) for _ in range(3))
        self.tp += (p & t & valid).sum(0)
        self.fp += (p & ~t & valid).sum(0)
        self.fn += (~p & t & valid).sum(0)
        # NaN score marks a missing entry for AP
        self.scores.append(torch.where(valid, pred, torch.full_like(pred, _NAN)))
        self.labels.append(t)

    def compute(self) -> dict[str, float]:
        if self.tp is None or self.nonfinite:
            return self._unmeasured()
        denom = 2 * self.tp + self.fp + self.fn
        has = denom > 0
        f1 = (2 * self.tp[has].double() / denom[has].double()).mean().item() if bool(has.any()) else _NAN
        scores = torch.cat(self.scores)
        labels = torch.cat(self.labels)
        aps = []
        for c in range(scores.shape[1]):
            keep = ~torch.isnan(scores[:, c])
            ap = average_precision(scores[keep, c], labels[keep, c])
            if not math.isnan(ap):
                aps.append(ap)
        m = sum(aps) / len(aps) if aps else _NAN
        return {"f1": 100.0 * f1, "map": 100.0 * m}


class RegressionMetric(Metric):
    """Mean absolute and root-mean-square error over labelled outputs (NaN = missing)."""

    primary = "mae"
    names = ("mae", "rmse")

    def reset(self) -> None:
        self.abs_sum = 0.0
        self.sq_sum = 0.0
        self.count = 0
        self.nonfinite = 0

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        target = target.detach().double().reshape(pred.shape)
        valid = ~torch.isnan(target)
        self._not_finite(torch.isfinite(pred.detach()), valid)
        err = pred.detach().double()[valid] - target[valid]
        self.abs_sum += float(err.abs().sum())
        self.sq_sum += float((err * err).sum())
        self.count += int(valid.sum())

    def compute(self) -> dict[str, float]:
        if self.nonfinite:
            return self._unmeasured()
        return {"mae": _ratio(self.abs_sum, self.count), "rmse": math.sqrt(_ratio(self.sq_sum, self.count))}


class SegmentationMetric(Metric):
    """Mean IoU and pixel accuracy (percent); void pixels excluded.

    mIoU averages over the classes that occur in the targets or the predictions (a class absent
    from both has no IoU), as the usual MTL code bases do. Kept as three per-class counts (pixels
    predicted, labelled and both), what a confusion matrix's diagonal and sums give, in O(classes)
    memory rather than O(classes^2).
    """

    primary = "miou"
    names = ("miou", "pixel_acc")

    def __init__(self, classes: int, ignore_index: int = 255):
        self.classes = classes
        self.ignore_index = ignore_index
        super().__init__()

    def reset(self) -> None:
        self.predicted, self.labelled, self.correct = (torch.zeros(self.classes, dtype=torch.long) for _ in range(3))
        self.nonfinite = 0

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """``pred``: (B, C, H, W) scores (resized to the target's size) or (B, H, W) / (B, 1, H, W) integer class
        ids (an id outside 0..C-1 is a wrong prediction); ``target``: (B, H, W) or (B, 1, H, W) class ids."""
        target = _label_target(target.detach(), self.ignore_index)
        if target.dim() == 4:
            target = target[:, 0]
        pred = pred.detach()
        if pred.dim() == target.dim() + 1 and pred.is_floating_point():
            pred = match_size(pred.float(), target.shape[-2:])
        labels = _class_ids(pred, target.dim() + 1)
        valid = (target != self.ignore_index) & (target >= 0) & (target < self.classes)
        self._not_finite(_finite_at(pred, target.dim() + 1).reshape(valid.shape), valid)
        target, labels = target[valid], labels[valid]
        count = functools.partial(torch.bincount, minlength=self.classes)
        self.labelled += count(target).cpu()
        self.predicted += count(labels[(labels >= 0) & (labels < self.classes)]).cpu()  # another id: no class's
        self.correct += count(target[target == labels]).cpu()

    def compute(self) -> dict[str, float]:
        if self.nonfinite:
            return self._unmeasured()
        inter = self.correct.double()
        total = self.labelled.sum().item()
        union = self.predicted.double() + self.labelled.double() - inter
        present = union > 0
        miou = (inter[present] / union[present]).mean().item() if bool(present.any()) else _NAN
        return {"miou": 100.0 * miou, "pixel_acc": 100.0 * _ratio(inter.sum().item(), total)}


class DepthMetric(Metric):
    """Absolute and relative error over valid pixels (depth 0 or non-finite is invalid).

    Errors are averaged over all valid pixels of the whole set, not per batch, so the value does
    not depend on the batch size.
    """

    primary = "abs_err"
    names = ("abs_err", "rel_err")

    def reset(self) -> None:
        self.abs_sum = 0.0
        self.rel_sum = 0.0
        self.count = 0
        self.nonfinite = 0

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        target = target.detach().double()
        if target.dim() == 3:
            target = target.unsqueeze(1)
        pred = match_size(pred.detach().double(), target.shape[-2:])
        valid = torch.isfinite(target) & (target != 0)
        self._not_finite(torch.isfinite(pred), valid)
        err = (pred[valid] - target[valid]).abs()
        self.abs_sum += float(err.sum())
        self.rel_sum += float((err / target[valid].abs()).sum())
        self.count += int(valid.sum())

    def compute(self) -> dict[str, float]:
        if self.nonfinite:
            return self._unmeasured()
        return {"abs_err": _ratio(self.abs_sum, self.count), "rel_err": _ratio(self.rel_sum, self.count)}


class NormalMetric(Metric):
    """Angle error statistics (degrees; ``within_*`` in percent) over valid pixels.

    The median comes from a histogram of 0.01-degree bins with linear interpolation inside the
    bin, so the metric never stores every pixel's angle: within about a bin of the exact median where many pixels
    lie near it (any image's worth: 0.005 degree from a few hundred pixels on), degrees off on a handful of pixels.
    A prediction of no direction (all zero) counts as 90 degrees off.
    """

    primary = "mean_angle"
    names = ("mean_angle", "median_angle", "within_11_25", "within_22_5", "within_30")
    BIN = 0.01
    THRESHOLDS = {"within_11_25": 11.25, "within_22_5": 22.5, "within_30": 30.0}

    def reset(self) -> None:
        self.bins = int(round(180.0 / self.BIN))
        self.hist = torch.zeros(self.bins, dtype=torch.long)
        self.angle_sum = 0.0
        self.within = {k: 0 for k in self.THRESHOLDS}
        self.count = 0
        self.nonfinite = 0

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        target = target.detach().double()
        pred = match_size(pred.detach().double(), target.shape[-2:])
        valid = normal_pixels(target)
        p = pred.permute(0, 2, 3, 1)[valid]
        t = target.permute(0, 2, 3, 1)[valid]
        # atan2(|p x t|, p.t) is accurate near 0 degrees, where acos loses precision. A prediction of no direction
        # (all zero) is 90 degrees off, as its loss says (cosine 0), not atan2(0, 0) = 0, a perfect score.
        angle = torch.rad2deg(torch.atan2(torch.linalg.cross(p, t).norm(dim=1), (p * t).sum(dim=1)))
        angle = torch.where((p != 0).any(dim=1), angle, torch.full_like(angle, 90.0)).cpu()
        if self._not_finite(torch.isfinite(p).all(dim=1).cpu(), torch.ones_like(angle, dtype=torch.bool)):
            return  # every value is NaN now; NaN angles would fall into the histogram's first bin
        self.angle_sum += float(angle.sum())
        for k, thr in self.THRESHOLDS.items():
            self.within[k] += int((angle < thr).sum())
        self.count += angle.numel()
        idx = (angle / self.BIN).long().clamp(0, self.bins - 1)
        self.hist += torch.bincount(idx, minlength=self.bins)

    def _median(self) -> float:
        if self.count == 0:
            return _NAN
        cum = torch.cumsum(self.hist, 0)
        half = self.count / 2.0
        b = int(torch.searchsorted(cum.double(), torch.tensor([half], dtype=torch.double))[0])
        before = float(cum[b - 1]) if b > 0 else 0.0
        inside = float(self.hist[b])
        return (b + (half - before) / inside) * self.BIN

    def compute(self) -> dict[str, float]:
        if self.nonfinite:
            return self._unmeasured()
        out = {"mean_angle": _ratio(self.angle_sum, self.count), "median_angle": self._median()}
        for k in self.THRESHOLDS:
            out[k] = 100.0 * _ratio(self.within[k], self.count)
        return out


def metric_for(task: "Task"):
    """A fresh metric object for a task: its own ``metric()`` factory, or its kind's builtin."""
    if task.metric is not None:
        metric = task.metric()
        if not (callable(getattr(metric, "update", None)) and callable(getattr(metric, "compute", None))):
            from .errors import ConfigError
            raise ConfigError(f"the metric of task {task.name!r} made a {type(metric).__name__}, which has no update() "
                              "and compute(); metric= takes a class (or a function) that makes an object with "
                              "update(pred, target) and compute() -> {name: number}")
        return metric
    return task.builtin("metric").metric(task)


def computed(task: str, metric) -> dict:
    """``metric.compute()`` as ``{name: float}``.

    Raises:
        ConfigError: compute() returned something other than a mapping of names to numbers.
    """
    from .errors import ConfigError

    value = metric.compute()
    try:
        if not isinstance(value, Mapping):
            raise TypeError
        return {str(k): float(v) for k, v in value.items()}
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError(f"the metric of task {task!r} returned {type(value).__name__} {str(value)[:60]!r} from "
                          "compute(); compute() returns a dict {name: number}, e.g. {'mae': 0.12}") from None


def delta_mtl(
    multi: Mapping[str, Mapping[str, float]],
    single: Mapping[str, Mapping[str, float]],
    higher_is_better: Optional[Mapping[str, bool]] = None,
) -> float:
    """Multi-task gain over single-task baselines, in percent (Maninis et al. 2019).

    Δ_MTL = mean over tasks of mean over metrics of (-1)^l (M_m - M_s) / M_s * 100, with l = 1
    when lower is better. Every metric of ``multi`` counts and must have a baseline in
    ``single``; ``higher_is_better`` adds directions for custom metric names.
    """
    directions = dict(HIGHER_IS_BETTER)
    directions.update(higher_is_better or {})
    if not multi:
        raise ConfigError("delta_mtl got no tasks; pass the multi-task metrics as {task: {metric: value}}")
    per_task = []
    for task, metrics in multi.items():
        if task not in single:
            raise ConfigError(f"delta_mtl: task {task!r} has no single-task baseline; add it to single=")
        if not metrics:
            raise ConfigError(f"delta_mtl: task {task!r} has no metrics; pass at least one value")
        gains = []
        for name, m in metrics.items():
            if name not in single[task]:
                raise ConfigError(f"delta_mtl: metric {name!r} of task {task!r} has no single-task baseline")
            if name not in directions:
                raise ConfigError(
                    f"delta_mtl: the direction of metric {name!r} is unknown; pass higher_is_better={{{name!r}: True}} or False"
                )
            s = float(single[task][name])
            m = float(m)
            if s == 0 or not math.isfinite(s) or not math.isfinite(m):
                raise ConfigError(
                    f"delta_mtl: metric {name!r} of task {task!r} is {m} against a baseline of {s}; "
                    "both must be finite and the baseline non-zero"
                )
            sign = 1.0 if directions[name] else -1.0
            gains.append(sign * (m - s) / s * 100.0)
        per_task.append(sum(gains) / len(gains))
    return sum(per_task) / len(per_task)
