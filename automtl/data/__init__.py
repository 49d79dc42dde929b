"""Builtin data sets, by name, and the loader that feeds them to a search.

Every data set yields ``(x, {task_name: target})`` with x float32 (3, H, W); the target
conventions (missing labels included) are those of :mod:`automtl.losses`. A data set is named
on the command line as ``NAME`` or ``NAME:ROOT`` (``synthetic``, ``multifashion``,
``multifashion:/path``, ``nyuv2:/path``, ``cityscapes:/path``).
"""
from __future__ import annotations

import difflib
import inspect
from typing import Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError, DataError
from ..kinds import BUILTIN_KINDS, describe_shapes, shape_fits
from ..tasks import Task
from .cityscapes import CityScapes
from .collate import stack_samples
from .multifashion import DEFAULT_ROOT as FASHION_MNIST_ROOT
from .multifashion import MultiFashion, read_idx
from .nyuv2 import NYUv2
from .synthetic import SyntheticScenes

__all__ = [
    "DATASETS",
    "SyntheticScenes",
    "MultiFashion",
    "NYUv2",
    "CityScapes",
    "FASHION_MNIST_ROOT",
    "read_idx",
    "make_dataset",
    "default_tasks",
    "make_loader",
    "stack_samples",
    "check_targets",
    "parse_spec",
]

#: Builtin data sets by name.
DATASETS: dict[str, type[Dataset]] = {
    "synthetic": SyntheticScenes,
    "multifashion": MultiFashion,
    "nyuv2": NYUv2,
    "cityscapes": CityScapes,
}

#: Data sets that cannot be found without a root folder.
_NEEDS_ROOT = ("nyuv2", "cityscapes")
#: Default size of the generated synthetic splits.
_SYNTHETIC_N = {"train": 1024}
_SYNTHETIC_N_OTHER = 256


def parse_spec(name_or_spec: str) -> tuple[str, Optional[str]]:
    """Split ``NAME[:ROOT]`` and check the name, suggesting the closest one on a typo."""
    if not isinstance(name_or_spec, str) or not name_or_spec.strip():
        raise DataError(f"data set {name_or_spec!r} is not a name; use one of {', '.join(DATASETS)} (optionally NAME:ROOT)")
    name, sep, root = name_or_spec.strip().partition(":")
    key = name.lower()
    if key not in DATASETS:
        close = difflib.get_close_matches(key, list(DATASETS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise DataError(f"unknown data set {name!r}; {hint}choose one of {', '.join(DATASETS)} (optionally NAME:ROOT)")
    return key, (root if sep and root else None)


def make_dataset(name_or_spec: str, split: str = "train", for_tasks: Optional[Sequence[Task]] = None,
                 **options) -> Dataset:
    """Build a builtin data set from ``NAME[:ROOT]``; ``options`` go to its constructor.

    ``for_tasks``, the tasks the data will feed, sets what the data set reads from them where it takes it: the
    class count of its ``segmentation`` task (Cityscapes reads ``label_7/`` or ``label_19/`` by it; NYUv2 states it).
    """
    key, root = parse_spec(name_or_spec)
    cls = DATASETS[key]
    takes_classes = "classes" in inspect.signature(cls.__init__).parameters
    if for_tasks is not None and takes_classes and "classes" not in options:
        classes = [t.classes for t in for_tasks if t.name == "segmentation" and t.classes is not None]
        if classes:
            options["classes"] = classes[0]
    if root is not None and "root" in options and options["root"] is not None and str(options["root"]) != root:
        raise ConfigError(f"data set {name_or_spec!r} names a root and root={options['root']!r} names another; give one")
    if key == "synthetic":
        if root is not None:
            raise DataError(f"the synthetic data set is generated and takes no root; use 'synthetic', not {name_or_spec!r}")
        options.setdefault("n", _SYNTHETIC_N.get(split, _SYNTHETIC_N_OTHER))
    else:
        if root is not None:
            options["root"] = root
        if key in _NEEDS_ROOT and options.get("root") is None:
            raise DataError(f"data set {key!r} needs a root folder; use {key}:/path/to/{key} (the .npy layout of MTAN)")
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p not in ("self", "split")]
    unknown = [o for o in options if o not in accepted]
    if unknown:
        raise ConfigError(f"data set {key!r} does not take option(s) {', '.join(unknown)}; it takes {', '.join(accepted)}")
    return cls(split=split, **options)


def default_tasks(name_or_spec: str) -> list[Task]:
    """The natural tasks of a builtin data set (what ``automtl convert`` trains when given none)."""
    key, _ = parse_spec(name_or_spec)
    if key == "synthetic":
        return [
            Task("segmentation", kind="segmentation", classes=4),
            Task("depth", kind="depth"),
            Task("normal", kind="normal"),
        ]
    if key == "multifashion":
        return [Task("left", kind="classification", classes=10), Task("right", kind="classification", classes=10)]
    if key == "nyuv2":
        return [
            Task("segmentation", kind="segmentation", classes=13),
            Task("depth", kind="depth"),
            Task("normal", kind="normal"),
        ]
    return [Task("segmentation", kind="segmentation", classes=7), Task("depth", kind="depth")]


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0, num_workers: int = 0) -> DataLoader:
    """A DataLoader whose shuffling order is fixed by ``seed`` (not by the global RNG); samples of different sizes
    in one batch are a DataError naming them (:func:`automtl.data.collate.stack_samples`)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(f"num_workers must be a non-negative integer, got {num_workers!r}")
    g = torch.Generator()
    g.manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=g,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        collate_fn=stack_samples,
    )


def _whole(dataset):
    """The data set under the ``Subset``s that take its first samples."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset


def _name(dataset) -> str:
    """The data set's class name, through the ``Subset`` that takes its first samples."""
    return type(_whole(dataset)).__name__


def _declared_kinds(dataset) -> dict:
    """``{target: TaskKind}`` for a data set that says what its targets are (the builtin ones' ``tasks``); {} else."""
    dataset = _whole(dataset)
    try:
        declared = getattr(type(dataset), "tasks", None) and dataset.tasks
    except Exception:  # noqa: BLE001 - a user's data set whose `tasks` is something else says nothing
        return {}
    if not isinstance(declared, (list, tuple)):
        return {}
    return {t.name: t.spec for t in declared if isinstance(t, Task) and t.spec is not None}


def check_targets(dataset: Dataset, tasks: Sequence[Task]) -> None:
    """Fail early, with the task's name, when the data cannot feed a task.

    Looks at the first sample: every task needs a target of its kind's shape, and label ids
    must fit the task's class count. Where the data set says what its targets are (the builtin ones'
    ``tasks``), class ids feed only builtin kinds of class ids and measured values only builtin kinds of measured
    values (a user's registered kind may derive its targets from either).

    Raises:
        DataError: naming the task, its target and what to change.
    """
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        n = None
    if n == 0:
        raise DataError(f"data set {_name(dataset)} is empty; check its root and split")
    sample = dataset[0]
    if not (isinstance(sample, (tuple, list)) and len(sample) == 2 and isinstance(sample[1], dict)):
        raise DataError(f"data set {_name(dataset)} must yield (x, {{task: target}}) pairs; it yields {type(sample).__name__}")
    targets = sample[1]
    declared = _declared_kinds(dataset)
    for task in tasks:
        if task.name not in targets:
            raise DataError(
                f"data set {_name(dataset)} has no target for task {task.name!r}; "
                f"its targets are {', '.join(map(repr, targets)) or 'none'}, so rename the task or pick another data set"
            )
        spec = task.spec
        if spec is None or not spec.target_shapes(task):
            continue
        y = torch.as_tensor(targets[task.name])
        if not shape_fits(spec.target_shapes(task), tuple(y.shape)):
            raise DataError(
                f"target {task.name!r} of data set {_name(dataset)} has shape {tuple(y.shape)}, "
                f"which does not fit a {task.kind} task (one sample's target is {describe_shapes(spec.target_shapes(task))}); "
                "check the task kind"
            )
        kind = declared.get(task.name)
        # builtin kinds only: a user's kind may derive its targets from another sort (edges from class ids)
        if task.kind in BUILTIN_KINDS and kind is not None and kind.integer_labels != spec.integer_labels:
            holds = "class ids" if kind.integer_labels else "measured values"
            raise DataError(
                f"target {task.name!r} of data set {_name(dataset)} holds {kind.name} {holds}, which a {task.kind} task "
                f"would read as {'class ids' if spec.integer_labels else 'measured values'}; give the task the kind "
                f"{kind.name!r} (--task {task.name}:{kind.name}{':N' if kind.needs_classes else ''}), or name it after a "
                "target of its kind"
            )
        if spec.integer_labels and task.classes is not None:
            labels = y[(y != task.ignore_index) & ~torch.isnan(y.double())] if y.is_floating_point() else y[y != task.ignore_index]
            if labels.numel() and (int(labels.max()) >= task.classes or int(labels.min()) < 0):
                raise DataError(
                    f"target {task.name!r} has label {int(labels.max()) if int(labels.max()) >= task.classes else int(labels.min())} "
                    f"outside 0..{task.classes - 1}; give the task the data set's class count (classes=N in Python, "
                    f"--task {task.name}:{task.kind}:N on the command line), or evaluate a model of that many classes"
                )
