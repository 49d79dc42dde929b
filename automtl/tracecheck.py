"""Inside step 1: check that torch.fx's trace computes what the backbone computes, values and gradients.

A trace records the tensor operations one symbolic call makes. What is not a tensor operation is
frozen at trace time or lost: a Python random draw or counter becomes a constant, and the autograd
constructs the trace cannot see (a ``torch.no_grad()`` block, a custom ``torch.autograd.Function`` reached
around ``Function.apply``, a hook the forward puts on a tensor) keep their forward and lose what they do
to the backward. The
known routes are refused by name while tracing (:mod:`automtl.capture`); no list can name them all, so
:func:`check_trace` asks the two programs: on one small batch, from the same weights, running statistics
and random state, the traced graph must give the backbone's outputs and, for a fixed random weighting of
the outputs, the same gradients of every trainable parameter and of the input. It runs in eval mode and
in train mode (with its own graph). A backbone that fails either comparison is refused, naming the
output or the parameter that differs.
"""
from __future__ import annotations

import contextlib
import io
import math
from typing import Optional

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from .errors import BackboneError
from .seeding import seeded

#: the image sides the check tries, smallest first (the cost grows with the pixels), then the example's own
CHECK_SIZES = (16, 32)
#: relative difference (to the reference's largest value) above which two results differ; the same
#: operations in the same order agree to rounding (float32: ~1e-6)
TOLERANCE = 1e-3


def check_trace(backbone: nn.Module, graphs: dict, example_input: torch.Tensor) -> None:
    """Raise :class:`BackboneError` when a traced graph computes other outputs or gradients than ``backbone``.

    Args:
        backbone: the module that was traced (a copy of the user's: its weights are shared with the graphs).
        graphs: ``{"eval": GraphModule, "train": GraphModule}``: the uncut graphs traced in each mode (None or
            left out: not checked; the capture leaves out the train graph where it is the eval graph's twin).
        example_input: ``(N, C, H, W)``; the check runs on images of its channels, dtype and device (one in eval
            mode, two in train mode, where batch norm needs two), values in [0, 1), at the first side of
            :data:`CHECK_SIZES` (at most the example's) both programs take, else at the example's size; on the
            example itself when its dtype is not floating.

    Every run starts from the same parameters, buffers and random state (dropout draws the same masks in
    both); gradients are taken with ``torch.autograd.grad`` (no ``.grad`` is written). Changes nothing:
    buffers, each module's train flag and the random state are as before. Where neither size runs in
    both programs the check is left to the later ones (which name the failure).
    """
    training = {m: m.training for m in backbone.modules()}
    buffers = [(b, b.detach().clone()) for b in backbone.buffers()]
    try:
        for mode, gm in graphs.items():
            if gm is None:
                continue
            backbone.train(mode == "train")
            for x in _check_inputs(example_input, 2 if mode == "train" else 1):
                found = _compare(backbone, gm, x, buffers)
                if found is not None:
                    _raise_if_apart(type(backbone).__name__, mode, *found)
                    break
    finally:
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)
        for m, flag in training.items():
            m.training = flag


def _check_inputs(example_input: torch.Tensor, n: int):
    """``n`` images at up to each of :data:`CHECK_SIZES` px a side, then at the example's size; the example itself
    when its dtype is not floating (index or byte images)."""
    if not example_input.is_floating_point():
        yield example_input
        return
    N, C, H, W = example_input.shape
    gen = torch.Generator().manual_seed(0)
    for h, w in dict.fromkeys([(min(H, s), min(W, s)) for s in CHECK_SIZES] + [(H, W)]):
        yield torch.rand((n, C, h, w), generator=gen).to(device=example_input.device, dtype=example_input.dtype)


def _run(program, x: torch.Tensor, params: list, buffers: list) -> tuple:
    """``program``'s tensor outputs on ``x`` and the gradients of ``params`` (then of ``x``, when floating) of a
    fixed random weighting of them, from the saved ``buffers`` and random state 0."""
    with torch.no_grad():
        for b, value in buffers:
            b.copy_(value)
    x = x.detach().requires_grad_(x.is_floating_point())
    wrt = params + ([x] if x.requires_grad else [])
    with seeded(x.device), torch.enable_grad(), contextlib.redirect_stderr(io.StringIO()):
        outs = [t for t in pytree.tree_leaves(program(x)) if isinstance(t, torch.Tensor)]
        gen = torch.Generator().manual_seed(1)
        terms = [(t * torch.randn(t.shape, generator=gen).to(t)).sum() for t in outs
                 if t.is_floating_point() and t.requires_grad]
        grads = torch.autograd.grad(sum(terms), wrt, allow_unused=True) if terms else [None] * len(wrt)
    return [t.detach() for t in outs], [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]


def _compare(backbone: nn.Module, gm: fx.GraphModule, x: torch.Tensor, buffers: list) -> Optional[tuple]:
    """``(worst output gap, its index, worst gradient gap, its name)`` of ``gm`` against ``backbone`` on ``x``;
    None when either fails on it."""
    named = [(name, p) for name, p in backbone.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    try:
        (outs, grads), (touts, tgrads) = _run(backbone, x, params, buffers), _run(gm, x, params, buffers)
    except BackboneError:
        raise
    except Exception:  # a refusal of this size or mode is for the checks that come later to name
        return None
    if len(outs) != len(touts) or any(a.shape != b.shape for a, b in zip(outs, touts)):
        return math.inf, 0, 0.0, None
    names = [name for name, _ in named] + ["the input"]
    scale = max([float(g.abs().max()) for g in grads if g.numel()] + [0.0])
    out_gaps = [relative_gap(b, a) for a, b in zip(outs, touts)]
    grad_gaps = [relative_gap(b, a, floor=1e-4 * scale) for a, b in zip(grads, tgrads)]
    k = max(range(len(out_gaps)), key=out_gaps.__getitem__, default=None)
    j = max(range(len(grad_gaps)), key=grad_gaps.__getitem__, default=None)
    return (0.0 if k is None else out_gaps[k], k, 0.0 if j is None else grad_gaps[j], None if j is None else names[j])


def _raise_if_apart(name: str, mode: str, out_gap: float, out_index, grad_gap: float, grad_name) -> None:
    if out_gap > TOLERANCE:
        raise BackboneError(
            f"torch.fx's trace of {name} computes other outputs than its forward in {mode} mode (output {out_index} "
            f"off by {_percent(out_gap)} of its largest value on a check batch): the forward depends on something the "
            "trace records as a constant (a Python random draw, a counter or other Python state, code that asks "
            "whether it is being traced); make that part tensor operations, or mark the module that does it as a "
            "leaf (leaf_modules=[ItsClass]) so it runs as one call")
    if grad_gap > TOLERANCE:
        raise BackboneError(
            f"torch.fx's trace of {name} trains with other gradients than its forward in {mode} mode (the gradient "
            f"of {grad_name} off by {_percent(grad_gap)} of its largest value on a check batch): the forward changes "
            "its backward in a way the trace does not record (a torch.no_grad() block: use .detach() instead; a "
            "custom autograd.Function applied around Function.apply; a hook put on a tensor); change that, or mark "
            "the module that does it as a leaf (leaf_modules=[ItsClass]) so it runs as one call")


def _percent(gap: float) -> str:
    return "NaN where the other is not" if math.isinf(gap) else f"{gap:.1%}"


def relative_gap(a: torch.Tensor, reference: torch.Tensor, floor: float = 1e-12) -> float:
    """The largest difference of ``a`` from ``reference`` relative to the reference's largest finite value (at
    least ``floor``); inf when NaN appears in one and not the other; for integer tensors 0 when equal, else inf."""
    if torch.equal(a, reference):  # the common case, and the cheap one
        return 0.0
    if not a.is_floating_point():
        return math.inf
    if not torch.equal(torch.isnan(a), torch.isnan(reference)):
        return math.inf
    finite = torch.isfinite(reference)
    if not finite.any():
        return 0.0
    diff = float((a.double() - reference.double())[finite].abs().max())
    return diff / max(float(reference[finite].abs().max()), floor)
