"""Collapsing a compact model's fx graph into boxes of blocks: what :mod:`automtl.render` draws.

The graph is drawn at the level of *blocks*, not operators, so that a ResNet-50 or a
MobileNetV2 stays readable. The collapsing rule:

1. A convolution (policy layer) belongs to the block named by its layer name up to the
   first numeric index that is followed by a named child (``layer3.2.conv1`` ->
   ``layer3.2``, ``features.7.conv.0.0`` -> ``features.7``, ``layers.8.0.layers.3`` ->
   ``layers.8.0``); failing that, up to the first numeric index (``features.0.0`` ->
   ``features.0``); failing that, the whole name (``conv1``).
2. One box per block and task class (the tuple of tasks a node computes for): all the
   block's convolutions of that class go into the box.
3. Every other operator (ReLU, BatchNorm, pooling, add, ...) is folded into the box of its
   latest input (a residual add inside one task class makes that box say "+ residual").
   The one exception is a *join* (an add or concat) whose inputs come from boxes of a
   different task class than its own, i.e. where a task's branch meets a value computed for
   more tasks (a task-owned residual path meeting a shared shortcut): it is kept as its own
   small "+" node. (An operator that fewer tasks reach through an identity skip opens the
   box of those tasks in the current block.)
4. A box whose outputs go to two or more task classes is a branch point: its out-edges go
   through a black dot, so the split is visible at a glance.
5. If the drawing still has more than ``max_boxes`` nodes (a policy that splits the tasks
   early and often), unbranched runs of boxes of one task class are merged into one box
   ("layer1.0 - layer2.3, 22 convs").

Identity skips emit no operator; they are listed in the box of the task's path through that
block ("skip conv2"), and a box that holds a skipped layer (identity or 1x1 projection) has
a dashed border.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

from .policy import SKIP, Policy

__all__ = ["Drawing", "block_names", "block_of", "branch_points", "collapse"]


def block_of(layer: str) -> str:
    """The block a layer belongs to (rule 1 of the module docstring)."""
    parts = layer.split(".")
    for i in range(len(parts) - 1):
        if parts[i].isdigit() and not parts[i + 1].isdigit():
            return ".".join(parts[: i + 1])
    for i, p in enumerate(parts):
        if p.isdigit() and i > 0:
            return ".".join(parts[: i + 1])
    return layer


def block_names(layers) -> dict:
    """layer -> block for a model's layers: :func:`block_of`, except that a trailing index with no
    sibling (``stem.0`` in a model with no ``stem.1``) is dropped, so the block is called ``stem``."""
    names = {l: block_of(l) for l in layers}
    parents: dict = {}
    for l, b in names.items():
        head, _, last = b.rpartition(".")
        if head and last.isdigit():
            parents.setdefault(head, set()).add(last)
    for l, b in names.items():
        head, _, last = b.rpartition(".")
        if b == l and head and last.isdigit() and len(parents[head]) == 1:
            names[l] = head
    return names



@dataclass
class _Box:
    key: tuple
    kind: str                  # "input", "block", "join", "head"
    tasks: tuple
    blocks: list = field(default_factory=list)     # block names, in order (several after a run merge)
    layers: list = field(default_factory=list)     # (layer name, choice) of its policy nodes
    skipped: list = field(default_factory=list)    # identity-skipped layer names shown here
    block_layers: int = 0      # how many layers the box's block(s) have in total
    residual: bool = False     # holds a same-class residual join
    label: str = ""

    @property
    def has_skip(self) -> bool:
        return bool(self.skipped) or any(c == "skip" for _, c in self.layers)


@dataclass
class Drawing:
    boxes: dict                # key -> _Box, in first-seen order
    edges: set                 # (from key, to key)
    projection_layers: set


_JOIN_TARGETS = {operator.add, operator.iadd, operator.mul, operator.sub}


def _is_join(node) -> bool:
    import torch

    if node.op == "call_function":
        return node.target in _JOIN_TARGETS or node.target in (torch.add, torch.cat, torch.stack, torch.mul)
    return node.op == "call_method" and node.target in ("add", "mul", "sub")


def _join_symbol(node) -> str:
    import torch

    if node.target in (operator.mul, torch.mul, "mul"):
        return "&#215;"
    if node.target in (torch.cat, torch.stack):
        return "cat"
    return "+"


class _Collapser:
    """Places the compact graph's nodes into boxes in one pass in graph order (rules 1-3)."""

    def __init__(self, model, policy: Optional[Policy]):
        from .compact import META_LAYER

        self.gm = model.graph_module
        self.all_tasks = tuple(model.task_names)
        self.boxes: dict = {}          # key -> _Box, in first-seen order
        self.box_of: dict = {}         # fx node -> box key
        self.edges: set = set()
        self.hidden: set = set()       # shape plumbing and constants: not part of the data flow drawn
        self.projections: set = set()
        self.seg, self.last_block = 0, None
        self.generation: dict = {}     # (seg, block, tasks) -> how often a join closed that box
        self.blocks = block_names(_layer_order(model, policy, META_LAYER))
        self.position = {n: i for i, n in enumerate(self.gm.graph.nodes)}

    def run(self) -> dict:
        for node in self.gm.graph.nodes:
            if node.op == "output":
                continue
            if self._is_plumbing(node):
                self.hidden.add(node)
                continue
            ins = [i for i in node.all_input_nodes if i in self.box_of]
            box = self._place(node, ins)
            self.box_of[node] = box.key
            for i in ins:
                if self.box_of[i] != box.key:
                    self.edges.add((self.box_of[i], box.key))
        return self.boxes

    def _is_plumbing(self, node) -> bool:
        return node.op == "get_attr" or (node.op == "call_method" and node.target in ("size", "dim")) or (
            bool(node.all_input_nodes) and all(i in self.hidden for i in node.all_input_nodes))

    def _box(self, key, kind, tasks, **kw) -> _Box:
        if key not in self.boxes:
            self.boxes[key] = _Box(key, kind, tasks, **kw)
        return self.boxes[key]

    def _block_box(self, block: str, tasks: tuple) -> _Box:
        base = (self.seg, block, tasks)
        return self._box(("block",) + base + (self.generation.get(base, 0),), "block", tasks, blocks=[block])

    def _place(self, node, ins: list) -> _Box:
        from .compact import META_LAYER, META_TASKS

        tasks = tuple(node.meta.get(META_TASKS, self.all_tasks))
        if node.op == "placeholder":
            return self._box(("input",), "input", self.all_tasks)
        if META_LAYER in node.meta:
            return self._place_layer(node, tasks)
        if node.op == "call_module" and str(node.target).startswith("heads."):
            return self._box(("head", tasks[0]), "head", tasks)
        if not ins:
            name = str(node.target)[4:] if str(node.target).startswith("net.") else node.name
            return self._box(("op", node.name), "block", tasks, blocks=[block_of(name)])
        return self._place_operator(node, ins, tasks)

    def _place_layer(self, node, tasks: tuple) -> _Box:
        """A policy layer goes into the box of its block and task class (rules 1-2)."""
        from .compact import META_CHOICE, META_LAYER

        layer, choice = node.meta[META_LAYER], node.meta.get(META_CHOICE, "share")
        block = self.blocks.get(layer) or block_of(layer)
        if block != self.last_block:
            self.seg, self.last_block = self.seg + 1, block
        box = self._block_box(block, tasks)
        if (layer, choice) not in box.layers:  # a loaded bundle splits a layer into conv and BN nodes
            box.layers.append((layer, choice))
        if choice == "skip":
            self.projections.add(layer)
        return box

    def _place_operator(self, node, ins: list, tasks: tuple) -> _Box:
        """Any other operator folds into its latest input's box, except a join across task classes (rule 3)."""
        in_boxes = list(dict.fromkeys(self.box_of[i] for i in ins))
        if all(self.boxes[k].tasks == tasks for k in in_boxes):
            box = self.boxes[self.box_of[max(ins, key=self.position.__getitem__)]]
            if len(in_boxes) > 1 and _is_join(node) and box.kind == "block":
                box.residual = True
            return box
        if len(in_boxes) == 1 or not _is_join(node):
            # a task's path going on after an identity skip: it opens its box in the current block
            return self._block_box(self.last_block, tasks)
        box = self._box(("join", node.name), "join", tasks, label=_join_symbol(node))
        for k in in_boxes:  # later nodes of those boxes go to new boxes: keeps the drawing acyclic
            if self.boxes[k].kind == "block" and k[0] == "block":
                base = k[1:4]
                self.generation[base] = self.generation.get(base, 0) + 1
        return box


def collapse(model, policy: Optional[Policy], max_boxes: int) -> Drawing:
    """Group the compact graph's nodes into boxes (rules 1-3), then merge runs until at most
    ``max_boxes`` nodes are left (rule 5)."""
    c = _Collapser(model, policy)
    boxes = c.run()
    _place_identity_skips(boxes, model, policy, c.blocks)
    _count_block_layers(boxes, c.blocks)
    drawing = Drawing(boxes, c.edges, c.projections)
    _merge_runs(drawing, max_boxes)
    return drawing


def _layer_order(model, policy, META_LAYER) -> list:
    if policy is not None:
        return list(policy.layers)
    seen = {}
    for node in model.graph_module.graph.nodes:
        if META_LAYER in node.meta:
            seen.setdefault(node.meta[META_LAYER], None)
    return list(seen)


def _place_identity_skips(boxes: dict, model, policy: Optional[Policy], blocks: dict) -> None:
    """List each identity skip in the box that carries that task through the skipped layer's block."""
    from .compact import META_LAYER

    layers = _layer_order(model, policy, META_LAYER)
    index = {l: i for i, l in enumerate(layers)}
    has_node = {(l, t) for b in boxes.values() for l, _ in b.layers for t in b.tasks}
    block_boxes = [b for b in boxes.values() if b.kind == "block"]
    for t in model.task_names:
        for layer in layers:
            if (layer, t) in has_node:
                continue
            if policy is not None and policy.choices[index[layer]][policy.tasks.index(t)] != SKIP:
                continue
            block = blocks[layer]
            same = [b for b in block_boxes if t in b.tasks and block in b.blocks]
            # the box after the skip on this task's path: fewest tasks (classes only narrow downstream)
            later = [b for b in block_boxes
                     if t in b.tasks and b.layers and min(index.get(l, 0) for l, _ in b.layers) > index[layer]]
            if same:
                target = min(same, key=lambda b: (len(b.tasks), -max([index.get(l, 0) for l, _ in b.layers] or [0])))
            elif later:
                target = min(later, key=lambda b: min(index.get(l, 0) for l, _ in b.layers))
            else:
                target = boxes.get(("head", t))
            if target is not None and layer not in target.skipped:
                target.skipped.append(layer)


def _count_block_layers(boxes: dict, blocks: dict) -> None:
    per_block: dict = {}
    for b in blocks.values():
        per_block[b] = per_block.get(b, 0) + 1
    for box in boxes.values():
        box.block_layers = sum(per_block.get(x, 0) for x in box.blocks)


def branch_points(d: Drawing) -> dict:
    """Boxes whose outputs go to two or more task classes: box key -> list of target keys."""
    out: dict = {}
    for a, b in d.edges:
        out.setdefault(a, []).append(b)
    return {a: sorted(bs, key=order_key(d)) for a, bs in out.items()
            if len({d.boxes[b].tasks for b in bs}) >= 2}


def order_key(d: Drawing):
    order = {k: i for i, k in enumerate(d.boxes)}
    return lambda k: order[k]


def _merge_runs(d: Drawing, max_boxes: int) -> None:
    """Merge unbranched runs A -> B of block boxes of one task class (rule 5) until the drawing fits.

    The pair with the fewest layers is merged first, so runs grow evenly along every branch.
    """
    while len(d.boxes) + len(branch_points(d)) > max_boxes:
        outs: dict = {}
        ins: dict = {}
        for a, b in d.edges:
            outs.setdefault(a, set()).add(b)
            ins.setdefault(b, set()).add(a)
        pairs = []
        for a, box in d.boxes.items():
            if box.kind != "block" or len(outs.get(a, ())) != 1:
                continue
            (b,) = outs[a]
            nxt = d.boxes[b]
            if nxt.kind == "block" and nxt.tasks == box.tasks and ins.get(b) == {a}:
                pairs.append((len(box.layers) + len(nxt.layers), a, b))
        if not pairs:
            return
        _, a, b = min(pairs, key=lambda p: p[0])
        box, nxt = d.boxes[a], d.boxes[b]
        box.blocks += [x for x in nxt.blocks if x not in box.blocks]
        box.layers += nxt.layers
        box.skipped += nxt.skipped
        box.block_layers += nxt.block_layers
        box.residual = box.residual or nxt.residual
        d.edges = {(a if x == b else x, a if y == b else y) for x, y in d.edges if (x, y) != (a, b)}
        del d.boxes[b]

