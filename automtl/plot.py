"""Pictures of a run: the policy's evolution, the loss curves and the validation metrics (matplotlib).

Reads the JSON-lines log that :func:`automtl.search` keeps in ``RUN_DIR/checkpoints/log.jsonl``:
training records (``stage``, ``step``, ``kind`` weight|policy, ``losses`` {task: value}, ``total``,
``tau``, ``expected_params`` or ``expected_macs``) and validation records (``stage: val``,
``metrics`` {task: {metric: value}}). A record may also carry ``policy_probs``
{task: {layer: [p_share, p_specialize, p_skip]}}; the policy figure is drawn when some do.

Writes ``losses.png``, ``metrics.png`` and ``policy.png`` (the last two only when the log has
their records). :func:`plot_sweep` draws the ``sweep.json`` of ``automtl sweep``. Needs
``pip install 'automtl[plot]'``.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

from .errors import AutomtlError, FileFormatError
from .fileio import atomic_path, ensure_dir, iter_json_lines

__all__ = ["plot_run", "plot_sweep", "read_log"]

_CHOICES = ("share", "specialize", "skip")
_STAGE_COLOURS = {"warmup": "#f2f2f2", "search": "#e6f0fa", "finetune": "#eef7ea"}


#: Bounds on what a log may name and hold for the figures (a log automtl writes is far inside them): the
#: training, validation and policy records kept (more are thinned evenly to every k-th), the distinct tasks,
#: layers, metrics per task, stages and kinds, the length of a name, the largest step and the largest
#: magnitude of a value drawn (a larger one is drawn as missing, like NaN); the policy figure is at most
#: ``MAX_FIGURE_INCHES`` tall (its rows get thinner with more layers).
MAX_RECORDS = 20_000
MAX_VAL_RECORDS = 2_000
MAX_POLICY_COLUMNS = 256
MAX_TASKS = 32
MAX_LAYERS = 1024
MAX_METRICS = 16
MAX_STAGES = 16
MAX_NAME = 256
MAX_STEP = 2**53
MAX_VALUE = 1e300
MAX_FIGURE_INCHES = 120.0


def read_log(path) -> List[dict]:
    """The records of a run's ``log.jsonl`` (a run directory, its ``checkpoints/`` or the file itself), in order.

    The log is data: it is read as a stream (a regular file of at most ``fileio.MAX_LOG_BYTES``); lines that are
    not JSON objects with a numeric ``step`` (at most :data:`MAX_STEP` in size) are skipped, as a killed run cuts
    its last line; of every record only the fields the figures draw are kept, each checked: ``stage`` and
    ``kind`` names, ``losses`` {task: number}, ``tau``/``expected_params``/``expected_macs`` numbers, ``metrics``
    {task: {metric: number}} and ``policy_probs`` {task: {layer: [3 numbers]}} (null stands for a missing
    number, and so does one beyond :data:`MAX_VALUE`). Names are printable text without ``$`` (matplotlib would
    read it as TeX), at most the counts above. A policy record keeps ``policy_probs`` as {task: (layer names,
    float32 array (layers, 3))}. A long run's records are thinned evenly to the caps above.

    Raises:
        FileFormatError: no log, no records, or a record whose field has another shape or names more tasks,
            layers, metrics or stages than the bounds above (one sentence with the line number).
    """
    path = _log_path(path)
    names = _Names(os.fspath(path))
    kept = {"train": _Thinned(MAX_RECORDS), "val": _Thinned(MAX_VAL_RECORDS), "policy": _Thinned(MAX_POLICY_COLUMNS)}
    lines = skipped = 0
    for number, raw, rec in iter_json_lines(path, "log", FileFormatError):
        lines += bool(raw.strip()) or not raw
        step = rec.get("step") if isinstance(rec, dict) else None
        if _finite(step) and not isinstance(step, bool) and abs(step) <= MAX_STEP:
            for kind, checked in _checked(rec, names.at(number)):
                kept[kind].add(checked)
        else:
            skipped += bool(raw.strip()) or not raw
    records = sorted((r for k in kept.values() for r in k.records), key=lambda r: (r["line"], "policy_probs" in r))
    if not records and skipped:
        raise FileFormatError(f"log {os.fspath(path)!r} holds no automtl log records (none of its {lines} line(s) is a "
                              "JSON record with a step automtl writes); pass a run directory or its log.jsonl")
    if not records:
        raise FileFormatError(f"log {os.fspath(path)!r} has no records yet; plot it once the run has logged a step")
    return records


def _log_path(path) -> Path:
    """The log of ``path``: the file itself, or ``checkpoints/log.jsonl`` or ``log.jsonl`` in the folder."""
    path = Path(path)
    for candidate in (path, path / "checkpoints" / "log.jsonl", path / "log.jsonl"):
        if candidate.exists() and not candidate.is_dir():  # a pipe or device is refused by the reader
            return candidate
    raise FileFormatError(f"{os.fspath(path)!r} holds no checkpoints/log.jsonl; give the --out directory of "
                          "automtl convert or automtl search")


def _run_dir(log: Path) -> Path:
    """The run directory of a log: the folder above ``checkpoints/``, else the log's own folder."""
    return log.parent.parent if log.parent.name == "checkpoints" else log.parent


class _Thinned:
    """At most ``cap`` of the records added, evenly spaced: past the cap every other one goes and the stride
    doubles, so memory stays bounded however long the log is."""

    def __init__(self, cap: int):
        self.cap, self.stride, self.seen, self.records = cap, 1, 0, []

    def add(self, rec: dict) -> None:
        if self.seen % self.stride == 0:
            self.records.append(rec)
            if len(self.records) > self.cap:
                self.records, self.stride = self.records[::2], self.stride * 2
        self.seen += 1


class _Names:
    """The distinct names a log uses, bounded per kind (and kept once: a name repeated on every line is one
    string); ``at(line)`` checks a record's names at that line."""

    LIMITS = {"task": MAX_TASKS, "layer": MAX_LAYERS, "stage": MAX_STAGES, "metric": MAX_METRICS, "kind": MAX_STAGES}

    def __init__(self, path: str):
        self.path, self.seen, self.line = path, defaultdict(dict), 0

    def at(self, line: int) -> "_Names":
        self.line = line
        return self

    def bad(self, what: str) -> FileFormatError:
        return FileFormatError(f"line {self.line} of log {self.path!r} has {what}; plot a log automtl wrote, or "
                               "delete that line")

    def name(self, value, kind: str, scope: str = "") -> str:
        seen = self.seen[kind, scope]
        known = seen.get(value) if isinstance(value, str) else None
        if known is not None:
            return known
        if not (isinstance(value, str) and 0 < len(value) <= MAX_NAME and value.isprintable() and "$" not in value):
            raise self.bad(f"a {kind} name that is not printable text of 1 to {MAX_NAME} characters without '$'")
        if len(seen) >= self.LIMITS[kind]:
            raise self.bad(f"more than {self.LIMITS[kind]} distinct {kind} names")
        seen[value] = value
        return value

    def number(self, value, what: str) -> Optional[float]:
        """``value`` as a float, None when it is null, not finite or beyond :data:`MAX_VALUE` (drawn as missing)."""
        if value is None:
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise self.bad(f"{what} that is not a number")
        try:
            value = float(value)
        except OverflowError:  # an integer of hundreds of digits
            return None
        return value if math.isfinite(value) and abs(value) <= MAX_VALUE else None

    def mapping(self, value, what: str) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.bad(f"{what} that is not a mapping")
        return value


def _checked(rec: dict, names: _Names) -> list:
    """``(kind, record)`` pairs, kind train, val or policy, of the fields of ``rec`` the figures draw, checked
    (see :func:`read_log`); no other field is kept."""
    out = {"line": names.line, "step": float(rec["step"]), "stage": names.name(rec.get("stage", "?"), "stage")}
    out["kind"] = names.name(rec.get("kind", "weight"), "kind")
    out["losses"] = {names.name(t, "task"): names.number(v, f"a loss of {t!r}")
                     for t, v in names.mapping(rec.get("losses"), "'losses'").items()}
    for key in ("tau", "expected_params", "expected_macs"):
        out[key] = names.number(rec.get(key), repr(key))
    if out["stage"] == "val":
        out["metrics"] = {names.name(t, "task"): {names.name(m, "metric", t): names.number(v, f"metric {m!r}")
                                                  for m, v in names.mapping(ms, f"metrics of {t!r}").items()}
                          for t, ms in names.mapping(rec.get("metrics"), "'metrics'").items()}
        return [("val", out)]
    found = [("train", out)]
    probs = {}
    for t, rows in names.mapping(rec.get("policy_probs"), "'policy_probs'").items():
        task = names.name(t, "task")
        rows = names.mapping(rows, f"policy_probs of {task!r}")
        if rows:
            probs[task] = (tuple(names.name(layer, "layer") for layer in rows), _probs(rows.values(), names))
    if probs:
        found.append(("policy", {"line": names.line, "step": out["step"], "stage": out["stage"], "policy_probs": probs}))
    return found


def _probs(rows, names: _Names):
    """The (layers, 3) float32 array of ``rows`` (NaN where a probability is missing)."""
    import numpy as np

    values = []
    for row in rows:
        if not isinstance(row, list) or len(row) != len(_CHOICES):
            raise names.bad(f"a policy_probs row that is not a list of {len(_CHOICES)} numbers")
        numbers = (names.number(p, "a policy probability") for p in row)  # float32 holds what is drawn, [0, 1]
        values.append([v if v is not None and -1.0 <= v <= 2.0 else math.nan for v in numbers])
    return np.asarray(values, dtype=np.float32)


def _legend(ax, **kwargs) -> None:
    """A legend where some line has a label (a log whose values are all missing draws none: no legend, no warning)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def plot_run(run, out=None) -> List[Path]:
    """Draw the figures of ``run`` (a run directory, its ``checkpoints/`` or the log file) into ``out`` (default
    ``RUN/plots``, beside ``checkpoints/``).

    Returns the PNG paths written. Raises :class:`AutomtlError` when matplotlib is missing and
    :class:`FileFormatError` when there is no log.

    Example:
        >>> plot_run("automtl-out")  # doctest: +SKIP
        [PosixPath('automtl-out/plots/losses.png'), ...]
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise AutomtlError("automtl plot needs matplotlib, which is not installed; "
                           "install it with pip install 'automtl[plot]'") from None
    log = _log_path(run)
    records = read_log(log)
    default = out is None
    out = Path(out) if out is not None else _run_dir(log) / "plots"
    if default and out.is_symlink():
        raise FileFormatError(f"{os.fspath(out)!r} is a symbolic link, so the figures would be written wherever it "
                              "points; remove it, or choose the folder with --out")
    train = [r for r in records if r["stage"] != "val" and "policy_probs" not in r]
    val = [r for r in records if r["stage"] == "val"]
    probs = [r for r in records if "policy_probs" in r]
    figures = []  # every figure is drawn before any file is written: a failure leaves no half of them
    if train:
        figures.append((_losses_figure(Figure, train), "losses.png"))
    if val:
        figures.append((_metrics_figure(Figure, val, train), "metrics.png"))
    if probs:
        figures.append((_policy_figure(Figure, probs), "policy.png"))
    ensure_dir(out)
    return _save_all(figures, out)


def _save_all(figures: list, out: Path) -> List[Path]:
    """Write each ``(figure, name)`` as a PNG in ``out``, each through a temporary file renamed over its path once
    every one is written (a link there is replaced, not followed; a failed write leaves none of them)."""
    paths = [out / name for _, name in figures]
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            raise FileFormatError(f"{os.fspath(path)!r} is a folder, so the figure cannot be written there; remove "
                                  "it, or choose another folder with --out")
    with contextlib.ExitStack() as stack:
        for (fig, _), path in zip(figures, paths):
            fig.savefig(stack.enter_context(atomic_path(path)), dpi=110, format="png")
    return paths


def _finite(v) -> bool:
    if not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer too large for a float
        return False


def _stages(ax, train: List[dict]) -> None:
    """Shade each stage's span of steps and name it at the top."""
    spans: Dict[str, List[float]] = {}
    for r in train:
        lo, hi = spans.setdefault(r["stage"], [r["step"], r["step"]])
        spans[r["stage"]] = [min(lo, r["step"]), max(hi, r["step"])]
    for stage, (lo, hi) in spans.items():
        ax.axvspan(lo - 0.5, hi + 0.5, color=_STAGE_COLOURS.get(stage, "#f7f7f7"), zorder=0)
        ax.text((lo + hi) / 2, 0.97, stage, transform=ax.get_xaxis_transform(), ha="center", va="top", fontsize=8,
                color="#555555")


def _losses_figure(Figure, train: List[dict]):
    extra = [k for k in ("tau", "expected_params", "expected_macs") if any(_finite(r.get(k)) for r in train)]
    fig = Figure(figsize=(9, 3.2 * (1 + len(extra))), layout="constrained")
    axes = fig.subplots(1 + len(extra), 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    tasks = sorted({t for r in train for t in (r.get("losses") or {})})
    for kind, style in (("weight", "-"), ("policy", ":")):
        rows = [r for r in train if r.get("kind", "weight") == kind]
        for k, task in enumerate(tasks):
            pts = [(r["step"], r["losses"][task]) for r in rows if _finite((r.get("losses") or {}).get(task))]
            if pts:
                ax.plot(*zip(*pts), style, color=f"C{k}", label=f"{task} ({kind} steps)" if kind == "policy" else task)
    ax.set_ylabel("loss")
    ax.set_title("training loss per task (dotted: policy steps, on held-out data)", fontsize=10)
    _legend(ax, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _stages(ax, train)
    labels = {"tau": "Gumbel-softmax τ", "expected_params": "expected parameters", "expected_macs": "expected MACs"}
    for ax, key in zip(axes[1:], extra):
        pts = [(r["step"], r[key]) for r in train if _finite(r.get(key))]
        ax.plot(*zip(*pts), ".-", color="C7")
        ax.set_ylabel(labels[key])
        _stages(ax, train)
    axes[-1].set_xlabel("step")
    return fig


def _metrics_figure(Figure, val: List[dict], train: List[dict]):
    series: Dict[str, Dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in val:
        for task, metrics in r["metrics"].items():
            for name, v in (metrics or {}).items():
                if _finite(v):
                    series[task][name].append((r["step"], v))
    tasks = sorted(series)
    fig = Figure(figsize=(9, 2.8 * max(1, len(tasks))), layout="constrained")
    axes = fig.subplots(max(1, len(tasks)), 1, sharex=True, squeeze=False)[:, 0]
    for ax, task in zip(axes, tasks):
        for k, (name, pts) in enumerate(sorted(series[task].items())):
            ax.plot(*zip(*pts), "o-", color=f"C{k}", label=name, markersize=4)
        ax.set_title(f"validation: {task}", fontsize=10)
        _legend(ax, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        if train:
            _stages(ax, train)
    axes[-1].set_xlabel("step")
    return fig


def _policy_figure(Figure, recs: List[dict]):
    """One heat map per task and choice: rows are layers, columns the logged steps, colour the probability."""
    import numpy as np

    tasks = list(dict.fromkeys(t for r in recs for t in r["policy_probs"]))
    layers = list(dict.fromkeys(layer for r in recs for layers, _ in r["policy_probs"].values() for layer in layers))
    where = {layer: k for k, layer in enumerate(layers)}
    row = min(0.16, max(0.0, (MAX_FIGURE_INCHES - 1.2) / len(tasks) - 0.8) / len(layers))
    steps = [r["step"] for r in recs]
    fig = Figure(figsize=(4 + 3.6 * len(_CHOICES), 1.2 + len(tasks) * (0.8 + row * len(layers))), layout="constrained")
    axes = fig.subplots(len(tasks), len(_CHOICES), squeeze=False, sharex=True, sharey=True)
    image = None
    for i, task in enumerate(tasks):
        grid = np.full((len(layers), len(recs), len(_CHOICES)), np.nan, dtype=np.float32)
        for c, r in enumerate(recs):
            if task in r["policy_probs"]:
                names, values = r["policy_probs"][task]
                grid[[where[n] for n in names], c, :] = values
        for j, choice in enumerate(_CHOICES):
            ax = axes[i][j]
            image = ax.imshow(grid[:, :, j], aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest",
                              extent=(steps[0] - 0.5, steps[-1] + 0.5, len(layers) - 0.5, -0.5))
            ax.set_title(f"{task}: p({choice})", fontsize=9)
            if j == 0 and row >= 0.08:
                ax.set_yticks(range(len(layers)), layers, fontsize=6 if len(layers) > 20 else 8)
            if i == len(tasks) - 1:
                ax.set_xlabel("step")
    fig.colorbar(image, ax=axes, shrink=0.6, label="probability")
    return fig


_SWEEP_STYLE = {"automtl": ("o", "C0"), "hard-sharing": ("s", "C1"), "single-task": ("^", "C2")}


def plot_sweep(result: dict, path) -> Path:
    """Draw ``sweep.json`` (:func:`automtl.sweep.sweep`) as two panels: Δ_MTL (%) against parameters
    (millions) and against latency (ms per batch), the Pareto front of each ringed and joined.

    Returns ``path``. Raises :class:`AutomtlError` when matplotlib is missing.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise AutomtlError("automtl sweep wrote sweep.json but needs matplotlib to draw sweep.png, which is not "
                           "installed; install it with pip install 'automtl[plot]'") from None
    rows = [r for r in result["rows"] if _finite(r.get("delta_mtl"))]
    lat = result["latency"]
    fig = Figure(figsize=(12, 5), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    panels = (("params", "pareto_params", 1e-6, "parameters (millions)"),
              ("latency_ms", "pareto_latency", 1.0,
               f"latency (ms per batch of {lat['batch']} at {lat['input_size']}x{lat['input_size']} px, "
               f"CPU, median of {lat['repeats']})"))
    for ax, (key, front, scale, label) in zip(axes, panels):
        _sweep_panel(ax, rows, key, front, scale)
        ax.set_xlabel(label)
    axes[0].set_ylabel("Δ_MTL against the single-task models (%)")
    _legend(axes[0], fontsize=8, loc="best")
    tasks = ", ".join(t["name"] for t in result["tasks"])
    fig.suptitle(f"{result['backbone']} on {result['data']} ({tasks}): {result['strategy']} at budgets "
                 f"{', '.join(result['budgets'])}; baselines trained for the same compute "
                 f"({result['compute']['fbe_per_run']:g} FBE)", fontsize=10)
    fig.savefig(path, dpi=110)
    return Path(path)


def _sweep_panel(ax, rows: List[dict], key: str, front: str, scale: float) -> None:
    """One panel of the sweep figure: the models as points, named; the front as a ringed dashed line."""
    ax.axhline(0.0, color="#999999", linestyle=":", linewidth=1)
    seen = set()
    below = _stacked([r[key] for r in rows], [r["delta_mtl"] for r in rows])
    for r, k in zip(rows, below):
        marker, colour = _SWEEP_STYLE.get(r["kind"], ("o", "C7"))
        legend = {"automtl": f"automtl ({r['name'].split('@')[0]}), one point per budget",
                  "hard-sharing": "hard sharing (all-share)", "single-task": "single-task models (together)"}[r["kind"]]
        x = r[key] * scale
        ax.plot(x, r["delta_mtl"], marker, color=colour, markersize=8, label=None if legend in seen else legend)
        seen.add(legend)
        name = r["budget"] if r["kind"] == "automtl" else r["name"]
        ax.annotate(name, (x, r["delta_mtl"]), textcoords="offset points", xytext=(9, 4 - 11 * k), fontsize=8)
    pts = sorted((r[key] * scale, r["delta_mtl"]) for r in rows if r.get(front))
    if pts:
        ax.plot(*zip(*pts), "o--", color="black", markerfacecolor="none", markersize=14, linewidth=1,
                label="Pareto front (nothing cheaper scores higher)")
    ax.margins(x=0.15, y=0.1)  # room for the names beside the outermost points
    ax.grid(True, color="#eeeeee")


def _stacked(xs: List[float], ys: List[float], near_x: float = 0.1, near_y: float = 0.04) -> List[int]:
    """For each point, how many earlier points lie near it (within ``near_x`` of the data range across, the
    width of a short label, and ``near_y`` up or down): its label goes that many lines lower, so the names
    of coinciding points do not overprint."""
    if not xs:
        return []
    rx, ry = (max(v) - min(v) or 1.0 for v in (xs, ys))
    return [sum(abs(xs[i] - xs[j]) < near_x * rx and abs(ys[i] - ys[j]) < near_y * ry for j in range(i))
            for i in range(len(xs))]
