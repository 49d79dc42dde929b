"""The right half of a drawing: the layers x tasks policy grid and its legend, and the colours
both halves use (:mod:`automtl.render` draws the model graph beside them)."""
from __future__ import annotations

import html

from .policy import SHARE, SPECIALIZE, Policy, score_meaning, undecided_meaning
from .render_graph import block_names

__all__ = ["PALETTE", "grid_label", "ink_on", "legend_label", "tint"]

#: Okabe-Ito colours (distinguishable with the common colour-vision deficiencies), one per
#: task in task order; yellow comes last because it is faint on white.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#F0E442")

ALL_FILL = "#3d3d3d"      # boxes computed for every task: the shared trunk
SOME_FILL = "#8a8a8a"     # boxes computed for several (not all) tasks
EDGE_SHARED = "#3d3d3d"
SHARE_CELL = "#d4d4d4"
SKIP_CELL = "#ffffff"


def tint(colour: str, amount: float = 0.72) -> str:
    """``colour`` mixed with white (amount 1 = white)."""
    r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    mix = lambda c: round(c + (255 - c) * amount)  # noqa: E731
    return f"#{mix(r):02x}{mix(g):02x}{mix(b):02x}"


def ink_on(colour: str) -> str:
    """Black or white text, whichever reads on ``colour``."""
    r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "white"


def grid_label(policy: Policy, colours: dict, projections: set) -> str:
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
            return f'<TD BGCOLOR="{SHARE_CELL}"><FONT POINT-SIZE="9">share{ev}</FONT></TD>'
        if choice == SPECIALIZE:
            c = colours[task]
            return f'<TD BGCOLOR="{c}"><FONT POINT-SIZE="9" COLOR="{ink_on(c)}"><B>specialize</B>{ev}</FONT></TD>'
        text = "skip 1x1" if layer in projections else "skip"
        return f'<TD BGCOLOR="{SKIP_CELL}"><FONT POINT-SIZE="9" COLOR="#555555"><I>{text}</I>{ev}</FONT></TD>'

    rows = []
    header = "".join(
        f'<TD BGCOLOR="{colours[t]}"><FONT COLOR="{ink_on(colours[t])}"><B>{e(t)}</B></FONT></TD>' for t in policy.tasks
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


def legend_label(policy: Policy, colours: dict, with_graph_legend: bool) -> str:
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
        rows.append(swatch(ALL_FILL, "block computed once for all tasks: the shared trunk"))
        if len(policy.tasks) > 2:
            rows.append(swatch(SOME_FILL, "block computed once for the tasks named in it"))
        rows += [
            swatch(tint(first), "block of one task, in the task's colour", f'COLOR="{first}" BORDER="1"'),
            item('>&#9679;', "tasks branch here"),
            item('><FONT POINT-SIZE="11">&#8853;</FONT>', "residual add where a task's branch meets a shared value"),
            swatch("#ffffff", "dashed border: the block skips layers (listed in it)", 'BORDER="1" STYLE="dashed"'),
        ]
    rows += [
        heading("Policy (layers x tasks)"),
        swatch(SHARE_CELL, "share: the backbone's operator, computed once per distinct input"),
        swatch(first, "specialize: the task's own copy (in the task's colour)"),
        item('BORDER="1"><FONT POINT-SIZE="9" COLOR="#555555"><I>skip</I></FONT>',
             "skip: left out (identity, or <I>skip 1x1</I>: a 1x1 projection)"),
    ]
    ev = policy.current_evidence or {}
    if ev.get("scores") is not None:
        what = score_meaning(ev)
        note = (f"+0.12 beside a choice: its {what} ({e(str(ev.get('strategy', 'search')))});<BR ALIGN=\"LEFT\"/>"
                f"? = undecided ({e(undecided_meaning(ev))}): fell back to share")
        budget = ev.get("budget")
        if budget:
            limit = f" of a {e(str(budget['limit']))}x budget" if budget.get("limit") else ""
            note += (f"<BR ALIGN=\"LEFT\"/>budget used: {e(str(budget['used']))}x the single model's "
                     f"{e(str(budget['metric']))}{limit}")
        rows.append(f'<TR><TD COLSPAN="2" ALIGN="LEFT"><FONT POINT-SIZE="10">{note}</FONT></TD></TR>')
    return '<<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="3" CELLPADDING="0">' + "".join(rows) + "</TABLE>>"
