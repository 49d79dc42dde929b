"""The task-by-task formulation of the supermodel, as the original AutoMTL runs it.

Each task runs the whole graph on its own, computing all three operators of every policy
layer and mixing them with its own weights. It is slow by design: it is the oracle the batched
supermodel is tested against, and the baseline the benchmarks measure the batched pass by.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx

from .heads import finish
from .policy import SHARE, SKIP, SPECIALIZE
from .supermodel import PolicyLayer, SuperModel, taskwise_batch_norm, taskwise_norm


class _OneTask(fx.Interpreter):
    """Interprets the per-task-input graph for a single task, at batch B."""

    def __init__(self, sm: SuperModel, task: int, mix: torch.Tensor, hard: Optional[list]):
        super().__init__(sm._net_for(per_task_input=True))
        self.task, self.mix, self.hard = task, mix, hard
        self.layer_index = {name: i for i, name in enumerate(sm.layer_names)}

    def call_function(self, target, args, kwargs):
        if target is taskwise_norm:
            return args[0](args[1])  # one task's batch
        if target is taskwise_batch_norm:
            return F.batch_norm(*args, **{k: v for k, v in kwargs.items() if k != "num_tasks"})
        return super().call_function(target, args, kwargs)

    def call_module(self, target, args, kwargs):
        layer = self.fetch_attr(target)
        if not isinstance(layer, PolicyLayer):
            return super().call_module(target, args, kwargs)
        x = args[0]
        i = self.layer_index[target]
        ops = {SHARE: layer.shared, SPECIALIZE: layer.specialized[self.task], SKIP: layer.skip}
        if self.hard is not None:
            return ops[self.hard[i][self.task]](x)
        w = self.mix[i, self.task]
        out = w[SHARE] * ops[SHARE](x) + w[SPECIALIZE] * ops[SPECIALIZE](x)
        if layer.skip is not None:
            out = out + w[SKIP] * ops[SKIP](x)
        return out


def run_task_by_task(sm: SuperModel, x: torch.Tensor, mix: Optional[torch.Tensor] = None,
                     generator: Optional[torch.Generator] = None) -> dict:
    """``{task: output}`` computed one task at a time; equals ``sm(x, mix)`` to float tolerance.

    In hard mode each task computes only its chosen operator, as AutoMTL's hard-policy inference.
    ``x`` is one batch for all tasks or a dict of per-task batches.
    """
    if mix is None:
        mix = sm.mixing_weights(generator)
    hard = sm.policy.choices if sm.mode == "hard" else None
    out = {}
    for t, task in enumerate(sm.tasks):
        xt = x[task.name] if isinstance(x, dict) else x
        feat = _OneTask(sm, t, mix, hard).run(xt, mix)
        out[task.name] = finish(task, sm.heads[task.name](feat), xt.shape[-2:])
    return out
