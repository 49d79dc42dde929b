"""Samples into a batch: torch's ``default_collate``, after checking that the samples can be stacked.

Samples of different sizes cannot share a batch; torch's collate then fails deep in the loader with ``stack
expects each tensor to be equal size``. :func:`stack_samples` names the part and the two sizes first, and is the
``collate_fn`` of every loader automtl builds from a data set.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.data import default_collate

from ..errors import DataError

__all__ = ["stack_samples"]


def stack_samples(samples: Sequence[Any]):
    """``default_collate(samples)``; DataError where two samples' tensors at one place differ in shape.

    Args:
        samples: what the data set's ``__getitem__`` returned for each index of one batch, e.g. ``(image
            (C, H, W), {task: target})`` tuples.

    Raises:
        DataError: the samples' tensors at one place (the image, a task's target) differ in shape, naming it
            and both shapes; or their target dicts hold different tasks (a sample that leaves out a task
            it has no label for), naming the task.
    """
    missing = _missing_key(list(samples)) if len(samples) > 1 else None
    if missing is not None:
        raise DataError(f"samples of one batch hold different targets ({missing!r} in one, not in another); give every "
                        "sample every task's target, marking a missing label with NaN (or the task's ignore index for "
                        "class ids)")
    where = _unequal(list(samples), "the sample") if len(samples) > 1 else None
    if where is not None:
        raise DataError(f"samples of one batch differ in size ({where}); give every sample of a data set one size "
                        "(resize or crop them in the data set)")
    return default_collate(samples)


def _missing_key(parts: list, depth: int = 0):
    """A key some of the parallel ``parts`` (dicts, or tuples holding them) have and others lack, or None."""
    first = parts[0]
    if depth > 8:
        return None
    if isinstance(first, dict) and all(isinstance(p, dict) for p in parts):
        keys = dict.fromkeys(k for p in parts for k in p)
        lacking = next((k for k in keys if any(k not in p for p in parts)), None)
        if lacking is not None:
            return lacking
        return next((m for k in first if (m := _missing_key([p[k] for p in parts], depth + 1)) is not None), None)
    if isinstance(first, (tuple, list)) and all(isinstance(p, (tuple, list)) and len(p) == len(first) for p in parts):
        return next((m for i in range(len(first)) if (m := _missing_key([p[i] for p in parts], depth + 1)) is not None),
                    None)
    return None


def _unequal(parts: list, name: str, depth: int = 0):
    """Where the parallel ``parts`` (one per sample) hold tensors of different shapes, as a phrase, or None."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        other = next((p for p in parts if isinstance(p, torch.Tensor) and p.shape != first.shape), None)
        return None if other is None else f"{name} {tuple(first.shape)} and {tuple(other.shape)}"
    if depth > 8:
        return None
    if isinstance(first, dict) and all(isinstance(p, dict) and p.keys() == first.keys() for p in parts):
        return next((w for k in first if (w := _unequal([p[k] for p in parts], f"target {k!r}", depth + 1))), None)
    if isinstance(first, (tuple, list)) and all(isinstance(p, (tuple, list)) and len(p) == len(first) for p in parts):
        names = ["the image", "the targets"] if depth == 0 and len(first) == 2 else [f"{name}[{i}]" for i in range(len(first))]
        return next((w for i, n in enumerate(names) if (w := _unequal([p[i] for p in parts], n, depth + 1))), None)
    return None
