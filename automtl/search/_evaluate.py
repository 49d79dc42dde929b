"""Validation metrics and losses of a supermodel (any mode) or a compact model."""
from __future__ import annotations

import contextlib
import numbers
from typing import Mapping, Optional, Union

import torch

from ..capture import placement
from ..data.checks import BatchChecks
from ..errors import ConfigError, DataError
from ..losses import loss_for
from ..metrics import computed, metric_for
from ..supermodel import SuperModel
from ._data import TargetTally, _check_task_keys, _epoch_iter, _split_batch, _task_target, _to, one_shot

# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------
def evaluate(
    supermodel: SuperModel,
    data,
    *,
    mix: Optional[torch.Tensor] = None,
    max_batches: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
    amp: bool = False,
    batch_size: int = 8,
    input_dtype: Optional[torch.dtype] = None,
) -> tuple[dict, dict]:
    """Validation metrics ``{task: {metric: value}}`` and mean losses ``{task: loss}`` of the
    supermodel in its current mode (``mix`` overrides the mode's operator weights).

    ``data`` is a loader (or Dataset) of ``(x, {task: target})`` or a dict of per-task
    loaders; per-task loaders are evaluated one task at a time, so that every sample of every
    task counts exactly once. A batch without a task's target is skipped for that task. ``input_dtype``: cast the
    images to it before the model (a model saved in bfloat16); else they must have the model's input dtype where it
    is known.

    Raises:
        ConfigError: ``device`` is not where the model's weights are; ``supermodel`` is no multi-task model (a SuperModel, a CompactModel from compact/load, or a
            module with ``tasks`` and ``task_names`` returning ``{task: output}``), or ``max_batches`` is not a
            positive whole number.
        DataError: a batch the training checks refuse (:class:`automtl.data.checks.BatchChecks`), no batch, or (a
            loader shared by the tasks) a task without a target in any batch.
    """
    if not (callable(supermodel) and isinstance(getattr(supermodel, "tasks", None), (list, tuple))
            and isinstance(getattr(supermodel, "task_names", None), (list, tuple))):
        raise ConfigError(f"evaluate() needs a multi-task model with its tasks (automtl.supermodel, automtl.compact or "
                          f"automtl.load), got a {type(supermodel).__name__}; wrap a backbone with automtl.supermodel first")
    if max_batches is not None and (not isinstance(max_batches, numbers.Integral) or isinstance(max_batches, bool)
                                    or max_batches < 1):
        raise ConfigError(f"max_batches must be a positive whole number (or None for every batch), got "
                          f"{str(max_batches)[:40]!r}")
    where = placement(supermodel).get("device")
    if device is not None and where is not None:
        want = torch.device(device)
        if want.type != where.type or (want.index is not None and where.index is not None and want.index != where.index):
            raise ConfigError(f"evaluate() was asked for device {str(device)!r} but the model is on {str(where)!r}; move "
                              f"the model there first (model.to({str(device)!r})) or leave device out to evaluate "
                              "where the model is")
    return _evaluate(supermodel, data, mix, max_batches, device, amp, batch_size, input_dtype, every_task_seen=True)


@torch.no_grad()
def _evaluate(sm, data, mix, max_batches, device, amp, batch_size, input_dtype, every_task_seen: bool):
    """:func:`evaluate`; ``every_task_seen=False`` (a look at the first batch only): a task without a target in the
    batches read is partial labels, not an error."""
    if device is None:
        device = placement(sm).get("device", torch.device("cpu"))
    device = torch.device(device)
    is_supermodel = isinstance(sm, SuperModel)  # a CompactModel (or any {task: output} model) has no modes
    if is_supermodel and mix is None and sm.mode != "hard":
        # noiseless operator weights: uniform in warm-up, the policy probabilities when searching
        mix = sm.mixing_weights() if sm.mode == "warmup" else sm.policy_probabilities()
    run = (lambda x: sm(x, mix=mix)) if is_supermodel else sm
    tally = _Tally(sm, run, device, amp, max_batches, input_dtype)
    was_training = sm.training
    sm.eval()
    try:
        if isinstance(data, Mapping):
            _check_task_keys(data, sm.task_names, "validation data")
            for t in sm.task_names:
                tally.consume(_epoch_iter(data[t], batch_size), [t], f"validation data of task {t!r}")
        else:
            tally.consume(_epoch_iter(data, batch_size), sm.task_names, "validation data", shared=True)
            error = tally.targets.error("validation data") if every_task_seen else None
            if error is not None:
                raise error
    finally:
        sm.train(was_training)
    if tally.batches == 0 and (max_batches is None or max_batches > 0):
        raise _no_batches("validation data")
    return tally.results()


def _no_batches(where: str) -> DataError:
    return DataError(f"{where} yielded no batches, so no metric can be computed; check the dataset's root and split, "
                     "or pass no validation data")


def _validation_checks(sm, dtype: Optional[torch.dtype]) -> BatchChecks:
    """The training batches' checks (images, target shapes, labels) for validation data, none demanding labels."""
    shape = getattr(sm, "input_shape", None)
    return BatchChecks(sm.tasks, int(shape[1]) if shape else None, "validation data", dtype=dtype, require_labels=False)


def check_validation_data(sm, data, batch_size: int = 8) -> None:
    """Check the first batch of validation data (of each task's, for per-task data) as training batches are checked,
    without running the model: a bad batch is refused before training, not after it.

    Raises:
        DataError: see :class:`automtl.data.checks.BatchChecks`; also when the data yields no batch.
    """
    checks = _validation_checks(sm, getattr(sm, "input_dtype", None))
    if isinstance(data, Mapping):
        _check_task_keys(data, sm.task_names, "validation data")
        sources = [(data[t], [t], f"validation data of task {t!r}") for t in sm.task_names]
    else:
        sources = [(data, list(sm.task_names), "validation data")]
    for source, tasks, where in sources:
        if one_shot(source):  # what this check read, the evaluation would not see
            continue
        batch = next(_epoch_iter(source, batch_size), None)
        if batch is None:
            raise _no_batches(where)
        x, y = _split_batch(batch, where)
        checks(x, {t: _task_target(y, t) for t in tasks}, task_names=tasks)


class _Tally:
    """Each task's metric and its loss over the batches consumed: each batch's loss weighted by the labels it holds
    (its kind's ``labelled``), so the result is the mean over the set's labels, whatever the batching (per batch of
    images, a batch size of 1 and of 4 gave 0.875 and 1.76 for one model; an image without labels counted as one)."""

    def __init__(self, sm, run, device: torch.device, amp: bool, max_batches: Optional[int],
                 input_dtype: Optional[torch.dtype] = None):
        self.task_names, self.run, self.device, self.max_batches = list(sm.task_names), run, device, max_batches
        self.ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" else contextlib.nullcontext()
        self.metrics = {t.name: metric_for(t) for t in sm.tasks}
        self.loss_fns = {t.name: loss_for(t) for t in sm.tasks}
        self.by_name = {t.name: t for t in sm.tasks}
        self.loss_sum = {t: 0.0 for t in self.task_names}
        self.loss_n = {t: 0 for t in self.task_names}
        self.targets = TargetTally(self.task_names)  # a shared loader's batches: which tasks had a target
        # a bad batch is one sentence, not an IndexError from inside a loss after the whole training
        self.checks = _validation_checks(sm, None if input_dtype is not None else getattr(sm, "input_dtype", None))
        self.input_dtype = input_dtype
        self.batches = 0

    def consume(self, batches, tasks, where: str, shared: bool = False) -> None:
        for k, batch in enumerate(batches):
            if self.max_batches is not None and k >= self.max_batches:
                break
            x, y = _split_batch(batch, where)
            if shared:
                self.targets.add(y, where)
            self.checks(x, {t: _task_target(y, t) for t in tasks}, task_names=tasks)
            self.batches += 1
            if self.input_dtype is not None:
                x = x.to(self.input_dtype)
            x, y = _to(x, self.device), _to(y, self.device)
            with self.ctx:
                out = self.run(x)
            for t in tasks:
                target = _task_target(y, t)
                if target is None:
                    continue
                pred = out[t].float()
                self.metrics[t].update(pred, target)
                loss = float(self.loss_fns[t](pred, target))
                # a mean over the batch's labels (pixels, samples): weighted by how many, the whole set's mean
                task = self.by_name[t]
                n = task.spec.labelled(task, target) if task.spec is not None else x.shape[0]
                self.loss_sum[t] += loss * n
                self.loss_n[t] += n

    def results(self) -> tuple[dict, dict]:
        results = {t: computed(t, m) for t, m in self.metrics.items()}
        losses = {t: (self.loss_sum[t] / self.loss_n[t] if self.loss_n[t] else float("nan")) for t in self.task_names}
        return results, losses
