"""Step 1 of the pipeline: trace the backbone with torch.fx, propagate shapes, cut at the features.

Everything later works on the :class:`Capture` this returns: a GraphModule whose output is
the feature node, with every node's ``tensor_meta`` filled in from the example input.

torch.fx turns ``self.training`` into a constant, so the backbone is traced twice: in eval
mode (``graph_module``, what evaluation, the compact model and saved files run) and in train
mode (``train_graph``, kept only when it differs: dropout, stochastic depth, ...). Both graphs
call the same modules. Before either is cut, each must compute the backbone's outputs and gradients in
its mode (:mod:`automtl.tracecheck`).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import io
import itertools
import operator
import os
import re
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.utils.checkpoint
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, _extract_tensor_metadata
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import BackboneError, TraceError, first_line as _first_line
from .features import META_LAYOUT, _module_paths, is_channels_last, laid_out, pick_feature_node
from .graphpasses import (STATE_WRITE_ADVICE, ancestors, functionalize, module_tensor, mutated_argument,
                          refuse_state_writes, user_line)
from .seeding import moved_generators, random_states, seeded
from .tracecheck import PythonState, check_trace, put_back, same_bits, saved_buffers


@dataclass
class Capture:
    """A traced, shape-annotated and cut backbone.

    ``train_graph`` is the train-mode graph over the same modules when the backbone behaves
    differently in train mode (its nodes carry no shapes), else None.
    """

    graph_module: fx.GraphModule
    feature_node: str
    input_shape: tuple
    feature_shape: tuple
    train_graph: Optional[fx.Graph] = None
    notes: list = field(default_factory=list)
    #: The example input's dtype: what the backbone takes (one that casts its input may compute in another).
    input_dtype: torch.dtype = torch.float32

    @property
    def conv_nodes(self) -> list[fx.Node]:
        """The Conv2d call sites, in execution order."""
        return [n for n in self.graph_module.graph.nodes if is_conv_node(self.graph_module, n)]


def is_conv_node(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Conv2d)


#: Module kinds traced as one call (never through their forward): normalisation layers branch on
#: ``self.training`` and read running statistics, which a trace through them would bake in.
NORM_LEAVES = (nn.modules.batchnorm._NormBase, nn.GroupNorm)
#: Convolutions of any class are traced as one call too: a subclass outside ``torch.nn`` (timm's
#: ``ScaledStdConv2d``, which standardises its weight, or ``Conv2dSame``, which pads from the input's size)
#: is then a policy layer like any conv, instead of ops a trace through its forward would scatter.
CONV_LEAVES = (nn.Conv2d,)


class _ValueProxy(fx.Proxy):
    """A traced value that records, on its tracer, when Python asks for its value (``int()``, ``float()``,
    ``len()``, ``bool()``, iteration): the trace then fails, and :func:`_trace_graph` reads the buffers that value
    is made from as constants on its next try."""

    def _needed(self, how: str):
        self.tracer.value_needed = self.node
        raise TypeError(f"{how}() needs the value of a tensor that torch.fx traces symbolically")

    def __int__(self):
        self._needed("int")

    def __float__(self):
        self._needed("float")

    def __index__(self):
        self._needed("index")

    def __complex__(self):
        self._needed("complex")

    def __len__(self):
        self.tracer.value_needed = self.node
        return super().__len__()


class _BufferProxy(_ValueProxy):
    """A buffer read in the forward: a graph value, whose size, dtype and device answer from the buffer itself
    (shapes are constants, as torch.fx answers them for parameters), so code asking them still traces."""

    def __init__(self, node: fx.Node, tracer, buffer: torch.Tensor):
        super().__init__(node, tracer)
        self.buffer = buffer

    shape = property(lambda self: self.buffer.shape)
    ndim = property(lambda self: self.buffer.ndim)
    dtype = property(lambda self: self.buffer.dtype)
    device = property(lambda self: self.buffer.device)

    def size(self, *dim):
        return self.buffer.size(*dim)

    def dim(self) -> int:
        return self.buffer.dim()

    def numel(self) -> int:
        return self.buffer.numel()

    def nelement(self) -> int:
        return self.buffer.nelement()

    def __len__(self) -> int:
        return len(self.buffer)

    def __setitem__(self, index: Any, value: Any) -> None:
        caller = traceback.extract_stack(limit=2)[0]
        raise BackboneError(
            f"the backbone assigns into its own tensor {self.node.target!r} during the forward at "
            f"{caller.filename}:{caller.lineno} ({(caller.line or '').strip()}); {STATE_WRITE_ADVICE}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "data":  # ``self.mean.data = v``: a write into the buffer, recorded as one
            self.tracer.create_proxy("call_method", "copy_", (self, value), {})
        else:
            super().__setattr__(name, value)


class _Tracer(fx.Tracer):
    """The default tracer, plus normalisation layers of any class and the user's extra leaf module types.

    Buffers are read as graph values (``get_attr``) like parameters, except those named in ``constants``: torch.fx's
    default reads them as plain tensors, so ``self.running_mean.view(1, -1, 1, 1)`` became a constant frozen at
    trace time (what training or a later ``load_state_dict`` put in the buffer was never read), and an in-place
    update of a buffer ran once, on the backbone, while tracing. Code that needs a buffer's value in Python
    (``int(self.factor)``) does not trace that way: the trace fails, ``value_needed`` is the node whose value
    Python asked for, and :func:`_trace_graph` traces again with the buffers it is made from in ``constants``.
    """

    def __init__(self, leaf_modules: Sequence[type] = (), constants: frozenset = frozenset(),
                 leaf_paths: frozenset = frozenset()):
        super().__init__()
        self.record_stack_traces = True  # errors name the user's line of a node
        self._extra_leaves = tuple(leaf_modules) + NORM_LEAVES + CONV_LEAVES
        self._leaf_paths = leaf_paths  # modules (by path) run as one call: see capture
        self._constants = constants
        self.value_needed: Optional[fx.Node] = None
        self.requires_grad_tests: list = []  # "file:line" of each `x.requires_grad` the trace decided
        self._needs_grad: dict = {}

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ValueProxy(node, self)

    def iter(self, obj: fx.Proxy):
        self.value_needed = obj.node
        return super().iter(obj)

    def to_bool(self, obj: fx.Proxy) -> bool:
        """``if x.requires_grad:`` on a traced value is decided as in an ordinary training step: true where the
        value is computed from a trainable parameter, false for the input and what only buffers and constants
        make (torchvision's memory-efficient DenseNet checkpoints its layers only on the first kind); the line
        is recorded. Everything else is refused as torch.fx refuses it. The trace check then runs the backbone
        as training does (its input not requiring gradients) and a second time without gradients, where
        ``requires_grad`` is false everywhere, so a branch that computes other values there is refused."""
        if isinstance(obj, fx.proxy.Attribute) and obj.attr == "requires_grad" and isinstance(obj.root, fx.Proxy):
            value = self._requires_grad(obj.root.node)
            frame = next((f for f in reversed(traceback.extract_stack()) if _is_user_file(f.filename)), None)
            self.requires_grad_tests.append(f"{frame.filename}:{frame.lineno}" if frame else "the forward")
            return value
        self.value_needed = obj.node
        return super().to_bool(obj)

    def _requires_grad(self, node: fx.Node) -> bool:
        """Whether ``node``'s value requires gradients in a training step whose input does not."""
        for n in node.graph.nodes:  # creation order: every input is decided before its users
            if n not in self._needs_grad:
                self._needs_grad[n] = self._decide_requires_grad(n)
            if n is node:
                break
        return self._needs_grad[node]

    def _decide_requires_grad(self, n: fx.Node) -> bool:
        if n.op == "placeholder":
            return False
        if n.op == "get_attr":
            try:
                value = functools.reduce(getattr, n.target.split("."), self.root)
            except AttributeError:
                return False
            return isinstance(value, torch.Tensor) and value.requires_grad
        if n.op == "call_method" and n.target in ("detach", "detach_"):
            return False
        if n.op == "call_function" and n.target in (torch.detach, torch.Tensor.detach):
            return False
        if n.op == "call_method" and n.target == "requires_grad_":
            return True
        if n.op == "call_module":
            try:
                if any(p.requires_grad for p in self.root.get_submodule(n.target).parameters()):
                    return True
            except AttributeError:
                pass
        return any(self._needs_grad.get(a, False) for a in n.all_input_nodes)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self._extra_leaves) or qualname in self._leaf_paths:
            return True
        return super().is_leaf_module(m, qualname)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if isinstance(attr_val, torch.Tensor) and not isinstance(attr_val, nn.Parameter):
            for name, buffer in self.root.named_buffers():
                if buffer is attr_val and name not in self._constants:
                    if name not in parameter_proxy_cache:
                        parameter_proxy_cache[name] = self.create_proxy(
                            "get_attr", name, (), {}, proxy_factory_fn=lambda node: _BufferProxy(node, self, buffer))
                    return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)


_LIBRARY_DIRS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(__file__) + os.sep)


def _is_user_file(filename: str) -> bool:
    """Not torch's or automtl's own code (torchvision's and the user's are someone's model code)."""
    return not filename.startswith(_LIBRARY_DIRS) and "<" not in filename


def _user_frame(exc: BaseException) -> Optional[traceback.FrameSummary]:
    """The innermost frame of the traceback that is not in torch or automtl: the user's line at fault."""
    frames = traceback.extract_tb(exc.__traceback__)
    return next((fr for fr in reversed(frames) if _is_user_file(fr.filename)), None)


def _faulty_module(exc: BaseException, backbone: nn.Module) -> str:
    """Name of the module whose forward was running when tracing failed."""
    return _module_name(*_faulty_path(exc, backbone), backbone)


def _module_name(path: Optional[str], cls: Optional[type], backbone: nn.Module) -> str:
    # the class with its module: leaf_modules takes the class itself, and two libraries' classes may share a name
    return f"{path or '<root>'} ({cls.__module__}.{cls.__qualname__})" if cls is not None else type(backbone).__name__


def _faulty_path(exc: BaseException, backbone: nn.Module) -> tuple:
    """``(path, class)`` of the innermost module whose forward was running when tracing failed (path "" for the
    backbone itself), or ``(None, None)``."""
    names = {id(m): n for n, m in backbone.named_modules()}
    tb = exc.__traceback__
    found = (None, None)
    while tb is not None:
        self_obj = tb.tb_frame.f_locals.get("self")
        if isinstance(self_obj, nn.Module) and id(self_obj) in names:
            found = (names[id(self_obj)], type(self_obj))
        tb = tb.tb_next
    return found


def _refuse_rebound_state(backbone: nn.Module, before: dict) -> None:
    """Refuse a forward that assigned a module tensor anew (``self.count += 1``, ``self.mean = 0.9 * self.mean +
    ...``): the trace put a graph value there, and automtl would drop the update."""
    for name, t in _state(backbone).items():
        if before.get(name) is not t:
            raise BackboneError(
                f"the backbone assigns its own tensor {name!r} during the forward (self.{name.rsplit('.', 1)[-1]} = "
                f"... or +=); {STATE_WRITE_ADVICE}")


def _state(backbone: nn.Module) -> dict:
    return {**dict(backbone.named_parameters()), **dict(backbone.named_buffers())}


#: The autograd function whose backward is its forward's gradient (recomputed): activation checkpointing.
_SAME_GRADIENT = torch.utils.checkpoint.CheckpointFunction


@contextlib.contextmanager
def _refusing_autograd_functions():
    """While tracing, a ``torch.autograd.Function`` applied to a traced value is refused: torch.fx records its
    forward's operations and loses its backward (a straight-through estimator trained with gradient 0, a
    gradient reversal layer with the sign flipped). Caught inside ``Function.apply``, where every call passes
    (``round_ste = RoundSTE.apply`` bound at import included): the hook is the helper it hands its arguments to."""
    import torch._functorch.utils as functorch_utils

    original = functorch_utils.unwrap_dead_wrappers

    def unwrap_dead_wrappers(args):
        caller = sys._getframe(1).f_locals
        cls, kwargs = caller.get("cls"), caller.get("kwargs") or {}
        if (isinstance(cls, type) and issubclass(cls, torch.autograd.Function) and cls is not _SAME_GRADIENT
                and any(isinstance(a, fx.Proxy) for a in (*args, *kwargs.values()))):
            raise BackboneError(
                f"the backbone applies the custom autograd function {cls.__qualname__}, whose backward torch.fx "
                "cannot keep (the converted model would train with the gradient of its forward instead); mark the "
                "module that applies it as a leaf (leaf_modules=[ItsClass]) so it runs as one call")
        return original(args)

    functorch_utils.unwrap_dead_wrappers = unwrap_dead_wrappers
    try:
        yield
    finally:
        functorch_utils.unwrap_dead_wrappers = original


def _refuse_hooks(backbone: nn.Module, graphs: Sequence[fx.Graph]) -> None:
    """Refuse hooks the converted model would not run: global module hooks, backward hooks (torch.fx keeps no
    autograd hook), forward hooks on the backbone itself (torch.fx calls its forward directly) and on modules
    called as one operation (they would run on the supermodel's folded batch, be deep-copied into task copies with
    what they read, and be lost by save). Forward hooks on modules torch.fx traces through are recorded as the
    operations they run, and stay."""
    from torch.nn.modules import module as torch_module

    globals_ = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks")
    if any(getattr(torch_module, name, None) for name in globals_):
        raise BackboneError("global module hooks are registered (torch.nn.modules.module.register_module_forward_hook "
                            "or its siblings), which the converted model would not run as the backbone does; remove "
                            "them while converting")
    called = {n.target for graph in graphs for n in graph.nodes if n.op == "call_module"}
    for name, m in backbone.named_modules():
        what = f"module {name!r} ({type(m).__name__})" if name else f"the backbone {type(m).__name__} itself"
        if m._backward_hooks or m._backward_pre_hooks:
            raise BackboneError(f"{what} has a backward hook, which torch.fx does not keep (the converted model would "
                                "train without it); remove it, or write its effect in an autograd function of a leaf module")
        if (m._forward_hooks or m._forward_pre_hooks) and (not name or name in called):
            raise BackboneError(f"{what} has a forward hook, which the converted model would not run as the backbone "
                                "does; write its effect in the backbone's forward instead")
        if "forward" in vars(m) and (not name or name in called):
            raise BackboneError(f"{what} has a forward set on the instance, which torch.fx and the converted model "
                                "do not call (they call its class's); write it in a subclass instead")
        if (type(m).__call__ is not nn.Module.__call__ or type(m)._call_impl is not nn.Module._call_impl) \
                and (not name or name in called):
            raise BackboneError(f"{what} overrides __call__ or _call_impl, which torch.fx and the converted model do "
                                "not run (they call forward); write what it does in forward instead")

        for tensor_name, p in getattr(m, "parametrizations", {}).items():
            moved = _moving_state(m, tensor_name, p)
            if moved:
                raise BackboneError(
                    f"{what} has a parametrization whose state changes each time it computes {tensor_name!r} in "
                    f"training ({type(p[0]).__name__}'s {', '.join(moved)}, as spectral_norm's power iteration does), "
                    "and the compact model calls a shared module once per group of tasks; fold it into the weight "
                    "first (torch.nn.utils.parametrize.remove_parametrizations)")


def _moving_state(module: nn.Module, tensor_name: str, parametrizations: nn.ModuleList) -> list:
    """The state a parametrization changes when it computes ``module.<tensor_name>`` in train mode, by name: its
    buffers, frozen parameters and tensor attributes, read again after each of two computations and compared with
    what they were (orthogonal's ``base`` stays; spectral_norm's ``_u`` and ``_v`` move, in place or rebound). The
    module's state is put back afterwards, the same objects with the same values."""
    def state() -> dict:
        found = {}
        for i, f in enumerate(parametrizations):
            found.update({(i, "buffer", n): b for n, b in f._buffers.items() if isinstance(b, torch.Tensor)})
            found.update({(i, "parameter", n): q for n, q in f._parameters.items()
                          if isinstance(q, torch.Tensor) and not q.requires_grad})
            found.update({(i, "attribute", n): v for n, v in vars(f).items() if isinstance(v, torch.Tensor)})
        return found

    kept = state()
    if not kept:
        return []
    values = {k: v.detach().clone() for k, v in kept.items()}
    modes = {f: f.training for f in parametrizations}
    moved: list = []
    try:
        with torch.no_grad():
            parametrizations.train()
            for _ in range(2):
                getattr(module, tensor_name)
                now = state()
                moved += [k[2] for k, v in values.items() if k[2] not in moved and (
                    k not in now or now[k].shape != v.shape or not torch.equal(now[k], v))]
        return moved
    finally:
        with torch.no_grad():
            for (i, kind, name), original in kept.items():
                f = parametrizations[i]
                if kind == "buffer":
                    f._buffers[name] = original
                elif kind == "parameter":
                    f._parameters[name] = original
                else:
                    object.__setattr__(f, name, original)
                original.copy_(values[(i, kind, name)])
        for f, mode in modes.items():
            f.train(mode)


def _trace_graph(backbone: nn.Module, leaf_modules: Sequence[type], concrete_args: Optional[dict],
                 leaf_paths: frozenset = frozenset()) -> fx.Graph:
    """The backbone's graph in its current mode. Buffers are graph values, except those whose value Python reads
    (``int(self.repeats)``): found one failed try at a time, those are traced as constants (torch.fx's default),
    and then must not change in the forward (:func:`_refuse_changed_constants`). A try that fails for another
    reason, or whose failure no buffer explains, is followed by one with every buffer a constant.

    ``graph.constant_buffers``: the buffers traced as constants, and why (``graph.constant_reason``);
    ``graph.requires_grad_tests``: where the trace decided a ``.requires_grad``."""
    before, python, device = _state(backbone), PythonState(backbone), _device_of(backbone)
    names = frozenset(name for name, _ in backbone.named_buffers())
    saved = saved_buffers(backbone)  # each try starts from the same values
    fixed = _with_defaults(backbone, concrete_args)
    constants, read = frozenset(), frozenset()  # traced as constants; of those, the ones Python reads
    while True:
        try:  # draws the forward makes while traced come from, and go back to, the caller's random state
            with _refusing_autograd_functions(), seeded(device, seed=None), _RefusingEagerDraws():
                states = random_states(device)
                tracer = _Tracer(leaf_modules, constants=constants, leaf_paths=leaf_paths)
                graph = tracer.trace(backbone, concrete_args=fixed)
                _drop_fixed_arguments(graph, fixed)
                graph.requires_grad_tests = tracer.requires_grad_tests  # read by capture's trace check
                graph.constant_buffers = constants  # read by capture's check of the writes
                graph.constant_reason = (f"Python reads the value of {', '.join(map(repr, sorted(read)))}"
                                         if constants == read else "the backbone traces no other way")
                _refuse_frozen_draws(moved_generators(states, device)
                                     + [f"the generator {name!r}" for name in python.moved_generators(backbone)])
            failure = None
        except BackboneError:
            raise
        except _EagerDraw as draw:
            frame = _user_frame(draw)
            _refuse_frozen_draws([f"a torch generator (with {draw.args[0]}"
                                  + (f" at {frame.filename}:{frame.lineno}: {frame.line.strip()}" if frame and frame.line
                                     else "") + ")"], fixed=True)
        except Exception as exc:  # fx raises many types; all mean "not traceable as written"
            failure = exc
        finally:  # what the forward kept in Python attributes while traced (a cache of symbolic values) is undone
            python.restore(added="proxies")
        _refuse_rebound_state(backbone, before)
        try:
            if failure is None:
                _refuse_changed_constants(backbone, saved, graph)
                _refuse_constant_writes(backbone, graph)
                return graph
        finally:  # a constant the forward changed in Python (refused above, or on a failed try) is put back
            put_back(saved)
        needed = _buffers_needed(tracer, names)
        if needed and not needed <= constants:
            constants, read = constants | needed, read | needed
        elif constants != names:
            constants = names
        else:
            break
    frame = _user_frame(failure)
    where = f" at {frame.filename}:{frame.lineno} ({frame.line.strip() if frame.line else ''})" if frame else ""
    path, cls = _faulty_path(failure, backbone)
    remedy = ("fix its Python control flow with concrete_args, or convert the part of the model that is a CNN (such "
              "as its .backbone or .features)" if not path else "mark that module as a leaf (leaf_modules=[ItsClass]) or fix its Python control flow with "
                   "concrete_args")
    callable_argument = r"argument of type: <class '(function|method|builtin_function_or_method|functools\.partial)'>"
    if isinstance(failure, NotImplementedError) and re.search(callable_argument, str(failure)):
        remedy = ("the forward passes a Python function to a tensor operation there (a gradient hook, register_hook, or "
                  "a callback), which torch.fx cannot record and the converted model would not keep: remove it while "
                  "converting" + (", or mark that module as a leaf (leaf_modules=[ItsClass])" if path else ""))
    factory = re.match(r"(zeros|ones|empty|rand|randn)\(\) takes 1 positional argument but \d+ were given", str(failure))
    if isinstance(failure, TypeError) and factory:
        remedy = (f"torch.fx passes sizes it reads from the input to torch.{factory[1]} only as one tuple: write "
                  f"torch.{factory[1]}((n, c, h, w), ...) rather than torch.{factory[1]}(n, c, h, w, ...)")
    raise TraceError(
        f"torch.fx cannot trace the backbone in module {_module_name(path, cls, backbone)}{where}: "
        f"{_first_line(failure, limit=None)}; {remedy}, then try again", path, f"{_first_line(failure)}{where}"
    ) from failure


def _with_defaults(backbone: nn.Module, concrete_args: Optional[dict]) -> Optional[dict]:
    """``concrete_args`` plus each argument of the forward after the image that has a default, at its default
    (``forward(self, x, attn_mask=None)``): the converted model takes the image alone, as the backbone called with
    one argument does."""
    try:
        params = list(inspect.signature(backbone.forward).parameters.values())
    except (TypeError, ValueError):  # a forward without a signature Python can read
        return concrete_args
    given = dict(concrete_args or {})
    if params and params[0].kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
        for p in params[1:]:
            if p.default is not p.empty and p.name not in given and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                given[p.name] = p.default
    return given or None


def _drop_fixed_arguments(graph: fx.Graph, fixed_names) -> None:
    """Remove the inputs torch.fx keeps for the fixed arguments ``fixed_names`` (with the checks it adds that a call
    passes the fixed value) and unused ``*args``/``**kwargs``: the graph's one input is the image. A fixed tuple,
    list or dict made torch.fx generate code that flattens its arguments: plain code again, outputs as traced."""
    names = set(fixed_names or ())
    for p in [n for n in graph.nodes if n.op == "placeholder"][1:]:
        for user in list(p.users):
            checks = [user] if user.target is fx._symbolic_trace._assert_is_none else \
                [*user.users, user] if user.target is operator.eq and all(u.target is torch._assert for u in user.users) \
                else []
            for n in checks:
                graph.erase_node(n)
        fixed = p.target.startswith("*") or p.target in names or p.target.rsplit("_", 1)[0] in names
        if fixed and not p.users:
            graph.erase_node(p)
    codegen = graph._codegen
    if isinstance(codegen, fx.graph._PyTreeCodeGen):
        out = next(n for n in graph.nodes if n.op == "output")
        if codegen.pytree_info.out_spec is not None:
            flat = out.args[0] if isinstance(out.args[0], (list, tuple)) else [out.args[0]]
            out.args = (torch.utils._pytree.tree_unflatten(list(flat), codegen.pytree_info.out_spec),)
        graph._codegen = fx.graph.CodeGen()


def _buffers_needed(tracer: _Tracer, buffers: frozenset) -> frozenset:
    """The buffers the value Python asked for in a failed trace is made from, when it is made from buffers and
    constants only (a value of the input or of a parameter stays symbolic whatever the buffers are)."""
    node = tracer.value_needed
    if node is None:
        return frozenset()
    found = set()
    for n in ancestors(node):
        if n.op == "placeholder" or (n.op == "get_attr" and n.target not in buffers and _is_parameter(tracer.root, n.target)):
            return frozenset()
        if n.op == "get_attr" and n.target in buffers:
            found.add(n.target)
    return frozenset(found)


def _is_parameter(root: nn.Module, target: str) -> bool:
    try:
        return isinstance(root.get_parameter(target), nn.Parameter)
    except AttributeError:
        return False


def _refuse_changed_constants(backbone: nn.Module, saved: list, graph: fx.Graph) -> None:
    """Refuse a forward that changed a buffer traced as a constant: Python ran that change once, while traced, and
    the converted model would never make it (``self.count += 1`` beside ``int(self.repeats)``)."""
    values = {id(b): v for b, v in saved}
    for name, buffer in backbone.named_buffers():
        if name in graph.constant_buffers and not same_bits(buffer, values[id(buffer)]):
            raise BackboneError(
                f"the backbone changes its own tensor {name!r} in place during the forward while torch.fx traces it as "
                f"a constant ({graph.constant_reason}), so the converted model would never make that change; "
                f"{STATE_WRITE_ADVICE}")


def _refuse_constant_writes(backbone: nn.Module, graph: fx.Graph) -> None:
    """Refuse a graph that writes into a buffer traced as a constant: the values read from it in Python, or by
    operations on it alone, were taken once, while traced, and would never see the write."""
    for node in graph.nodes:
        target = mutated_argument(backbone, node)
        state = module_tensor(target) if target is not None else None
        if state is not None and state.target in graph.constant_buffers:
            raise BackboneError(
                f"the backbone writes its own tensor {state.target!r} during the forward{user_line(node)} while "
                f"torch.fx traces it as a constant ({graph.constant_reason}), so the converted model would read the "
                "value it had while traced; compute that value in the forward without keeping it in a buffer, or mark "
                "the module as a leaf (leaf_modules=[ItsClass])")


class _EagerDraw(Exception):
    """A random operation ran on real tensors while the backbone was traced (``args[0]``: the operation)."""


class _RefusingEagerDraws(TorchDispatchMode):
    """While tracing, stop at any random operation that runs: traced ones are recorded, not run, so one that runs is
    on no traced value and its draw would be frozen, whichever generator it draws from (a global one, a module's,
    a helper object's, one forked and put back)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch.Tag.nondeterministic_seeded in func.tags:
            raise _EagerDraw(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def _refuse_frozen_draws(moved: list, fixed: bool = False) -> None:
    """Refuse a forward that drew random numbers while traced: a traced random operation (dropout,
    ``torch.rand(x.shape)``) draws nothing until it runs, so a draw during the trace was made in Python on no traced
    value, and the trace froze its outcome (``if torch.rand(1).item() < p``, ``torch.randn(8)``, ``random.random()``)
    into every call of the converted model (a leaf draws only when it runs). ``moved``: what drew, as the message
    names it (a global generator, one a module owns, a torch operation caught as it ran); ``fixed``: add the advice
    for a draw meant to be the same in every call."""
    if moved:
        raise BackboneError(
            f"the backbone draws from {' and '.join(moved)} while traced, on no traced value (such "
            "as `torch.rand(1).item() < p`, `torch.randn(8)` or `random.random()`), so torch.fx would freeze that one "
            "draw into the converted model; draw on the input's shape and device (torch.rand(x.shape[0], 1, 1, 1, "
            "device=x.device)) or mark the module that draws as a leaf (leaf_modules=[ItsClass])"
            + ("; a draw meant to be the same in every call belongs in __init__, kept with register_buffer" if fixed
               else ""))


def _device_of(module: nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (the CPU for one with neither)."""
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def trace(backbone: nn.Module, leaf_modules: Sequence[type] = (), concrete_args: Optional[dict] = None) -> fx.GraphModule:
    """Symbolically trace ``backbone`` (in its current mode); a failure names the module and the Python line at fault."""
    return fx.GraphModule(backbone, _trace_graph(backbone, leaf_modules, concrete_args), type(backbone).__name__)


def _tensor_meta(node: fx.Node):
    meta = node.meta.get("tensor_meta")
    return meta if hasattr(meta, "shape") else None


def capture(
    backbone: nn.Module,
    example_input: torch.Tensor,
    feature_node: Optional[str] = None,
    leaf_modules: Sequence[type] = (),
    concrete_args: Optional[dict] = None,
) -> Capture:
    """Trace ``backbone`` on ``example_input`` and cut it at the feature node.

    The default feature node is the deepest feature map before the spatial resolution collapses
    (global pooling, flatten) and before a classifier layer; ``feature_node`` names a node or a
    module path (``"layer4"``; ``"block@1"`` for the second call of a module the forward calls several times). The backbone is copied first: converting never changes the user's
    module. Pruning masks and old-style weight norm are folded into the copy's weights.
    """
    if not isinstance(backbone, nn.Module):
        raise BackboneError(f"the backbone must be a torch.nn.Module, got {type(backbone).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise BackboneError(
            f"example_input must be a tensor of shape (N, C, H, W), got {type(example_input).__name__}"
        )
    if example_input.dim() != 4:
        raise BackboneError(
            f"example_input has shape {tuple(example_input.shape)} but a CNN backbone needs a 4-D input "
            "(N, C, H, W); add the batch dimension, e.g. torch.randn(1, 3, 64, 64)"
        )
    if torch.is_inference_mode_enabled():
        raise BackboneError("automtl converts the backbone into a model to train, and tensors made under "
                            "torch.inference_mode() can never be trained; convert it outside inference_mode")
    _refuse_wrappers(backbone)
    # before capture sets the modes: a layer put in eval mode by hand in a train-mode backbone is frozen on purpose
    frozen = {name: "the backbone is in train mode but" for name in _frozen_modules(backbone)} if backbone.training \
        else {}
    thawed = [] if backbone.training else _thawed_modules(backbone)  # and the reverse: one left in train mode
    backbone = copy_backbone(backbone)
    was_training = backbone.training
    as_one_call: dict = {}  # module path -> why it does not trace: run as one call, if cut away with the classifier
    while True:
        try:
            eval_graph = _trace_graph(backbone.eval(), leaf_modules, concrete_args, frozenset(as_one_call))
            frozen.update({name: "the backbone's train()" for name in _frozen_modules(backbone.train())
                           if name not in frozen})
            train_graph = _trace_graph(backbone, leaf_modules, concrete_args, frozenset(as_one_call))
            break
        except TraceError as exc:
            if not exc.path or exc.path in as_one_call or len(as_one_call) >= MAX_MODULES_AS_ONE_CALL:
                _refuse_failing_forward(backbone, example_input)  # a bug in the forward is not torch.fx's limit
                raise
            as_one_call[exc.path] = exc
        finally:
            backbone.train(was_training)
    with _as_first_refusal(as_one_call):  # a refusal of what runs as one call comes first
        _refuse_hooks(backbone, [eval_graph, train_graph])
        gm = fx.GraphModule(backbone, eval_graph, type(backbone).__name__)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            others = [str(n.target) for n in placeholders[1:]]
            raise BackboneError(
                f"the backbone's forward takes {len(placeholders)} inputs ({', '.join(str(n.target) for n in placeholders)})"
                " but automtl needs exactly one image tensor; give the others fixed values with concrete_args="
                f"{{{', '.join(f'{o!r}: ...' for o in others)}}} (or defaults in the forward's signature), or wrap the "
                "backbone in a module whose forward(x) takes one tensor")
        _propagate(gm, example_input)
        tgm = fx.GraphModule(backbone, train_graph, type(backbone).__name__)
        assumed = list(dict.fromkeys(getattr(eval_graph, "requires_grad_tests", [])
                                     + getattr(train_graph, "requires_grad_tests", [])))
        check_trace(backbone, {"eval": gm, "train": tgm}, example_input, requires_grad_tests=assumed,
                    fixed_arguments=concrete_args)
        writes = functionalize(gm, gm.graph)
        notes: list = []
        node = pick_feature_node(gm, feature_node, notes)
        refuse_state_writes(writes, gm.graph, node)
        if feature_node is None:
            notes.extend(_dropped_body(gm, node))
        for note in notes:
            warnings.warn(note, stacklevel=3)
        if not any(is_conv_node(gm, n) for n in ancestors(node)):
            raise BackboneError(
                f"the backbone {type(backbone).__name__} has no Conv2d before its feature node {node.name!r}; "
                "automtl converts convolutional backbones, so give it one with nn.Conv2d layers"
            )
        train_graph = _train_counterpart(backbone, gm, tgm, node, example_input)
        _cut(gm.graph, node)
        if is_channels_last(node):  # heads and policy layers take (N, C, H, W)
            node = _channels_first(gm.graph)
            if train_graph is not None:
                _channels_first(train_graph)
        _refuse_kept_untraceable(as_one_call, [gm.graph] + ([train_graph] if train_graph is not None else []))
        _refuse_frozen_modules(backbone, gm.graph, frozen)
        _refuse_thawed_modules(backbone, gm.graph, thawed)
        _refuse_stateful_leaves(backbone, gm.graph, example_input)
    for path, why in as_one_call.items():
        notes.append(f"module {path!r} does not trace with torch.fx ({why.reason}); "
                     "the features are cut before it, so it ran as one call and is left out with the classifier")
        warnings.warn(notes[-1], stacklevel=3)
    train_graph = _drop_if_same(gm.graph, train_graph, {name for name, _ in backbone.named_parameters()}
                                | {name for name, _ in backbone.named_buffers()})
    _delete_unused(gm, [gm.graph] + ([train_graph] if train_graph is not None else []))
    gm.recompile()
    return Capture(gm, node.name, tuple(example_input.shape), tuple(_tensor_meta(node).shape), train_graph, notes,
                   example_input.dtype)


@contextlib.contextmanager
def _as_first_refusal(as_one_call: dict):
    """Where modules that do not trace run as one call (``as_one_call``), any refusal before the cut shows that
    doing so did not work (the features need the module, or a name inside it was asked for): the module's own
    trace refusal is raised instead, the other as its cause."""
    try:
        yield
    except BackboneError as exc:
        if as_one_call and not isinstance(exc, TraceError):
            raise next(iter(as_one_call.values())) from exc
        raise


#: How many modules that torch.fx cannot trace capture tries running as one call (see _refuse_kept_untraceable).
MAX_MODULES_AS_ONE_CALL = 8


def _refuse_kept_untraceable(as_one_call: dict, graphs: Sequence[fx.Graph]) -> None:
    """A module torch.fx cannot trace was run as one call (``as_one_call``: its path -> the refusal its trace
    gave); that is right only where the cut leaves it out (timm's VGG head, ``ConvMlp``, branches on its input's
    size). One the features need is refused as its trace was: its convolutions would not be policy layers, and an
    ``.automtl`` file could not describe it."""
    for graph in graphs:
        for n in graph.nodes:
            if n.op == "call_module" and n.target in as_one_call:
                raise as_one_call[n.target]


def _refuse_wrappers(backbone: nn.Module) -> None:
    """Wrappers around a model, TorchScript modules, lazy layers not yet built and gradient hooks on its tensors,
    each refused with its own remedy (a trace of them fails far from the cause, or drops the hook)."""
    wrapped = {"OptimizedModule": "torch.compile", "DataParallel": "nn.DataParallel",
               "DistributedDataParallel": "DistributedDataParallel"}
    for name, m in backbone.named_modules():
        if isinstance(m, torch.jit.ScriptModule):
            raise BackboneError(f"{f'module {name!r}' if name else 'the backbone'} is a TorchScript module (torch.jit.script "
                                "or trace), whose parameters and train/eval mode torch.fx cannot reach; pass the eager "
                                "nn.Module instead")
        kind = wrapped.get(type(m).__name__)
        if kind is not None and type(m).__module__.startswith("torch."):
            inner = "_orig_mod" if kind == "torch.compile" else "module"
            where = f"module {name!r}" if name else "the backbone"
            raise BackboneError(f"{where} is wrapped by {kind}; pass the model it wraps ({'.'.join(filter(None, ['backbone', name, inner]))}) "
                                "and wrap the converted model instead")
        hooked = next((f"{name + '.' if name else ''}{key}" for key, t in (*m.named_parameters(recurse=False),
                                                                          *m.named_buffers(recurse=False))
                       if getattr(t, "_backward_hooks", None) or getattr(t, "_post_accumulate_grad_hooks", None)), None)
        if hooked is not None:  # (a copy of the backbone would not even show them: tensors are copied without hooks)
            raise BackboneError(f"tensor {hooked!r} has a gradient hook (register_hook), which the converted model's "
                                "copies of it do not keep; remove it while converting")
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
            raise BackboneError(f"module {name or type(m).__name__!r} ({type(m).__name__}) has lazy parameters not yet "
                                "built; run the backbone once on an example input before converting it")


def _frozen_modules(backbone: nn.Module) -> list:
    """Paths of the norm and dropout layers in eval mode whose eval mode differs from their train mode: a norm with
    running statistics, a dropout of probability above 0 (an InstanceNorm without running statistics, a dropout of 0
    compute the same in both)."""
    found = []
    for name, m in backbone.named_modules():
        if m.training:
            continue
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats \
                or isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            found.append(name)
    return found


@contextlib.contextmanager
def _eager_eval_run(backbone: nn.Module, example_input: torch.Tensor, grad: bool = False):
    """Run the backbone's own forward once on the example input, in eval mode, without gradients (``grad``: with
    them), from random state 0 (its stderr swallowed); yields the buffers as they were (``(tensor, value)`` pairs: the
    run's changes can be read in the block). Afterwards its buffers, Python attributes, modes and the random states are
    as before."""
    modes = {m: m.training for m in backbone.modules()}
    buffers, python = saved_buffers(backbone), PythonState(backbone)
    try:
        with torch.set_grad_enabled(grad), seeded(example_input.device), contextlib.redirect_stderr(io.StringIO()):
            backbone.eval()(example_input)
        yield buffers
    finally:
        put_back(buffers)
        python.restore()
        for m, mode in modes.items():
            m.training = mode


def _refuse_failing_forward(backbone: nn.Module, example_input: torch.Tensor) -> None:
    """Raise when the backbone's own forward fails on the example input in eval mode (a typo, a missing import):
    the trace failed for that, not for what torch.fx cannot follow. Its buffers and the random states are put back."""
    try:
        with _eager_eval_run(backbone, example_input):
            pass
    except Exception as exc:
        frame = _user_frame(exc)
        where = f" at {frame.filename}:{frame.lineno} ({frame.line.strip() if frame.line else ''})" if frame else ""
        try:  # does it fail under no_grad only? (register_hook on an intermediate tensor needs autograd on)
            with _eager_eval_run(backbone, example_input, grad=True):
                pass
        except Exception:
            pass
        else:
            raise BackboneError(
                f"the backbone's forward needs autograd while it runs{where} ({_first_line(exc, limit=None)} under "
                "torch.no_grad()): a gradient hook (register_hook) or a gradient taken inside the forward, which torch.fx "
                "cannot record and the converted model would not keep; remove it while converting") from exc
        raise BackboneError(
            f"the backbone's own forward fails on the example input of shape {tuple(example_input.shape)}{where}: "
            f"{_first_line(exc, limit=None)}; it fails without automtl too: fix the forward, or pass an example_input it takes"
        ) from exc


def _thawed_modules(backbone: nn.Module) -> list:
    """Paths of the norm and dropout layers in train mode (in an eval-mode backbone) whose train mode differs from
    their eval mode: a BatchNorm (batch statistics), a norm with running statistics, a dropout above 0."""
    return [name for name, m in backbone.named_modules() if m.training and (
        isinstance(m, nn.modules.batchnorm._BatchNorm)
        or isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
        or isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0)]


#: torch.nn norm classes whose eval-mode forward reads its buffers and never writes them.
_EVAL_READ_ONLY = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _refuse_stateful_leaves(backbone: nn.Module, graph: fx.Graph, example_input: torch.Tensor) -> None:
    """Refuse a module ``graph`` calls as one (a leaf) that writes a buffer of its own in an eval-mode forward
    (quantization-aware training's observers, an EMA): what it computes depends on how often it ran, and a shared
    module runs once per class of tasks, not once a batch (a QAT conv's outputs drifted 0.002 from the backbone's).
    The backbone runs once on the example input, in eval mode, only where such a leaf holds buffers; its buffers,
    Python state, modes and random states are put back."""
    leaves = {str(n.target) for n in graph.nodes if n.op == "call_module"}
    owned = {}
    for leaf in sorted(leaves):
        module = backbone.get_submodule(leaf)
        for name, b in module.named_buffers():
            owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
            if not (type(owner).__module__.startswith("torch.nn.modules") and isinstance(owner, _EVAL_READ_ONLY)):
                owned.setdefault(id(b), (leaf, f"{leaf}.{name}"))
    if not owned:
        return
    moved = None
    try:
        with _eager_eval_run(backbone, example_input) as buffers:
            moved = next((owned[id(b)] for b, before in buffers if id(b) in owned and not same_bits(b, before)), None)
    except Exception:  # noqa: BLE001 - the forward ran in the trace check; a failure here is not this check's to name
        pass
    if moved is not None:
        leaf, buffer = moved
        raise BackboneError(
            f"module {leaf!r} ({type(backbone.get_submodule(leaf)).__name__}) changes its buffer {buffer!r} in an "
            "eval-mode forward, so what it computes depends on how often it has run, and automtl runs a shared "
            "module once per class of tasks; freeze that state first (quantization-aware training: "
            "backbone.apply(torch.ao.quantization.disable_observer))")


def _first_kept(graph: fx.Graph, paths) -> Optional[tuple]:
    """Of the module ``paths``, the first whose module computes what ``graph`` keeps, and how many more do (as words:
    " and 2 more"); None when none does."""
    used = {p for n in graph.nodes for p in _module_paths(n)} | {str(n.target) for n in graph.nodes
                                                                if n.op == "call_module"}
    stuck = [name for name in paths if name in used]
    return (stuck[0], f" and {len(stuck) - 1} more" if len(stuck) > 1 else "") if stuck else None


def _refuse_thawed_modules(backbone: nn.Module, graph: fx.Graph, thawed: list) -> None:
    """Refuse an eval-mode backbone whose ``thawed`` layers (put in train mode by hand: Monte Carlo dropout,
    test-time BatchNorm) compute the features ``graph`` keeps: the supermodel and the compact model set every
    module's mode themselves, and would turn them to eval mode (the backbone's numbers lost without a word)."""
    found = _first_kept(graph, thawed)
    if found is None:
        return
    name, more = found
    what = "a dropout left on, Monte Carlo dropout" if isinstance(backbone.get_submodule(name), nn.modules.dropout._DropoutNd) \
        else "a norm normalising with its batch, test-time adaptation"
    raise BackboneError(
        f"the backbone is in eval mode but keeps {name!r}{more} in train mode ({what}); automtl sets every module's "
        "mode itself and would turn it off: put the whole backbone in one mode (backbone.train() or backbone.eval()) "
        "before converting it")


def _refuse_frozen_modules(backbone: nn.Module, graph: fx.Graph, frozen: dict) -> None:
    """Refuse a train-mode backbone whose ``frozen`` norm or dropout layers (path -> how: put in eval mode by hand,
    or kept there by a ``train`` override) compute the features ``graph`` keeps: the supermodel and the compact model
    set every module's mode themselves, and would train them (a frozen BatchNorm: 1.36 off in train mode)."""
    found = _first_kept(graph, frozen)
    if found is None:
        return
    name, more = found
    where = frozen[name]
    if isinstance(backbone.get_submodule(name), nn.modules.dropout._DropoutNd):
        raise BackboneError(
            f"{where} keeps {name!r}{more} in eval mode (a dropout turned off); automtl sets every module's mode "
            "itself and would turn it on in training: set its probability to 0 (or replace it with nn.Identity) instead")
    raise BackboneError(
        f"{where} keeps {name!r}{more} in eval mode (a frozen norm layer); automtl sets every module's mode itself "
        "and would train it: freeze it with a layer that has no train mode (torchvision.ops.FrozenBatchNorm2d, "
        "timm.layers.freeze_batch_norm_2d) instead")


def copy_backbone(backbone: nn.Module) -> nn.Module:
    """A deep copy of ``backbone`` with pruning masks and old-style weight norm folded into the weights.

    Both keep their weight as a computed (non-leaf) tensor that deepcopy refuses; the copy gets a
    plain parameter with the same value, which fine-tuning may then change freely.
    """
    memo: dict = {}
    for m in backbone.modules():
        for k, v in list(vars(m).items()):
            if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter) and v.grad_fn is not None:
                memo[id(v)] = v.detach().clone()
    try:
        copied = copy.deepcopy(backbone, memo)
    except Exception as exc:
        raise BackboneError(
            f"the backbone {type(backbone).__name__} cannot be copied ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            "remove what holds non-copyable state (hooks, computed tensors) before converting it"
        ) from exc
    from torch.nn.utils import prune
    from torch.nn.utils.weight_norm import WeightNorm

    for m in copied.modules():
        for hook in list(m._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                name = hook._tensor_name
                setattr(m, name, getattr(m, name).detach().clone())  # mask applied with the current orig
                prune.remove(m, name)
            elif isinstance(hook, WeightNorm):
                name = hook.name
                with torch.no_grad():
                    w = hook.compute_weight(m)
                torch.nn.utils.remove_weight_norm(m, name)
                getattr(m, name).data.copy_(w)
    return copied


class _TolerantShapeProp(ShapeProp):
    """ShapeProp that leaves a node that fails, and every node after it that reads it, without shapes
    (``failures`` keeps the first error): a branch the feature node does not need may fail at a size
    the trunk handles (Inception's auxiliary classifier, run in train mode only)."""

    def __init__(self, gm):
        super().__init__(gm)
        self.failures: list = []

    def run_node(self, n):
        if any(self.env.get(i) is _FAILED for i in n.all_input_nodes):
            return _FAILED
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints the traceback of a failing node
                return super().run_node(n)
        except Exception as exc:  # any op refusing its shapes
            self.failures.append((n, exc.__cause__ or exc))  # ShapeProp wraps the op's own error
            return _FAILED


_FAILED = object()


def _propagate(gm: fx.GraphModule, example_input: torch.Tensor, tolerant: bool = False) -> list:
    """Shapes onto ``gm``'s nodes (``tensor_meta``) from one run on ``example_input``; with ``tolerant``,
    the (node, error) pairs of the nodes that failed instead of an error."""
    was_training, python = gm.training, PythonState(gm)  # a leaf's counter or generator is as it was afterwards
    gm.eval()
    try:
        # ShapeProp prints the traceback of a failing node itself; the sentence below replaces it. Dropout in a
        # train-mode graph draws: from a random state of its own
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()), seeded(example_input.device):
            prop = (_TolerantShapeProp if tolerant else ShapeProp)(gm)
            prop.propagate(example_input)
            _mark_batched(gm, example_input)
            if not tolerant:
                buffers = saved_buffers(gm)
                try:  # a buffer the forward writes (a counter) is as the shape run left it
                    _mark_layout(gm, example_input)
                finally:
                    put_back(buffers)
        return getattr(prop, "failures", [])
    except Exception as exc:
        raise BackboneError(
            f"the backbone fails on an example input of shape {tuple(example_input.shape)} "
            f"({_first_line(exc.__cause__ or exc)}); pass an example_input with the channels, size, dtype and device the backbone expects"
        ) from exc
    finally:
        gm.train(was_training)
        python.restore(added="proxies")


#: Node meta: False on a tensor whose first dimension does not grow with the batch (a coordinate map made from the
#: input's height and width, ``(1, 1, H, W)``): where it meets per-task rows it is made again from the per-task
#: input rather than repeated along its first dimension. Absent (unknown) counts as batched.
META_BATCHED = "automtl_batched"


def _mark_batched(gm: fx.GraphModule, example_input: torch.Tensor) -> None:
    """Set :data:`META_BATCHED` on the tensor nodes whose first dimension stays the same when the batch grows by
    one. Only the nodes before every convolution are run again (at batch N + 1, under ``no_grad``): they are the
    ones a supermodel with one input for all tasks reads in a per-task form; a node that fails, and what depends on
    it, stay unknown (counted as batched)."""
    after: set = set()  # nodes at or after a convolution
    env: dict = {}
    runner = fx.Interpreter(gm, garbage_collect_values=False)
    runner.env = env
    n = int(example_input.shape[0])
    for node in gm.graph.nodes:
        if is_conv_node(gm, node) or any(i in after for i in node.all_input_nodes):
            after.add(node)
            continue
        if node.op == "output" or any(i not in env for i in node.all_input_nodes):
            continue
        try:
            with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
                env[node] = (torch.zeros((n + 1, *example_input.shape[1:]), dtype=example_input.dtype,
                                         device=example_input.device) if node.op == "placeholder" else runner.run_node(node))
        except Exception:  # unknown from here on
            continue
        meta, value = _tensor_meta(node), env[node]
        if meta is not None and len(meta.shape) >= 1 and isinstance(value, torch.Tensor) and value.dim() >= 1:
            node.meta[META_BATCHED] = int(value.shape[0]) != int(meta.shape[0])


class _ShapesAt(fx.Interpreter):
    """Runs ``gm`` and keeps each node's output shape (a 4-D tensor's only); a node that fails, and what reads
    it, stay without one."""

    def __init__(self, gm):
        super().__init__(gm)
        self.shapes: dict = {}

    def run_node(self, n):
        if any(self.env.get(i) is _FAILED for i in n.all_input_nodes):
            return _FAILED
        try:
            value = super().run_node(n)
        except Exception:
            return _FAILED
        if isinstance(value, torch.Tensor) and value.dim() == 4:
            self.shapes[n] = tuple(value.shape)
        return value


#: How much taller, then wider, than the example the layout runs are (pixels): a map of stride up to 64 grows.
LAYOUT_PROBE = 64


def _mark_layout(gm: fx.GraphModule, example_input: torch.Tensor) -> None:
    """Set :data:`automtl.features.META_LAYOUT` on the 4-D nodes from two more runs (no gradients, eval mode, one
    batch as the example): on the example tiled :data:`LAYOUT_PROBE` pixels taller, then wider. A backbone that refuses those
    sizes leaves the nodes it could not reach unmarked (their layout unknown, taken as (N, C, H, W))."""
    x = example_input  # at the example's batch: an axis that folds the batch in (x.view(1, N * C, H, W)) stays put
    d = LAYOUT_PROBE
    taller = x.repeat(1, 1, -(-(x.shape[2] + d) // x.shape[2]), 1)[:, :, :x.shape[2] + d]
    wider = x.repeat(1, 1, 1, -(-(x.shape[3] + d) // x.shape[3]))[:, :, :, :x.shape[3] + d]
    runs = []
    for probe in (taller, wider):
        with seeded(example_input.device), contextlib.redirect_stderr(io.StringIO()):
            runner = _ShapesAt(gm)
            try:
                runner.run(probe)
            except Exception:  # the output node itself: the shapes before it are kept
                pass
        runs.append(runner.shapes)
    for node in gm.graph.nodes:
        meta = _tensor_meta(node)
        if meta is None or len(meta.shape) != 4 or node not in runs[0] or node not in runs[1]:
            continue
        node.meta[META_LAYOUT] = laid_out(tuple(meta.shape), runs[0][node], runs[1][node])


def _train_counterpart(backbone, gm: fx.GraphModule, tgm: fx.GraphModule, feature: fx.Node, example_input) -> fx.Graph:
    """The train-mode graph (``tgm``'s), functionalized and cut at the node that matches the eval graph's feature
    node."""
    graph = tgm.graph
    buffers = saved_buffers(backbone)
    try:  # for shapes only: train-mode code written in the forward may move statistics
        failures = _propagate(tgm, example_input, tolerant=True)
    finally:
        put_back(buffers)
    writes = functionalize(tgm, graph)
    _share_constants(gm, tgm, {name for name, _ in backbone.named_buffers()})
    shape = _tensor_meta(feature).shape
    same = [n for n in graph.nodes if n.op == feature.op and n.target == feature.target
            and (m := _tensor_meta(n)) is not None and m.shape == shape]
    # the same call of the same line in the same module, counted: names shift where train mode adds operations
    # (y * 0.5 + 1.0 under `if self.training` takes the name "add" from a residual add after it)
    eval_calls = [n for n in gm.graph.nodes if _call_site(n) == _call_site(feature)]
    train_calls = [n for n in same if _call_site(n) == _call_site(feature)]
    named = [n for n in same if n.name == feature.name]
    if len(train_calls) == len(eval_calls):
        node = train_calls[eval_calls.index(feature)]
    elif named or same:
        node = named[0] if named else same[-1]
    elif failures:
        n, exc = failures[0]
        raise BackboneError(
            f"the backbone fails in train mode on an example input of shape {tuple(example_input.shape)} at "
            f"{n.name!r} ({_first_line(exc)}); pass an example_input with the channels, size, dtype and device the backbone expects")
    else:
        raise BackboneError(
            f"the backbone's train-mode graph has no node matching its eval-mode feature node {feature.name!r}; "
            "name the feature map with feature_node='module.path'"
        )
    refuse_state_writes(writes, graph, node)
    _cut(graph, node)
    return graph


def _call_site(node: fx.Node) -> tuple:
    """What a node is beyond its name: its operation and target, the user's line that made it and the modules it
    was made in."""
    stack = node.meta.get("nn_module_stack") or {}
    return (node.op, node.target, node.meta.get("stack_trace"),
            tuple(v[0] if isinstance(v, tuple) else str(k) for k, v in stack.items()))


def _share_constants(gm: fx.GraphModule, tgm: fx.GraphModule, buffers: set) -> None:
    """Point the train graph's tensor constants at the eval graph's equal ones (each trace makes its own), and
    give ``gm`` the ones it lacks: the supermodel runs both graphs over ``gm``'s attributes. ``buffers``: the
    backbone's buffer names, which are never constants."""
    own = {n.target: gm.get_attr_value(n) if hasattr(gm, "get_attr_value") else _fetch(gm, n.target)
           for n in gm.graph.nodes if n.op == "get_attr"}
    for n in tgm.graph.nodes:
        if n.op != "get_attr" or n.target in own:
            continue
        value = _fetch(tgm, n.target)
        # only a constant (fx's _tensor_constantN) stands for an equal one: a buffer read in train mode alone is
        # state of its own, whatever value it holds now (refused below: _drop_if_same)
        match = None if n.target in buffers else next(
            (k for k, v in own.items() if isinstance(v, torch.Tensor) and isinstance(value, torch.Tensor)
             and v.shape == value.shape and v.dtype == value.dtype and torch.equal(v, value)), None)
        if match is not None:
            n.target = match
            _assign(tgm, match, own[match])  # the train graph module must hold what its graph reads
        elif n.target in buffers or isinstance(value, torch.Tensor):
            if not _has(gm, n.target):
                _assign(gm, n.target, value)
        else:  # a module's torch.Generator: kept in a registered module, which copies of the graph module keep
            n.target = f"{TRAIN_ONLY}.{n.target.replace('.', '_')}"
            _assign(tgm, n.target, value)
            _assign(gm, n.target, value)


#: The submodule holding what only the train graph reads that is not a tensor (a module's ``torch.Generator``): a
#: GraphModule keeps the attributes its graph reads, and its copies the registered ones only.
TRAIN_ONLY = "train_only_constants"


def copy_constants(source: nn.Module, dest: nn.Module, graph: fx.Graph) -> None:
    """Give ``dest`` each attribute ``graph`` reads (``get_attr``) that it lacks, from ``source``: the constants a
    train-mode trace made (a tensor, a module's ``torch.Generator``) that the eval graph, which ``dest`` was built
    from, does not read."""
    for n in graph.nodes:
        if n.op == "get_attr" and not _has(dest, n.target):
            _assign(dest, n.target, _fetch(source, n.target))


def _has(mod: nn.Module, target: str) -> bool:
    try:
        _fetch(mod, target)
        return True
    except AttributeError:
        return False


def _assign(mod: nn.Module, target: str, value: Any) -> None:
    """Set ``target`` (a dotted path) on ``mod`` as a GraphModule stores what its graph reads: a tensor as a buffer,
    anything else as an attribute, on registered submodules (made where missing)."""
    *path, name = target.split(".")
    owner = mod
    for part in path:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    if _has(owner, name):
        return
    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        owner.register_buffer(name, value)
    else:
        setattr(owner, name, value)


def _fetch(mod: nn.Module, target: str) -> Any:
    obj = mod
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _signature(graph: fx.Graph) -> list:
    index = {n: i for i, n in enumerate(graph.nodes)}
    sig = []
    for n in graph.nodes:
        args = fx.map_arg((n.args, n.kwargs), lambda a: ("node", index[a]))
        sig.append((n.op, n.target, repr(args)))
    return sig


def _drop_if_same(graph: fx.Graph, train_graph: fx.Graph, state: set) -> Optional[fx.Graph]:
    """None when the train graph computes what the eval graph does; else check that it calls no other modules and
    reads no parameter or buffer (``state``: their names) the eval graph does not. Constants the train trace made
    (a tensor or a ``torch.Generator`` it reads) are on the eval graph's module already (``_share_constants``)."""
    if _signature(graph) == _signature(train_graph):
        return None
    targets = {n.target for n in graph.nodes if n.op in ("call_module", "get_attr")}
    for n in train_graph.nodes:
        if n.target not in targets and (n.op == "call_module" or n.op == "get_attr" and n.target in state):
            raise BackboneError(
                f"the backbone uses {n.target!r} in train mode only{user_line(n)}; automtl keeps one set of modules "
                "for both modes, so compute it in eval mode too or move it after the feature node"
            )
    return train_graph


def _delete_unused(gm: fx.GraphModule, graphs: Sequence[fx.Graph]) -> None:
    """Delete the submodules no graph calls or reads (the classifier and anything else after the cut)."""
    used: set = set()
    for graph in graphs:
        for n in graph.nodes:
            if n.op not in ("call_module", "get_attr"):
                continue
            parts = n.target.split(".")
            used.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
            if n.op == "call_module":
                used.update(f"{n.target}.{name}" for name, _ in gm.get_submodule(n.target).named_modules() if name)
    for name, _ in list(gm.named_modules()):
        if name and name not in used:
            gm.delete_submodule(name)


#: More parameterised modules than any classifier has (VGG's three Linear layers, MobileNetV3's two): a cut before
#: so many that also hold most of the parameters leaves out the model's body, not its head.
DROPPED_MODULES_WARN = 8


def _dropped_body(gm: fx.GraphModule, node: fx.Node) -> list:
    """A note when the default cut leaves out most of the backbone (a ViT cut at its patch embedding): more than
    DROPPED_MODULES_WARN parameterised modules after the cut, holding more parameters than the part kept."""
    kept = set(ancestors(node))

    def params(n: fx.Node) -> int:
        if n.op == "call_module":
            return sum(p.numel() for p in gm.get_submodule(n.target).parameters())
        if n.op == "get_attr":
            value = _fetch(gm, n.target)
            return value.numel() if isinstance(value, nn.Parameter) else 0
        return 0

    count = {False: {}, True: {}}  # kept? -> {module or attribute path: parameters}
    for n in gm.graph.nodes:
        held = params(n)
        if held:
            count[n in kept][n.target] = held
    dropped = {t: v for t, v in count[False].items() if t not in count[True]}
    kept_params, dropped_params = sum(count[True].values()), sum(dropped.values())
    (out,) = [n.args[0] for n in gm.graph.nodes if n.op == "output"]
    out_meta = _tensor_meta(out) if isinstance(out, fx.Node) else None
    convs = [n.target for n in gm.graph.nodes if n not in kept and is_conv_node(gm, n)]
    if out is not node and out_meta is not None and len(out_meta.shape) == 4 and convs:
        # the backbone's own output is a feature map: a default cut before it leaves out convolutions it computes
        return [f"the features are cut at {node.name!r} {tuple(_tensor_meta(node).shape)}, the deepest 4-D map before "
                f"the tokens or vectors the backbone computes in between, though its output {out.name!r} "
                f"{tuple(out_meta.shape)} is a feature map too; this leaves out {len(convs)} convolution(s) after the cut "
                f"({', '.join(map(str, convs[:3]))}{', ...' if len(convs) > 3 else ''}): pass feature_node={out.name!r} "
                "(or another place) to convert them too"]
    if len(dropped) <= DROPPED_MODULES_WARN or dropped_params <= kept_params:
        body = _left_out_body(gm, kept, dropped)
        if not body:
            return []
        share = sum(body.values()) / max(kept_params + dropped_params, 1)
        return [f"the features are cut at {node.name!r} {tuple(_tensor_meta(node).shape)}, the deepest map automtl can "
                f"tell, which leaves out {len(body)} parameterised module(s) computing the backbone's output after it "
                f"before any pooling or classifier ({', '.join(map(str, list(body)[:3]))}{', ...' if len(body) > 3 else ''}"
                f"; {share:.0%} of its parameters), such as blocks on tokens: the converted model ends at the cut; name "
                "another place with feature_node if that is not what you want"]
    share = dropped_params / max(kept_params + dropped_params, 1)
    return [f"the features are cut at {node.name!r} {tuple(_tensor_meta(node).shape)}, the deepest 4-D map before the "
            f"spatial resolution collapses, which leaves out {len(dropped)} modules after it holding {share:.0%} of the "
            "backbone's parameters (such as a transformer's encoder on tokens, or a segmentation head after the "
            "deepest map); automtl converts convolutions, so if that is not what you want, name another place with "
            "feature_node"]


def _left_out_body(gm: fx.GraphModule, kept: set, dropped: dict) -> dict:
    """Of the ``dropped`` parameterised modules (path -> parameters), those on the way to the output before any
    spatial collapse and outside a classifier: the backbone's body, not its head (a last block on tokens)."""
    from .features import _chosen_output, _collapses, _in_classifier, _is_map

    output = _chosen_output(gm, [])
    toward = set(ancestors(output)) | {output}  # an auxiliary head beside the output is not the body
    maps: set = set()
    after_collapse: set = set()
    body: dict = {}
    for n in gm.graph.nodes:
        if _is_map(n):
            maps.add(n)
        if n.op in ("placeholder", "output") or n in kept or n not in toward:
            continue
        if any(i in after_collapse for i in n.all_input_nodes) or _collapses(gm, n, frozenset(maps)):
            after_collapse.add(n)
        elif n.target in dropped and not _in_classifier(n):
            body[n.target] = dropped[n.target]
    return body


def _channels_first(graph: fx.Graph) -> fx.Node:
    """Permute the output of a graph cut at a channels-last map, (N, H, W, C), to (N, C, H, W); the new output node
    (its ``tensor_meta`` follows where the cut node has one)."""
    out = next(n for n in graph.nodes if n.op == "output")
    feature = out.args[0]
    with graph.inserting_before(out):
        moved = graph.create_node("call_method", "permute", (feature, 0, 3, 1, 2), name=f"{feature.name}_channels_first")
    out.args = (moved,)
    meta = _tensor_meta(feature)
    if meta is not None:
        n, h, w, c = meta.shape
        moved.meta["tensor_meta"] = _extract_tensor_metadata(
            torch.empty((n, h, w, c), dtype=meta.dtype, device="meta").permute(0, 3, 1, 2))
        moved.meta[META_LAYOUT] = "map"
        for key in (META_BATCHED, "nn_module_stack", "stack_trace"):
            if key in feature.meta:
                moved.meta[key] = feature.meta[key]
    return moved


def _cut(graph: fx.Graph, node: fx.Node) -> None:
    """Make ``node`` the output and drop everything only the removed tail needed."""
    old_out = next(n for n in graph.nodes if n.op == "output")
    graph.erase_node(old_out)
    graph.output(node)
    # Keep only the feature node's ancestors: the classifier and anything else after the cut goes,
    # including impure nodes that fx's own dead code elimination would keep. In-place operations
    # whose result matters were made out-of-place before (graphpasses.functionalize).
    keep = set(ancestors(node))
    for n in reversed(list(graph.nodes)):
        if n.op != "output" and n not in keep:
            graph.erase_node(n)
    graph.lint()


def count_parameters(module: nn.Module) -> int:
    """Number of distinct parameters (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def placement(module: nn.Module) -> dict:
    """``dict(device=..., dtype=...)`` of the module's first floating parameter or buffer (where what is made for it
    must live and in which dtype it computes); ``{}`` for a module without one."""
    like = next((t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()), None)
    return {} if like is None else dict(device=like.device, dtype=like.dtype)
