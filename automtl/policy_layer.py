"""The policy layer: one convolution (and the norm after it) offered to every task as share, specialize or skip.

:class:`PolicyLayer` holds the backbone's operator (*share*), one task-owned copy per task
(*specialize*) and the *skip* operator (identity, or a strided 1x1 projection where the shape
changes); it runs on the folded task batch (row ``t*B + b`` is sample ``b`` of task ``t``) under a
(T, 3) mixing weight, or, in hard mode, only each task's chosen operator. The normalisation helpers
keep BatchNorm's batch statistics per task on the folded batch.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .capture import placement
from .policy import SHARE, SKIP, SPECIALIZE

#: Normalisation kinds fused with the conv right before them (the rule is by kind, any subclass:
#: BatchNorm of any dimension, SyncBatchNorm, InstanceNorm, GroupNorm, LayerNorm, and norm+activation
#: modules built on them): they follow the conv's share/specialize/skip choice and count in its parameters.
FUSABLE_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def uses_batch_statistics(m: nn.Module) -> bool:
    """True for a norm that normalises a sample with the statistics of its batch: a BatchNorm (any subclass) in
    train mode or without running statistics, or a norm subclass whose own forward does so in its current mode
    whatever torch's class would (test-time adaptation's BatchNorm normalises with the batch in eval mode too),
    seen by a probe (:func:`batch_statistics_in_mode`)."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None):
        return True
    return isinstance(m, FUSABLE_NORMS) and batch_statistics_in_mode(m, m.training)


#: Where :func:`batch_statistics_in_mode` keeps its answers on the module (a deep copy keeps them too).
_PROBED = "_automtl_batch_statistics"


def batch_statistics_in_mode(m: nn.Module, training: bool) -> bool:
    """Whether a norm subclass with a forward of its own normalises a sample with the other samples of its batch in
    train (``training``) or eval mode, seen by running a copy of it on two batches that differ in every sample but
    the first (drawn again, at another scale and offset). torch's own forwards are not probed (False: their rule is the class's). Probed once per module and
    mode; a subclass that refuses the probe's inputs counts as using batch statistics (its tasks' rows are then
    normalised apart, which is right either way)."""
    if getattr(type(m).forward, "__module__", "").startswith("torch."):
        return False
    known = m.__dict__.setdefault(_PROBED, {})
    if training not in known:
        known[training] = _probe_batch_statistics(m, training)
    return known[training]


def _probe_batch_statistics(m: nn.Module, training: bool) -> bool:
    try:
        probe = copy.deepcopy(m).train(training)  # its forward may move running statistics
    except Exception:  # a norm that cannot be copied cannot be probed: normalised per task, which is right either way
        return True
    where = placement(probe)
    dtype, device = where.get("dtype", torch.float32), where.get("device", torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    shape = getattr(m, "normalized_shape", None)
    c = int(getattr(m, "num_features", getattr(m, "num_channels", shape[-1] if shape else 1)))
    for size in ((4, c, 3, 3), (4, 3, 3, c), (4, c, 5), (4, c), (4, c, 2, 2, 2)):
        x = torch.randn(size, generator=g).to(device=device, dtype=dtype)
        y = x.clone()  # the other samples drawn again (not rescaled: a norm of its own would undo that)
        y[1:] = (torch.randn(size, generator=g)[1:] * 3 + 2).to(device=device, dtype=dtype)
        try:
            with torch.no_grad():
                a, b = probe(x), probe(y)
        except Exception:  # another rank or layout: the next one
            continue
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == x.shape == b.shape):
            return True
        return not torch.allclose(a[0].float(), b[0].float(), rtol=1e-4, atol=1e-5)
    return True


def tracks_running_stats(m: nn.Module) -> bool:
    """True for a norm (BatchNorm, InstanceNorm, any subclass) built with ``track_running_stats``."""
    return isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats


def updates_running_stats(m: nn.Module) -> bool:
    """True for a norm whose forward moves its running statistics: train mode with ``track_running_stats``."""
    return tracks_running_stats(m) and m.training and m.running_mean is not None


def holds_running_stats(module: nn.Module) -> bool:
    """True when ``module`` or a submodule is a norm with running statistics (whatever its mode)."""
    return any(tracks_running_stats(m) for m in module.modules())


def needs_task_batches(module: nn.Module) -> bool:
    """True when ``module`` or a submodule normalises with its batch's statistics or moves running statistics (in
    its current mode): run on folded tasks, it must see each task's rows as a batch of their own."""
    return any(uses_batch_statistics(m) or updates_running_stats(m) for m in module.modules())


def one_update(buffers: Sequence[torch.Tensor], calls: Sequence[Callable[[], torch.Tensor]],
               members: Sequence[Sequence[int]]) -> list:
    """``[call() for call in calls]``, the running statistics in ``buffers`` moved once for all the tasks.

    Each call is a norm's forward on the batch of one group of tasks (``members[j]``: the task
    indices of call ``j``). Every call starts from the same running statistics; afterwards they are
    the start plus the mean over tasks of the change each task's group made, summed in task order:
    for a BatchNorm of momentum ``m``, one update ``(1 - m) r + m s̄`` toward the tasks' mean batch
    statistic ``s̄`` (with ``momentum=None``, one step of the cumulative average). The result does not
    depend on how tasks are grouped into calls, so the supermodel (one call per task) and the compact
    model (one call per class of tasks) keep the same statistics, as a backbone trained on one batch
    would. Outputs are unaffected: in train mode a norm normalises with its batch's statistics.
    """
    if len(calls) == 1 or not buffers:
        return [call() for call in calls]
    # Written through .data, as the norm's own kernel writes them: autograd saves the running statistics
    # with each call (unused by a train-mode backward) and would refuse a version change.
    buffers = [b.data for b in buffers]
    start = [b.clone() for b in buffers]
    outs, changes = [], []
    for call in calls:
        for b, s in zip(buffers, start):
            b.copy_(s)
        outs.append(call())
        changes.append([b - s for b, s in zip(buffers, start)])
    order = sorted((t, j) for j, group in enumerate(members) for t in group)
    for i, (b, s) in enumerate(zip(buffers, start)):
        total = changes[order[0][1]][i].clone()
        for _, j in order[1:]:
            total += changes[j][i]
        b.copy_(s + (total / len(order) if b.is_floating_point() else total // len(order)))
    return outs


def _tracked_buffers(module: nn.Module) -> list:
    return [b for m in module.modules() if updates_running_stats(m) for b in m.buffers(recurse=False)
            if b is not None]


def module_per_group(module: nn.Module, inputs: Sequence[torch.Tensor], members: Sequence[Sequence[int]]) -> tuple:
    """``module(x)`` for each group's batch in ``inputs``, its norms' running statistics moved once
    (:func:`one_update`). The compact model's train graph calls it where one module runs for several
    classes of tasks."""
    return tuple(one_update(_tracked_buffers(module), [functools.partial(module, x) for x in inputs], members))


def batch_norm_per_group(inputs: Sequence[torch.Tensor], members: Sequence[Sequence[int]], running_mean=None,
                         running_var=None, *args, **kwargs) -> tuple:
    """``F.batch_norm`` on each group's batch, the running statistics moved once (:func:`one_update`)."""
    training = kwargs.get("training", args[2] if len(args) > 2 else False)
    buffers = [b for b in (running_mean, running_var) if b is not None] if training else []
    calls = [functools.partial(F.batch_norm, x, running_mean, running_var, *args, **kwargs) for x in inputs]
    return tuple(one_update(buffers, calls, members))


def taskwise_norm(norm: nn.Module, x: torch.Tensor, num_tasks: int,
                  members: Optional[Sequence[Sequence[int]]] = None) -> torch.Tensor:
    """``norm(x)`` on the folded task batch as if each task's rows were a batch of their own.

    ``norm`` is a norm layer, or a module the trace did not enter (a leaf) that holds one.

    A BatchNorm that uses batch statistics would otherwise mix every task's rows, and the compact
    model (one batch per class of tasks) would compute another function. The running statistics
    (BatchNorm's, or an InstanceNorm's that tracks them) get one update for the T tasks together:
    :func:`one_update`. ``members``: when the ``num_tasks`` row blocks are groups of tasks rather than
    tasks (sampled paths), the tasks of each block, which weight its update.
    """
    if num_tasks == 1 or not needs_task_batches(norm):
        return norm(x)
    members = members if members is not None else [(t,) for t in range(num_tasks)]
    outs = module_per_group(norm, x.chunk(num_tasks), members)
    if not all(isinstance(o, torch.Tensor) for o in outs):
        from .errors import BackboneError
        raise BackboneError(
            f"{type(norm).__name__}, a module called as one that holds a norm with batch or running statistics, "
            f"returns a {type(outs[0]).__name__}; automtl runs it on each task's rows apart and joins one tensor: "
            "mark a smaller module (the norm itself) as the leaf")
    return torch.cat(outs)


def taskwise_batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                        eps=1e-5, num_tasks=1):
    """``F.batch_norm`` (as a backbone's hand-written norm calls it) normalising each task's rows apart; see :func:`taskwise_norm`."""
    if num_tasks == 1 or not (training or running_mean is None):
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return torch.cat(batch_norm_per_group(input.chunk(num_tasks), [(t,) for t in range(num_tasks)], running_mean,
                                          running_var, weight, bias, training, momentum, eps))


class ConvUnit(nn.Module):
    """A convolution and the normalisation layer after it: the unit a task shares, owns or skips."""

    def __init__(self, conv: nn.Conv2d, bn: Optional[nn.Module] = None):
        super().__init__()
        self.conv = conv
        self.bn = bn if bn is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))

    def forward_tasks(self, x: torch.Tensor, num_tasks: int, members: Optional[Sequence[Sequence[int]]] = None) -> torch.Tensor:
        """The unit on ``num_tasks`` tasks' rows folded into the batch, normalising each task apart
        (``members``: see :func:`taskwise_norm`)."""
        return taskwise_norm(self.bn, self.conv(x), num_tasks, members)


def _run(op: nn.Module, x: torch.Tensor, num_tasks: int) -> torch.Tensor:
    return op.forward_tasks(x, num_tasks) if isinstance(op, ConvUnit) else op(x)


def repeat_tasks(x: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Turn a task-invariant batch (B, ...) into the folded task batch (T*B, ...)."""
    return x.repeat(num_tasks, *([1] * (x.dim() - 1)))



@dataclass
class LayerInfo:
    """Static facts about one policy layer, used for accounting and legality."""

    name: str
    in_shape: tuple
    out_shape: tuple
    unit_params: int
    skip_params: int
    macs: int  # per sample, of the backbone operator
    skip_macs: int
    skip_kind: str  # "identity", "projection" or "none" (skip illegal)

    @property
    def skip_legal(self) -> bool:
        return self.skip_kind != "none"


class PolicyLayer(nn.Module):
    """share | specialize | skip for every task, on the folded task batch.

    ``mix`` is the (T, 3) mixing weight of this layer for this forward; in hard mode
    (``choices`` set) only the chosen operator of each task is computed.
    """

    def __init__(self, unit: ConvUnit, num_tasks: int, skip: Optional[nn.Module]):
        super().__init__()
        self.num_tasks = num_tasks
        self.shared = unit
        self.specialized = nn.ModuleList(copy.deepcopy(unit) for _ in range(num_tasks))
        self.skip = skip
        self.choices: Optional[tuple] = None

    def forward(self, x: torch.Tensor, mix: torch.Tensor, shared_input: bool = False) -> torch.Tensor:
        if self.choices is not None:
            return self._forward_hard(x, shared_input)
        T = self.num_tasks
        xs = [x] * T if shared_input else x.chunk(T)
        n = 1 if shared_input else T
        y_spec = torch.stack([op(xt) for op, xt in zip(self.specialized, xs)])  # (T, B, C, H, W)
        w = mix.to(y_spec.dtype).view(T, 3, 1, 1, 1, 1)
        out = w[:, SPECIALIZE] * y_spec + w[:, SHARE] * self._per_task(_run(self.shared, x, n), shared_input)
        if self.skip is not None:
            out = out + w[:, SKIP] * self._per_task(_run(self.skip, x, n), shared_input)
        return out.flatten(0, 1)

    def _per_task(self, y: torch.Tensor, shared_input: bool) -> torch.Tensor:
        return y.unsqueeze(0) if shared_input else y.view(self.num_tasks, -1, *y.shape[1:])

    def _forward_hard(self, x: torch.Tensor, shared_input: bool) -> torch.Tensor:
        T = self.num_tasks
        if not shared_input and self.choices[0] != SPECIALIZE and all(c == self.choices[0] for c in self.choices):
            # every task runs the same operator: one call on the folded batch, no gather/scatter copies
            y = _run(self.shared if self.choices[0] == SHARE else self.skip, x, T)
            return y.clone() if y is x else y  # an identity skip must not alias its input (in-place ops follow)
        xs = [x] * T if shared_input else list(x.chunk(T))
        outs: list = [None] * T
        for choice, op in ((SHARE, self.shared), (SKIP, self.skip)):
            users = [t for t in range(T) if self.choices[t] == choice]
            if not users:
                continue
            if shared_input:
                y = op(x)
                for t in users:
                    outs[t] = y
            else:
                if users[-1] - users[0] == len(users) - 1:  # consecutive tasks: their rows are a view
                    b = x.shape[0] // T
                    inp = x.narrow(0, users[0] * b, len(users) * b)
                else:
                    inp = torch.cat([xs[t] for t in users])
                ys = _run(op, inp, len(users)).chunk(len(users))
                for t, y in zip(users, ys):
                    outs[t] = y
        for t in range(T):
            if self.choices[t] == SPECIALIZE:
                outs[t] = self.specialized[t](xs[t])
        return torch.cat(outs)


def _skip_operator(conv: nn.Conv2d, in_shape: tuple, out_shape: tuple) -> tuple[Optional[nn.Module], str]:
    """Identity when the shape is kept; else a strided 1x1 conv + BN where that reproduces the shape and
    costs fewer multiply-accumulates than the layer (a ResNet downsampling 3x3, not a 1x1 or a depthwise
    conv, whose "skip" would cost as much or more than running it); else none (skip is illegal)."""
    if not _keeps_size_rule(conv):
        return None, "none"  # the conv's output size is not the strided input size at every input size
    if tuple(in_shape[1:]) == tuple(out_shape[1:]) and tuple(conv.stride) == (1, 1):
        return nn.Identity(), "identity"
    stride = conv.stride
    h, w = in_shape[2], in_shape[3]
    fits = (h - 1) // stride[0] + 1 == out_shape[2] and (w - 1) // stride[1] + 1 == out_shape[3]
    projection_macs = out_shape[1] * out_shape[2] * out_shape[3] * in_shape[1]
    if fits and projection_macs < _conv_macs(conv, out_shape):
        proj = ConvUnit(
            nn.Conv2d(in_shape[1], out_shape[1], 1, stride=stride, bias=False),
            nn.BatchNorm2d(out_shape[1]),
        )
        nn.init.kaiming_normal_(proj.conv.weight, mode="fan_out", nonlinearity="relu")
        return proj, "projection"
    return None, "none"


def _keeps_size_rule(conv: nn.Conv2d) -> bool:
    """True when out = ceil(in / stride) at every input size ("same" padding): only then can a skip
    (identity, or a strided 1x1 projection) stand in for the conv at sizes other than the example's."""
    if conv.padding == "same":
        return True
    if isinstance(conv.padding, str):
        return all(d * (k - 1) == 0 for k, d in zip(conv.kernel_size, conv.dilation))
    return all(2 * p == d * (k - 1) for p, k, d in zip(conv.padding, conv.kernel_size, conv.dilation))


def _conv_macs(conv: nn.Conv2d, out_shape: tuple) -> int:
    k = conv.kernel_size[0] * conv.kernel_size[1]
    return int(out_shape[1] * out_shape[2] * out_shape[3] * (conv.in_channels // conv.groups) * k)
