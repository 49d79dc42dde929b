"""The closed vocabulary of an ``.automtl`` graph: what a model file may call, and with what.

A bundle's graph is a program, so the reader treats it as one: every function, tensor method,
tensor attribute and module class it may name is listed here one by one, each a pure tensor
operation, and :func:`check_graph` propagates value *kinds* (tensor, size, int, ...) through the
whole graph before anything runs. A value that is not data (a callable, a module, a numpy array,
a file) can never be produced, so it can never be passed on: nothing in this list touches files,
storage, numpy, the network or Python internals.

Adding an entry is a review decision: ``tests/test_vocabulary.py`` holds the reviewed list and
fails when this one changes without it.
"""
from __future__ import annotations

import inspect
import math
import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx

from ..errors import FileFormatError

# ---------------------------------------------------------------------------------------
# value kinds
# ---------------------------------------------------------------------------------------
TENSOR, TENSORS, SIZE, INT, FLOAT, BOOL, DTYPE, DEVICE = "tensor", "tensors", "size", "int", "float", "bool", "dtype", "device"
NUMBER = (INT, FLOAT, BOOL)

#: Functions by the qualified name a bundle records, each with the kind of what it returns.
#: ``"arith"`` follows Python's rules on its operands (tensor if any operand is a tensor).
FUNCTIONS: dict[str, tuple[Callable, str]] = {
    # Python operators (traced from +, *, x[i], ...)
    "operator.add": (operator.add, "arith"), "operator.sub": (operator.sub, "arith"),
    "operator.mul": (operator.mul, "arith"), "operator.truediv": (operator.truediv, "arith"),
    "operator.floordiv": (operator.floordiv, "arith"), "operator.neg": (operator.neg, "arith"),
    "operator.mod": (operator.mod, "arith"),  # numbers and tensors only (pad to a multiple: (8 - h % 8) % 8)
    "operator.pow": (operator.pow, "arith"),  # x ** 2, the attention scale d ** -0.5 (integer powers bounded at load)
    "operator.matmul": (operator.matmul, TENSOR), "operator.getitem": (operator.getitem, "getitem"),
    "builtins.getattr": (getattr, "getattr"),
    # torch.*
    **{f"torch.{n}": (getattr(torch, n), TENSOR) for n in (
        "add", "sub", "mul", "div", "cat", "concat", "stack", "flatten", "reshape", "transpose", "permute",
        "relu", "sigmoid", "tanh", "mean", "sum", "sqrt", "rsqrt", "exp", "abs", "clamp", "clamp_min",
        "clamp_max", "maximum", "minimum", "narrow", "squeeze", "unsqueeze", "matmul", "bmm", "softmax",
        "roll", "channel_shuffle", "amax", "erf", "where", "zeros_like", "ones_like", "flip", "conv2d",
        "conv_transpose2d", "square", "var", "log_softmax")},
    **{f"torch.{n}": (getattr(torch, n), TENSORS) for n in ("chunk", "split", "unbind")},
    # torch.nn.functional.*
    **{f"torch.nn.functional.{n}": (getattr(F, n), TENSOR) for n in (
        "relu", "relu6", "gelu", "silu", "hardswish", "hardsigmoid", "sigmoid", "tanh", "leaky_relu", "elu",
        "mish", "softplus", "hardtanh", "glu", "softmax", "log_softmax", "interpolate", "adaptive_avg_pool2d",
        "adaptive_max_pool2d", "avg_pool2d", "max_pool2d", "dropout", "dropout2d", "pad", "normalize",
        "layer_norm", "group_norm", "batch_norm", "linear", "conv2d", "conv_transpose2d", "pixel_shuffle",
        "pixel_unshuffle", "prelu", "selu", "celu", "logsigmoid", "softsign", "tanhshrink", "hardshrink",
        "softshrink", "threshold", "softmin")},
}

#: Tensor methods (called only on a tensor) and the kind each returns; ``"size"`` depends on
#: its argument (``x.size()`` is a size, ``x.size(1)`` an int).
METHODS: dict[str, str] = {
    **{n: TENSOR for n in (
        "view", "reshape", "flatten", "permute", "transpose", "contiguous", "unsqueeze", "squeeze", "expand",
        "expand_as", "view_as", "reshape_as", "narrow", "mean", "sum", "sqrt", "rsqrt", "clamp", "clamp_min",
        "clamp_max", "add", "sub", "mul", "div", "relu", "sigmoid", "tanh", "exp", "abs", "neg", "pow", "softmax",
        "matmul", "float", "half", "bfloat16", "to", "type_as", "repeat", "amax", "flip", "roll", "clone", "detach",
        "masked_fill", "square", "var", "log_softmax")},
    **{n: TENSORS for n in ("chunk", "split", "unbind")},
    "size": "size", "dim": INT,
}

#: Attributes a bundle may read with getattr, only from a tensor.
ATTRIBUTES: dict[str, str] = {"shape": SIZE, "ndim": INT, "dtype": DTYPE, "device": DEVICE}

#: Nothing in a bundle writes into a tensor it did not create: no in-place method or operator is listed,
#: no ``out=`` is accepted, ``inplace`` arguments must be False, and batch_norm may update running
#: statistics only when it has none. (``automtl.save`` rewrites in-place calls to their out-of-place forms.)
_PYTHON_SIGNATURES = {fn: inspect.signature(fn) for fn, _ in FUNCTIONS.values() if inspect.isfunction(fn)}

#: Bounds on literal values: sizes and counts of CNNs fit easily, allocation bombs do not.
MAX_LITERAL_INT = 2**31
MAX_STRING = 64


# ---------------------------------------------------------------------------------------
# checking
# ---------------------------------------------------------------------------------------
def _literal_kind(v: Any, kinds: dict, where: str):
    """The kind of an argument value (recursing into tuples/lists), refusing anything not data."""
    if isinstance(v, fx.Node):
        kind = kinds.get(v)
        if kind is None or kind == "output":
            raise FileFormatError(f"{where} uses node {v.name!r}, which is not a value it may use; the file is corrupted, re-save the model")
        return kind
    if isinstance(v, bool):
        return BOOL
    if isinstance(v, int):
        if abs(v) > MAX_LITERAL_INT:
            raise FileFormatError(f"{where} holds the integer {str(v)[:30]}, larger than any size a model uses; the file is corrupted, re-save the model")
        return INT
    if isinstance(v, float):
        if math.isnan(v):
            raise FileFormatError(f"{where} holds a NaN constant; the file is corrupted, re-save the model")
        return FLOAT
    if v is None or v is Ellipsis:
        return "none"
    if isinstance(v, str):
        if len(v) > MAX_STRING or not v.replace("_", "").replace("-", "").isalnum():
            raise FileFormatError(f"{where} holds the string {v[:40]!r}, which is not an option name; the file is corrupted, re-save the model")
        return "str"
    if isinstance(v, torch.dtype):
        return DTYPE
    if isinstance(v, torch.device):
        raise FileFormatError(f"{where} names the device {str(v)[:20]!r}; an automtl file takes its device from the "
                              "input (x.device) and never names one, so it is crafted or corrupted, re-save the model")
    if isinstance(v, torch.memory_format):
        return "memory_format"
    if isinstance(v, slice):
        for part in (v.start, v.stop, v.step):
            if _literal_kind(part, kinds, where) not in (INT, "none"):
                raise FileFormatError(f"{where} slices with a value that is not an integer; the file is corrupted, re-save the model")
        return "slice"
    if isinstance(v, torch.Size):
        return SIZE
    if isinstance(v, (tuple, list)):
        inner = [_literal_kind(x, kinds, where) for x in v]
        if inner and all(k == TENSOR for k in inner):
            return TENSORS
        if all(k == INT for k in inner):
            return SIZE
        return "seq"
    raise FileFormatError(f"{where} holds a value of type {type(v).__name__}, which is not data; the file is corrupted, re-save the model")


def _arith(kinds_in: list, where: str) -> str:
    if any(k == TENSOR for k in kinds_in):
        if not all(k in (TENSOR,) + NUMBER for k in kinds_in):
            raise FileFormatError(f"{where} combines a tensor with a value that is not a number; the file is corrupted, re-save the model")
        return TENSOR
    if all(k in NUMBER for k in kinds_in):
        return INT if all(k in (INT, BOOL) for k in kinds_in) else FLOAT
    if all(k == SIZE for k in kinds_in):
        return SIZE
    raise FileFormatError(f"{where} applies arithmetic to values that are not tensors or numbers; the file is corrupted, re-save the model")


def _holds_tensor(value: Any, kinds: dict) -> bool:
    """Whether ``value`` is, or holds in a tuple, list or slice, a node of tensor kind."""
    if isinstance(value, fx.Node):
        return kinds.get(value) in (TENSOR, TENSORS)
    if isinstance(value, (tuple, list)):
        return any(_holds_tensor(v, kinds) for v in value)
    if isinstance(value, slice):
        return any(_holds_tensor(v, kinds) for v in (value.start, value.stop, value.step))
    return False


def _getitem(kinds_in: list, index: Any, where: str) -> str:
    base = kinds_in[0] if kinds_in else None
    if base == TENSOR:
        return TENSOR
    if base in (SIZE, TENSORS):
        if isinstance(index, slice):
            return base
        if kinds_in[1] == INT:
            return INT if base == SIZE else TENSOR
    raise FileFormatError(f"{where} indexes a value that is not a tensor, size or tuple of tensors; the file is corrupted, re-save the model")


def _function_kind(name: str, rule: str, args: tuple, arg_kinds: list, where: str) -> str:
    if rule == "arith":
        return _arith(arg_kinds, where)
    if rule == "getitem":
        if len(args) != 2:
            raise FileFormatError(f"{where} indexes with {len(args)} arguments; the file is corrupted, re-save the model")
        return _getitem(arg_kinds, args[1], where)
    if rule == "getattr":
        if len(args) != 2 or arg_kinds[0] != TENSOR or args[1] not in ATTRIBUTES:
            raise FileFormatError(
                f"{where} reads an attribute other than {sorted(ATTRIBUTES)} of a tensor, which automtl files never "
                "do; the file is corrupted or crafted, re-save the model")
        return ATTRIBUTES[args[1]]
    if not arg_kinds or arg_kinds[0] not in (TENSOR, TENSORS):
        raise FileFormatError(f"{where} calls {name} on a value that is not a tensor; the file is corrupted, re-save the model")
    return rule


def _method_kind(name: str, args: tuple, arg_kinds: list, where: str) -> str:
    if name not in METHODS:
        raise FileFormatError(
            f"{where} calls the method {name!r}, which is not on automtl's reviewed list of tensor methods; "
            "the file was not written by automtl.save or was crafted, re-save the model")
    if not arg_kinds or arg_kinds[0] != TENSOR:
        raise FileFormatError(f"{where} calls the method {name!r} on a value that is not a tensor; the file is corrupted or crafted, re-save the model")
    rule = METHODS[name]
    if rule == "size":
        return SIZE if len(args) == 1 else INT
    return rule


def _no_writes(node: fx.Node, at: str, kinds: dict) -> None:
    """Refuse a call that would write into a tensor it did not create (see _PYTHON_SIGNATURES' note)."""
    if node.kwargs.get("out") is not None:  # out=None (F.normalize's default, as tracing spells it) writes nothing
        raise FileFormatError(f"{at} writes its result into an existing tensor (out=), which automtl files never do; re-save the model")
    sig = _PYTHON_SIGNATURES.get(node.target)
    if sig is None:
        return
    try:
        bound = sig.bind(*node.args, **node.kwargs).arguments
    except TypeError:
        raise FileFormatError(f"{at} calls {getattr(node.target, '__name__', node.target)} with arguments it does not take; re-save the model") from None
    if bound.get("out") is not None:  # given by position (F.normalize's fifth): the same write as out=
        raise FileFormatError(f"{at} writes its result into an existing tensor (out=), which automtl files never do; re-save the model")
    if bound.get("inplace") not in (None, False):
        raise FileFormatError(f"{at} asks for an in-place operation, which automtl files never do; re-save the model")
    if node.target in (F.dropout, F.dropout2d) and bound.get("training", True) is not False:
        raise FileFormatError(f"{at} drops activations at random (training=True), which an automtl file, an eval-mode "
                              "graph, never does; re-save the model")
    if node.target is F.batch_norm and bound.get("training") not in (None, False) and (
            bound.get("running_mean") is not None or bound.get("running_var") is not None):
        raise FileFormatError(f"{at} updates running statistics, which automtl files never do; re-save the model")


def _check_to(node: fx.Node, at: str, kinds: dict) -> None:
    """``x.to(...)`` may only change the dtype (or match another tensor): no device strings."""
    for a in list(node.args[1:]) + [v for k, v in node.kwargs.items() if k not in ("non_blocking", "copy")]:
        if _literal_kind(a, kinds, at) not in (DTYPE, TENSOR):
            raise FileFormatError(f"{at} converts a tensor to something other than a dtype; the file is crafted or corrupted, re-save the model")


def check_graph(graph: fx.Graph, where: str) -> None:
    """Propagate value kinds through ``graph`` and refuse anything outside the vocabulary.

    Placeholders and attribute reads (``get_attr``) are tensors; each call's arguments must be
    data of the kinds its operation takes; the output is a dict of tensors. Modules are checked
    by :mod:`automtl.formats.modules` when they are built; here a module call must take a tensor.

    Raises:
        FileFormatError: naming the node and what it does that a model file may not.
    """
    allowed = {fn: name for name, (fn, _) in FUNCTIONS.items()}
    kinds: dict = {}
    for node in graph.nodes:
        at = f"node {node.name!r} of {where}"
        if node.op != "output":
            arg_kinds = [_literal_kind(a, kinds, at) for a in node.args]
            for v in node.kwargs.values():
                _literal_kind(v, kinds, at)
        if node.op in ("placeholder", "get_attr"):
            kinds[node] = TENSOR
        elif node.op == "call_function":
            name = allowed.get(node.target)
            if name is None:
                raise FileFormatError(f"{at} calls a function that is not on automtl's reviewed vocabulary; re-save the model")
            _no_writes(node, at, kinds)
            if name == "operator.getitem" and arg_kinds[:1] == [TENSOR] and _holds_tensor(node.args[1:], kinds):
                raise FileFormatError(f"{at} indexes a tensor with another tensor (a lookup table, or an index computed "
                                      "from the data), which an .automtl file does not describe: only the index's values "
                                      "decide whether it is in range, and they are known only when it runs; write a .pt2 "
                                      "with automtl.export() instead")
            kinds[node] = _function_kind(name, FUNCTIONS[name][1], node.args, arg_kinds, at)
        elif node.op == "call_method":
            kinds[node] = _method_kind(node.target, node.args, arg_kinds, at)
            if "out" in node.kwargs:
                raise FileFormatError(f"{at} writes its result into an existing tensor (out=); re-save the model")
            if node.target == "to":
                _check_to(node, at, kinds)
        elif node.op == "call_module":
            if arg_kinds[:1] != [TENSOR] or len(node.args) != 1 or node.kwargs:
                raise FileFormatError(f"{at} calls a module with something other than one tensor; the file is corrupted, re-save the model")
            kinds[node] = TENSOR
        elif node.op == "output":
            out = node.args[0] if len(node.args) == 1 else None
            if not isinstance(out, dict) or not all(isinstance(v, fx.Node) and kinds.get(v) == TENSOR for v in out.values()):
                raise FileFormatError(f"the output of {where} is not a mapping of task names to tensors; the file is corrupted, re-save the model")
            kinds[node] = "output"
        else:  # pragma: no cover - ops are checked when the graph is built
            raise FileFormatError(f"{at} has an unknown operation {node.op!r}; the file is corrupted, re-save the model")
