"""Every training batch checked against the tasks before it reaches the model.

A wrong input or target should fail at once, naming the task and what to fix, rather than
crash deep inside a loss (an IndexError from a label out of range), broadcast silently (a depth
target with three channels), train at loss 0 for the whole run (a task with no label at all) or be misread
without a word (a normal map stored as a 0-255 image).
The checks run on the batch as the loader yields it, before it moves to the device, so they add
no device synchronisation.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

from ..errors import DataError
from ..kinds import describe_shapes, shape_fits
from ..tasks import Task

#: A task whose first this-many training batches hold no usable label is refused.
NO_LABEL_BATCHES = 100


class BatchChecks:
    """Checks the images and each builtin-kind target of every training batch.

    Args:
        tasks: the tasks being trained (custom tasks are left to their own loss; a kind says its
            target shapes, labels and what counts as labelled, see :mod:`automtl.kinds`).
        in_channels: channels of the backbone's input (C of its example input).
        where: how the data is named in errors, e.g. ``"training data"``.
        dtype: the dtype of the images the model takes (its example input's); None: any floating dtype.
        require_labels: refuse a task with no usable label in its first ``NO_LABEL_BATCHES`` batches (training).

    Raises (on call):
        DataError: images that are not a float (N, C, H, W) tensor with ``in_channels`` channels
            or hold NaN/inf; a target that is not a tensor, has another batch size or a shape
            that does not fit its kind, or a label outside ``0..classes-1`` (other than the
            ignore index); a task with no usable label in its first ``NO_LABEL_BATCHES`` batches.
    """

    def __init__(self, tasks: Sequence[Task], in_channels: Optional[int], where: str = "training data",
                 dtype: Optional[torch.dtype] = None, require_labels: bool = True):
        self.tasks = [t for t in tasks if t.spec is not None]
        self.in_channels, self.where, self.dtype, self.require_labels = in_channels, where, dtype, require_labels
        self.batches = {t.name: 0 for t in self.tasks}
        self.labelled = {t.name: 0 for t in self.tasks}

    def images(self, x, where: Optional[str] = None) -> None:
        where = where or self.where
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            what = f"{str(x.dtype).split('.')[-1]} images of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) \
                else f"images of type {type(x).__name__}"
            hint = ("one image (C, H, W), not a batch: give samples as a Dataset (or in a DataLoader), which batches "
                    "them") if isinstance(x, torch.Tensor) and x.dim() == 3 and x.is_floating_point() else \
                "for uint8 images, x.float() / 255 or torchvision's ToTensor"
            raise DataError(f"{where} yielded {what}; the backbone needs a float batch (N, C, H, W) ({hint})")
        if x.is_meta:
            raise DataError(f"{where} yielded images on the meta device, which holds shapes but no values; load them "
                            "on the CPU (or a GPU)")
        if self.dtype is not None and x.dtype != self.dtype:
            raise DataError(f"{where} yielded {str(x.dtype).split('.')[-1]} images but the model takes "
                            f"{str(self.dtype).split('.')[-1]} ones (its example input's dtype); convert the images "
                            f"(x.to({self.dtype})) or build the model with an example input of theirs")
        if self.in_channels is not None and x.shape[1] != self.in_channels:
            raise DataError(f"{where} yielded images with {x.shape[1]} channels but the backbone takes {self.in_channels}; "
                            "convert them (e.g. repeat a grey channel) or build the supermodel for that many channels")
        if not bool(torch.isfinite(x).all()):
            raise DataError(f"{where} yielded images that hold NaN or infinite values; check the input data "
                            "(the images, not the tasks' targets)")

    def __call__(self, x, targets: Mapping, task_names: Optional[Sequence[str]] = None) -> None:
        """Check one batch: ``targets`` maps task name -> target (missing names are unlabelled)."""
        self.images(x)
        for task in self.tasks:
            if task_names is not None and task.name not in task_names:
                continue
            y = targets.get(task.name) if isinstance(targets, Mapping) else None
            self.batches[task.name] += 1
            if y is not None:
                self._target(task, x, y)
                self.labelled[task.name] += task.spec.labelled(task, y)
            if self.require_labels and self.batches[task.name] == NO_LABEL_BATCHES and self.labelled[task.name] == 0:
                raise DataError(
                    f"task {task.name!r} has no usable label in the first {NO_LABEL_BATCHES} batches of {self.where} "
                    "(every target is missing, ignore_index or NaN); check its targets or drop the task")

    def _target(self, task: Task, x: torch.Tensor, y) -> None:
        name, kind = task.name, task.kind
        at = f"target {name!r} ({kind}) of {self.where}"
        if not isinstance(y, torch.Tensor):
            raise DataError(f"{at} is a {type(y).__name__}; targets must be tensors (a collate_fn that stacks them, "
                            "or torch.as_tensor in the dataset)")
        if y.dim() == 0 or y.shape[0] != x.shape[0]:
            raise DataError(f"{at} has shape {tuple(y.shape)} for a batch of {x.shape[0]} images; give one target per image")
        if y.is_meta:
            raise DataError(f"{at} is on the meta device, which holds shapes but no values; load it on the CPU (or a GPU)")
        expected = task.spec.target_shapes(task)
        if expected and not shape_fits(expected, tuple(y.shape[1:])):
            hint = "reshape it or change the task's kind"
            if task.classes is None and not task.spec.needs_classes and task.spec.fixed_outputs is None and y.dim() == 2:
                hint = (f"for {y.shape[1]} {task.spec.classes_word} a sample give the task classes={y.shape[1]} "
                        f"(--task {task.name}:{kind}:{y.shape[1]}), else reshape it")
            raise DataError(f"{at} has shape {tuple(y.shape)} but a {kind} target is {describe_shapes(expected, batch=True)}; "
                            + hint)
        if task.spec.integer_labels and task.classes is not None:
            labels = y[y != task.ignore_index]
            if y.is_floating_point():
                labels = labels[~torch.isnan(labels)]
            if labels.numel() and y.is_floating_point():
                fractional = labels[labels != labels.round()]
                if fractional.numel():
                    raise DataError(f"{at} holds label {float(fractional.flatten()[0]):g}, which is not a class id; "
                                    f"{kind} labels are whole numbers 0..{task.classes - 1} (NaN or {task.ignore_index} "
                                    "for a missing one)")
            if labels.numel():
                bad = labels[(labels < 0) | (labels >= task.classes)]
                if bad.numel():
                    first = bad.flatten()[0]
                    shown = f"{float(first):g}" if y.is_floating_point() else int(first)
                    raise DataError(f"{at} holds label {shown} outside 0..{task.classes - 1} (ignore index "
                                    f"{task.ignore_index}); set classes= to the data's class count or fix the labels")
        if task.spec.target_range is not None and task.spec.float_targets and not y.is_floating_point():
            low, high = task.spec.target_range  # a uint8 0-255 map is misread too
            raise DataError(f"{at} holds {str(y.dtype).removeprefix('torch.')} values; a {kind} target is floats in "
                            f"[{low:g}, {high:g}]; {task.spec.range_hint or 'convert it'}")
        if task.spec.target_range is not None:
            low, high = task.spec.target_range
            floats = y if y.is_floating_point() else y.double()
            values, slack = floats[torch.isfinite(floats)], task.spec.target_slack * (high - low)
            if values.numel() and not low - slack <= float(values.min()) <= float(values.max()) <= high + slack:
                raise DataError(f"{at} holds values from {float(values.min()):g} to {float(values.max()):g}, outside "
                                f"the [{low:g}, {high:g}] of a {kind} target; {task.spec.range_hint or 'rescale it'}")

