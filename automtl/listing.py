"""What the listing commands show: the builtin (or timm's, torchvision's) backbones, a supermodel's
policy layers and parameter counts, and the plain-text table they are printed as.

Re-exported by :mod:`automtl.report`.
"""
from __future__ import annotations

from typing import Optional, Sequence

from .policy import Policy

__all__ = ["backbone_catalog", "format_catalog", "format_rows", "format_supermodel_summary", "supermodel_summary"]


def supermodel_summary(sm) -> dict:
    """A supermodel's policy layers and parameter counts: what ``automtl supermodel`` shows.

    Returns:
        ``{"tasks", "policy_layers", "backbone_parameters", "all_share_parameters",
        "all_specialize_parameters", "supermodel_parameters", "layers"}``; each of ``layers`` is
        ``{"layer", "in", "out" (C, H, W lists), "parameters" (of one copy), "skip" (identity or
        projection, or none)}``. Counts are parameters (elements), not bytes.
    """
    from .capture import count_parameters

    def policy_size(choice: str) -> int:
        return sm.policy_parameter_count(Policy.uniform(sm.layer_names, sm.task_names, choice))

    return {
        "tasks": sm.task_names, "policy_layers": len(sm.layer_info),
        "backbone_parameters": sm.backbone_parameters(),
        "all_share_parameters": policy_size("share"),
        "all_specialize_parameters": policy_size("specialize"),
        "supermodel_parameters": count_parameters(sm),
        "layers": [{"layer": i.name, "in": list(i.in_shape[1:]), "out": list(i.out_shape[1:]),
                    "parameters": i.unit_params, "skip": i.skip_kind} for i in sm.layer_info],
    }


def backbone_catalog(source: str = "builtin", pattern: Optional[str] = None) -> list:
    """The backbones ``automtl backbones`` lists, optionally only names matching the glob ``pattern``.

    ``source="builtin"``: automtl's own, each ``{"name", "parameters", "convolutions",
    "description"}`` (each is built once to count); ``"timm"`` or ``"torchvision"``: the models
    that package offers, each ``{"name": "timm:NAME", "pretrained": downloadable weights}``.

    Raises:
        BackboneError: an unknown source, or the package of ``source`` is not installed.
    """
    import fnmatch

    from .backbones import count_convs, count_parameters, list_backbones, list_external

    if source != "builtin":
        return list_external(source, pattern)
    rows = []
    for spec in list_backbones():
        if pattern and not fnmatch.fnmatchcase(spec.name, pattern):
            continue
        model = spec.factory()
        rows.append({"name": spec.name, "parameters": count_parameters(model), "convolutions": count_convs(model),
                     "description": spec.description})
    return rows


def format_rows(rows: Sequence[dict]) -> str:
    """``rows`` (dicts with the same keys) as a plain-text table: a header of the keys, numbers
    right-aligned with thousands separators, true/false as yes/no, lists as tuples."""
    if not rows:
        return ""
    keys = list(rows[0])

    def text(v) -> str:
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, (list, tuple)):
            return str(tuple(v))
        return f"{v:,}" if isinstance(v, int) else str(v)

    cells = [[text(r[k]) for k in keys] for r in rows]
    widths = [max([len(k)] + [len(c[i]) for c in cells]) for i, k in enumerate(keys)]
    right = [isinstance(rows[0][k], (int, float)) and not isinstance(rows[0][k], bool) for k in keys]

    def line(values) -> str:
        parts = [f"{v:>{w}}" if r else f"{v:<{w}}" for v, w, r in zip(values, widths, right)]
        return "  ".join(parts[:-1] + [values[-1] if not right[-1] else parts[-1]]).rstrip()

    return "\n".join([line(keys)] + [line(c) for c in cells])


def format_supermodel_summary(summary: dict) -> str:
    """:func:`supermodel_summary` as ``automtl supermodel`` prints it: the layer table, then the counts."""
    lines = [format_rows(summary["layers"])]
    for k, v in summary.items():
        if k.endswith("parameters") or k == "policy_layers":
            lines.append(f"{k.replace('_', ' ')}: {v:,}")
    return "\n".join(lines) + "\n"


def format_catalog(rows: Sequence[dict], source: str = "builtin") -> str:
    """:func:`backbone_catalog` as ``automtl backbones`` prints it: the table, then how many and how to build one."""
    prefix = "" if source == "builtin" else f"{source}:"
    tail = (f"{len(rows)} {source} backbones; build one with automtl convert {prefix}NAME"
            + ("" if source == "builtin" else " (--pretrained to download its weights)"))
    return (format_rows(rows) + "\n" if rows else "") + tail
