"""Validation metrics and losses of a supermodel (any mode) or a compact model."""
from __future__ import annotations

import contextlib
from typing import Mapping, Optional, Union

import torch

from ..losses import loss_for
from ..metrics import metric_for
from ..supermodel import SuperModel
from ._data import _check_task_keys, _epoch_iter, _split_batch, _task_target, _to

# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    supermodel: SuperModel,
    data,
    *,
    mix: Optional[torch.Tensor] = None,
    max_batches: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
    amp: bool = False,
    batch_size: int = 8,
) -> tuple[dict, dict]:
    """Validation metrics ``{task: {metric: value}}`` and mean losses ``{task: loss}`` of the
    supermodel in its current mode (``mix`` overrides the mode's operator weights).

    ``data`` is a loader (or Dataset) of ``(x, {task: target})`` or a dict of per-task
    loaders; per-task loaders are evaluated one task at a time, so that every sample of every
    task counts exactly once. A batch without a task's target is skipped for that task.
    """
    sm = supermodel
    if device is None:
        device = next(sm.parameters()).device
    device = torch.device(device)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" else contextlib.nullcontext()
    metrics = {t.name: metric_for(t) for t in sm.tasks}
    loss_fns = {t.name: loss_for(t) for t in sm.tasks}
    loss_sum = {t: 0.0 for t in sm.task_names}
    loss_n = {t: 0 for t in sm.task_names}
    is_supermodel = isinstance(sm, SuperModel)  # a CompactModel (or any {task: output} model) has no modes
    if is_supermodel and mix is None and sm.mode != "hard":
        # noiseless operator weights: uniform in warm-up, the policy probabilities when searching
        mix = sm.mixing_weights() if sm.mode == "warmup" else sm.policy_probabilities()
    was_training = sm.training
    sm.eval()

    def consume(batches, tasks, where):
        for k, batch in enumerate(batches):
            if max_batches is not None and k >= max_batches:
                break
            x, y = _split_batch(batch, where)
            x, y = _to(x, device), _to(y, device)
            with ctx:
                out = sm(x, mix=mix) if is_supermodel else sm(x)
            for t in tasks:
                target = _task_target(y, t)
                if target is None:
                    continue
                pred = out[t].float()
                metrics[t].update(pred, target)
                loss = float(loss_fns[t](pred, target))
                loss_sum[t] += loss * x.shape[0]
                loss_n[t] += x.shape[0]

    try:
        if isinstance(data, Mapping):
            _check_task_keys(data, sm.task_names, "validation data")
            for t in sm.task_names:
                consume(_epoch_iter(data[t], batch_size), [t], f"validation data of task {t!r}")
        else:
            consume(_epoch_iter(data, batch_size), sm.task_names, "validation data")
    finally:
        sm.train(was_training)
    results = {t: {k: float(v) for k, v in m.compute().items()} for t, m in metrics.items()}
    losses = {t: (loss_sum[t] / loss_n[t] if loss_n[t] else float("nan")) for t in sm.task_names}
    return results, losses
