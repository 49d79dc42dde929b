"""Where the backbone's features are cut: the default feature node, and the one a user names.

The default is the deepest feature map on the backbone's *trunk* (the 4-D maps that keep their
spatial layout from the input on) before the spatial resolution collapses (global pooling,
flatten, a reduction over H and W) and before any classifier module. A squeeze-excite branch
pools, but its result is multiplied back into the trunk, so it is not where the trunk ends.

A 4-D tensor is not always laid out (N, C, H, W): transformer-style blocks permute a map to
channels-last (N, H, W, C) for a LayerNorm and a Linear, and attention holds (N, heads, tokens, dim).
Capture runs the graph again on inputs taller and wider than the example and records, per node,
:data:`META_LAYOUT`: ``"map"`` where axis 2 grows with the input's height, axis 3 with its width and
axis 1 with neither; ``"channels_last"`` where axes 1 and 2 follow the height and width and axis 3 neither (a
feature node of that layout is permuted to (N, C, H, W) by the cut); ``"fixed"`` where the channels stay on axis 1
but the size does not follow the input (a pooling to a fixed size); ``"other"`` for any other layout (attention
tensors, tokens). Only maps, of either layout, are feature nodes, and
maps that tokens lead back to (PVT's stages end in ``(N, C, H, W)``) count as the trunk's.
"""
from __future__ import annotations

import difflib
from typing import Optional

import torch.nn.functional as F
from torch import fx, nn

from . import axes
from .axes import NCHW, NHWC, moves_axes as _moves_axes
from .errors import BackboneError
from .graphpasses import ancestors

#: Module names (the last part of a module path) that hold a model's classifier.
CLASSIFIER_NAMES = {"classifier", "aux_classifier", "logits", "aux_logits", "AuxLogits", "last_linear"}
_GLOBAL_POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_GLOBAL_POOL_FUNCTIONS = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_REDUCTIONS = {"mean", "amax", "sum", "max", "amin", "min", "logsumexp", "std", "var"}

#: Node meta set by capture from runs at a taller and a wider input: "map", "channels_last", "fixed" or "other" (see the
#: module doc); absent where those runs could not reach the node (the backbone refuses other sizes).
META_LAYOUT = "automtl_layout"


def _shape(node: fx.Node):
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def _is_map(node: fx.Node) -> bool:
    s = _shape(node)
    return s is not None and len(s) == 4 and all(d > 0 for d in s)  # an empty tensor is no map


def _layout(node: fx.Node) -> Optional[str]:
    """:data:`META_LAYOUT`, or where the runs at other sizes did not reach the node (a backbone that takes one
    size only), ``"channels_last"`` or ``"other"`` when its axes are known from the graph (:func:`mark_axes`) to be
    laid out so."""
    found = node.meta.get(META_LAYOUT)
    if found is None and META_AXES in node.meta:
        axes_ = node.meta[META_AXES]
        return "map" if axes_ == NCHW else "channels_last" if axes_ == NHWC else "other"
    return found


def is_channels_last(node: fx.Node) -> bool:
    """A map laid out (N, H, W, C), as transformer-style stages keep theirs (Swin, MambaOut, Sequencer in timm):
    a feature node the cut moves to (N, C, H, W) with a permute."""
    return _layout(node) == "channels_last"


#: Node meta set by :func:`mark_axes`: which axis of the input each axis of a 4-D node follows ("N", "C", "H", "W",
#: or another class of :func:`automtl.axes.axis_class`).
META_AXES = "automtl_axes"
UNKNOWN_AXES = ("?", "?", "?", "?")


def mark_axes(gm: fx.GraphModule) -> None:
    """Set :data:`META_AXES` on the 4-D nodes whose axes follow from the input's through the graph
    (:mod:`automtl.axes`: convolutions, permutes, reshapes to tokens and back, windows, linear layers, residual adds);
    :data:`UNKNOWN_AXES` (not a map) on those computed from tensors laid out otherwise through operations it does not
    follow (attention); the rest stay unmarked."""
    axes.mark(gm, META_AXES, UNKNOWN_AXES)


def laid_out(shape: tuple, taller: tuple, wider: tuple) -> str:
    """:data:`META_LAYOUT` of a 4-D node from its shapes at the example, a taller and a wider input."""
    if len(taller) == len(wider) == 4 and taller[1] > shape[1] and wider[2] > shape[2] and taller[0] == shape[0] \
            and wider[0] == shape[0] and taller[2:] == shape[2:] and (wider[1], wider[3]) == (shape[1], shape[3]):
        return "channels_last"
    if not (len(taller) == len(wider) == 4) or taller[1] != shape[1] or wider[1] != shape[1] \
            or taller[3] != shape[3] or wider[2] != shape[2]:
        return "other"
    return "map" if taller[2] > shape[2] and wider[3] > shape[3] else "fixed"


def _carries_maps(node: fx.Node) -> bool:
    """Maps in another form that the trunk passes through: a tuple of them (``chunk``, ``split``) or a
    view with the channels split in two axes (``view(N, G, C // G, H, W)`` in a channel shuffle)."""
    meta = node.meta.get("tensor_meta")
    # TensorMetadata is itself a NamedTuple: only a sequence without a shape is a tuple of outputs.
    metas = [meta] if hasattr(meta, "shape") or not isinstance(meta, (tuple, list)) or not meta else meta
    return all(hasattr(m, "shape") and len(m.shape) >= 4 for m in metas)


def _keeps_spatial(node: fx.Node, inputs: list) -> bool:
    """A map with fewer axes that keeps its input's height and width: one channel taken apart (``x[:, 0]``,
    (N, H, W), as GoogLeNet's and Inception's ``transform_input`` do before concatenating them back)."""
    s = _shape(node)
    if s is None or len(s) != 3:
        return False
    return any((si := _shape(i)) is not None and len(si) >= 4 and tuple(si[-2:]) == tuple(s[-2:]) for i in inputs)


def _is_resize(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An adaptive pooling to a fixed size (VGG's ``AdaptiveAvgPool2d(7)``): the classifier's input adapter."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _GLOBAL_POOL_MODULES)
    return node.op == "call_function" and node.target in _GLOBAL_POOL_FUNCTIONS


def _one(size) -> bool:
    return size == 1 or (isinstance(size, (tuple, list)) and all(s == 1 for s in size))


def _is_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An average pooling with a kernel larger than 2 (a 2x2 pooling is a downsampling step, not a global pool)."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        kernel = mod.kernel_size if isinstance(mod, nn.AvgPool2d) else None
    elif node.op == "call_function" and node.target is F.avg_pool2d:
        kernel = node.args[1] if len(node.args) > 1 else node.kwargs.get("kernel_size")
    else:
        return False
    kernel = kernel if isinstance(kernel, (tuple, list)) else (kernel, kernel)
    return all(isinstance(k, int) and k > 2 for k in kernel)


def _spatial(node: fx.Node) -> tuple:
    """A 4-D node's height and width, wherever its layout keeps them."""
    shape = _shape(node)
    return tuple(shape[1:3]) if is_channels_last(node) else tuple(shape[2:])


def _collapses(gm: fx.GraphModule, node: fx.Node, trunk: frozenset = frozenset()) -> bool:
    """A global pooling, a reduction over the spatial axes, or any operation that makes a 1x1 map of a map of the
    ``trunk`` larger than 4x4, more than a downsampling step does (a stride-2 convolution without padding takes
    3x3 or 4x4 to 1x1, Inception's last stages at 96 px): a convolution whose kernel covers such a map is a fully
    connected layer (VGG's ``fc6`` as a 7x7 convolution, timm's ``ConvMlp``), whatever it makes of a larger input."""
    if _is_pool(gm, node) and _shape(node)[2:] == (1, 1) and any(
            _is_map(i) and _shape(i)[2] * _shape(i)[3] > 1 for i in node.all_input_nodes):
        return True  # a fixed-size pooling over the whole map (AvgPool2d(7) at the end of a classifier)
    if _is_map(node) and _spatial(node) == (1, 1) and not _moves_axes(node) and any(
            i in trunk and _is_map(i) and max(_spatial(i)) > 4 for i in node.all_input_nodes):
        return True
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return isinstance(mod, _GLOBAL_POOL_MODULES) and _one(mod.output_size)
    if node.op == "call_function" and node.target in _GLOBAL_POOL_FUNCTIONS:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return _one(size)
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name in _REDUCTIONS:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = dims if isinstance(dims, (tuple, list)) else (dims,)
        source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        classes = source.meta.get(META_AXES) if source is not None else None
        if classes and _shape(source) is not None and len(classes) == len(_shape(source)) != 4:
            # tokens or another rank whose axes the graph tells: a reduction over the image's axes (a mean over tokens)
            return any(isinstance(d, int) and classes[d % len(classes)] in ("L", "H", "W") for d in dims)
        return any(d in (2, 3, -1, -2) for d in dims)
    return False


def _module_paths(node: fx.Node) -> list:
    stack = node.meta.get("nn_module_stack") or {}
    return [v[0] if isinstance(v, tuple) else str(k) for k, v in stack.items()]


def _in_classifier(node: fx.Node) -> bool:
    return any(p.split(".")[-1] in CLASSIFIER_NAMES for p in _module_paths(node))


def _is_named_tuple(node: fx.Node) -> bool:
    """A call that builds a namedtuple (torch.fx records the constructor as a call)."""
    return node.op == "call_function" and isinstance(node.target, type) and issubclass(node.target, tuple) \
        and isinstance(getattr(node.target, "_fields", None), tuple)


def _chosen_output(gm: fx.GraphModule, notes: list) -> fx.Node:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    value = out.args[0]
    if isinstance(value, fx.Node) and _is_named_tuple(value):  # NT(low=y, high=z): its fields are the outputs
        fields = value.target._fields
        value = {**dict(zip(fields, value.args)), **value.kwargs}
        value = {k: value[k] for k in fields if k in value}
    if isinstance(value, fx.Node):
        return value
    items = list(value.items()) if isinstance(value, dict) else list(enumerate(value)) if isinstance(value, (tuple, list)) else []
    items = [(k, v) for k, v in items if isinstance(v, fx.Node)]
    if not items:
        raise BackboneError("the backbone's output holds no tensor; automtl needs a CNN whose forward returns its feature or logit maps")
    key, node = next(((k, v) for k, v in items if k == "out"), items[0])
    if len(items) > 1:
        notes.append(f"the backbone returns {len(items)} outputs ({', '.join(repr(k) for k, _ in items)}); automtl cut "
                     f"its features on the way to output {key!r}; pass feature_node='module.path' to choose another place")
    return node


def trunk_nodes(gm: fx.GraphModule, output: fx.Node) -> list:
    """The 4-D trunk nodes that feed ``output``, in execution order.

    A node that returns a tuple of maps (``x.chunk(2, dim=1)`` in ShuffleNet, CSPNet's split) or a
    5-D view of one (ShuffleNet's channel shuffle) carries the trunk on but is no feature node itself.
    """
    keep = set(ancestors(output))
    trunk: set = set()
    collapsed: set = set()  # a collapse and what is computed from it off the trunk
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            trunk.add(n)
            continue
        if n not in keep:
            continue
        if _collapses(gm, n, trunk):
            collapsed.add(n)
            continue
        inputs = [i for i in n.all_input_nodes if i in trunk]
        if inputs and (_carries_maps(n) or _keeps_spatial(n, inputs)):
            trunk.add(n)
        elif any(i in collapsed for i in n.all_input_nodes):
            collapsed.add(n)
        elif _layout(n) in ("map", "channels_last"):  # a map again after tokens (a PVT stage's end)
            trunk.add(n)
    maps = [n for n in gm.graph.nodes if n in trunk and n.op != "placeholder" and _is_map(n)
            and _layout(n) != "other"]
    from .capture import is_conv_node  # capture imports this module

    sized = [n for n in maps if _layout(n) != "fixed"]
    # fixed-size maps after the convolutions are a head (timm's VGG ConvMlp); where the input is resized to a fixed
    # size first, every map after a convolution is of fixed size, and those are the trunk
    return sized if sized and any(is_conv_node(gm, a) for a in ancestors(sized[-1])) else maps


def pick_feature_node(gm: fx.GraphModule, name: Optional[str], notes: list) -> fx.Node:
    """The feature node: the one ``name`` gives (node name or module path), or the default (see the module doc)."""
    mark_axes(gm)
    if name is not None:
        return _named(gm, name)
    output = _chosen_output(gm, notes)
    candidates = trunk_nodes(gm, output)
    classifier = {n for n in gm.graph.nodes if n.op != "placeholder" and _in_classifier(n)}
    after = set()
    for n in gm.graph.nodes:
        if n in classifier or any(i in after for i in n.all_input_nodes):
            after.add(n)
    candidates = [n for n in candidates if n not in after]
    # A resize to a fixed size at the trunk's end only adapts the map to the classifier's input
    # (VGG, AlexNet): at a small input it would upsample the features.
    while len(candidates) > 1 and _is_resize(gm, candidates[-1]):
        candidates.pop()
    if not candidates:
        four_d = [n for n in gm.graph.nodes if n.op not in ("output", "placeholder") and _is_map(n)
                  and _layout(n) != "other"]
        if not four_d:
            raise BackboneError("the backbone produces no 4-D feature map; automtl needs a CNN whose layers output (N, C, H, W)")
        known = [n for n in four_d if _layout(n) in ("map", "channels_last") or n.meta.get(META_AXES) == NCHW]
        if not known:  # all made by reshapes (TNT's pixel patches, attention heads): a guess would be a wrong cut
            raise BackboneError(
                "no 4-D tensor on the way to the backbone's output is known to be a feature map (N, C, H, W): its 4-D "
                f"tensors (such as {four_d[-1].name!r} of shape {_shape(four_d[-1])}) are made by reshapes of tokens "
                "or patches, as in a vision transformer; name a node or module whose output is (N, C, H, W) with "
                "feature_node=, or convert a convolutional backbone")
        four_d = known
        notes.append(f"no 4-D map leads from the input to the output without a spatial collapse, so the features are "
                     f"cut at the last 4-D map, {four_d[-1].name!r} of shape {_shape(four_d[-1])}; pass "
                     "feature_node= (a node name or module path) to cut elsewhere")
        return four_d[-1]
    return candidates[-1]


def _named(gm: fx.GraphModule, name: str) -> fx.Node:
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    by_name = {n.name: n for n in nodes}
    # Users think in module paths ("layer4", "backbone.layer4"), fx in node names ("layer4_1_relu_1"):
    # a module path means the last value computed inside that module, its output.
    by_path: dict = {}
    calls: dict = {}  # module path -> the last node of each call of it, in order ("path@k" names the k-th)
    for n in nodes:
        if n.op == "call_module":
            by_path[str(n.target)] = n
        for p in _module_paths(n):
            by_path[p] = n
        for key, value in (n.meta.get("nn_module_stack") or {}).items():
            calls.setdefault(value[0] if isinstance(value, tuple) else str(key), {})[key] = n
    path, _, k = name.rpartition("@")
    if len(calls.get(name, ())) > 1:
        outputs = list(calls[name].values())
        raise BackboneError(
            f"module {name!r} runs {len(outputs)} times in the forward, so its output is not one place; name one "
            f"call: {', '.join(repr(f'{name}@{i}') for i in range(len(outputs)))} (nodes "
            f"{', '.join(repr(n.name) for n in outputs)})")
    if path in calls and k.isdigit():
        if int(k) >= len(calls[path]):
            raise BackboneError(f"module {path!r} runs {len(calls[path])} time(s) in the forward, so it has no call "
                                f"{name!r}; name one of {', '.join(repr(f'{path}@{i}') for i in range(len(calls[path])))}")
        node = list(calls[path].values())[int(k)]
    else:
        node = by_name.get(name) or by_path.get(name)
    if node is None:
        maps = [p for p, n in by_path.items() if _is_map(n) and _layout(n) != "other"]
        close = difflib.get_close_matches(name, maps, n=3) or difflib.get_close_matches(name, list(by_name), n=3)
        hint = (f"; did you mean {', '.join(close)}?" if close else
                f"; name a module path as print(backbone) shows it{', e.g. ' + repr(maps[-1]) if maps else ''}")
        raise BackboneError(f"the backbone has no node named {name!r} (nor a module path){hint}")
    if not _is_map(node):
        shape = _shape(node) or "no tensor"
        raise BackboneError(
            f"feature node {name!r} has output {shape}, not a 4-D feature map; name a node or module whose output is (N, C, H, W)"
        )
    if _layout(node) == "other":
        raise BackboneError(
            f"feature node {name!r} has output {_shape(node)} whose axes do not follow the input as (N, C, H, W) or "
            "(N, H, W, C) do (a size fixed or read from another axis, tokens or attention heads); name a node or "
            "module whose output is a map, e.g. where a block's output is folded back into one")
    return node
