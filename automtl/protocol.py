"""How automtl compares models: equal training compute and the metrics that enter Δ_MTL.

One home for the protocol that ``automtl sweep`` and ``benchmarks/quality.py`` share.

**Compute** is counted in backbone forward+backward equivalents (FBE): one optimizer step of the
hard-sharing model (one backbone pass and T heads, forward and backward) is 1 FBE. The other steps
cost what was measured on the 2-core CPU machine (small_resnet at batch 32 / resnet18 at batch 8):
a gumbel warm-up step about 1 FBE (it trains the hard-sharing model) and a gumbel search step
1.5 / 1.4 on sampled paths (with ``paths="soft"``, every operator for every task: 4.8 / 4.4 and
4.6 / 3.8);
a conflict warm-up step 0.9 / 1.0 (it trains the hard-sharing model), a conflict search step
1.9 / 2.7 (one backward per task); a fine-tune step of the compact model about 1.1.

**Δ_MTL** (Maninis et al. 2019; :func:`automtl.metrics.delta_mtl`) averages, per task, the usual
metrics of the MTL literature for its kind; the within-N-degrees percentages of normals are left
out, as they can be 0 early in training (a zero baseline has no ratio).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

from .metrics import HIGHER_IS_BETTER

__all__ = ["STEP_COST", "DELTA_METRICS", "run_cost", "delta_metrics", "delta_or_none"]

#: FBE of one step of each stage, per strategy (see the module docstring for the measurements).
STEP_COST = {"gumbel": {"warmup": 1.0, "search": 1.5, "finetune": 1.1},
             "conflict": {"warmup": 1.0, "search": 2.5, "finetune": 1.1}}
#: The metrics that enter Δ_MTL, per task kind; a kind not listed uses every metric of known direction.
DELTA_METRICS = {"segmentation": ("miou", "pixel_acc"), "depth": ("abs_err", "rel_err"),
                 "normal": ("mean_angle", "median_angle"), "classification": ("accuracy",)}


def run_cost(strategy: str, warmup_steps: int, search_steps: int, finetune_steps: int) -> float:
    """Training compute of one search run in FBE: steps of each stage times :data:`STEP_COST`.

    Raises:
        KeyError: ``strategy`` has no measured step cost (only ``conflict`` and ``gumbel`` have).
    """
    cost = STEP_COST[strategy]
    return warmup_steps * cost["warmup"] + search_steps * cost["search"] + finetune_steps * cost["finetune"]


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
