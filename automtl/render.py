"""The last view of the pipeline: draw a compact model's sharing decisions with graphviz.

One drawing holds two parts side by side: the compact model's graph (where tasks share a
trunk, where they branch, which layers they skip) and the layers x tasks policy grid.

The graph is drawn at the level of *blocks*, not operators (how, and the rules: :mod:`.render_graph`);
the grid and legend are :mod:`.render_grid`.
"""
from __future__ import annotations

import html
import shutil
import subprocess
from pathlib import Path
from typing import Optional

from .errors import AutomtlError
from .policy import CHOICES, Policy
from .render_graph import Drawing, block_names, block_of, branch_points, collapse, order_key
from .render_grid import ALL_FILL, EDGE_SHARED, PALETTE, SOME_FILL, grid_label, ink_on, legend_label, tint

__all__ = ["FORMATS", "PALETTE", "block_names", "block_of", "render", "to_dot"]

#: Output formats, chosen by the file's suffix.
FORMATS = ("svg", "png", "pdf")

_FONT = "Helvetica,Arial,sans-serif"


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------
def drawing_format(path, format: Optional[str] = None) -> tuple:
    """``(Path(path), format)`` of a drawing (svg, png or pdf: ``format``, else the suffix); :class:`AutomtlError`
    in one sentence otherwise."""
    if not str(path):
        raise AutomtlError("cannot draw to an empty path; give a file name ending in .svg, .png or .pdf")
    path = Path(path)
    fmt = (format or path.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        shown = f"format {format!r}" if format else f"suffix {path.suffix!r}" if path.suffix else "no suffix"
        raise AutomtlError(
            f"cannot draw {str(path)!r}: {shown} is not a drawing format; use one of "
            f"{', '.join('.' + f for f in FORMATS)}"
        )
    return path, fmt


def render(model_or_policy, path, format: Optional[str] = None, title: Optional[str] = None) -> Path:
    """Draw ``model_or_policy`` into ``path`` (svg, png or pdf, from the suffix) and return the path.

    A CompactModel gives its graph and its policy grid side by side; a SuperModel with a hard
    policy is compiled first; a Policy alone gives the grid. The file appears whole or not at all.
    """
    path, fmt = drawing_format(path, format)
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


#: The most cells (layers x tasks) a drawn policy grid may have: 300 layers (a DenseNet-201's convolutions) for 32
#: tasks, 6 s and 246 MB to draw as a PNG; a 2.6 MB policy file of 1000 layers x 190 tasks took 1.8 GB and 37 s.
MAX_GRID_CELLS = 10_000


def to_dot(model_or_policy, title: Optional[str] = None, max_boxes: int = 60):
    """The drawing as a ``graphviz.Digraph`` (no ``dot`` program needed until it is rendered).

    ``max_boxes`` bounds the nodes of the model graph: past it, unbranched runs of blocks
    are merged (rule 5 of :mod:`.render_graph`).

    Raises:
        AutomtlError: the policy's grid has more than :data:`MAX_GRID_CELLS` cells.
    """
    import graphviz

    model, policy = _resolve(model_or_policy)
    if policy is not None and len(policy.layers) * len(policy.tasks) > MAX_GRID_CELLS:
        raise AutomtlError(f"the policy has {len(policy.layers)} layers x {len(policy.tasks)} tasks, more than the "
                           f"{MAX_GRID_CELLS} cells automtl draws in one grid (graphviz would take gigabytes for the "
                           "image); read it with automtl inspect, or draw a policy of fewer layers or tasks")
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
        drawing = collapse(model, policy, max_boxes)
        projections = drawing.projection_layers
        _emit_graph(g, drawing, model, colours)
    g.attr(label=_title_label(title, model, policy), labelloc="t", labeljust="l", fontsize="18")
    if policy is not None:  # legend above grid: one component, packed beside the model graph
        g.node("legend", label=legend_label(policy, colours, with_graph_legend=model is not None),
               shape="plain", sortv="2")
        g.node("grid", label=grid_label(policy, colours, projections), shape="plain", sortv="2")
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
# drawing
# --------------------------------------------------------------------------------------
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


def _box_label(box, colours: dict, all_tasks: tuple) -> str:
    """Block name, what it computes, what it skips, and (for several tasks) which tasks."""
    e = html.escape
    if len(box.blocks) > 1:
        name = f"{e(box.blocks[0])} &#8211; {e(box.blocks[-1])}"  # names come from the model file: escaped
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
    return EDGE_SHARED if tasks == all_tasks else SOME_FILL


def _emit_graph(g, d: Drawing, model, colours: dict) -> None:
    """Boxes, joins, branch dots and heads; edges take the colour of the tasks they feed."""
    all_tasks = tuple(model.task_names)
    ids = {k: f"n{i}" for i, k in enumerate(d.boxes)}
    with g.subgraph(name="model") as s:
        for key, box in d.boxes.items():
            s.node(ids[key], **_node_attrs(box, model, colours))
        # heads side by side at the bottom
        with s.subgraph() as r:
            r.attr(rank="sink")
            heads = [ids[("head", t)] for t in all_tasks if ("head", t) in d.boxes]
            for h in heads:
                r.node(h)
            for a, b in zip(heads, heads[1:]):  # keep the heads in task order, left to right
                r.edge(a, b, style="invis")
        branches = branch_points(d)
        for a, targets in branches.items():
            fork = f"{ids[a]}_split"
            src = d.boxes[a]
            s.node(fork, label="", shape="point", width="0.11", color="black")
            s.edge(ids[a], fork, color=_class_colour(src.tasks, colours, all_tasks), arrowhead="none",
                   penwidth=_pen(src.tasks))
        for a, b in sorted(d.edges, key=lambda e: (order_key(d)(e[0]), order_key(d)(e[1]))):
            dst = d.boxes[b]
            src = ids[a] + "_split" if a in branches else ids[a]
            s.edge(src, ids[b], color=_class_colour(dst.tasks, colours, all_tasks), penwidth=_pen(dst.tasks))


def _node_attrs(box, model, colours: dict) -> dict:
    """The graphviz attributes of one box: the input, a task's head, a join or a block."""
    all_tasks = tuple(model.task_names)
    if box.kind == "input":
        return dict(label=f"input{_input_shape(model)}", shape="invhouse", style="filled", fillcolor="white",
                    color=EDGE_SHARED, penwidth="1.5", sortv="1")
    if box.kind == "head":
        t = box.tasks[0]
        c = colours[t]
        kind = next((task.kind for task in model.tasks if task.name == t), "")
        extra = f'<BR/><FONT POINT-SIZE="10">{html.escape(kind)} head</FONT>'
        skipped = ""
        if box.skipped:
            skipped = f'<BR/><FONT POINT-SIZE="10"><I>skip {html.escape(", ".join(box.skipped[:3]))}</I></FONT>'
        return dict(label=f"<<B>{html.escape(t)}</B>{extra}{skipped}>", shape="box",
                    style="rounded,filled", fillcolor=c, color=c, fontcolor=ink_on(c), penwidth="2", margin="0.15,0.06")
    if box.kind == "join":
        c = _class_colour(box.tasks, colours, all_tasks)
        return dict(label=f"<{box.label}>", shape="circle", width="0.3", height="0.3", fixedsize="true",
                    style="filled", fillcolor=tint(c, 0.8) if len(box.tasks) == 1 else "white",
                    color=c, penwidth="2", fontsize="14")
    if len(box.tasks) == 1:
        c = colours[box.tasks[0]]
        fill, border, ink, width = tint(c), c, "black", "2.5"
    else:
        fill = ALL_FILL if box.tasks == all_tasks else SOME_FILL
        border, ink, width = fill, "white", "1"
    style = "rounded,filled" + (",dashed" if box.has_skip else "")
    if box.has_skip and len(box.tasks) > 1:
        border, width = "#000000", "2"
    return dict(label=_box_label(box, colours, all_tasks), shape="box", style=style,
                fillcolor=fill, color=border, fontcolor=ink, penwidth=width, margin="0.12,0.04")


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


