"""What a policy costs, in the unit a budget is given in, and whether a budget can be met at all.

A budget (``SearchConfig.budget``, e.g. ``"1.5x"``) is a multiple of the single model (the
converted backbone with every task's head: the all-share policy), counted in parameters or in
multiply-accumulates per sample (``budget_metric``, ``"params"`` or ``"macs"``). The counts come
from the supermodel's accounting (:meth:`~automtl.supermodel.SuperModel.policy_parameter_count`,
:meth:`~automtl.supermodel.SuperModel.policy_mac_count`; MACs of the heads by torch's
FlopCounterMode, see :mod:`automtl.flops`); this module picks the one the budget is in, so every
caller (the search's entry, ``convert``) checks the same number.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ConfigError
from .policy import SHARE, SKIP, Policy
from .supermodel import SuperModel

if TYPE_CHECKING:
    from .config import SearchConfig

__all__ = ["METRICS", "UNITS", "policy_cost", "single_model_cost", "smallest_policy", "check_budget"]

#: The budget metrics, and how their numbers read in messages.
METRICS = ("params", "macs")
UNITS = {"params": "parameters", "macs": "MACs per sample"}


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ConfigError(f"budget metric {metric!r} is unknown; choose {' or '.join(METRICS)}")


def policy_cost(sm: SuperModel, policy: Policy, metric: str = "params") -> int:
    """Parameters (``"params"``) or multiply-accumulates per sample (``"macs"``) of the compact model
    that ``policy`` compiles ``sm`` to. Raises ConfigError for another metric."""
    _check_metric(metric)
    return sm.policy_mac_count(policy) if metric == "macs" else sm.policy_parameter_count(policy)


def single_model_cost(sm: SuperModel, metric: str = "params") -> int:
    """The cost of the single model, the unit of a budget: the all-share policy (backbone + heads)."""
    return policy_cost(sm, Policy.uniform(sm.layer_names, sm.task_names, "share"), metric)


def smallest_policy(sm: SuperModel, metric: str = "params") -> Policy:
    """The cheapest policy in ``metric``: every task skips each layer where skip is legal and cheaper
    than the layer, and shares it elsewhere (tasks that choose alike are counted once, so diverging
    never saves)."""
    _check_metric(metric)
    rows = []
    for legal, info in zip(sm.skip_legal, sm.layer_info):
        cheaper = info.skip_macs < info.macs if metric == "macs" else info.skip_params < info.unit_params
        rows.append([SKIP if legal and cheaper else SHARE] * sm.num_tasks)
    return Policy(sm.layer_names, sm.task_names, rows)


def check_budget(sm: SuperModel, config: "SearchConfig") -> None:
    """Refuse a budget that no policy can meet, in the budget's own metric, before any training.

    Does nothing without a budget (or for something that is not a SuperModel: the search says so).

    Raises:
        ConfigError: one sentence with the budget and the smallest reachable cost in its unit.
    """
    mult = config.budget_multiple
    if mult is None or not isinstance(sm, SuperModel):
        return
    metric = config.budget_metric
    single = single_model_cost(sm, metric)
    smallest = policy_cost(sm, smallest_policy(sm, metric), metric)
    if mult * single < smallest:
        unit = UNITS[metric]
        raise ConfigError(
            f"budget {config.budget} ({mult * single:,.0f} {unit}) is below what any policy can reach "
            f"({smallest:,} {unit}, {smallest / single:.2f}x); raise the budget (--budget)"
        )
