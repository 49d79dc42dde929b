"""What :func:`~automtl.search.search` returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..policy import Policy


@dataclass
class SearchResult:
    """What a search found: the discrete policy, how training went, and how good it is.

    ``metrics`` is ``{task: {metric: value}}`` on the validation data (the format of
    :func:`automtl.metrics.delta_mtl`), ``losses`` the mean validation loss per task.
    ``params`` / ``macs`` are the compact model's parameter count and estimated MACs per
    sample under ``policy``; ``base_*`` those of the single backbone + heads (all-share);
    ``budget_*`` the budget in the same unit (None without a budget). ``steps`` is the optimizer steps
    of each stage, ``{stage: n}`` (the fine-tune's as fitted to the policy under ``finetune_unit: compute``).
    """

    policy: Policy
    history: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    losses: dict = field(default_factory=dict)
    params: int = 0
    base_params: int = 0
    macs: int = 0
    base_macs: int = 0
    budget: Optional[float] = None
    budget_metric: str = "params"
    budget_params: Optional[float] = None
    budget_macs: Optional[float] = None
    checkpoint: Optional[str] = None
    stages: list = field(default_factory=list)
    strategy: str = "gumbel"
    steps: dict = field(default_factory=dict)

    @property
    def within_budget(self) -> Optional[bool]:
        """Whether the discrete policy meets the budget (None without a budget)."""
        if self.budget is None:
            return None
        if self.budget_metric == "macs":
            return self.macs <= self.budget_macs
        return self.params <= self.budget_params

    def to_dict(self) -> dict:
        """Plain data (JSON-able) for reports."""
        return {
            "policy": self.policy.to_dict(), "metrics": self.metrics, "losses": self.losses,
            "params": self.params, "base_params": self.base_params, "macs": self.macs, "base_macs": self.base_macs,
            "budget": self.budget, "budget_metric": self.budget_metric, "budget_params": self.budget_params,
            "budget_macs": self.budget_macs, "within_budget": self.within_budget, "checkpoint": self.checkpoint,
            "stages": self.stages, "steps": self.steps, "strategy": self.strategy, "evidence": self.policy.current_evidence,
            "history": self.history,
        }
