"""Small fx graph passes used by capture: in-place operations, and naming the user's line of a node."""
from __future__ import annotations

import operator
import os
import re
from typing import Iterator, Optional

import torch
from torch import fx

from .errors import BackboneError

INPLACE_OPERATORS = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv,
    operator.iand: operator.and_, operator.ior: operator.or_, operator.ixor: operator.xor,
}

#: Operations whose result shares memory with their first argument.
_VIEW_METHODS = {"view", "view_as", "reshape", "narrow", "transpose", "permute", "expand", "expand_as", "select",
                 "unsqueeze", "squeeze", "flatten", "unflatten", "chunk", "split", "unbind", "as_strided",
                 "t", "movedim", "diagonal", "contiguous", "detach", "unfold"}


#: What every refusal of a forward that writes the module's own tensors advises.
STATE_WRITE_ADVICE = ("automtl runs the forward as data flow and would drop that update: keep running statistics in a "
                      "BatchNorm module or F.batch_norm (automtl keeps them per task), or update the tensor outside "
                      "the forward")


def user_line(node: fx.Node) -> str:
    """`` at file:line (code)`` for the user's line that made ``node``, or an empty string."""
    trace = node.stack_trace or ""
    torch_dir, own_dir = os.path.dirname(torch.__file__), os.path.dirname(__file__)
    found = None
    for m in re.finditer(r'File "([^"]+)", line (\d+), in [^\n]*\n\s*([^\n]*)', trace):
        if not m.group(1).startswith((torch_dir, own_dir)):
            found = m
    if found is None:
        return ""
    return f" at {found.group(1)}:{found.group(2)} ({found.group(3).strip()})"


def mutated_argument(gm: fx.GraphModule, node: fx.Node) -> Optional[fx.Node]:
    """The node whose tensor ``node`` changes in place, if it is an in-place operation."""
    if node.op in ("call_function", "call_method") and isinstance(node.kwargs.get("out"), fx.Node):
        return node.kwargs["out"]  # torch.add(a, b, out=t) writes t
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if first is None:
        return None
    if node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_"):
        return first
    if node.op == "call_function":
        if node.target in INPLACE_OPERATORS or node.kwargs.get("inplace") is True:
            return first
        name = getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.startswith("_") and getattr(torch, name, None) is node.target:
            return first
    if node.op == "call_module" and getattr(gm.get_submodule(node.target), "inplace", False) is True:
        return first
    return None


def module_tensor(node: fx.Node, written: Optional[dict] = None) -> Optional[fx.Node]:
    """The ``get_attr`` node (a parameter, buffer or constant of the module) whose memory ``node`` is, or a view of
    (``.view``, ``.data``, basic indexing; indexing with a tensor makes a copy), directly or as the result of an
    earlier write into it (``written``)."""
    while True:
        if node.op == "get_attr":
            return node
        if written and node in written:
            return written[node]
        if not node.args or not isinstance(node.args[0], fx.Node):
            return None
        viewing = (node.op == "call_method" and node.target in _VIEW_METHODS) or (
            node.op == "call_function" and node.target is getattr and node.args[1:] == ("data",)) or (
            node.op == "call_function" and node.target is operator.getitem and node.all_input_nodes == [node.args[0]])
        if not viewing:
            return None
        node = node.args[0]


def _view_base(node: fx.Node) -> Optional[fx.Node]:
    """The tensor ``node`` is a view of, when it is one."""
    base = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if base is None:
        return None
    if node.op == "call_method" and node.target in _VIEW_METHODS:
        return base
    if node.op == "call_function" and node.target is operator.getitem:
        if hasattr(base.meta.get("tensor_meta"), "shape"):
            return base
        return _view_base(base)  # an element of chunk()/split()
    return None


def functionalize(gm: fx.GraphModule, graph: fx.Graph) -> list:
    """Make every in-place operation out-of-place, and let every later reader of the changed tensor read its result.

    Afterwards the graph's data flow is explicit: cutting it at the feature node keeps what the
    features need (``y.mul_(2)`` whose result is unused is not dropped), and tasks that branch
    apart never write into each other's tensors. An in-place write through a view of a tensor
    that is read again is refused (its effect on the base tensor is not data flow).

    Returns the writes into the module's own tensors, ``(node, get_attr node)``: as data flow they no longer
    change the module (:func:`refuse_state_writes` decides which of them matter).
    """
    writes: list = []
    written: dict = {}  # a write's node -> the module tensor it wrote (a chain: mean.mul_(0.9).add_(...))
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        target = mutated_argument(gm, node)
        if target is None:
            continue
        state = module_tensor(target, written)
        if state is not None:
            writes.append((node, state))
            written[node] = state  # out of place below: its result is the tensor's new value
        base = _view_base(target)
        if base is not None and any(order[u] > order[node] for u in base.users):
            raise BackboneError(
                f"the backbone changes a view of a tensor in place{user_line(node)} and reads the tensor again; "
                "write the result out of place (y = y.mul(2) instead of y.mul_(2)) or clone the view first"
            )
        for user in list(target.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(target, node)
        _out_of_place(gm, node)
    return writes


def refuse_state_writes(writes: list, graph: fx.Graph, feature: fx.Node) -> None:
    """Refuse a write (from :func:`functionalize`) into a module's own tensor that the features' forward makes from
    the input: a running statistic kept by hand, whose update automtl would drop. Writes after the feature node
    (cut away) or made from the module's own tensors only (a cache recomputed every call) do not matter.

    Raises:
        BackboneError: naming the tensor and the user's line.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node, state in writes:
        if order.get(node, len(order)) > order[feature] or not any(n.op == "placeholder" for n in ancestors(node)):
            continue
        raise BackboneError(
            f"the backbone changes its own tensor {state.target!r} in place during the forward{user_line(node)} "
            f"(a running statistic kept by hand); {STATE_WRITE_ADVICE}")


def ancestors(node: fx.Node) -> Iterator[fx.Node]:
    """``node`` and every node it is computed from, each once (lazily: a search may stop early)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        yield n
        stack.extend(n.all_input_nodes)


def _out_of_place(gm: fx.GraphModule, node: fx.Node) -> None:
    if "out" in node.kwargs:
        node.kwargs = {k: v for k, v in node.kwargs.items() if k != "out"}
    elif node.op == "call_method" and hasattr(torch.Tensor, node.target[:-1]) and node.target[:-1] != "set":
        node.target = node.target[:-1]
    elif node.op == "call_function":
        if node.target in INPLACE_OPERATORS:
            node.target = INPLACE_OPERATORS[node.target]
        elif node.kwargs.get("inplace") is True:
            node.kwargs = {**node.kwargs, "inplace": False}
        else:
            name = node.target.__name__[:-1]
            if callable(getattr(torch, name, None)):
                node.target = getattr(torch, name)
    elif node.op == "call_module":
        gm.get_submodule(node.target).inplace = False
