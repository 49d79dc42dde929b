"""Inside step 2: check that folding the tasks into the batch keeps each task's rows apart.

The supermodel runs every task in one pass, the tasks' rows stacked along the batch dimension
(:mod:`automtl.supergraph`). That is exact for every operation that treats samples independently,
which is what a CNN does, and what batch norm is rewritten to do per task. A backbone that mixes the
samples of a batch (concatenates the batch with a flipped copy, takes a mean over the batch, slices it
with sizes of its own) would mix the tasks' rows: silently wrong numbers. No list of operations can
name every way to do that, so :func:`check_tasks_apart` asks the graph: on a small batch, with every
task's copy of every policy layer given its own weights, the supermodel must equal the same model run
one task at a time (:func:`automtl.reference.run_task_by_task`), with one image batch for all tasks
and with a batch per task. Train mode has random draws (dropout) that two different passes cannot
share, so there the check asks the folded pass alone: run twice from the same random state, with
only task 0's rows changed, every other task's output must stay as it was. A backbone that fails
either check is refused, naming the first operation along the batch dimension it found.
"""
from __future__ import annotations

import contextlib
import io
import math
import operator
import warnings

import torch
from torch import fx

from .errors import BackboneError, first_line as _first_line
from .policy import SPECIALIZE, Policy
from .tracecheck import saved_buffers
from .seeding import seeded
from .tracecheck import PythonState, put_back

#: the largest image side the check runs at (a smaller example's own; the example's when the backbone refuses it)
CHECK_SIZE = 32
#: relative difference (to the largest output) above which the folded pass is not the task-by-task one;
#: float32 reordering stays near 1e-6, a mixed batch is off by 1e-2 and more
TOLERANCE = 1e-3
#: the length of the random block a copy's perturbation repeats (prime: the pattern does not follow channels)
NOISE_BLOCK = 4099
_REDUCTIONS = {"mean", "sum", "std", "var", "amax", "amin", "prod", "max", "min", "logsumexp", "norm", "median",
               "nanmean", "nansum", "std_mean", "var_mean", "cumsum", "cumprod", "softmax", "log_softmax",
               "argmax", "argmin", "all", "any", "count_nonzero"}
#: operations that take a dimension, with its position in the arguments (after the tensor) and its default
_DIM_AT = {"narrow": (1, None), "select": (1, None), "index_select": (1, None), "gather": (1, None),
           "cummax": (1, None), "cummin": (1, None), "sort": (1, -1), "topk": (2, -1), "take_along_dim": (2, None),
           "split": (2, 0), "chunk": (2, 0), "tensor_split": (2, 0), "unbind": (1, 0), "flatten": (1, 0)}


def check_tasks_apart(sm) -> None:
    """Raise :class:`BackboneError` when ``sm``'s folded pass mixes the tasks' rows (see the module docstring).

    Runs under ``no_grad`` on 3 images a task at up to 32 px a side (the example input's size when the backbone
    does not take that), with every task on its own copy of every policy layer (the copies perturbed by a seeded
    5% of their weights' spread and the first layer's scaled by 1 + k/2 for task k). Eval mode: the supermodel
    against the same model run one task at a time, once with one batch for all tasks and once with a batch per
    task, each task's drawn from its own range. Train mode: the supermodel twice from the same random state (the
    same dropout masks), the second time with task 0's rows changed (its batch, or with one batch for all tasks
    its first layer's copy); the other tasks' outputs must not move. This is how batch statistics a backbone
    computes by hand in training only (``x.mean((0, 2, 3))`` under ``if self.training``) are found; a random draw
    that depends on the data itself would be refused too. Changes nothing: weights, buffers (running
    statistics), each module's train flag, the mode and the random state are as before.
    """
    T, L = sm.num_tasks, len(sm.layer_names)
    if T < 2 or L == 0:
        return
    kinds = {(p.device, p.dtype) for p in sm.parameters()}
    if len(kinds) != 1:  # a backbone on another device or dtype than the heads (built on the CPU in float32)
        warnings.warn("the check that folding tasks into the batch keeps their rows apart runs on a supermodel whose "
                      "parameters share one device and dtype; this one has several, so it was skipped",
                      stacklevel=3)
        return
    ((device, dtype),) = kinds
    gen = torch.Generator().manual_seed(0)
    C, H, W = tuple(sm.input_shape)[1:]
    small = (min(H, CHECK_SIZE), min(W, CHECK_SIZE))
    training = {m: m.training for m in sm.modules()}  # each module's own flag (a backbone handed over in eval mode)
    mode, policy = sm.mode, sm.policy
    buffers = saved_buffers(sm)  # train mode moves running statistics
    copies = [(unit, layer.shared) for layer in sm.policy_layers for unit in layer.specialized]
    # a fresh supermodel's copies are its shared operators (restored from them); trained ones are kept aside
    kept = None if all(_same(unit, shared) for unit, shared in copies) else [
        {k: v.detach().clone() for k, v in unit.state_dict().items()} for unit, _ in copies]
    try:
        sm.eval()
        sm.hard(Policy.uniform(sm.layer_names, sm.task_names, SPECIALIZE))  # each task runs its own copy only
        with torch.no_grad():
            for i, layer in enumerate(sm.policy_layers):
                for k, unit in enumerate(layer.specialized):
                    for p in unit.parameters():
                        noise = _noise(p.shape, gen).to(device=device, dtype=dtype)
                        p.add_(noise * 0.05 * (float(p.std()) if p.numel() > 1 else 1.0))
                    if i == 0:  # the tasks' rows differ in scale from the first layer on (once: no compounding)
                        unit.conv.weight.mul_(1 + 0.5 * k)
            # batch mixing does not depend on the image size: a small one is cheap; the example's where it is not taken
            sizes = [small, (H, W)] if small != (H, W) else [(H, W)]
            for n, (h, w) in enumerate(sizes):
                try:
                    worst = _compare(sm, gen, (3, C, h, w), device, dtype)
                    random = worst > TOLERANCE and _draws_in_eval(sm, gen, (3, C, h, w), device, dtype)
                    moved = 0.0 if worst > TOLERANCE else _interference(sm, gen, (3, C, h, w), device, dtype, buffers)
                    break
                except _Failed as failed:
                    if n == len(sizes) - 1:
                        raise BackboneError(
                            f"the supermodel fails on a check batch of 3 images a task ({failed.args[0]}); a "
                            "backbone must take any batch size, as training does") from None
    finally:
        with torch.no_grad():
            for i, (unit, shared) in enumerate(copies):
                unit.load_state_dict(shared.state_dict() if kept is None else kept[i])
        put_back(buffers)
        for m, flag in training.items():
            m.training = flag
        if policy is not None:
            sm.hard(policy)
        else:
            sm._set_mode(mode)
    if worst > TOLERANCE and random:
        raise BackboneError(
            "the backbone draws random numbers in eval mode (MC dropout, noise injection), so two passes over the same "
            "images differ and its folded pass cannot be checked against the tasks run one at a time; make the "
            "randomness train-only (F.dropout(x, p, self.training)) for conversion")
    if worst > TOLERANCE:
        where = _batch_op(sm.net.graph, set(sm.layer_names))
        raise BackboneError(
            "the backbone mixes the samples of a batch"
            + (f" (at node {where.name!r}: {_describe(where)})" if where is not None else "")
            + f", so with tasks folded into one batch each task's output would depend on the other tasks' rows "
            f"(off by {worst:.1%} of the output on a check batch); compute that part per sample, or move it out "
            "of the backbone (e.g. test-time augmentation around the model)")
    if moved > TOLERANCE:
        where = _batch_op(sm._net_for(per_task_input=True, train=True).graph, set(sm.layer_names))
        raise BackboneError(
            "the backbone mixes the samples of a batch in train mode"
            + (f" (at node {where.name!r}: {_describe(where)})" if where is not None else "")
            + f", so with tasks folded into one batch each task's training would depend on the other tasks' rows "
            f"(another task's rows moved an output by {moved:.1%} on a check batch); compute batch statistics with "
            "a BatchNorm module or F.batch_norm, which automtl keeps per task, or compute that part per sample")


class _Failed(Exception):
    """The supermodel (or the task-by-task run) raised at a check size; args[0] says what."""


def _compare(sm, gen: torch.Generator, shape: tuple, device, dtype) -> float:
    """The largest difference between the one-pass and the task-by-task outputs, relative to the largest output,
    over one batch for all tasks and a batch per task (inf when NaN appears in one and not the other)."""
    from .reference import run_task_by_task

    worst = 0.0
    for inputs in _inputs(sm, gen, shape, device, dtype):
        try:  # torch.fx prints the generated code of a failing forward itself: the sentence replaces it
            with contextlib.redirect_stderr(io.StringIO()):
                folded, alone = sm(inputs), run_task_by_task(sm, inputs)
        except BackboneError:
            raise  # a graph built on first use refused the backbone: that sentence is the answer
        except Exception as exc:
            raise _Failed(_first_line(exc)) from None
        worst = max([worst] + [_gap(folded[t], alone[t]) for t in sm.task_names])
    return worst


def _draws_in_eval(sm, gen: torch.Generator, shape: tuple, device, dtype) -> bool:
    """Whether two eval-mode passes over the same images differ (randomness in eval mode)."""
    x = torch.rand(shape, generator=gen).to(device=device, dtype=dtype)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            first, second = sm(x), sm(x)
    except Exception:
        return False
    return any(not torch.equal(first[t], second[t]) for t in sm.task_names)


def _inputs(sm, gen: torch.Generator, shape: tuple, device, dtype) -> tuple:
    """One image batch for all tasks (image-like values in [0, 1)), and a batch per task, each task's drawn from
    its own range so that statistics over the whole batch differ between tasks."""
    x = torch.rand(shape, generator=gen).to(device=device, dtype=dtype)
    xs = {t: (torch.rand(shape, generator=gen) * (1 + k) + 0.5 * k).to(device=device, dtype=dtype)
          for k, t in enumerate(sm.task_names)}
    return x, xs


def _gap(a: torch.Tensor, reference: torch.Tensor) -> float:
    """The largest difference of ``a`` from ``reference``, relative to the reference's largest value (inf when NaN
    appears in one and not the other: the rows were mixed)."""
    if not torch.equal(torch.isnan(a), torch.isnan(reference)):
        return math.inf
    finite = torch.isfinite(reference)
    if not finite.any():
        return 0.0
    return float((a - reference)[finite].abs().max()) / (float(reference[finite].abs().max()) + 1e-6)


def _interference(sm, gen: torch.Generator, shape: tuple, device, dtype, buffers: list) -> float:
    """Train mode: the largest move of tasks 1..T-1's outputs (relative to their largest output) when only task
    0's rows change, with one batch for all tasks (task 0's first-layer copy changed) and with a batch per task
    (task 0's batch changed); each pass starts from the same random state and running statistics."""
    x, xs = _inputs(sm, gen, shape, device, dtype)
    other = (torch.rand(shape, generator=gen) * 4 - 1).to(device=device, dtype=dtype)
    first = list(sm.policy_layers[0].specialized[0].parameters())  # task 0's copy of the first layer
    was = [p.detach().clone() for p in first]
    changed_to = [w + (torch.randn(w.shape, generator=gen) * 0.5).to(device=device, dtype=dtype)
                  * (float(w.std()) if w.numel() > 1 else 1.0) for w in was]

    def set_first(values: list) -> None:
        for p, value in zip(first, values):
            p.copy_(value)

    cases = [(x, lambda: set_first(changed_to), lambda: set_first(was)), (xs, None, None)]
    worst = 0.0
    sm.train()
    state = PythonState(sm)  # a module's own torch.Generator, counters: each pass from the same, and back after
    try:
        for inputs, before, after in cases:
            outs = []
            for changed in (False, True):
                put_back(buffers)
                state.restore()
                run = dict(inputs, **{sm.task_names[0]: other}) if changed and isinstance(inputs, dict) else inputs
                if changed and before is not None:
                    before()
                try:
                    # the random state forked and reset: the CPU's, and the accelerator's where the supermodel runs on one
                    with seeded(device), contextlib.redirect_stderr(io.StringIO()):
                        outs.append(sm(run))
                except BackboneError:
                    raise
                except Exception as exc:
                    raise _Failed(f"in train mode: {_first_line(exc)}") from None
                finally:
                    if changed and after is not None:
                        after()
            worst = max([worst] + [_gap(outs[1][t], outs[0][t]) for t in sm.task_names[1:]])
    finally:
        state.restore()
    return worst


def _noise(shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """Standard normal values of ``shape``: a seeded block of a prime length, repeated (drawing every element costs
    ResNet-50's three copies a third of a second; a copy only needs to differ from the others)."""
    n = math.prod(shape)
    block = torch.randn(min(n, NOISE_BLOCK), generator=gen)
    return block.repeat(-(-n // block.numel()))[:n].view(shape)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """True when two modules' state dicts hold equal tensors under the same keys."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _batch_op(graph: fx.Graph, layers: set):
    """The first node after a policy layer that works along dimension 0 of a tensor, if any (best effort)."""
    per_task: set = set()
    for n in graph.nodes:
        if n.op == "call_module" and n.target in layers:
            per_task.add(n)
            continue
        if not any(i in per_task for i in n.all_input_nodes):
            continue
        per_task.add(n)
        if _along_batch(n):
            return n
    return None


def _name(n: fx.Node) -> str:
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")


def _is_tensor(a) -> bool:
    meta = a.meta.get("tensor_meta") if isinstance(a, fx.Node) else None
    return hasattr(meta, "shape")


def _along_batch(n: fx.Node) -> bool:
    if n.op not in ("call_function", "call_method"):
        return False
    name, args, kwargs = _name(n), n.args, n.kwargs
    if n.target is operator.getitem:
        if not _is_tensor(args[0]):
            return False
        first = args[1][0] if isinstance(args[1], tuple) and args[1] else args[1]
        return not (isinstance(first, slice) and first == slice(None)) and first is not Ellipsis
    if name in _REDUCTIONS:
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        dims = dim if isinstance(dim, (tuple, list)) else (dim,)
        return dim is None or 0 in dims
    if name in ("cat", "concat", "concatenate", "stack"):
        return kwargs.get("dim", args[1] if len(args) > 1 else 0) == 0
    if name in ("flip", "roll"):
        dims = kwargs.get("dims", args[-1] if len(args) > 1 else None)
        dims = dims if isinstance(dims, (tuple, list)) else (dims,)
        return dims == (None,) or 0 in dims
    if name == "permute":
        order = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
        return bool(order) and order[0] != 0
    if name in ("transpose", "swapaxes", "movedim", "swapdims"):
        return 0 in args[1:3]
    if name in _DIM_AT:
        at, default = _DIM_AT[name]
        key = "start_dim" if name == "flatten" else "dim"
        dim = kwargs.get(key, args[at] if len(args) > at else default)
        return dim is None or dim == 0
    return False


def _describe(n: fx.Node) -> str:
    what = _name(n) or str(n.target)
    return "indexing along the batch" if n.target is operator.getitem else f"{what} along the batch"
