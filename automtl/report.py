"""Accounting: what a compact model costs, against the models it replaces.

Parameters are counted on the modules the graph uses; multiply-accumulates (MACs) are
counted by running the graph once under torch's ``FlopCounterMode`` (every op with a FLOP
formula, MACs = FLOPs / 2; see :mod:`automtl.flops`); latency is
the median wall-clock time of repeated CPU runs. ``compare`` sets the compact model against
one single-task backbone, T single-task models and the supermodel; the *FLOP bound* is the
latency the compact model would have if its time scaled with its MACs from the backbone's.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Optional, Sequence

import torch
from torch import nn

from .compact import CompactModel, compact as _compile
from .flops import macs_of, shapes_only
from .listing import backbone_catalog, format_rows, supermodel_summary  # noqa: F401  (re-exported)
from .policy import CHOICES, Policy, score_meaning, undecided_meaning

__all__ = ["backbone_catalog", "count_macs", "model_stats", "interleaved_latency", "flop_bound", "compare", "format_inspect",
           "format_rows", "inspect_text", "supermodel_summary"]

#: The letters of the policy grid.
LETTERS = {"share": "S", "specialize": "P", "skip": "-"}


# ---------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------
def count_macs(model: nn.Module, x: torch.Tensor, static: bool = False, **kwargs) -> int:
    """Multiply-accumulates per input sample of one ``model(x, **kwargs)``, counted by torch's FlopCounterMode.

    Every op with a FLOP formula in torch counts (convolutions, transposed convolutions, linear
    and matrix products, attention; see :mod:`automtl.flops`), at FLOPs / 2; a conv is output
    elements x in_channels/groups x kh x kw, a linear in x out per row. The total is divided by
    the batch size of ``x``. Runs in eval mode, without gradients. With ``static=True`` the model
    runs on fake tensors (shapes only: no arithmetic, no data).
    """
    with _eval(model), torch.inference_mode(), shapes_only(static) as fake:
        total = macs_of(lambda: model(fake(x) if fake else x, **kwargs))
    return int(total // max(x.shape[0], 1))


class _eval:
    """Eval mode for a measurement, the previous modes restored afterwards."""

    def __init__(self, module: nn.Module):
        self.modes = {m: m.training for m in module.modules()}
        self.module = module

    def __enter__(self):
        self.module.eval()

    def __exit__(self, *exc):
        for m, mode in self.modes.items():
            m.training = mode


def _synchronize() -> None:
    """Wait for the GPU work queued so far: a CUDA call returns before its kernels ran, so a wall-clock interval
    must end (and start) here to hold them."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _median_latency(fn, repeats: int, warmup: int = 1) -> dict:
    with torch.inference_mode():
        for _ in range(max(warmup, 0)):
            fn()
        times = []
        for _ in range(max(repeats, 1)):
            _synchronize()
            start = time.perf_counter()
            fn()
            _synchronize()
            times.append(time.perf_counter() - start)
    return {"latency_s": statistics.median(times), "latency_min_s": min(times), "repeats": len(times)}


def interleaved_latency(models: Sequence[nn.Module], input_shape: Sequence[int], repeats: int = 10,
                        warmup: int = 1) -> list[dict]:
    """Median wall-clock seconds of one batch of ``input_shape`` (N, C, H, W) through each of ``models``,
    timed in rounds (each round runs every model once), so that all see the same machine load.

    Models run in eval mode, without gradients. Returns one ``{"latency_s", "latency_min_s", "repeats"}``
    per model, in order. Use it to compare models on a machine other jobs share; :func:`model_stats`
    times one model alone.
    """
    shape = _check_shape(input_shape)
    inputs = [_input(m, shape) for m in models]
    times: list = [[] for _ in models]
    with torch.inference_mode(), contextlib.ExitStack() as stack:
        for m in models:
            stack.enter_context(_eval(m))
        for r in range(max(warmup, 0) + max(repeats, 1)):
            for k, (m, x) in enumerate(zip(models, inputs)):
                _synchronize()
                start = time.perf_counter()
                m(x)
                _synchronize()
                if r >= warmup:
                    times[k].append(time.perf_counter() - start)
    return [{"latency_s": statistics.median(t), "latency_min_s": min(t), "repeats": len(t)} for t in times]


def _input(model: nn.Module, shape: Sequence[int]) -> torch.Tensor:
    p = next(model.parameters(), None)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    return x.to(device=p.device, dtype=p.dtype) if p is not None else x


def _check_shape(input_shape) -> tuple:
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"input_shape must be (N, C, H, W) with positive sizes, got {tuple(input_shape)}")
    return shape


def _task_parameters(model: CompactModel, tasks: Optional[Sequence[str]]) -> int:
    """Parameters of the modules and attributes the graph for ``tasks`` actually uses."""
    gm = model.graph_module if tasks is None or list(tasks) == model.task_names else model._subset(tuple(tasks))
    seen: dict = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            for p in gm.get_submodule(node.target).parameters():
                seen[id(p)] = p.numel()
        elif node.op == "get_attr":
            obj = gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            if isinstance(obj, nn.Parameter):
                seen[id(obj)] = obj.numel()
    return sum(seen.values())


def model_stats(compact: CompactModel, input_shape: Sequence[int], tasks: Optional[Sequence[str]] = None,
                repeats: int = 10, warmup: int = 1, latency: bool = True) -> dict:
    """Parameters, MACs per sample and median latency of ``compact`` computing ``tasks`` (default all), on the
    device its weights are on (a GPU's queued kernels waited for).

    Latency is for one batch of ``input_shape`` (N, C, H, W) in eval mode; MACs are per sample and
    counted on shapes alone. With ``latency=False`` the model is never run on data (latency is None).
    """
    shape = _check_shape(input_shape)
    names = list(tasks) if tasks is not None else list(compact.task_names)
    run_tasks = None if names == compact.task_names else names
    macs = count_macs(compact, _input(compact, (1,) + shape[1:]), static=True, tasks=run_tasks)
    timing: dict = {"latency_s": None}
    if latency:
        x = _input(compact, shape)
        with _eval(compact):
            timing = _median_latency(lambda: compact(x, tasks=run_tasks), repeats, warmup)
    return {"tasks": names, "input_shape": list(shape), "parameters": _task_parameters(compact, run_tasks),
            "macs": macs, **timing}


def _bound(reference_latency: float, reference_macs: int, macs: int) -> float:
    return reference_latency * macs / reference_macs if reference_macs else float("nan")


def flop_bound(compact: CompactModel, input_shape: Sequence[int], backbone: Optional[CompactModel] = None,
               repeats: int = 10) -> float:
    """Seconds per batch the compact model would take if its time scaled with its MACs.

    ``backbone_latency * compact_macs / backbone_macs``, where the backbone is ``backbone``
    computing its first task (e.g. the all-share compact model: one backbone and one head), or,
    by default, the compact model's own heaviest single-task path.
    """
    shape = _check_shape(input_shape)
    macs = count_macs(compact, _input(compact, (1,) + shape[1:]))
    if backbone is None:
        one = _input(compact, (1,) + shape[1:])
        per_task = {t: count_macs(compact, one, tasks=[t]) for t in compact.task_names}
        ref, task = compact, max(per_task, key=per_task.get)
    else:
        ref, task = backbone, backbone.task_names[0]
    ref_stats = model_stats(ref, shape, tasks=[task], repeats=repeats)
    return _bound(ref_stats["latency_s"], ref_stats["macs"], macs)


def _restore_mode(sm, mode: str, policy: Optional[Policy], tau: float) -> None:
    if mode == "hard" and policy is not None:
        sm.hard(policy)
    elif mode == "soft":
        sm.soft(tau)
    else:
        sm.warmup()


def compare(sm, compact: CompactModel, input_shape: Sequence[int], repeats: int = 10) -> dict:
    """The compact model against what it replaces, measured in one run at ``input_shape``.

    - ``backbone``: one backbone and one head (the all-share compact model computing the first task);
    - ``separate``: T single-task models (backbone + that task's head), run one after another;
    - ``supermodel``: ``sm`` itself in soft mode (every operator of every layer computed);
    - ``flop_bound_s``: backbone latency x compact MACs / backbone MACs.
    Ratios are compact / other (below 1 means the compact model is cheaper).
    """
    shape = _check_shape(input_shape)
    names = list(compact.task_names)
    ours = model_stats(compact, shape, repeats=repeats)
    single = _compile(sm, Policy.uniform(sm.layer_names, sm.task_names, "share"))
    backbone = model_stats(single, shape, tasks=[names[0]], repeats=repeats)

    one = _input(single, (1,) + shape[1:])
    x = _input(single, shape)
    sep_params = sum(_task_parameters(single, [t]) for t in names)
    sep_macs = sum(count_macs(single, one, tasks=[t]) for t in names)
    with _eval(single):
        sep_time = _median_latency(lambda: [single(x, tasks=[t]) for t in names], repeats)
    separate = {"parameters": sep_params, "macs": sep_macs, **sep_time}

    mode, policy, tau = sm.mode, sm.policy, sm.tau
    try:
        with torch.random.fork_rng(devices=[]):  # the Gumbel noise must not move the caller's RNG
            sm.soft(tau)
            sm_macs = count_macs(sm, _input(sm, (1,) + shape[1:]))
            xs = _input(sm, shape)
            with _eval(sm):
                sm_time = _median_latency(lambda: sm(xs), repeats)
    finally:
        _restore_mode(sm, mode, policy, tau)
    supermodel = {"parameters": sum(p.numel() for p in sm.parameters()), "macs": sm_macs, "mode": "soft", **sm_time}

    bound = _bound(backbone["latency_s"], backbone["macs"], ours["macs"])

    def ratio(a, b):
        return a / b if b else float("nan")

    ratios = {}
    for key in ("parameters", "macs", "latency_s"):
        label = key.replace("_s", "")
        ratios[f"{label}_vs_backbone"] = ratio(ours[key], backbone[key])
        ratios[f"{label}_vs_separate"] = ratio(ours[key], separate[key])
        ratios[f"{label}_vs_supermodel"] = ratio(ours[key], supermodel[key])
    ratios["latency_vs_flop_bound"] = ratio(ours["latency_s"], bound)
    return {"input_shape": list(shape), "tasks": names, "repeats": repeats, "compact": ours, "backbone": backbone,
            "separate": separate, "supermodel": supermodel, "flop_bound_s": bound, "ratios": ratios}


# ---------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------
def _num(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def _ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None or seconds != seconds else f"{seconds * 1e3:.1f} ms"


def format_inspect(stats: dict, policy: Optional[Policy]) -> str:
    """A plain-text table of the accounting (``model_stats`` or ``compare`` output) and the policy grid.

    The grid has one row per policy layer and one column per task: S = share, P = specialize
    (a task-owned copy), - = skip.
    """
    lines = []
    shape = stats.get("input_shape")
    head = f"Accounting at input {'x'.join(str(d) for d in shape)}" if shape else "Accounting"
    lines.append(head + " (MACs per sample, latency per batch, median)")
    rows = []
    if "compact" in stats:
        n = len(stats.get("tasks", []))
        for key, label in (("compact", "compact model"), ("backbone", "one backbone + head"),
                           ("separate", f"{n} single-task models"), ("supermodel", "supermodel (soft)")):
            s = stats[key]
            rows.append((label, _num(s["parameters"]), _num(s["macs"], "MAC"), _ms(s.get("latency_s"))))
        rows.append(("FLOP bound of the compact model", "", "", _ms(stats.get("flop_bound_s"))))
    else:
        rows.append(("compact model", _num(stats["parameters"]), _num(stats["macs"], "MAC"), _ms(stats.get("latency_s"))))
    header = ("model", "parameters", "MACs", "latency")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines.append(fmt.format(*header))
    lines.extend(fmt.format(*r) for r in rows)
    if "ratios" in stats:
        r = stats["ratios"]
        lines.append(
            f"compact / backbone: {r['parameters_vs_backbone']:.2f}x parameters, {r['macs_vs_backbone']:.2f}x MACs, "
            f"{r['latency_vs_backbone']:.2f}x latency; compact / separate models: {r['parameters_vs_separate']:.2f}x "
            f"parameters, {r['latency_vs_separate']:.2f}x latency; latency / FLOP bound: {r['latency_vs_flop_bound']:.2f}"
        )
    lines.append("")
    return "\n".join(lines + _policy_lines(policy)) + "\n"


def _policy_lines(policy: Optional[Policy]) -> list:
    """The policy as an S/P/- grid (with the search's evidence beside each choice when it has any)."""
    if policy is None:
        return ["Policy: none recorded."]
    lines = ["Policy (S = share the backbone's layer, P = specialize: a task-owned copy, - = skip the layer)"]
    ev = policy.current_evidence or {}
    scored = ev.get("scores") is not None
    if scored:
        what = score_meaning(ev)
        lines.append(f"beside each choice: its {what} ({ev.get('strategy', 'search')}); ? = undecided "
                     f"({undecided_meaning(ev)}), fell back to share")
        if ev.get("kind") == "conflict" and ev.get("planned_steps"):
            stop = "; then stopped: more could not change the decision" if ev.get("stopped_early") else ""
            lines.append(f"gradients measured {ev.get('steps')} of {ev['planned_steps']} planned times{stop}")
    lw = max([len("layer")] + [len(l) for l in policy.layers])
    cw = [max(len(t), 8 if scored else 1) for t in policy.tasks]
    lines.append("  ".join([f"{'layer':<{lw}}"] + [f"{t:<{w}}" for t, w in zip(policy.tasks, cw)]).rstrip())
    for l, (layer, row) in enumerate(zip(policy.layers, policy.choices)):
        cells = []
        for t, (c, w) in enumerate(zip(row, cw)):
            cell = LETTERS[CHOICES[c]]
            if scored:
                cell += ("?" if policy.undecided(l, t) else " ") + f"{policy.score(l, t):+.3f}"
            cells.append(f"{cell:<{w}}")
        lines.append("  ".join([f"{layer:<{lw}}"] + cells).rstrip())
    counts = policy.counts()
    lines.append(f"{counts['share']} share, {counts['specialize']} specialize, {counts['skip']} skip "
                 f"over {len(policy.layers)} layers x {len(policy.tasks)} tasks")
    budget = ev.get("budget")
    if budget:
        limit = f" of a {budget['limit']}x budget" if budget.get("limit") else " (no budget)"
        lines.append(f"budget used: {budget['used']}x the single model's {budget['metric']}{limit}")
    return lines


def inspect_text(path: str | os.PathLike, repeats: int = 5, batch: int = 1, latency: bool = False) -> str:
    """What ``automtl inspect model.automtl`` prints: the tasks, the accounting and the policy grid.

    Parameters and MACs come from the graph's static shapes; the model runs on data only with
    ``latency=True`` (the ``--latency`` flag), to time it.
    """
    from .formats import load

    model = load(path)
    shape = model.input_shape or (1, 3, 64, 64)
    stats = model_stats(model, (batch,) + tuple(shape[1:]), repeats=repeats, latency=latency)
    tasks = []
    for t in model.tasks:
        detail = f", {t.classes} {t.spec.classes_word if t.spec is not None else 'classes'}" if t.classes is not None else ""
        tasks.append(f"  {t.name}: {t.kind}{detail}")
    head = [f"{os.fspath(path)}: compact multi-task model, {len(model.tasks)} tasks", *tasks, ""]
    return "\n".join(head) + "\n" + format_inspect(stats, model.policy)
