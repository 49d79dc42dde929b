"""The last view of the pipeline: draw a compact model's sharing decisions with graphviz.

One drawing holds two parts side by side: the compact model's graph (where tasks share a
trunk, where they branch, which layers they skip) and the layers x tasks policy grid.

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

import html
import operator
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import AutomtlError
from .policy import CHOICES, SHARE, SKIP, SPECIALIZE, Policy

__all__ = ["FORMATS", "PALETTE", "render", "to_dot"]

#: Output formats, chosen by the file's suffix.
FORMATS = ("svg", "png", "pdf")

#: Okabe-Ito colours (distinguishable with the common colour-vision deficiencies), one per
#: task in task order; yellow comes last because it is faint on white.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#F0E442")

_FONT = "Helvetica,Arial,sans-serif"
_ALL_FILL = "#3d3d3d"      # boxes computed for every task: the shared trunk
_SOME_FILL = "#8a8a8a"     # boxes computed for several (not all) tasks
_EDGE_SHARED = "#3d3d3d"
_SHARE_CELL = "#d4d4d4"
_SKIP_CELL = "#ffffff"


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------
def render(model_or_policy, path, format: Optional[str] = None, title: Optional[str] = None) -> Path:
    """Draw ``model_or_policy`` into ``path`` (svg, png or pdf, from the suffix) and return the path.

    A CompactModel gives its graph and its policy grid side by side; a SuperModel with a hard
    policy is compiled first; a Policy alone gives the grid. The file appears whole or not at all.
    """
    path = Path(path)
    fmt = (format or path.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        shown = f"format {format!r}" if format else f"suffix {path.suffix!r}" if path.suffix else "no suffix"
        raise AutomtlError(
            f"cannot draw {str(path)!r}: {shown} is not a drawing format; use one of "
            f"{', '.join('.' + f for f in FORMATS)}"
        )
    _require_dot()
    dot = to_dot(model_or_policy, title=title)
    import graphviz

    try:
        data = dot.pipe(format=fmt)
    except graphviz.ExecutableNotFound:
        raise AutomtlError(_NO_DOT) from None
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or b"").decode(errors="replace")
        if "not recognized" in detail:  # a dot built without this output format (e.g. no cairo for png)
            raise AutomtlError(
                f"this graphviz 'dot' cannot write {fmt} files; draw as .svg, or install a graphviz "
                "with that format (apt-get install graphviz, or brew install graphviz)"
            ) from exc
        if "syntax error" in detail:
            raise  # the drawing we generated is malformed: our bug, keep the traceback
        first = next((l for l in detail.splitlines() if l.strip()), f"exit code {exc.returncode}")
        raise AutomtlError(f"graphviz's dot failed to draw {str(path)!r} ({first.strip()[:160]}); try .svg, "
                           "which has no size limit") from exc
    except OSError as exc:  # dot quit before reading the whole graph (a broken pipe)
        raise AutomtlError(f"graphviz's dot stopped while drawing {str(path)!r} ({exc.strerror or exc}); the "
                           "drawing is probably too large for this format, try .svg") from exc
    from .fileio import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def to_dot(model_or_policy, title: Optional[str] = None, max_boxes: int = 60):
    """The drawing as a ``graphviz.Digraph`` (no ``dot`` program needed until it is rendered).

    ``max_boxes`` bounds the nodes of the model graph: past it, unbranched runs of blocks
    are merged (see the module docstring).
    """
    import graphviz

    model, policy = _resolve(model_or_policy)
    g = graphviz.Digraph("automtl")
    # pack lays the model graph and the legend+grid out apart, side by side, top-aligned.
    # (No newrank: dot 2.43 segfaults on this graph with it.)
    g.attr(rankdir="TB", fontname=_FONT, nodesep="0.25", ranksep="0.3",
           pack="true", packmode="array_tu", bgcolor="white")
    g.attr("node", fontname=_FONT, fontsize="12")
    g.attr("edge", fontname=_FONT, fontsize="10", arrowsize="0.6")
    task_names = list(model.task_names if model is not None else policy.tasks)
    colours = {t: PALETTE[i % len(PALETTE)] for i, t in enumerate(task_names)}
    projections: set = set()
    if model is not None:
        drawing = _collapse(model, policy, max_boxes)
        projections = drawing.projection_layers
        _emit_graph(g, drawing, model, colours)
    g.attr(label=_title_label(title, model, policy), labelloc="t", labeljust="l", fontsize="18")
    if policy is not None:  # legend above grid: one component, packed beside the model graph
        g.node("legend", label=_legend_label(policy, colours, with_graph_legend=model is not None),
               shape="plain", sortv="2")
        g.node("grid", label=_grid_label(policy, colours, projections), shape="plain", sortv="2")
        g.edge("legend", "grid", style="invis")
    return g


# --------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------
_NO_DOT = (
    "graphviz's 'dot' program is not installed or not on PATH; install it "
    "(apt-get install graphviz, or brew install graphviz) to draw models"
)


def _require_dot() -> None:
    if shutil.which("dot") is None:
        raise AutomtlError(_NO_DOT)


def _resolve(obj):
    """(compact model or None, policy or None) for what render() accepts."""
    from .compact import CompactModel, compact
    from .supermodel import SuperModel

    if isinstance(obj, Policy):
        return None, obj
    if isinstance(obj, SuperModel):
        if obj.policy is None:
            raise AutomtlError(
                "this supermodel has no discrete policy to draw; call supermodel.hard(policy) first, "
                "or draw the policy or the compact model"
            )
        obj = compact(obj, obj.policy)
    if isinstance(obj, CompactModel):
        return obj, obj.policy
    raise AutomtlError(
        f"render() draws a CompactModel, a SuperModel with a hard policy, or a Policy, not a {type(obj).__name__}"
    )


# --------------------------------------------------------------------------------------
# collapsing the fx graph into boxes
# --------------------------------------------------------------------------------------
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
class _Drawing:
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


def _collapse(model, policy: Optional[Policy], max_boxes: int) -> _Drawing:
    """Group the compact graph's nodes into boxes (rules 1-3, 5), in one pass in graph order."""
    from .compact import META_CHOICE, META_LAYER, META_TASKS

    gm = model.graph_module
    all_tasks = tuple(model.task_names)
    boxes: dict = {}
    box_of: dict = {}
    edges: set = set()
    hidden: set = set()
    projections: set = set()
    seg, last_block = 0, None
    generation: dict = {}
    blocks = block_names(_layer_order(model, policy, META_LAYER))
    position = {n: i for i, n in enumerate(gm.graph.nodes)}

    def new_box(key, kind, tasks, **kw) -> _Box:
        if key not in boxes:
            boxes[key] = _Box(key, kind, tasks, **kw)
        return boxes[key]

    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        ins = [i for i in node.all_input_nodes if i in box_of]
        if node.op == "get_attr" or (node.op == "call_method" and node.target in ("size", "dim")) or (
            node.all_input_nodes and all(i in hidden for i in node.all_input_nodes)
        ):
            hidden.add(node)  # shape plumbing and constants: not part of the data flow drawn
            continue
        tasks = tuple(node.meta.get(META_TASKS, all_tasks))
        if node.op == "placeholder":
            box = new_box(("input",), "input", all_tasks)
        elif META_LAYER in node.meta:
            layer, choice = node.meta[META_LAYER], node.meta.get(META_CHOICE, "share")
            block = blocks.get(layer) or block_of(layer)
            if block != last_block:
                seg, last_block = seg + 1, block
            base = (seg, block, tasks)
            box = new_box(("block",) + base + (generation.get(base, 0),), "block", tasks, blocks=[block])
            if (layer, choice) not in box.layers:  # a loaded bundle splits a layer into conv and BN nodes
                box.layers.append((layer, choice))
            if choice == "skip":
                projections.add(layer)
        elif node.op == "call_module" and str(node.target).startswith("heads."):
            box = new_box(("head", tasks[0]), "head", tasks)
        elif not ins:
            name = str(node.target)[4:] if str(node.target).startswith("net.") else node.name
            box = new_box(("op", node.name), "block", tasks, blocks=[block_of(name)])
        else:
            in_boxes = list(dict.fromkeys(box_of[i] for i in ins))
            if all(boxes[k].tasks == tasks for k in in_boxes):
                latest = max(ins, key=position.__getitem__)
                box = boxes[box_of[latest]]
                if len(in_boxes) > 1 and _is_join(node) and box.kind == "block":
                    box.residual = True
            elif len(in_boxes) == 1 or not _is_join(node):
                # a task's path going on after an identity skip: it opens its box in the current block
                base = (seg, last_block, tasks)
                box = new_box(("block",) + base + (generation.get(base, 0),), "block", tasks, blocks=[last_block])
            else:
                box = new_box(("join", node.name), "join", tasks, label=_join_symbol(node))
                for k in in_boxes:  # later nodes of those boxes go to new boxes: keeps the drawing acyclic
                    if boxes[k].kind == "block" and k[0] == "block":
                        base = k[1:4]
                        generation[base] = generation.get(base, 0) + 1
        box_of[node] = box.key
        for i in ins:
            if box_of[i] != box.key:
                edges.add((box_of[i], box.key))

    _place_identity_skips(boxes, model, policy, blocks)
    _count_block_layers(boxes, blocks)
    drawing = _Drawing(boxes, edges, projections)
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


def _branch_points(d: _Drawing) -> dict:
    """Boxes whose outputs go to two or more task classes: box key -> list of target keys."""
    out: dict = {}
    for a, b in d.edges:
        out.setdefault(a, []).append(b)
    return {a: sorted(bs, key=_order_key(d)) for a, bs in out.items()
            if len({d.boxes[b].tasks for b in bs}) >= 2}


def _order_key(d: _Drawing):
    order = {k: i for i, k in enumerate(d.boxes)}
    return lambda k: order[k]


def _merge_runs(d: _Drawing, max_boxes: int) -> None:
    """Merge unbranched runs A -> B of block boxes of one task class (rule 5) until the drawing fits.

    The pair with the fewest layers is merged first, so runs grow evenly along every branch.
    """
    while len(d.boxes) + len(_branch_points(d)) > max_boxes:
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


# --------------------------------------------------------------------------------------
# drawing
# --------------------------------------------------------------------------------------
def _tint(colour: str, amount: float = 0.72) -> str:
    """``colour`` mixed with white (amount 1 = white)."""
    r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    mix = lambda c: round(c + (255 - c) * amount)  # noqa: E731
    return f"#{mix(r):02x}{mix(g):02x}{mix(b):02x}"


def _ink(colour: str) -> str:
    """Black or white text, whichever reads on ``colour``."""
    r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "white"


def _stripe(tasks, colours, width: int = 14) -> str:
    cells = "".join(f'<TD BGCOLOR="{colours[t]}" WIDTH="{width}" HEIGHT="5" FIXEDSIZE="TRUE"></TD>' for t in tasks)
    return f'<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="1" CELLPADDING="0"><TR>{cells}</TR></TABLE>'


def _short(layer: str, blocks: list) -> str:
    """The layer's name inside its block; "" when that says nothing (the whole block, or a bare index)."""
    for b in blocks:
        if layer == b:
            return ""
        if layer.startswith(b + "."):
            rest = layer[len(b) + 1:]
            return "" if rest.replace(".", "").isdigit() else rest
    return layer


def _skip_text(local: str, projection: bool) -> str:
    text = f"skip {html.escape(local)}" if local else "skipped"
    return text + " (1x1)" if projection else text


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _box_label(box: _Box, colours: dict, all_tasks: tuple) -> str:
    """Block name, what it computes, what it skips, and (for several tasks) which tasks."""
    e = html.escape
    if len(box.blocks) > 1:
        name = f"{box.blocks[0]} &#8211; {box.blocks[-1]}"
    else:
        name = e(box.blocks[0]) if box.blocks else ""
    rows = [f"<TR><TD><B>{name}</B></TD></TR>"]
    convs = [l for l, c in box.layers if c != "skip"]
    projs = [l for l, c in box.layers if c == "skip"]
    if not convs:
        what = ""
    elif len(box.layers) == box.block_layers or len(box.blocks) > 1 or len(convs) > 3:
        what = _plural(len(convs), "conv")
    else:
        what = ", ".join(e(_short(l, box.blocks)) or "conv" for l in convs)
    if box.residual:
        what += " + residual" if what else "residual"
    if what:
        rows.append(f'<TR><TD><FONT POINT-SIZE="10">{what}</FONT></TD></TR>')
    skips = [_skip_text(_short(l, box.blocks), False) for l in box.skipped]
    skips += [_skip_text(_short(l, box.blocks), True) for l in projs]
    if skips:
        shown = ", ".join(skips[:3]) + (f" +{len(skips) - 3}" if len(skips) > 3 else "")
        rows.append(f'<TR><TD><FONT POINT-SIZE="10"><I>{shown}</I></FONT></TD></TR>')
    if len(box.tasks) > 1 and box.tasks != all_tasks:
        rows.append(f'<TR><TD><FONT POINT-SIZE="10">{e(" + ".join(box.tasks))}</FONT></TD></TR>')
    if len(box.tasks) > 1:
        rows.append(f"<TR><TD>{_stripe(box.tasks, colours)}</TD></TR>")
    return '<<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="0" CELLPADDING="1">' + "".join(rows) + "</TABLE>>"


def _class_colour(tasks: tuple, colours: dict, all_tasks: tuple) -> str:
    if len(tasks) == 1:
        return colours[tasks[0]]
    return _EDGE_SHARED if tasks == all_tasks else _SOME_FILL


def _emit_graph(g, d: _Drawing, model, colours: dict) -> None:
    """Boxes, joins, branch dots and heads; edges take the colour of the tasks they feed."""
    all_tasks = tuple(model.task_names)
    ids = {k: f"n{i}" for i, k in enumerate(d.boxes)}
    kinds = {t.name: t.kind for t in model.tasks}
    with g.subgraph(name="model") as s:
        for key, box in d.boxes.items():
            nid = ids[key]
            if box.kind == "input":
                shape = _input_shape(model)
                s.node(nid, label=f"input{shape}", shape="invhouse", style="filled", fillcolor="white",
                       color=_EDGE_SHARED, penwidth="1.5", sortv="1")
            elif box.kind == "head":
                t = box.tasks[0]
                c = colours[t]
                extra = f'<BR/><FONT POINT-SIZE="10">{html.escape(kinds.get(t, ""))} head</FONT>'
                skipped = ""
                if box.skipped:
                    skipped = f'<BR/><FONT POINT-SIZE="10"><I>skip {html.escape(", ".join(box.skipped[:3]))}</I></FONT>'
                s.node(nid, label=f"<<B>{html.escape(t)}</B>{extra}{skipped}>", shape="box",
                       style="rounded,filled", fillcolor=c, color=c, fontcolor=_ink(c), penwidth="2", margin="0.15,0.06")
            elif box.kind == "join":
                c = _class_colour(box.tasks, colours, all_tasks)
                s.node(nid, label=f"<{box.label}>", shape="circle", width="0.3", height="0.3", fixedsize="true",
                       style="filled", fillcolor=_tint(c, 0.8) if len(box.tasks) == 1 else "white",
                       color=c, penwidth="2", fontsize="14")
            else:
                if len(box.tasks) == 1:
                    c = colours[box.tasks[0]]
                    fill, border, ink, width = _tint(c), c, "black", "2.5"
                else:
                    fill = _ALL_FILL if box.tasks == all_tasks else _SOME_FILL
                    border, ink, width = fill, "white", "1"
                style = "rounded,filled" + (",dashed" if box.has_skip else "")
                if box.has_skip and len(box.tasks) > 1:
                    border, width = "#000000", "2"
                s.node(nid, label=_box_label(box, colours, all_tasks), shape="box", style=style,
                       fillcolor=fill, color=border, fontcolor=ink, penwidth=width, margin="0.12,0.04")
        # heads side by side at the bottom
        with s.subgraph() as r:
            r.attr(rank="sink")
            heads = [ids[("head", t)] for t in all_tasks if ("head", t) in d.boxes]
            for h in heads:
                r.node(h)
            for a, b in zip(heads, heads[1:]):  # keep the heads in task order, left to right
                r.edge(a, b, style="invis")
        branches = _branch_points(d)
        for a, targets in branches.items():
            fork = f"{ids[a]}_split"
            src = d.boxes[a]
            s.node(fork, label="", shape="point", width="0.11", color="black")
            s.edge(ids[a], fork, color=_class_colour(src.tasks, colours, all_tasks), arrowhead="none",
                   penwidth=_pen(src.tasks))
        for a, b in sorted(d.edges, key=lambda e: (_order_key(d)(e[0]), _order_key(d)(e[1]))):
            dst = d.boxes[b]
            src = ids[a] + "_split" if a in branches else ids[a]
            s.edge(src, ids[b], color=_class_colour(dst.tasks, colours, all_tasks), penwidth=_pen(dst.tasks))


def _pen(tasks: tuple) -> str:
    return f"{1.2 + 0.8 * len(tasks):.1f}"


def _input_shape(model) -> str:
    for node in model.graph_module.graph.nodes:
        if node.op == "placeholder":
            meta = node.meta.get("tensor_meta")
            shape = getattr(meta, "shape", None)
            if shape is not None and len(shape) == 4:
                return f"\n{shape[1]} x {shape[2]} x {shape[3]}"
    return ""


def _title_label(title: Optional[str], model, policy: Optional[Policy]) -> str:
    e = html.escape
    tasks = model.task_names if model is not None else policy.tasks
    head = e(title) if title else f"automtl: sharing among {e(', '.join(tasks))}"
    facts = []
    if policy is not None:
        counts = policy.counts()
        facts.append(f"{_plural(len(policy.layers), 'layer')} x {_plural(len(policy.tasks), 'task')}: "
                     + ", ".join(f"{counts[c]} {c}" for c in CHOICES))
    if model is not None:
        facts.append(f"{model.num_parameters() / 1e6:.2f}M parameters")
    sub = f'<FONT POINT-SIZE="12">{" &#183; ".join(facts)}</FONT><BR ALIGN="LEFT"/>' if facts else ""
    return f'<<B>{head}</B><BR ALIGN="LEFT"/>{sub} <BR/>>'


# --------------------------------------------------------------------------------------
# the policy grid
# --------------------------------------------------------------------------------------
def _grid_label(policy: Policy, colours: dict, projections: set) -> str:
    """The layers x tasks table, rows grouped by block like the graph's boxes."""
    e = html.escape
    T = len(policy.tasks)

    def evidence(l: int, t: int) -> str:
        """The score behind the choice (and ? where it was undecided), when the policy carries evidence."""
        score = policy.score(l, t)
        if score is None:
            return ""
        return f" {'?' if policy.undecided(l, t) else ''}{score:+.2f}"

    def cell(choice: int, task: str, layer: str, l: int, t: int) -> str:
        ev = evidence(l, t)
        if choice == SHARE:
            return f'<TD BGCOLOR="{_SHARE_CELL}"><FONT POINT-SIZE="9">share{ev}</FONT></TD>'
        if choice == SPECIALIZE:
            c = colours[task]
            return f'<TD BGCOLOR="{c}"><FONT POINT-SIZE="9" COLOR="{_ink(c)}"><B>specialize</B>{ev}</FONT></TD>'
        text = "skip 1x1" if layer in projections else "skip"
        return f'<TD BGCOLOR="{_SKIP_CELL}"><FONT POINT-SIZE="9" COLOR="#555555"><I>{text}</I>{ev}</FONT></TD>'

    rows = []
    header = "".join(
        f'<TD BGCOLOR="{colours[t]}"><FONT COLOR="{_ink(colours[t])}"><B>{e(t)}</B></FONT></TD>' for t in policy.tasks
    )
    rows.append(f'<TR><TD COLSPAN="2" ALIGN="LEFT"><B>layer</B></TD>{header}</TR>')
    blocks: list = []
    names = block_names(policy.layers)
    for layer in policy.layers:
        b = names[layer]
        if blocks and blocks[-1][0] == b:
            blocks[-1][1].append(layer)
        else:
            blocks.append((b, [layer]))
    index = {l: i for i, l in enumerate(policy.layers)}
    for b, layers in blocks:
        for j, layer in enumerate(layers):
            cells = "".join(cell(policy.choices[index[layer]][t], policy.tasks[t], layer, index[layer], t)
                            for t in range(T))
            local = layer[len(b) + 1:] if layer.startswith(b + ".") else layer
            if len(layers) == 1:  # a block of one layer: one wide cell
                rows.append(f'<TR><TD COLSPAN="2" ALIGN="LEFT"><B>{e(b)}</B></TD>{cells}</TR>')
                continue
            lead = f'<TD ROWSPAN="{len(layers)}" ALIGN="LEFT"><B>{e(b)}</B></TD>' if j == 0 else ""
            rows.append(f'<TR>{lead}<TD ALIGN="LEFT"><FONT POINT-SIZE="9">{e(local or b)}</FONT></TD>{cells}</TR>')
    return ('<<TABLE BORDER="0" CELLBORDER="1" CELLSPACING="0" CELLPADDING="3" COLOR="#bbbbbb">'
            + "".join(rows) + "</TABLE>>")


def _legend_label(policy: Policy, colours: dict, with_graph_legend: bool) -> str:
    """The legend: one flat two-column table, so swatches and words stay left-aligned."""
    e = html.escape

    def item(mark: str, text: str) -> str:
        return (f'<TR><TD WIDTH="30" HEIGHT="16" FIXEDSIZE="TRUE" {mark}</TD>'
                f'<TD ALIGN="LEFT"><FONT POINT-SIZE="10">{text}</FONT></TD></TR>')

    def swatch(fill: str, text: str, style: str = "") -> str:
        return item(f'BGCOLOR="{fill}" {style}>', text)

    def heading(text: str) -> str:
        return f'<TR><TD COLSPAN="2" ALIGN="LEFT"><B>{text}</B></TD></TR>'

    first = colours[policy.tasks[0]]
    tasks = "  ".join(f'<FONT COLOR="{colours[t]}">&#9632;</FONT> {e(t)}' for t in policy.tasks)
    rows = [f'<TR><TD COLSPAN="2" ALIGN="LEFT"><B>Tasks</B>   {tasks}</TD></TR>']
    if with_graph_legend:
        rows.append(heading("Graph (blocks of layers)"))
        rows.append(swatch(_ALL_FILL, "block computed once for all tasks: the shared trunk"))
        if len(policy.tasks) > 2:
            rows.append(swatch(_SOME_FILL, "block computed once for the tasks named in it"))
        rows += [
            swatch(_tint(first), "block of one task, in the task's colour", f'COLOR="{first}" BORDER="1"'),
            item('>&#9679;', "tasks branch here"),
            item('><FONT POINT-SIZE="11">&#8853;</FONT>', "residual add where a task's branch meets a shared value"),
            swatch("#ffffff", "dashed border: the block skips layers (listed in it)", 'BORDER="1" STYLE="dashed"'),
        ]
    rows += [
        heading("Policy (layers x tasks)"),
        swatch(_SHARE_CELL, "share: the backbone's operator, computed once per distinct input"),
        swatch(first, "specialize: the task's own copy (in the task's colour)"),
        item('BORDER="1"><FONT POINT-SIZE="9" COLOR="#555555"><I>skip</I></FONT>',
             "skip: left out (identity, or <I>skip 1x1</I>: a 1x1 projection)"),
    ]
    ev = policy.evidence or {}
    if ev.get("scores") is not None:
        what = "probability margin over the runner-up" if ev.get("kind") == "margin" else "gradient-conflict score"
        note = (f"+0.12 beside a choice: its {what} ({e(str(ev.get('strategy', 'search')))});<BR ALIGN=\"LEFT\"/>"
                f"? = undecided (below {e(str(ev.get('threshold')))}): fell back to share")
        budget = ev.get("budget")
        if budget:
            limit = f" of a {budget['limit']}x budget" if budget.get("limit") else ""
            note += f"<BR ALIGN=\"LEFT\"/>budget used: {budget['used']}x the single model's {e(budget['metric'])}{limit}"
        rows.append(f'<TR><TD COLSPAN="2" ALIGN="LEFT"><FONT POINT-SIZE="10">{note}</FONT></TD></TR>')
    return '<<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="3" CELLPADDING="0">' + "".join(rows) + "</TABLE>>"
