"""How automtl compares models: equal training compute and the metrics that enter Δ_MTL.

One home for the protocol that ``automtl sweep`` and ``benchmarks/quality.py`` share.

**Compute** is counted in backbone forward+backward equivalents (FBE): one optimizer step of the
hard-sharing model (one backbone pass and T heads, forward and backward) is 1 FBE. The other steps
cost what was measured on the 2-core CPU machine (``python benchmarks/stage_cost.py --threads 1``:
``benchmarks/quality.py``'s small_resnet at batch 32 / resnet18 at batch 8, median step time against
the same run's warm-up step):
a gumbel warm-up step about 1 FBE (it trains the hard-sharing model) and a gumbel search step
1.57 / 1.49 on sampled paths (with ``paths="soft"``, every operator for every task, measured earlier: 4.8 / 4.4 and
4.6 / 3.8); a conflict warm-up or unmeasured search step 1 FBE (the hard-sharing model), a measured
one 1.55-1.60 (T = 2) / 2.39-2.71 (T = 3) in two runs: one forward and T backwards, the step's own backward reused as
the last task's gradient, charged as 1 + 0.8 (T - 1); a fine-tune step of the compact model 1 FBE
when the fine-tune counts its steps in compute (``finetune_unit: compute``: the discrete
architecture runs finetune_steps x MACs(all share) / MACs(policy) steps), as the sweep and the
quality benchmark do. Under ``finetune_unit: compute``, a conflict search that stops measuring early
(``conflict_futility``) has the planned measurements it skipped, at these rates, added to its
fine-tune, so its run costs what :func:`run_cost` says (up to rounding to whole steps).

**Δ_MTL** (Maninis et al. 2019; :func:`automtl.metrics.delta_mtl`) averages, per task, the usual
metrics of the MTL literature for its kind; the within-N-degrees percentages of normals are left
out, as they can be 0 early in training (a zero baseline has no ratio).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

from .metrics import HIGHER_IS_BETTER

__all__ = ["STEP_COST", "DELTA_METRICS", "measure_cost", "step_cost", "run_cost", "finetune_share", "delta_metrics", "delta_or_none"]

#: FBE of one step of each stage, per strategy (see the module docstring for the measurements);
#: conflict's search step is an average over measured and plain steps (:func:`step_cost`).
STEP_COST = {"gumbel": {"warmup": 1.0, "search": 1.5, "finetune": 1.0},
             "conflict": {"warmup": 1.0, "search": 1.0, "measure_per_extra_task": 0.8, "finetune": 1.0}}
#: The metrics that enter Δ_MTL, per task kind; a kind not listed uses every metric of known direction.
DELTA_METRICS = {"segmentation": ("miou", "pixel_acc"), "depth": ("abs_err", "rel_err"),
                 "normal": ("mean_angle", "median_angle"), "classification": ("accuracy",)}


def measure_cost(num_tasks: int) -> float:
    """FBE a measured conflict search step costs above a plain one: ``0.8 (T - 1)`` (T - 1 extra backwards)."""
    return STEP_COST["conflict"]["measure_per_extra_task"] * max(num_tasks - 1, 0)


def step_cost(strategy: str, num_tasks: int = 3, conflict_every: int = 4) -> dict:
    """FBE of one warm-up, search and fine-tune step of ``strategy`` with ``num_tasks`` tasks.

    A conflict search step measures the per-task gradients once every ``conflict_every`` steps, at
    ``0.8 (T - 1)`` FBE more than a plain step; the search entry is the average over that cycle.

    Raises:
        KeyError: ``strategy`` has no measured step cost (only ``conflict`` and ``gumbel`` have).
    """
    cost = dict(STEP_COST[strategy])
    if cost.pop("measure_per_extra_task", None) is not None:
        cost["search"] += measure_cost(num_tasks) / max(int(conflict_every), 1)
    return cost


def run_cost(strategy: str, warmup_steps: int, search_steps: int, finetune_steps: int, num_tasks: int = 3,
             conflict_every: int = 4) -> float:
    """Training compute of one search run in FBE: steps of each stage times their cost in :data:`STEP_COST`,
    plus, for conflict, :func:`measure_cost` for each of the ``search_steps // conflict_every`` measured steps
    (the search stage measures at the end of each full cycle, so a partial last cycle measures nothing; the
    average of :func:`step_cost` would charge it a fraction of a measurement).

    Raises:
        KeyError: ``strategy`` has no measured step cost (only ``conflict`` and ``gumbel`` have).
    """
    cost = STEP_COST[strategy]
    measured = (search_steps // max(int(conflict_every), 1)) * measure_cost(num_tasks) \
        if "measure_per_extra_task" in cost else 0.0
    return warmup_steps * cost["warmup"] + search_steps * cost["search"] + measured + finetune_steps * cost["finetune"]


def finetune_share(strategy: str, warmup_steps: int, search_steps: int, finetune_steps: int, num_tasks: int = 3,
                   conflict_every: int = 4) -> float:
    """The fraction of a run's compute (:func:`run_cost`) spent in its fine-tune, the part in which its learning
    rate anneals: a baseline given ``finetune_decay_fraction`` = this share has the run's schedule shape.

    Raises:
        KeyError: ``strategy`` has no measured step cost (only ``conflict`` and ``gumbel`` have).
    """
    total = run_cost(strategy, warmup_steps, search_steps, finetune_steps, num_tasks, conflict_every)
    fine = finetune_steps * step_cost(strategy, num_tasks, conflict_every)["finetune"]
    return min(1.0, fine / total) if total > 0 else 1.0


def delta_metrics(metrics: Mapping[str, Mapping[str, float]], kinds: Mapping[str, str]) -> dict:
    """``{task: {metric: value}}`` cut to the metrics that enter Δ_MTL for each task's kind.

    ``kinds`` maps task name to task kind; tasks of ``metrics`` missing from it are left out.
    """
    out = {}
    for task, values in metrics.items():
        if task not in kinds:
            continue
        names = DELTA_METRICS.get(kinds[task]) or tuple(k for k in values if k in HIGHER_IS_BETTER)
        out[task] = {k: values[k] for k in names if k in values}
    return out


def delta_or_none(multi: Mapping[str, Mapping[str, float]], single: Mapping[str, Mapping[str, float]],
                  tasks: Optional[Sequence[str]] = None) -> Optional[float]:
    """Δ_MTL in percent of ``multi`` against ``single``, or None where no ratio exists (a zero or
    non-finite baseline, e.g. an untrained classifier's accuracy of 0)."""
    from .errors import ConfigError
    from .metrics import delta_mtl

    if tasks is not None:
        multi = {t: multi[t] for t in tasks}
    try:
        return delta_mtl(multi, single)
    except ConfigError:
        return None
