"""The pieces one training step is built from, shared by the run's loops and the strategies.

Reading the next batch, the forward with per-task losses (averaged over DDP ranks, checked for
non-finite values), the backward with gradient averaging and clipping, and the step's log record.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence

import torch

from ..errors import AutomtlError
from ..policy import SHARE, SPECIALIZE
from ._data import TARGET_GRACE_BATCHES, TargetTally, _split_batch, _task_target, _to, check_batch_targets


class _StepMixin:
    """Step helpers of :class:`~automtl.search._run._Search` (which sets the attributes used here)."""

    def _shared_parameters(self) -> list:
        """For GradNorm: the weight of the deepest conv that tasks still share (last layer's shared
        conv while searching; in hard mode the deepest layer some task shares, else the operators
        the tasks own there)."""
        layers = self.sm.policy_layers
        if self.sm.mode != "hard":
            return [layers[-1].shared.conv.weight]
        for layer, row in zip(reversed(layers), reversed(self.sm.policy.choices)):
            if SHARE in row:
                return [layer.shared.conv.weight]
        last, row = layers[-1], self.sm.policy.choices[-1]
        params = [last.specialized[t].conv.weight for t, c in enumerate(row) if c == SPECIALIZE]
        return params or [p for p in self.sm.heads.parameters()][:1]

    def _batch(self, iters: dict, part: str = ""):
        """The next training batch of data part ``part`` ("" training, "policy" held out, "all")."""
        if part and part not in iters:
            part = ""
        if self.per_task:
            xs, ys = {}, {}
            for t in self.tasks:
                key = t if not part else f"{part}:{t}"
                key = key if key in iters else t
                x, y = _split_batch(next(iters[key]), f"training data of task {t!r}")
                self.checks(x, {t: _task_target(y, t)}, task_names=[t])
                xs[t] = x.to(self.device, non_blocking=True)
                ys[t] = _to(_task_target(y, t), self.device)
            return xs, ys
        x, y = _split_batch(next(iters[part]), "training data")
        check_batch_targets(y, "training data")
        self._count_targets(y)
        self.checks(x, y)
        return x.to(self.device, non_blocking=True), _to(y, self.device)

    def _count_targets(self, y) -> None:
        """A task with no target in the first TARGET_GRACE_BATCHES training batches is an error (TargetTally)."""
        tally = self.__dict__.setdefault("_target_tally", TargetTally(self.tasks))
        if tally.batches < TARGET_GRACE_BATCHES:
            tally.add(y)
            error = tally.error("training data") if tally.batches == TARGET_GRACE_BATCHES else None
            if error is not None:
                raise error

    def _autocast(self):
        if self.config.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _check_finite(self, values: torch.Tensor, names: Sequence[str], stage: str, i: int, g: int) -> None:
        bad = [(n, float(v)) for n, v in zip(names, values.tolist()) if not math.isfinite(v)]
        if bad:
            name, v = bad[0]
            where = f"the last good checkpoint is {str(self.ckpt_path)!r}" if self.last_saved >= 0 and self.ckpt_path else "no checkpoint was written"
            what = f"the loss of task {name!r}" if name in self.tasks else f"the {name}"
            raise AutomtlError(
                f"{what} is {v} at step {g + 1} ({stage} step {i + 1}); stopping ({where}). "
                "Lower the learning rate, enable grad_clip, or check that task's targets"
            )

    def sync_buffers(self) -> None:
        if self.dist.active:
            # like DDP's broadcast_buffers: every rank starts the step with rank 0's BN statistics
            self.dist.broadcast(self.buffers + self.weighting_state)

    def forward_losses(self, net, x, targets, stage: str, i: int, g: int, mix=None) -> tuple[dict, torch.Tensor]:
        """Per-task losses of one forward (``net(x)``, or the supermodel under ``mix`` when ``net`` is None),
        and their values averaged over ranks; raises on a non-finite loss."""
        with self._autocast():
            out = net(x) if net is not None else self.sm(x, mix=mix)
        losses = {}
        for t in self.tasks:
            target = targets.get(t)
            pred = out[t].float()
            # a batch without the task's key counts as all-missing: a zero with a grad path
            losses[t] = self.loss_fns[t](pred, target) if target is not None else pred.sum() * 0.0
        values = torch.stack([losses[t].detach().float().reshape(()) for t in self.tasks])
        if self.dist.active:
            synced = values.clone()
            self.dist.all_reduce_mean([synced])
            # value = the mean over ranks (so value-driven balancers agree), gradient = the local one
            losses = {t: losses[t] + (synced[k] - values[k]).to(losses[t].dtype) for k, t in enumerate(self.tasks)}
            values = synced
        self._check_finite(values, self.tasks, stage, i, g)
        return losses, values

    def weight_step(self, total: Optional[torch.Tensor], opt) -> None:
        """Backward ``total`` (None: the gradients are already in ``.grad``), average over ranks, clip, step."""
        if total is not None:
            opt.zero_grad(set_to_none=True)
            if getattr(self.weighting, "jacobian", False):
                self.weighting.backward(self.weight_params)  # torchjd: aggregate the per-task gradients
            else:
                total.backward()
        self.dist.all_reduce_grads(self.weight_params)
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in self.weight_params if p.grad is not None], self.config.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def record(self, stage: str, i: int, g: int, kind: str, values, weights, total, opt) -> dict:
        return {"stage": stage, "step": g + 1, "stage_step": i + 1, "kind": kind,
                "losses": {t: float(v) for t, v in zip(self.tasks, values.tolist())}, "weights": weights,
                "total": float(total.detach()), "lr": opt.param_groups[0]["lr"], "tau": None}
