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

import ast
import contextlib
import copy
import dataclasses
import inspect
import io
import math
import textwrap
from collections.abc import Mapping
from typing import Optional, Sequence

import torch
from torch import fx, nn

from .errors import BackboneError, first_line as _first_line
from .seeding import generator_state, is_generator, same_state, seeded, set_generator_state

#: the image sides the check tries, smallest first (the cost grows with the pixels), then the example's own
CHECK_SIZES = (16, 32)
#: relative difference above which two results differ: per element, against the element's own size plus 1% of the
#: tensor's largest (a score next to pixel coordinates in one output is compared at its own scale); the same
#: operations in the same order agree to rounding (float32: ~1e-7)
TOLERANCE = 1e-3
#: the floor of that comparison, as a fraction of the tensor's largest value
FLOOR = 1e-2
#: what a bare nn.Module keeps in its __dict__ (parameters, buffers, children, hooks, the train flag): not Python
#: state of the model's own
_MODULE_INTERNALS = frozenset(vars(nn.Module())) | {"_compiled_call_impl"}


class PythonState:
    """The Python-level attributes of every module of ``root`` (counters, caches, flags, ``torch.Generator``
    states), kept so that a trace or a check run can be undone: :meth:`restore` puts back every attribute as it
    was (containers one level deep), removes the ones added since, and resets each generator's state."""

    def __init__(self, root: nn.Module):
        self.saved = []
        for m in root.modules():
            own = {k: v for k, v in vars(m).items() if k not in _MODULE_INTERNALS}
            self.saved.append((m, own, {k: _state_of(v) for k, v in own.items()}))

    def moved_generators(self, root: nn.Module) -> list:
        """The ``module.attribute`` paths (under ``root``) of the generators whose state moved since."""
        names = {id(m): name for name, m in root.named_modules()}
        moved = []
        for m, own, copies in self.saved:
            for k, v in own.items():
                if is_generator(v) and not same_state(_state_of(v), copies[k]):
                    moved.append(f"{names.get(id(m), '?')}.{k}".lstrip("."))
        return moved

    def restore(self, added: str = "all") -> None:
        """Put the attributes back; the ones added since are removed (``added="all"``), or only those holding a
        traced value, an ``fx.Proxy`` (``"proxies"``: after a trace, whose own constants the graph reads)."""
        for m, own, copies in self.saved:
            for k in [k for k in vars(m) if k not in _MODULE_INTERNALS and k not in own]:
                if added == "all" or _holds_proxy(vars(m)[k]):
                    delattr(m, k)
            for k, v in own.items():
                _set_state(v, copies[k])
                m.__dict__[k] = v


def _state_of(value):
    """What :func:`_set_state` needs to put ``value`` back in place: a generator's state (torch's, Python's,
    numpy's), a plain tensor's values, a container's items (one level); None for what is only rebound."""
    if is_generator(value):
        return generator_state(value)
    if isinstance(value, torch.Tensor) and not isinstance(value, (nn.Parameter, fx.Proxy)):
        return value.detach().clone()
    if isinstance(value, (list, dict, set)):
        return copy.copy(value)
    return None


def _set_state(value, kept) -> None:
    if kept is None:
        return
    if is_generator(value):
        set_generator_state(value, kept)
    elif isinstance(value, torch.Tensor):
        if value.shape == kept.shape:
            with torch.no_grad():
                value.copy_(kept)
    else:
        value.clear()
        value.update(kept) if not isinstance(value, list) else value.extend(kept)


def _holds_proxy(value, depth: int = 0) -> bool:
    """Whether ``value`` is or holds (in nested containers) a traced value."""
    if isinstance(value, fx.Proxy):
        return True
    if depth > 16:
        return False
    if isinstance(value, Mapping):
        value = list(value.values())
    return isinstance(value, (list, tuple, set)) and any(_holds_proxy(v, depth + 1) for v in value)


def check_trace(backbone: nn.Module, graphs: dict, example_input: torch.Tensor,
                requires_grad_tests: Sequence[str] = (), fixed_arguments: Optional[dict] = None) -> None:
    """Raise :class:`BackboneError` when a traced graph computes other outputs or gradients than ``backbone``.

    Args:
        backbone: the module that was traced (a copy of the user's: its weights are shared with the graphs).
        graphs: ``{"eval": GraphModule, "train": GraphModule}``: the uncut graphs traced in each mode.
        example_input: ``(N, C, H, W)``; the check runs on images of its channels, dtype and device (one in eval
            mode, two in train mode, where batch norm needs two; then two and the example's batch where the
            backbone refuses fewer), values in [0, 1) (crops of the example when its dtype is not floating), at
            the first side of :data:`CHECK_SIZES` both programs take, else at the example's size.

    Every run starts from the same parameters, buffers, Python attributes of the modules (counters, caches,
    generators) and random state (torch's, Python's and numpy's: dropout draws the same masks in both), and is
    followed by a second call (outputs only) from the Python state the first left: a call counter the trace froze
    differs there;
    ``requires_grad_tests``: where the trace decided a ``x.requires_grad`` as an ordinary training step would
    (``file:line``). The first call then runs as that step does, its input not requiring gradients (no input
    gradient is compared), and the second, without gradients, runs the branches inference takes; a difference
    in either names those lines.
    ``fixed_arguments``: the ``concrete_args`` the graphs were traced with, passed to the backbone's forward.
    Gradients are taken by ``.backward()`` (every ``.grad`` is put back as it was), also under an outer
    ``torch.no_grad()`` or ``torch.inference_mode()``. Changes nothing: all of that is as before afterwards.
    A train-mode graph may fail on every check batch (a train-only branch the feature node does not need); in
    eval mode, where shapes were propagated with the trace on the example, the backbone must run on it too.
    """
    with torch.inference_mode(False), torch.enable_grad():
        training = {m: m.training for m in backbone.modules()}
        buffers = saved_buffers(backbone)
        python = PythonState(backbone)
        try:
            own = _with_fixed(backbone, fixed_arguments) if fixed_arguments else backbone
            for mode, gm in graphs.items():
                backbone.train(mode == "train")
                failures = []
                for x in _check_inputs(example_input, mode):
                    found = _compare(backbone, own, gm, x, buffers, python, failures, not requires_grad_tests)
                    if found is not None:
                        _raise_if_apart(type(backbone).__name__, mode, *found, requires_grad_tests=requires_grad_tests,
                                        augmented=augmented_assignments(backbone))
                        break
                else:
                    if mode == "eval" and failures:  # the trace ran on the example when shapes were propagated
                        raise BackboneError(
                            f"{failures[-1]} on the example input's shape {tuple(example_input.shape)} in eval mode, "
                            f"so automtl cannot check that its torch.fx trace computes the same; make the forward run "
                            "on the example input")
        finally:
            put_back(buffers)
            for m, flag in training.items():
                m.training = flag
            python.restore()


def _check_inputs(example_input: torch.Tensor, mode: str):
    """The check batches to try, cheapest first (see :func:`check_trace`)."""
    N, C, H, W = example_input.shape
    counts = list(dict.fromkeys(([1] if mode == "eval" else []) + [2, N]))
    sides = list(dict.fromkeys([(min(H, s), min(W, s)) for s in CHECK_SIZES] + [(H, W)]))
    gen = torch.Generator().manual_seed(0)
    for h, w in sides:
        for n in counts:
            if example_input.is_floating_point():
                yield torch.rand((n, C, h, w), generator=gen).to(device=example_input.device, dtype=example_input.dtype)
            else:
                rows = torch.arange(n, device=example_input.device) % N
                yield example_input[rows, :, :h, :w].clone()


def _tensors(value, path: str = "output"):
    """``(path, tensor)`` for every tensor in a forward's result: tensors, sequences, mappings and dataclasses."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _tensors(v, f"{path}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _tensors(v, f"{path}[{i}]")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _tensors(getattr(value, f.name), f"{path}.{f.name}")


def saved_buffers(module: nn.Module) -> list:
    """``(buffer, a copy of its value)`` for each buffer of ``module``: what :func:`put_back` restores."""
    return [(b, b.detach().clone()) for b in module.buffers()]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN and infinities included (writing the value a tensor holds changes nothing)."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(
        torch.equal(a, b) or (a.is_floating_point() and torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True)))


def put_back(saved: list) -> None:
    """Copy each ``(tensor, saved value)`` pair's saved value back into the tensor (buffers a run moved)."""
    with torch.no_grad():
        for tensor, value in saved:
            tensor.copy_(value)


def _run(program, x: torch.Tensor, params: list, buffers: list, python: PythonState, input_grad: bool = True) -> tuple:
    """``program``'s tensor outputs on ``x`` (``{path: tensor}``) and the gradients of ``params`` (then of ``x``,
    when floating and ``input_grad``) of a fixed random weighting of them, from the saved buffers, Python state and
    random state 0; the gradients are an error's text where the backward fails. The program gets a copy of ``x``:
    a forward that writes into its input in place (``x.sub_(mean)``) runs."""
    put_back(buffers)
    python.restore()
    x = x.detach().requires_grad_(x.is_floating_point() and input_grad)
    wrt = params + ([x] if x.requires_grad else [])
    with seeded(x.device), contextlib.redirect_stderr(io.StringIO()):
        outs = dict(_tensors(program(x.clone())))
        gen = torch.Generator().manual_seed(1)
        terms = [(t * torch.randn(t.shape, generator=gen).to(t)).sum() for t in outs.values()
                 if t.is_floating_point() and t.requires_grad]
        # .backward(), not autograd.grad (reentrant checkpointing takes only the first); .grad is put back after
        kept = [w.grad for w in wrt]
        for w in wrt:
            w.grad = None
        try:
            if terms:
                sum(terms).backward()
            grads = [torch.zeros_like(w) if w.grad is None else w.grad for w in wrt]
        except RuntimeError as exc:  # an operation without a backward: compared as such
            grads = _first_line(exc)
        finally:
            for w, g in zip(wrt, kept):
                w.grad = g
    return {k: t.detach() for k, t in outs.items()}, grads


def _compare(backbone: nn.Module, own, gm: fx.GraphModule, x: torch.Tensor, buffers: list, python: PythonState,
             failures: list, input_grad: bool = True):
    """What differs between ``gm`` and ``backbone`` on ``x``: ``(what, how much)`` of the worst difference, or
    ``(None, 0.0)``; None when either fails on it (which, appended to ``failures``). ``own``: the backbone's forward
    as the graphs were traced (with their fixed arguments)."""
    named = [(name, p) for name, p in backbone.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    runs = []
    for who, program in (("the backbone's own forward", own), ("its torch.fx trace", gm)):
        try:
            runs.append((_run(program, x, params, buffers, python, input_grad), _run_again(program, x, buffers)))
        except BackboneError:
            raise
        except Exception as exc:  # a refusal of this size or mode
            failures.append(f"{who} fails ({_first_line(exc)})")
            return None
    ((outs, grads), again), ((touts, tgrads), tagain) = runs
    found = _outputs_apart(outs, touts)
    if found is not None:
        return found
    found = _outputs_apart(again, tagain)
    if found is not None:  # a second call differs: Python state the first call changed, frozen by the trace
        return f"{found[0]}, in a second call", found[1]
    if isinstance(grads, str) or isinstance(tgrads, str):
        if isinstance(grads, str) and isinstance(tgrads, str):
            return None, 0.0  # no backward in either (an operation without one): the outputs were compared
        return ("the gradients (" + (f"the trace's backward fails: {tgrads}" if isinstance(tgrads, str)
                                     else f"only the trace has a backward; the backbone's fails: {grads}") + ")"), math.inf
    names = [f"the gradient of {name}" for name, _ in named] + ["the gradient of the input"]
    scale = max([float(g.abs().max()) for g in grads if g.numel() and g.is_floating_point()] + [0.0])
    return _worst((names[i], a, relative_gap(b, a, floor=1e-4 * scale)) for i, (a, b) in enumerate(zip(grads, tgrads))) \
        or (None, 0.0)


def _with_fixed(backbone: nn.Module, fixed: Mapping):
    """``backbone`` called with the image and the ``fixed`` arguments: positional-only ones by position (with the
    defaults of those before them), the others by name."""
    try:
        params = list(inspect.signature(backbone.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        params = []
    positional = [p for p in params if p.kind is p.POSITIONAL_ONLY]
    last = max((i for i, p in enumerate(positional) if p.name in fixed), default=-1)
    args = [fixed[p.name] if p.name in fixed else p.default for p in positional[:last + 1]]
    kwargs = {k: v for k, v in fixed.items() if k not in {p.name for p in positional}}
    return lambda x: backbone(x, *args, **kwargs)


def _worst(gaps) -> Optional[tuple]:
    """``(what, gap)`` of the ``(what, reference, gap)`` whose gap is largest against its dtype's :func:`tolerance`,
    when that gap is beyond it; else None."""
    ratio, what, gap = max(((gap / tolerance(ref.dtype), what, gap) for what, ref, gap in gaps),
                           key=lambda t: t[0], default=(0.0, None, 0.0))
    return (what, gap) if ratio > 1 else None


def _run_again(program, x: torch.Tensor, buffers: list) -> dict:
    """``program``'s tensor outputs in a second call right after :func:`_run`'s: from the same buffers and random
    state, the Python state as the first call left it (a call counter, a warm-up ramp), without gradients."""
    put_back(buffers)
    with torch.no_grad(), seeded(x.device), contextlib.redirect_stderr(io.StringIO()):
        return {k: t.detach() for k, t in _tensors(program(x.clone()))}


def _outputs_apart(outs: dict, touts: dict) -> Optional[tuple]:
    """``(what, how much)`` where two runs' outputs differ beyond :data:`TOLERANCE`, else None."""
    if list(outs) != list(touts):
        return f"the outputs ({', '.join(outs) or 'no tensor'} against {', '.join(touts) or 'no tensor'})", math.inf
    for path, a in outs.items():
        b = touts[path]
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{path} ({tuple(a.shape)} {a.dtype} against {tuple(b.shape)} {b.dtype})", math.inf
    return _worst((k, outs[k], relative_gap(touts[k], outs[k])) for k in outs)


def tolerance(dtype: torch.dtype) -> float:
    """The largest :func:`relative_gap` two runs of the same operations may show in ``dtype``: :data:`TOLERANCE`,
    or 4 units in the last place where that is coarser (bfloat16: 0.03), so that a GPU's nondeterministic backward
    (atomic adds) cannot refuse a 16-bit backbone."""
    return max(TOLERANCE, 4 * torch.finfo(dtype).eps) if dtype.is_floating_point else TOLERANCE


def augmented_assignments(root: nn.Module, limit: int = 3) -> list:
    """``file:line`` of the first ``limit`` augmented assignments (``x += y``, ``x *= s``) to a plain name in the
    forwards of ``root``'s module classes: torch.fx records them out of place, so another name holding the same tensor
    keeps the old value in the trace and sees the new one in eager mode."""
    found: list = []
    for cls in dict.fromkeys(type(m) for m in root.modules()):
        forward = cls.__dict__.get("forward")
        try:
            lines, first = inspect.getsourcelines(forward)
            tree = ast.parse(textwrap.dedent("".join(lines)))
            where = inspect.getsourcefile(forward)
        except (TypeError, OSError, SyntaxError, ValueError):
            continue
        found += [f"{where}:{first + node.lineno - 1}" for node in ast.walk(tree)
                  if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name)]
        if len(found) >= limit:
            break
    return found[:limit]


def _raise_if_apart(name: str, mode: str, what, gap: float, requires_grad_tests: Sequence[str] = (),
                    augmented: Sequence[str] = ()) -> None:
    if what is None:
        return
    off = "differs" if math.isinf(gap) else f"off by {gap:.1%}" if gap < 10 else "off by more than 1000%"
    if requires_grad_tests:
        second = what.endswith(", in a second call")
        what = what.removesuffix(", in a second call")
        raise BackboneError(
            f"torch.fx's trace of {name} computes other {'gradients' if what.startswith('the gradient') else 'outputs'} "
            f"than its forward in {mode} mode ({what} {off} on a check batch "
            f"{'run again without gradients' if second else 'run as a training step'}): its forward branches on "
            f"`.requires_grad` at {', '.join(requires_grad_tests)}, where torch.fx keeps the branch an ordinary "
            "training step takes (its input not requiring gradients), so the other branch must compute the same; or it "
            "depends on something else the trace records as a constant (a call counter or other Python state, a "
            "random draw); compute the same values in both branches, or mark the module that does it as a leaf "
            "(leaf_modules=[ItsClass])")
    if not what.startswith("the gradient"):
        raise BackboneError(
            f"torch.fx's trace of {name} computes other outputs than its forward in {mode} mode ({what} {off} on a "
            "check batch): the forward depends on something the trace records as a constant (a Python random draw, "
            "a call counter or other Python state, code that asks whether it is being traced) or on what it does not "
            "record (a torch.autocast block: autocast around the whole model instead)"
            + (f", or an augmented assignment (`x += y` at {', '.join(augmented)}) to a tensor another name still holds, "
               "which torch.fx records out of place (`x = x + y`), so that other name keeps the old value (assign the "
               "new value to it too)" if augmented else "")
            + "; make that part tensor operations, or mark the module that does it as a leaf "
              "(leaf_modules=[ItsClass]) so it runs as one call")
    raise BackboneError(
        f"torch.fx's trace of {name} trains with other gradients than its forward in {mode} mode ({what} {off} on a "
        "check batch): the forward changes its backward in a way the trace does not record (a torch.no_grad() or "
        "torch.autocast block: use .detach(), or autocast around the whole model; a custom autograd.Function "
        "applied around Function.apply; a hook put on a tensor); change that, or mark the module that does it as a "
        "leaf (leaf_modules=[ItsClass]) so it runs as one call")


def relative_gap(a: torch.Tensor, reference: torch.Tensor, floor: float = 0.0) -> float:
    """The largest difference of ``a`` from ``reference``, each element's relative to its own size plus
    :data:`FLOOR` times the reference's largest finite value (and at least ``floor``); inf when a NaN or an
    infinity (of either sign) appears in one and not the other, or for integer tensors that differ.

    Shapes: ``a`` and ``reference`` the same shape."""
    if torch.equal(a, reference):  # the common case, and the cheap one
        return 0.0
    if not a.is_floating_point():
        return math.inf
    if not all(torch.equal(test(a), test(reference)) for test in (torch.isnan, torch.isposinf, torch.isneginf)):
        return math.inf
    finite = torch.isfinite(reference)
    if not finite.any():
        return 0.0
    a, reference = a.double()[finite], reference.double()[finite]
    scale = max(FLOOR * float(reference.abs().max()), floor, 1e-30)
    return float(((a - reference).abs() / (reference.abs() + scale)).max())
