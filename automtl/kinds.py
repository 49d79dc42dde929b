"""Task kinds: everything automtl knows about one kind of task, in one class per kind.

A kind says how wide its head's output is and which builtin head computes it, how that output is
*finished* (dense kinds: brought to the input resolution), its loss and metric, the direction of
each metric for Δ_MTL, the target shapes a data set must yield, how many labels a batch holds,
and the output shapes a model file may compute. The supermodel, the compact model, the search,
the data checks and the file loader all ask the kind; none of them names one.

A new kind is one subclass of :class:`TaskKind` and a registration::

    @automtl.register_kind("count")
    class Count(automtl.TaskKind):
        fixed_outputs = 1
        higher_is_better = {"count_mae": False}
        def loss(self, task): ...
        def metric(self, task): ...

after which ``Task("people", kind="count")`` works everywhere a builtin kind does.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar, Union

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .heads import DenseHead, GlobalHead
from .losses import (ClassificationLoss, DepthLoss, MultilabelLoss, NormalLoss, RegressionLoss, SegmentationLoss,
                     normal_pixels)
from .metrics import (HIGHER_IS_BETTER, Accuracy, DepthMetric, Metric, MultilabelMetric, NormalMetric,
                      RegressionMetric, SegmentationMetric)

if TYPE_CHECKING:
    from .tasks import Task

__all__ = ["TaskKind", "KINDS", "register_kind", "kind_names", "shape_fits", "describe_shapes"]

#: A per-sample shape; ``None`` stands for any size on that axis.
Shape = Tuple[Optional[int], ...]


def shape_fits(shapes: Sequence[Shape], shape: Sequence[int]) -> bool:
    """Whether ``shape`` matches one of ``shapes`` (same length; ``None`` matches any size)."""
    return any(len(s) == len(shape) and all(e is None or e == d for e, d in zip(s, shape)) for s in shapes)


def describe_shapes(shapes: Sequence[Shape], batch: bool = False) -> str:
    """``shapes`` for an error message: ``(3, *, *) or (1,)``; with ``batch``, a leading ``B``."""
    return " or ".join("(" + ", ".join((["B"] if batch else []) + ["*" if e is None else str(e) for e in s])
                       + ("," if len(s) == 1 and not batch else "") + ")" for s in shapes)


#: How far beyond its kind's ``target_range`` a target value may lie, as a fraction of the range's width: bilinear
#: resampling stays within a range, torch's bicubic (a = -0.75) overshoots it by at most 44.5 % in two dimensions
#: (its weights' absolute sum is 1.375 a dimension). A 0-255 normal map lies 100x beyond.
TARGET_SLACK = 0.5


class TaskKind:
    """One kind of task. Subclass it, override what differs, and register it with :func:`register_kind`.

    Class attributes:
        dense: the output is a (B, C, H, W) map at the input resolution; else one (B, C) vector per image.
        needs_classes: a task of this kind must give ``classes=N`` (unless it brings its own head).
        fixed_outputs: the output width when it does not come from ``classes`` (depth: 1).
        default_ignore_index: the label value that marks a missing label, when the task does not set one.
        integer_labels: targets are class ids in ``0..classes-1`` (range-checked, ``ignore_index`` = missing).
        higher_is_better: ``{metric name: True when larger is better}`` of the kind's metric (Δ_MTL signs).
        classes_word: what ``classes`` counts, for reports ("classes", "outputs").
        target_range: ``(low, high)``: the finite values a target may hold, give or take ``target_slack`` of the
            range's width, checked on every batch; None: any. It catches a target on a scale the loss or metric
            misreads (a normal map stored as a 0-255 image, 0/255 multilabel targets, on which BCE is unbounded
            below); ``range_hint`` says how to convert one.
        target_slack: how far beyond ``target_range`` a value may lie, as a fraction of its width (default
            ``TARGET_SLACK``, what resampling a map overshoots; 0 for targets that are never resampled).
        float_targets: targets must be floating point (integers are an image's encoding of the values, not them).
    """

    name: str = ""
    dense: bool = False
    needs_classes: bool = False
    fixed_outputs: Optional[int] = None
    default_ignore_index: int = 255
    integer_labels: bool = False
    higher_is_better: Mapping[str, bool] = {}
    classes_word: str = "classes"
    target_range: Optional[Tuple[float, float]] = None
    target_slack: float = TARGET_SLACK
    float_targets: bool = False
    range_hint: str = ""

    def outputs(self, task: "Task") -> int:
        """Output channels of the builtin head. Raises ConfigError when the task has no ``classes``."""
        if self.fixed_outputs is not None:
            return self.fixed_outputs
        if task.classes is None:
            raise ConfigError(f"task {task.name!r} has no builtin output width; give it a class count (classes=N in "
                              f"Python, --task {task.name}:{task.kind}:N on the command line)")
        return task.classes

    def head(self, task: "Task", channels: int) -> nn.Module:
        """The builtin head: ``channels`` feature channels in, :meth:`outputs` channels out (at feature stride)."""
        return (DenseHead if self.dense else GlobalHead)(channels, self.outputs(task))

    def finish(self, y: Any, size: Any) -> Any:
        """The builtin head's output ``y`` as the task's prediction, for an input of spatial ``size`` (H, W).

        Written once for both worlds: it runs on tensors in the supermodel and on ``torch.fx`` proxies
        when :func:`automtl.compact` emits it as graph code, so use torch functions and tensor methods
        only (no Python branching on values). Dense kinds resize bilinearly to ``size``.
        """
        if not self.dense:
            return y
        return F.interpolate(y, size=size, mode="bilinear", align_corners=False)

    def loss(self, task: "Task") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """A callable ``(pred, target) -> scalar`` that ignores missing labels (see :mod:`automtl.losses`)."""
        raise ConfigError(f"task kind {self.name!r} defines no loss; define loss() in its TaskKind subclass, or give "
                          f"the Task its own (Task(..., kind={self.name!r}, loss=my_loss))")

    def metric(self, task: "Task") -> Metric:
        """A fresh streaming metric (``update``/``compute``/``reset``, see :mod:`automtl.metrics`)."""
        raise ConfigError(f"task kind {self.name!r} defines no metric; define metric() in its TaskKind subclass, or "
                          f"give the Task its own (Task(..., kind={self.name!r}, metric=MyMetric))")

    def target_shapes(self, task: "Task") -> List[Shape]:
        """Per-sample target shapes a data set may yield for the task (an empty list: not checked)."""
        return []

    def output_shapes(self, task: "Task") -> List[Shape]:
        """Per-sample output shapes of a model computing the task (what a model file is checked against)."""
        width = self.fixed_outputs if self.fixed_outputs is not None else task.classes
        return [(width, None, None)] if self.dense else [(width,)]

    def labelled(self, task: "Task", y: torch.Tensor) -> int:
        """How many labels a batch target holds (integer labels: not ``ignore_index``; else finite values): what the
        kind's loss averages over, so a validation loss weights each batch by it."""
        if self.integer_labels:
            keep = y != task.ignore_index
            return int((keep & ~torch.isnan(y)).sum()) if y.is_floating_point() else int(keep.sum())
        return int(torch.isfinite(y).sum())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


#: Registered kinds by name, builtins first, in registration order.
KINDS: Dict[str, TaskKind] = {}

_K = TypeVar("_K", bound=Union[type, TaskKind])


def register_kind(name: str) -> Callable[[_K], _K]:
    """Decorator that registers a :class:`TaskKind` subclass (or instance) as ``Task(kind=name)``.

    Its metric directions join :data:`automtl.metrics.HIGHER_IS_BETTER`, so :func:`automtl.metrics.delta_mtl`
    knows them. Returns what it was given.

    Raises:
        ConfigError: ``name`` is not a Python-style name, is ``"custom"`` or taken, the kind is not a
            TaskKind, or one of its metric names is already registered with the other direction.

    Example (a kind needs an output width, a loss and a metric; the rest has defaults):
        >>> from automtl.losses import RegressionLoss
        >>> from automtl.metrics import RegressionMetric
        >>> @register_kind("count")
        ... class Count(TaskKind):
        ...     fixed_outputs = 1
        ...     higher_is_better = {"mae": False, "rmse": False}
        ...     def loss(self, task):
        ...         return RegressionLoss("l1")  # NaN targets are missing labels
        ...     def metric(self, task):
        ...         return RegressionMetric()
    """
    if not isinstance(name, str) or not name.isidentifier() or name == "custom":
        raise ConfigError(f"task kind name {name!r} must be a Python-style name other than 'custom'")

    def register(kind: _K) -> _K:
        instance = kind() if isinstance(kind, type) and issubclass(kind, TaskKind) else kind
        if not isinstance(instance, TaskKind):
            raise ConfigError(f"register_kind({name!r}) needs a TaskKind subclass, got {type(kind).__name__}")
        if name in KINDS:
            raise ConfigError(f"task kind {name!r} is already registered ({KINDS[name]!r})")
        clash = [m for m, up in instance.higher_is_better.items() if HIGHER_IS_BETTER.get(m, up) != up]
        if clash:
            raise ConfigError(f"task kind {name!r}: metric {clash[0]!r} is registered with the other direction; "
                              "rename the metric")
        instance.name = name
        KINDS[name] = instance
        HIGHER_IS_BETTER.update(instance.higher_is_better)
        return kind

    return register


def kind_names() -> List[str]:
    """The registered kind names, builtins first."""
    return list(KINDS)


# ---- the builtin kinds --------------------------------------------------------------------------
_LABEL_MAP: List[Shape] = [(None, None), (1, None, None)]


@register_kind("classification")
class Classification(TaskKind):
    """One label per image: a linear head on pooled features, cross-entropy, top-1 accuracy."""

    needs_classes, integer_labels, default_ignore_index = True, True, -1
    higher_is_better = {"accuracy": True}

    def loss(self, task):
        return ClassificationLoss(task.ignore_index)

    def metric(self, task):
        return Accuracy(task.ignore_index)

    def target_shapes(self, task):
        return [(), (1,)]


@register_kind("multilabel")
class Multilabel(TaskKind):
    """Any number of labels per image (a 0/1 vector, NaN = missing; soft labels in [0, 1]): BCE, mean F1 and mAP."""

    needs_classes = True
    target_range, target_slack = (0.0, 1.0), 0.0
    range_hint = "for 0/255 labels divide by 255, for -1/1 labels take (y + 1) / 2"
    higher_is_better = {"f1": True, "map": True}

    def loss(self, task):
        return MultilabelLoss()

    def metric(self, task):
        return MultilabelMetric(task.classes)

    def target_shapes(self, task):
        return [(task.classes,)]


@register_kind("regression")
class Regression(TaskKind):
    """``classes`` real values per image (default 1; NaN = missing): L1 or MSE (``options={"loss": "mse"}``)."""

    higher_is_better = {"mae": False, "rmse": False}
    classes_word = "outputs"

    def outputs(self, task):
        return task.classes or 1

    def loss(self, task):
        return RegressionLoss(str(task.options.get("loss", "l1")).lower())

    def metric(self, task):
        return RegressionMetric()

    def target_shapes(self, task):
        """``(classes,)``, and ``()`` for one value; without ``classes`` the builtin head's one output (a head or a
        loss of the task's own may take any width)."""
        width = task.classes or (None if task.head is not None or task.loss is not None else 1)
        return [(width,)] + ([()] if width in (None, 1) else [])

    def output_shapes(self, task):
        return [(task.classes or 1,), ()]


@register_kind("segmentation")
class Segmentation(TaskKind):
    """A class id per pixel: a dense head, per-pixel cross-entropy, mIoU and pixel accuracy."""

    dense, needs_classes, integer_labels = True, True, True
    higher_is_better = {"miou": True, "pixel_acc": True}

    def loss(self, task):
        return SegmentationLoss(task.ignore_index)

    def metric(self, task):
        if task.classes is None:
            raise ConfigError(f"task {task.name!r}: the segmentation metric needs a class count (classes=N in Python, "
                              f"--task {task.name}:{task.kind}:N on the command line)")
        return SegmentationMetric(task.classes, task.ignore_index)

    def target_shapes(self, task):
        return list(_LABEL_MAP)


@register_kind("depth")
class Depth(TaskKind):
    """A depth per pixel (0 or non-finite = missing): L1, absolute and relative error."""

    dense, fixed_outputs = True, 1
    higher_is_better = {"abs_err": False, "rel_err": False}

    def loss(self, task):
        return DepthLoss()

    def metric(self, task):
        return DepthMetric()

    def target_shapes(self, task):
        return list(_LABEL_MAP)

    def labelled(self, task, y):
        return int((torch.isfinite(y) & (y != 0)).sum())


@register_kind("normal")
class Normal(TaskKind):
    """A unit surface normal per pixel: 1 - cosine similarity, angle error statistics."""

    dense, fixed_outputs = True, 3
    target_range, float_targets = (-1.0, 1.0), True
    # a map in [0, 1] (ToTensor of the image) or [0, 2] (x / 127.5) lies within the slack and is not caught: the
    # check finds scales, not offsets; the hint names the conversion the loaders use
    range_hint = "for a normal map stored as a 0-255 image, x / 127.5 - 1 (0 where a pixel has no normal)"
    higher_is_better = {"mean_angle": False, "median_angle": False, "within_11_25": True, "within_22_5": True,
                        "within_30": True}

    def finish(self, y, size):
        """Resized as every dense kind, then scaled to unit length over channels.

        ``y / max(|y|, 1e-12)`` in elementary ops equals ``F.normalize(y, dim=1)`` to float rounding but is
        several times faster on CPU, where the vector norm over the channel axis of an NCHW map takes a slow
        strided path (15 ms against 2 ms for an 8x3x128x128 batch, about a fifth of a MobileNetV2).
        """
        y = super().finish(y, size)
        return y / (y * y).sum(1, keepdim=True).sqrt().clamp_min(1e-12)

    def loss(self, task):
        return NormalLoss()

    def labelled(self, task, y):
        """Pixels with a normal: finite and not all zero (a (B, 3, H, W) target), as the loss and metric count them."""
        return int(normal_pixels(y).sum()) if y.dim() == 4 else int(torch.isfinite(y).sum())

    def metric(self, task):
        return NormalMetric()

    def target_shapes(self, task):
        return [(3, None, None)]


#: The kinds automtl brings (registered above), apart from those a user registers.
BUILTIN_KINDS = frozenset(KINDS)
