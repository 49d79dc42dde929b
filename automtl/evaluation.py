"""Evaluate a model (supermodel or compact) on a builtin data set: per-task metrics."""
from __future__ import annotations

from typing import Optional

from .errors import DataError


def converted_side(model) -> Optional[int]:
    """The side of the square input ``model`` was converted at (``model.input_shape``, (N, C, H, W)); None where
    it records none or a non-square one."""
    shape = getattr(model, "input_shape", None)
    if shape is not None and len(shape) == 4 and shape[2] == shape[3]:
        return int(shape[2])
    return None


def evaluate_model(model, data: str = "synthetic", split: str = "val", samples: Optional[int] = None,
                   input_size: Optional[int] = None, batch_size: int = 16) -> dict:
    """``{task: {metric: value}}`` of ``model`` on split ``split`` of data set ``data``. ``input_size`` is the
    side in pixels of the synthetic images (None: :func:`converted_side`, the size the model was converted at, else
    the synthetic data's default of 64); data read from disk keeps its own size."""
    from torch.utils.data import Subset

    from .capture import placement
    from .data import check_targets, make_dataset, parse_spec
    from .search import evaluate

    name, _ = parse_spec(data)
    options = {}
    if name == "synthetic":
        size = input_size if input_size is not None else converted_side(model)
        if size is not None:
            options["size"] = size
        if samples:
            options["n"] = samples
    dataset = make_dataset(data, split, for_tasks=model.tasks, **options)
    if samples and name != "synthetic":
        dataset = Subset(dataset, range(min(samples, len(dataset))))
    if len(dataset) == 0:
        raise DataError(f"split {split!r} of data set {data!r} is empty; choose another split")
    check_targets(dataset, model.tasks)
    # the data sets' images are float32: a model saved in another floating dtype (its first floating parameter's or
    # buffer's) takes them cast
    computes = placement(model).get("dtype")
    metrics, losses = evaluate(model, dataset, batch_size=batch_size,
                               input_dtype=getattr(model, "input_dtype", None) or computes)
    return {t: {**m, "loss": losses[t]} for t, m in metrics.items()}


def format_metrics(metrics: dict) -> str:
    """``{task: {metric: value}}`` as ``automtl eval`` prints it: one line per task."""
    return "".join(f"{task}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()) + "\n"
                   for task, values in metrics.items())
