"""What a policy costs, in the unit a budget is given in, and whether a budget can be met at all.

The accounting of a supermodel lives here as functions of it (:func:`policy_parameter_count`,
:func:`policy_mac_count`, their differentiable expectations, ...; the ``SuperModel`` methods of
the same names delegate to them).

A budget (``SearchConfig.budget``, e.g. ``"1.5x"``) is a multiple of the single model (the
converted backbone with every task's head: the all-share policy), counted in parameters or in
multiply-accumulates per sample (``budget_metric``, ``"params"`` or ``"macs"``). The counts come
from that accounting (:func:`policy_parameter_count`,
:func:`policy_mac_count`; MACs of the heads by torch's
FlopCounterMode, see :mod:`automtl.flops`); this module picks the one the budget is in, so every
caller (the search's entry, ``convert``) checks the same number.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from .errors import ConfigError
from .flops import macs_of
from .policy import SHARE, SKIP, SPECIALIZE, Policy

if TYPE_CHECKING:
    from .config import SearchConfig
    from .supermodel import SuperModel

__all__ = [
    "METRICS", "UNITS", "policy_cost", "single_model_cost", "smallest_policy", "check_budget",
    "base_parameters", "backbone_parameters", "head_macs", "policy_parameter_count", "policy_mac_count",
    "expected_parameter_count", "expected_mac_count",
]

#: The budget metrics, and how their numbers read in messages.
METRICS = ("params", "macs")
UNITS = {"params": "parameters", "macs": "MACs per sample"}


def base_parameters(sm: "SuperModel") -> int:
    """Parameters outside the policy layers and the logits: heads and unfused backbone layers."""
    layer_params = {id(p) for layer in sm.policy_layers for p in layer.parameters()}
    return sum(p.numel() for p in sm.weight_parameters() if id(p) not in layer_params)


def policy_parameter_count(sm: "SuperModel", policy: Policy) -> int:
    """Parameters of the compact model that ``policy`` compiles to."""
    total = base_parameters(sm)
    for info, row in zip(sm.layer_info, policy.choices):
        total += info.unit_params * ((SHARE in row) + row.count(SPECIALIZE))
        total += info.skip_params * (SKIP in row)
    return total


def expected_parameter_count(sm: "SuperModel", probs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Differentiable expected parameter count of the compact model under ``probs``."""
    probs = sm.policy_probabilities() if probs is None else probs
    unit = torch.tensor([i.unit_params for i in sm.layer_info], dtype=probs.dtype, device=probs.device)
    skip = torch.tensor([i.skip_params for i in sm.layer_info], dtype=probs.dtype, device=probs.device)
    p_share_used = 1 - (1 - probs[..., SHARE]).prod(-1)
    p_skip_used = 1 - (1 - probs[..., SKIP]).prod(-1)
    n_spec = probs[..., SPECIALIZE].sum(-1)
    return base_parameters(sm) + (unit * (p_share_used + n_spec) + skip * p_skip_used).sum()


def head_macs(sm: "SuperModel") -> int:
    """Multiply-accumulates per sample of all task heads, counted by torch's FlopCounterMode.

    Measured once on a feature-shaped dummy input (heads in eval mode, so their BatchNorm
    statistics do not move), so custom heads are counted too, every op of them.
    """
    cached = getattr(sm, "_head_macs", None)
    if cached is not None:
        return cached
    p = next(sm.heads.parameters(), None)
    feat = torch.zeros(1, *sm.feature_shape[1:], device=p.device if p is not None else "cpu",
                       dtype=p.dtype if p is not None else torch.float32)
    total = 0
    for head in sm.heads.values():
        was_training = head.training
        try:
            with torch.no_grad():
                total += macs_of(lambda: head.eval()(feat))
        finally:
            head.train(was_training)
    object.__setattr__(sm, "_head_macs", int(total))
    return int(total)


def policy_mac_count(sm: "SuperModel", policy: Policy) -> int:
    """Estimated multiply-accumulates per sample of the compact model that ``policy`` compiles to.

    A layer's operator is counted once per distinct input, where a task's input is
    identified by its choices in all earlier policy layers (layers in execution order, so
    parallel branches are counted conservatively); a specialized operator always counts.
    """
    total = head_macs(sm)
    sig = [0] * sm.num_tasks  # id of each task's current value
    ids: dict = {}
    for info, row in zip(sm.layer_info, policy.choices):
        computed: set = set()
        new_sig = []
        for t, c in enumerate(row):
            key = (sig[t], c, t if c == SPECIALIZE else -1)
            if key not in computed:
                computed.add(key)
                total += info.skip_macs if c == SKIP else info.macs
            new_sig.append(ids.setdefault(key, len(ids) + 1))
        sig = new_sig
    return int(total)


def expected_mac_count(sm: "SuperModel", probs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Differentiable estimate of :func:`policy_mac_count` under the policy distribution.

    A task whose choices so far were all *share* reads the common trunk; an operator on
    the trunk is computed once for all the tasks that pick it there, one off the trunk once
    per task (an upper bound: tasks that branched off may still agree with each other).
    """
    probs = sm.policy_probabilities() if probs is None else probs
    dtype, device = probs.dtype, probs.device
    macs = torch.tensor([i.macs for i in sm.layer_info], dtype=dtype, device=device)
    skip_macs = torch.tensor([i.skip_macs for i in sm.layer_info], dtype=dtype, device=device)
    p_share, p_spec, p_skip = probs[..., SHARE], probs[..., SPECIALIZE], probs[..., SKIP]
    # q[l, t]: probability that task t's input at layer l is the trunk (shared everything before l)
    ones = torch.ones_like(p_share[:1])
    q = torch.cat([ones, torch.cumprod(p_share, 0)[:-1]], 0)
    share = 1 - (1 - q * p_share).prod(-1) + ((1 - q) * p_share).sum(-1)
    skip = 1 - (1 - q * p_skip).prod(-1) + ((1 - q) * p_skip).sum(-1)
    return head_macs(sm) + (macs * (share + p_spec.sum(-1)) + skip_macs * skip).sum()


def backbone_parameters(sm: "SuperModel") -> int:
    """Parameters of the converted single-task backbone (no heads)."""
    head_params = sum(p.numel() for p in sm.heads.parameters())
    return policy_parameter_count(sm, Policy.uniform(sm.layer_names, sm.task_names, "share")) - head_params


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ConfigError(f"budget metric {metric!r} is unknown; choose {' or '.join(METRICS)}")


def policy_cost(sm: "SuperModel", policy: Policy, metric: str = "params") -> int:
    """Parameters (``"params"``) or multiply-accumulates per sample (``"macs"``) of the compact model
    that ``policy`` compiles ``sm`` to. Raises ConfigError for another metric."""
    _check_metric(metric)
    return policy_mac_count(sm, policy) if metric == "macs" else policy_parameter_count(sm, policy)


def single_model_cost(sm: "SuperModel", metric: str = "params") -> int:
    """The cost of the single model, the unit of a budget: the all-share policy (backbone + heads)."""
    return policy_cost(sm, Policy.uniform(sm.layer_names, sm.task_names, "share"), metric)


def smallest_policy(sm: "SuperModel", metric: str = "params") -> Policy:
    """The cheapest policy in ``metric``: every task skips each layer where skip is legal and cheaper
    than the layer, and shares it elsewhere (tasks that choose alike are counted once, so diverging
    never saves)."""
    _check_metric(metric)
    rows = []
    for legal, info in zip(sm.skip_legal, sm.layer_info):
        cheaper = info.skip_macs < info.macs if metric == "macs" else info.skip_params < info.unit_params
        rows.append([SKIP if legal and cheaper else SHARE] * sm.num_tasks)
    return Policy(sm.layer_names, sm.task_names, rows)


def check_budget(sm: "SuperModel", config: "SearchConfig") -> None:
    """Refuse a budget that no policy can meet, in the budget's own metric, before any training.

    Does nothing without a budget (or for something that is not a SuperModel: the search says so).

    Raises:
        ConfigError: one sentence with the budget and the smallest reachable cost in its unit.
    """
    from .supermodel import SuperModel  # here: supermodel imports this module for its accounting

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
