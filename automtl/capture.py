"""Step 1 of the pipeline: trace the backbone with torch.fx, propagate shapes, cut at the features.

Everything later works on the :class:`Capture` this returns: a GraphModule whose output is
the feature node, with every node's ``tensor_meta`` filled in from the example input.
"""
from __future__ import annotations

import copy
import difflib
import os
import traceback
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import BackboneError


@dataclass
class Capture:
    """A traced, shape-annotated and cut backbone."""

    graph_module: fx.GraphModule
    feature_node: str
    input_shape: tuple
    feature_shape: tuple

    @property
    def conv_nodes(self) -> list[fx.Node]:
        """The Conv2d call sites, in execution order."""
        return [n for n in self.graph_module.graph.nodes if is_conv_node(self.graph_module, n)]


def is_conv_node(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Conv2d)


class _Tracer(fx.Tracer):
    """The default tracer, plus the user's extra leaf module types."""

    def __init__(self, leaf_modules: Sequence[type] = ()):
        super().__init__()
        self._extra_leaves = tuple(leaf_modules)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self._extra_leaves and isinstance(m, self._extra_leaves):
            return True
        return super().is_leaf_module(m, qualname)


def _user_frame(exc: BaseException) -> Optional[traceback.FrameSummary]:
    """The innermost frame of the traceback that is not in torch or automtl: the user's line at fault."""
    torch_dir = os.path.dirname(torch.__file__)
    own_dir = os.path.dirname(__file__)
    frames = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(frames):
        if not fr.filename.startswith((torch_dir, own_dir)) and "<" not in fr.filename:
            return fr
    return None


def _faulty_module(exc: BaseException, backbone: nn.Module) -> str:
    """Name of the module whose forward was running when tracing failed."""
    names = {id(m): n for n, m in backbone.named_modules()}
    tb = exc.__traceback__
    found = None
    while tb is not None:
        self_obj = tb.tb_frame.f_locals.get("self")
        if isinstance(self_obj, nn.Module) and id(self_obj) in names:
            found = (names[id(self_obj)] or "<root>", type(self_obj).__name__)
        tb = tb.tb_next
    return f"{found[0]} ({found[1]})" if found else type(backbone).__name__


def trace(backbone: nn.Module, leaf_modules: Sequence[type] = (), concrete_args: Optional[dict] = None) -> fx.GraphModule:
    """Symbolically trace ``backbone``; a failure names the module and the Python line at fault."""
    tracer = _Tracer(leaf_modules)
    try:
        graph = tracer.trace(backbone, concrete_args=concrete_args)
    except Exception as exc:  # fx raises many types; all mean "not traceable as written"
        frame = _user_frame(exc)
        where = f" at {frame.filename}:{frame.lineno} ({frame.line.strip() if frame.line else ''})" if frame else ""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackboneError(
            f"torch.fx cannot trace the backbone in module {_faulty_module(exc, backbone)}{where}: {first}; "
            "mark that module as a leaf (leaf_modules=[ItsClass]) or fix its Python control flow with "
            "concrete_args, then try again"
        ) from exc
    return fx.GraphModule(tracer.root, graph, type(backbone).__name__)


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

    The feature node is the last node with a 4-D output unless ``feature_node`` names one.
    The backbone is copied first: converting never changes the user's module.
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
    backbone = copy.deepcopy(backbone)
    gm = trace(backbone, leaf_modules, concrete_args)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise BackboneError(
            f"the backbone's forward takes {len(placeholders)} inputs but automtl needs exactly one image tensor; "
            "wrap it in a module whose forward(x) takes one tensor, or fix the others with concrete_args"
        )
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    except Exception as exc:
        raise BackboneError(
            f"the backbone fails on an example input of shape {tuple(example_input.shape)} ({exc}); "
            "pass an example_input with the channels and size the backbone expects"
        ) from exc
    finally:
        gm.train(was_training)

    node = _pick_feature_node(gm, feature_node)
    if not any(is_conv_node(gm, n) for n in _ancestors(node)):
        raise BackboneError(
            f"the backbone {type(backbone).__name__} has no Conv2d before its feature node {node.name!r}; "
            "automtl converts convolutional backbones, so give it one with nn.Conv2d layers"
        )
    _cut(gm, node)
    return Capture(gm, node.name, tuple(example_input.shape), tuple(_tensor_meta(node).shape))


def _ancestors(node: fx.Node) -> Iterable[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        yield n
        stack.extend(n.all_input_nodes)


def _pick_feature_node(gm: fx.GraphModule, name: Optional[str]) -> fx.Node:
    nodes = list(gm.graph.nodes)
    if name is not None:
        by_name = {n.name: n for n in nodes}
        # Users think in module paths ("layer4"), fx in node names ("layer4_1_relu_1"): accept both.
        by_target = {str(n.target): n for n in nodes if n.op == "call_module"}
        node = by_name.get(name) or by_target.get(name)
        if node is None:
            close = difflib.get_close_matches(name, list(by_name) + list(by_target), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; list them with automtl inspect or capture(...).graph_module.graph"
            raise BackboneError(f"the backbone has no node named {name!r}{hint}")
        meta = _tensor_meta(node)
        if meta is None or len(meta.shape) != 4:
            shape = tuple(meta.shape) if meta is not None else "no tensor"
            raise BackboneError(
                f"feature node {name!r} has output {shape}, not a 4-D feature map; name a node whose output is (N, C, H, W)"
            )
        return node
    four_d = [n for n in nodes if n.op != "output" and (m := _tensor_meta(n)) is not None and len(m.shape) == 4]
    if not four_d:
        raise BackboneError("the backbone produces no 4-D feature map; automtl needs a CNN whose layers output (N, C, H, W)")
    return four_d[-1]


def _cut(gm: fx.GraphModule, node: fx.Node) -> None:
    """Make ``node`` the output and drop everything only the removed tail needed."""
    graph = gm.graph
    old_out = next(n for n in graph.nodes if n.op == "output")
    graph.erase_node(old_out)
    graph.output(node)
    # Keep only the feature node's ancestors: the classifier and anything else after the cut goes,
    # including impure nodes that fx's own dead code elimination would keep.
    keep = set(_ancestors(node))
    for n in reversed(list(graph.nodes)):
        if n.op != "output" and n not in keep:
            graph.erase_node(n)
    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()


def count_parameters(module: nn.Module) -> int:
    """Number of distinct parameters (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())
