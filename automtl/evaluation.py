"""Evaluate a model (supermodel or compact) on a builtin data set: per-task metrics."""
from __future__ import annotations

from typing import Optional

from .errors import DataError


def evaluate_model(model, data: str = "synthetic", split: str = "val", samples: Optional[int] = None,
                   input_size: int = 64, batch_size: int = 16) -> dict:
    """``{task: {metric: value}}`` of ``model`` on split ``split`` of data set ``data``."""
    from torch.utils.data import Subset

    from .capture import placement
    from .data import check_targets, make_dataset, parse_spec
    from .search import evaluate

    name, _ = parse_spec(data)
    options = {}
    if name == "synthetic":
        options["size"] = input_size
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
