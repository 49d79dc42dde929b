"""Which axes of the input image each axis of a traced tensor follows, read from the graph alone.

Used where the runs at other sizes that tell a map's layout cannot run (a backbone that takes one size:
Swin, VOLO and most vision transformers in timm). Every axis gets a *label*: its atoms, major to minor, each an
axis of the input with a size: ``N``, ``C``, ``H``, ``W``, the fine part of a split height or width ``h`` and
``w`` (the position inside a window or patch), or ``?``. A convolution makes (N, C, H, W) of an (N, C, H, W)
map; ``permute`` and ``transpose`` move labels; a reshape (``view``, ``flatten``, ``unflatten``, ``squeeze``)
lays the input's atoms out in a row and cuts the row at the output's sizes, so a map folded into tokens
(N, H·W, C) and back is followed, as are windows (N·H/7·W/7, 7, 7, C, not a map) and a patch merging's
space-to-depth (N, H/2, W/2, 2·2·C, a map). A linear layer changes the last axis's size only; any other
operation keeps the labels of an input of its own shape (a residual add, a norm, an activation), known ones
first. What these rules do not cover is unlabeled; made from a tensor laid out otherwise than (N, C, H, W),
it is *other* (attention over tokens), which no map is.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

Atom = Tuple[str, int]  # (axis of the input, size)
Label = Tuple[Atom, ...]  # one axis: its atoms, major to minor; () for an axis of size 1 from a reshape

#: The class of a 4-D tensor laid out as the input image, and channels-last.
NCHW = ("N", "C", "H", "W")
NHWC = ("N", "H", "W", "C")

_FINE = {"H": "h", "W": "w", "C": "C", "h": "h", "w": "w"}  # the minor part of a split axis
_REJOIN = {("H", "h"), ("W", "w"), ("C", "C"), ("h", "h"), ("w", "w")}  # adjacent atoms that are one axis again

_NCHW_MODULES = (nn.Conv2d, nn.ConvTranspose2d, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.MaxPool2d,
                 nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample)
_NCHW_FUNCTIONS = {F.conv2d, F.conv_transpose2d, F.interpolate, F.avg_pool2d, F.max_pool2d,
                   F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.batch_norm, F.group_norm}
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
_MOVES = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis"}
_PADS = (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)
_RESIZES = {"pad", "getitem", "narrow", "cat", "concat", "concatenate"}  # same rank, sizes change per axis


def _shape(node) -> Optional[tuple]:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def call_name(node: fx.Node) -> Optional[str]:
    """The method or function a call node makes (``"permute"`` for ``x.permute`` and ``torch.permute``)."""
    if node.op == "call_method":
        return node.target
    return getattr(node.target, "__name__", None) if node.op == "call_function" else None


def moves_axes(node: fx.Node) -> bool:
    return call_name(node) in _MOVES


def fresh(shape: tuple, names: tuple) -> List[Label]:
    return [((name, size),) for name, size in zip(names, shape)]


def _rejoined(atoms: List[Atom]) -> Label:
    out: List[Atom] = []
    for name, size in atoms:
        if size == 1 and name != "N":
            continue
        if out and (out[-1][0], name) in _REJOIN:
            out[-1] = (out[-1][0], out[-1][1] * size)
        else:
            out.append((name, size))
    return tuple(out)


def reshaped(labels: List[Label], sizes: tuple) -> Optional[List[Label]]:
    """The labels of a reshape of a tensor labelled ``labels`` to ``sizes``: its atoms in a row, cut at the sizes
    (an atom cut in two leaves its major part the name and its minor part the fine name); None where a size does not
    fall on the atoms' factors."""
    row = [a for label in labels for a in label]
    if 0 in sizes or any(n == 0 for _, n in row):
        return None  # an empty tensor: no axis of it is the image's
    out: List[Label] = []
    for size in sizes:
        part: List[Atom] = []
        while row and row[0][1] == 1:  # a batch of one goes with the part that follows it
            part.append(row.pop(0))
        product = 1
        while product < size:
            if not row:
                return None
            name, n = row.pop(0)
            if size % (product * n) == 0:
                part.append((name, n))
                product *= n
            elif n % (size // product) == 0 and size % product == 0:
                major = size // product
                part.append((name, major))
                row.insert(0, (_FINE.get(name, "?"), n // major))
                product = size
            else:
                return None
        if product != size:
            return None
        out.append(_rejoined(part))
    if any(n != 1 for _, n in row):
        return None
    return out


def axis_class(label: Label) -> str:
    """``N``, ``C``, ``H``, ``W``, ``L`` (height and width flattened, as tokens), ``1`` (size 1) or ``?``."""
    names = [name for name, _ in label]
    if not names or all(n == 1 for _, n in label) and names != ["N"]:
        return "1"
    if len(names) == 1 and names[0] in ("N", "H", "W"):
        return names[0]
    if "C" in names and set(names) <= {"C", "h", "w"}:
        return "C"  # the channels, with a patch's pixels folded in (space-to-depth)
    if names == ["H", "W"]:
        return "L"
    return "?"


def classify(labels: List[Label]) -> tuple:
    """The axes of a 4-D tensor: :data:`NCHW`, :data:`NHWC`, or a tuple of :func:`axis_class` (size-1 axes count as
    whichever axis is wanted: a 1 x 1 map)."""
    classes = tuple(axis_class(label) for label in labels)
    for layout in (NCHW, NHWC):
        if classes[0] == "N" and all(c == want or c == "1" for c, want in zip(classes[1:], layout[1:])):
            return layout
    return classes


def _ints(args) -> Optional[list]:
    flat = list(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else list(args)
    return flat if all(isinstance(d, int) for d in flat) else None


def _moved(node: fx.Node, labels: List[Label]) -> Optional[List[Label]]:
    name, rank = call_name(node), len(labels)
    if rank == 0:
        return None
    args = list(node.args[1:])
    if name == "permute":
        dims = _ints(args or [node.kwargs.get("dims", ())])
        return [labels[d % rank] for d in dims] if dims is not None and len(dims) == rank else None
    pair = _ints(args[:2] or [node.kwargs.get("dim0"), node.kwargs.get("dim1")])
    if pair is None or len(pair) != 2:
        return None
    out = list(labels)
    if name in ("movedim", "moveaxis"):
        out.insert(pair[1] % rank, out.pop(pair[0] % rank))
    else:
        out[pair[0] % rank], out[pair[1] % rank] = out[pair[1] % rank], out[pair[0] % rank]
    return out


def _resized(labels: List[Label], shape: tuple) -> List[Label]:
    """Same rank, other sizes (a pad, a crop, a concatenation): an axis of one atom keeps its name, an axis of more
    atoms whose size changes is ``?`` (a class token before the tokens)."""
    out = []
    for label, size in zip(labels, shape):
        if _size(label) == size:
            out.append(label)
        else:
            out.append(((label[0][0] if len(label) == 1 else "?", size),))
    return out


def _size(label: Label) -> int:
    size = 1
    for _, n in label:
        size *= n
    return size


def _sliced(node: fx.Node) -> bool:
    """An index of slices only (and ``...``): every axis stays where it was. Not an index by a tensor (a gather or a
    shuffle: which position goes where is known only when it runs), nor one that drops or adds axes (an int, a None:
    labels matched by position would land on the wrong axes)."""
    if call_name(node) != "getitem":
        return True
    index = node.args[1] if len(node.args) > 1 else None
    index = index if isinstance(index, tuple) else (index,)
    return all(i is Ellipsis or isinstance(i, slice) for i in index)


def _known(labels: List[Label]) -> bool:
    return all(axis_class(label) != "?" for label in labels)


class _Axes:
    """One pass over a graph: :attr:`labels` per node where the rules reach; :attr:`other`, the unlabeled nodes
    computed from a 4-D tensor laid out otherwise than (N, C, H, W) (channels-last maps, windows, attention heads)
    or from what was computed from one (tokens of a channels-last map, attention over them)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.labels: Dict[fx.Node, List[Label]] = {}
        self.other: set = set()
        after_otherwise: set = set()  # computed from a 4-D tensor laid out otherwise, labeled or not
        for node in gm.graph.nodes:
            shape = _shape(node)
            if node.op == "placeholder":
                if shape is not None and len(shape) == 4:
                    self.labels[node] = fresh(shape, NCHW)
                continue
            try:
                found = self._rule(node, shape) if shape is not None else None
            except (ArithmeticError, IndexError, KeyError, TypeError, ValueError):  # a form the rules did not foresee
                found = None
            if found is not None and len(found) == len(shape):
                self.labels[node] = found
            if any(i in after_otherwise or (i in self.labels and len(self.labels[i]) == 4
                                            and classify(self.labels[i]) != NCHW) for i in node.all_input_nodes):
                after_otherwise.add(node)
                if node not in self.labels:
                    self.other.add(node)
        for node in reversed(gm.graph.nodes):  # and back: the branch a residual add joins has the add's labels
            labels, shape = self.labels.get(node), _shape(node)
            if labels is None or node.op == "placeholder" or moves_axes(node):
                continue
            for i in node.all_input_nodes:
                if i not in self.labels and i not in self.other and _shape(i) == shape:
                    self.labels[i] = labels

    def _module(self, node: fx.Node) -> Optional[nn.Module]:
        return self.gm.get_submodule(node.target) if node.op == "call_module" else None

    def _rule(self, node: fx.Node, shape: tuple) -> Optional[List[Label]]:
        first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if first is None and node.args and isinstance(node.args[0], (tuple, list)):  # torch.cat([a, b], dim)
            first = next((a for a in node.args[0] if isinstance(a, fx.Node) and a in self.labels), None)
        source = self.labels.get(first) if first is not None else None
        name, module = call_name(node), self._module(node)
        if name == "getitem" and not _sliced(node):
            return None
        if source is not None:
            if name in _MOVES:
                return _moved(node, source)
            if name in _RESHAPES or node.target in (torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze,
                                                    torch.unflatten):
                return reshaped(source, shape)
            if len(source) == 4 and classify(source) == NCHW and len(shape) == 4 and (
                    isinstance(module, _NCHW_MODULES) or node.target in _NCHW_FUNCTIONS):
                return fresh(shape, NCHW)
            if isinstance(module, nn.Linear) or node.target is F.linear:  # mixes the last axis only
                last = source[-1]
                if _size(last) == shape[-1]:
                    return source
                return source[:-1] + [(("C" if axis_class(last) == "C" else "?", shape[-1]),)]
            if len(source) == len(shape) and (name in _RESIZES or isinstance(module, _PADS)):
                return _resized(source, shape)
        if name == "getitem" and first is not None and _shape(first) is None:  # one output of several: attention's
            same = [self.labels[i] for i in first.all_input_nodes if i in self.labels and _shape(i) == shape]
            return same[0] if same else None  # output, its query's (tokens in, tokens out)
        same = [self.labels[i] for i in node.all_input_nodes if i in self.labels and _shape(i) == shape]
        return next((s for s in same if _known(s)), same[0] if same else None)


def mark(gm: fx.GraphModule, key: str, unknown: tuple) -> None:
    """Set ``node.meta[key]`` on the nodes the rules reach: a 4-D node's :func:`classify`, another's
    :func:`axis_class` per axis (tokens: ``("N", "L", "C")``); and ``unknown`` on the 4-D nodes computed from tensors
    laid out otherwise through operations the rules do not cover."""
    axes = _Axes(gm)
    for node in gm.graph.nodes:
        shape = _shape(node)
        if shape is None:
            continue
        if node in axes.labels:
            labels = axes.labels[node]
            node.meta[key] = classify(labels) if len(shape) == 4 else tuple(axis_class(label) for label in labels)
        elif node in axes.other and len(shape) == 4:
            node.meta[key] = unknown
