"""Lowering a compact model to what an ``.automtl`` file can describe: torch.nn leaf modules only.

Modules automtl owns (the conv+BN unit, the builtin heads) and torch.nn containers called as a
whole are inlined by tracing them, so the bundle names only leaf modules of
:data:`automtl.formats.modules.MODULES`. A node keeps its name and ``automtl_*`` meta, and the
nodes inlined from it carry the same meta (the renderer groups them by it).
"""
from __future__ import annotations

import contextlib
import inspect

import torch

from torch import fx, nn

from ..compact import META_CHOICE, META_LAYER, META_SOURCE, META_TASKS
from ..errors import FileFormatError
from .modules import buildable

META_KEYS = (META_TASKS, META_LAYER, META_CHOICE, META_SOURCE)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def torch_nn_class(cls: type) -> bool:
    """True for a public class of the torch.nn namespace itself (not a user's subclass of one)."""
    return (isinstance(cls, type) and issubclass(cls, nn.Module) and not cls.__name__.startswith("_")
            and getattr(nn, cls.__name__, None) is cls)


class _InlineTracer(fx.Tracer):
    """Traces through everything except the torch.nn leaf modules a bundle can build. ``proxy_buffers``: buffers are
    traced as attribute reads, not as the tensors they hold (a train-mode branch that reads one as a number, as a
    BatchNorm of momentum None reads its step counter, then fails to trace instead of baking in today's value, and
    one that counts steps in a buffer writes nothing while traced)."""

    def __init__(self, proxy_buffers: bool = False):
        super().__init__()
        self.proxy_buffer_attributes = proxy_buffers

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return buildable(m)


def _needs_inlining(m: nn.Module) -> bool:
    """Containers, automtl's own modules and users' modules (a norm+activation subclass, a custom
    head) are traced into their parts; a torch.nn class off the list is refused by name."""
    return not buildable(m) and (isinstance(m, _CONTAINERS) or not torch_nn_class(type(m)))


@contextlib.contextmanager
def _shape_checks_off():
    """BatchNorm's input-rank check branches on the traced input; the graph's shapes are checked
    at load instead, so a subclass (timm's BatchNormAct2d) traces into F.batch_norm."""
    classes = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
    saved = {cls: cls.__dict__.get("_check_input_dim") for cls in classes}
    try:
        for cls in classes:
            cls._check_input_dim = lambda self, input: None
        yield
    finally:
        for cls, fn in saved.items():
            if fn is None:
                del cls._check_input_dim
            else:
                cls._check_input_dim = fn


def lower(gm: fx.GraphModule, proxy_buffers: bool = False) -> fx.GraphModule:
    """A copy of ``gm`` whose call_module nodes all call torch.nn leaf modules (sharing gm's modules).
    ``proxy_buffers``: see :class:`_InlineTracer` (the file writer's train-mode lowering)."""
    graph = fx.Graph()
    env: dict = {}
    traced: dict = {}  # module id -> its traced graph (one module can be called by several task classes)
    for node in gm.graph.nodes:
        if _is_assert(node):
            continue  # a shape assertion (timm's norm layers): the loader checks every shape itself
        if node.op == "call_function" and _python_function(node.target):
            env[node] = _inline_function(graph, node, env)
            continue
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if _needs_inlining(mod):
                env[node] = _inline(graph, gm, node, mod, env, traced, proxy_buffers)
                continue
            if isinstance(mod, nn.Identity):
                env[node] = fx.map_arg(node.args[0], lambda n: env[n])
                continue
            if not buildable(mod):
                _custom_module_error(node.target, mod)
            value = _module_input(node, mod)
            env[node] = copy = graph.node_copy(node, lambda n: env[n])
            copy.args, copy.kwargs = (fx.map_arg(value, lambda n: env[n]),), {}
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    _out_of_place(graph)
    lowered = fx.GraphModule(gm, graph, "CompactNet")
    lowered.graph.eliminate_dead_code()
    lowered.recompile()
    return lowered


def _module_input(node: fx.Node, mod: nn.Module):
    """The input of ``node``, a call of a torch.nn leaf module, passed by position or by name (``conv(input=x)``):
    a bundle describes a module call with its input only.

    Raises:
        FileFormatError: the call passes the module more than its input.
    """
    if len(node.args) == 1 and not node.kwargs:
        return node.args[0]
    try:
        bound = inspect.signature(mod.forward).bind(*node.args, **node.kwargs)
    except TypeError:
        bound = None
    if bound is None or len(bound.arguments) != 1:
        raise FileFormatError(f"module {node.target!r} ({type(mod).__name__}) is called with more than its input, which "
                              "an .automtl file does not describe; export a .pt2 with automtl.export() instead")
    (value,) = bound.arguments.values()
    return value


def _out_of_place(graph: fx.Graph) -> None:
    """Rewrite in-place calls to their out-of-place forms, which a bundle may hold.

    capture makes every in-place operation's result explicit (later readers read the returned
    value), so ``x.add_(y)`` -> ``x.add(y)``, ``operator.iadd`` -> ``operator.add`` and
    ``inplace=True`` -> ``False`` compute the same values without writing into their input.
    """
    from ..graphpasses import INPLACE_OPERATORS

    for node in graph.nodes:
        if node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_"):
            node.target = node.target[:-1]
        elif node.op == "call_function":
            if node.target in INPLACE_OPERATORS:
                node.target = INPLACE_OPERATORS[node.target]
            name = getattr(node.target, "__name__", "")
            if name.endswith("_") and not name.startswith("_") and getattr(torch, name, None) is node.target \
                    and hasattr(torch, name[:-1]):
                node.target = getattr(torch, name[:-1])
            if inspect.isfunction(node.target) and "inplace" in inspect.signature(node.target).parameters:
                try:
                    bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
                except TypeError:
                    continue
                if bound.arguments.get("inplace"):
                    bound.arguments["inplace"] = False
                    node.args, node.kwargs = tuple(bound.args), dict(bound.kwargs)


def _is_assert(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch._assert


def _python_function(fn) -> bool:
    """A function written in Python that fx kept as one call (``torch.fx.wrap``), not a torch builtin."""
    return inspect.isfunction(fn) and not (getattr(fn, "__module__", "") or "").startswith(("torch.", "operator"))


def _inline_function(graph: fx.Graph, node: fx.Node, env: dict):
    """Run ``node``'s Python function on proxies, so its body lands in ``graph`` as primitive operations.

    torchvision's ``stochastic_depth`` is wrapped this way; with ``training=False`` (the eval graph
    a bundle stores) its body returns its input, so it lowers to nothing. A body that fails on proxies
    is kept as a call, which ``describe`` then names.
    """
    tracer = fx.proxy.GraphAppendingTracer(graph)
    args = fx.map_arg(node.args, lambda n: fx.Proxy(env[n], tracer))
    kwargs = fx.map_arg(node.kwargs, lambda n: fx.Proxy(env[n], tracer))
    before = set(graph.nodes)
    try:
        out = node.target(*args, **kwargs)
    except Exception:  # data-dependent control flow and the like: keep the call as it is
        for n in reversed([n for n in graph.nodes if n not in before]):
            graph.erase_node(n)
        return graph.node_copy(node, lambda n: env[n])
    for n in graph.nodes:
        if n not in before:
            n.meta = {k: v for k, v in node.meta.items() if k in META_KEYS}
    if isinstance(out, fx.Proxy):
        return out.node
    return fx.node.map_aggregate(out, lambda v: v.node if isinstance(v, fx.Proxy) else v)


def _custom_module_error(target: str, mod: nn.Module):
    cls = type(mod)
    raise FileFormatError(
        f"module {target!r} is a {cls.__module__}.{cls.__qualname__}, not one of the torch.nn modules on automtl's "
        "reviewed list, so an .automtl file cannot describe it as data; build it from listed modules, or write a "
        ".pt2 with automtl.export() instead"
    )


def _inline(graph: fx.Graph, gm: fx.GraphModule, node: fx.Node, mod: nn.Module, env: dict, traced: dict,
            proxy_buffers: bool = False):
    """Emit the traced body of ``mod`` in place of ``node``; returns the value that replaces it."""
    try:
        if id(mod) not in traced:
            with _shape_checks_off():
                traced[id(mod)] = _InlineTracer(proxy_buffers).trace(mod)
        sub = traced[id(mod)]
    except Exception as exc:  # fx raises many types: all mean "not traceable"
        from ..capture import _faulty_module

        inner = _faulty_module(exc, mod)  # the innermost module that was running, e.g. "conv (Conv2dSame)"
        where = f" in {node.target}.{inner}" if not inner.startswith("<root>") and inner != type(mod).__name__ else ""
        raise FileFormatError(
            f"module {node.target!r} ({type(mod).__name__}){where} cannot be traced into torch.nn operations "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); write a .pt2 with automtl.export() instead"
        ) from exc
    args = list(fx.map_arg(node.args, lambda n: env[n]))
    kwargs = dict(fx.map_arg(node.kwargs, lambda n: env[n]))
    local: dict = {}
    result = None
    body = [n for n in sub.nodes if n.op not in ("placeholder", "output") and not _is_assert(n)]
    for n in sub.nodes:
        if _is_assert(n):
            continue
        if n.op == "placeholder":
            if args:
                local[n] = args.pop(0)
            elif n.target in kwargs:
                local[n] = kwargs.pop(n.target)
            elif n.args:
                local[n] = n.args[0]  # the parameter's default value
            else:
                raise FileFormatError(f"module {node.target!r} is called without its argument {n.target!r}")
            continue
        if n.op == "output":
            result = fx.map_arg(n.args[0], lambda m: local[m])
            continue
        sub_mod = sub_target = None
        if n.op in ("call_module", "get_attr"):
            sub_target = f"{node.target}.{n.target}"
            if n.op == "call_module":
                sub_mod = gm.get_submodule(sub_target)
                if not buildable(sub_mod):
                    _custom_module_error(sub_target, sub_mod)
                if isinstance(sub_mod, nn.Identity):
                    local[n] = fx.map_arg(n.args[0], lambda m: local[m])
                    continue
        last = n is body[-1] or all(u.op == "output" for u in n.users)
        new = graph.create_node(n.op, sub_target if sub_target is not None else n.target,
                                fx.map_arg(n.args, lambda m: local[m]), fx.map_arg(n.kwargs, lambda m: local[m]),
                                name=node.name if last else f"{node.name}_{n.name}")
        new.meta = {k: v for k, v in node.meta.items() if k in META_KEYS}
        local[n] = new
    return result
