"""The strategy interface: what a search does between warm-up and the discrete policy.

A strategy is one file (``gumbel.py``, ``conflict.py``) holding one :class:`Strategy` subclass
registered by name with :func:`register_strategy`. The run (``_run._Search``) owns everything
the strategies share: data streams, optimizers, checkpoint/resume, DDP, logging, progress,
warm-up and fine-tune loops. A strategy says how the warm-up trains (``enter_warmup``), what one
search step does (``search_step``), and which discrete policy the evidence supports
(``decide``, returning per-decision evidence). Its own running state goes into the run's
checkpoint through ``state_dict``/``load_state_dict``, so a resumed run is bitwise equal to an
uninterrupted one.
"""
from __future__ import annotations

import difflib
from typing import Optional

import torch

from ..errors import ConfigError

_STRATEGIES: dict = {}


def register_strategy(name: str):
    """Class decorator: make a :class:`Strategy` subclass available as ``SearchConfig(strategy=name)``."""

    def deco(cls):
        cls.name = name
        _STRATEGIES[name] = cls
        return cls

    return deco


def list_strategies() -> list[str]:
    """The names of the registered strategies."""
    _load_builtin()
    return sorted(_STRATEGIES)


def strategy_class(name: str):
    _load_builtin()
    if name not in _STRATEGIES:
        close = difflib.get_close_matches(name, list(_STRATEGIES), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"search strategy {name!r} is unknown; {hint}choose one of {', '.join(sorted(_STRATEGIES))}")
    return _STRATEGIES[name]


def _load_builtin() -> None:
    from . import conflict, gumbel  # noqa: F401  (registration happens on import)


class Strategy:
    """Base class. ``run`` is the search run: ``run.sm`` the supermodel, ``run.config`` the config,
    ``run.forward_losses``/``run.weight_step``/``run.record`` the shared step helpers."""

    name = "base"

    def __init__(self, run):
        self.run = run

    # ---- stages -------------------------------------------------------------------
    def enter_warmup(self) -> Optional[torch.nn.Module]:
        """Put the supermodel in the warm-up mode; return a module to run instead of it (or None)."""
        self.run.sm.warmup()
        return None

    def warmup_mix(self) -> Optional[torch.Tensor]:
        """Operator weights of a warm-up forward (None: the network from ``enter_warmup``)."""
        return self.run.sm.mixing_weights()

    def warmup_forward(self, g: int):
        """``(net, mix)`` of warm-up step ``g``: the network to run (None: the supermodel) and the operator
        weights the supermodel runs under."""
        net = self.run.stage_net
        return net, (self.warmup_mix() if net is None else None)

    def stage_done(self, stage: str) -> None:
        """Called once when ``stage`` has run its last step (not again when a resumed run passes over it)."""

    def shared_parameters(self):
        """The weights GradNorm measures task gradients on, after this step's forward."""
        return self.run.shared

    def enter_search(self) -> None:
        raise NotImplementedError

    def search_step(self, i: int, g: int, iters: dict, log: bool) -> dict:
        """One step of the search stage (``i`` within the stage, ``g`` global); returns the log record."""
        raise NotImplementedError

    def decide(self):
        """The discrete :class:`~automtl.policy.Policy` and its evidence dict (see ``Policy.evidence``)."""
        raise NotImplementedError

    def size(self, policy) -> int:
        """What the budget limits of ``policy``'s compact model: its parameters, or its MACs under
        ``budget_metric: macs``."""
        run = self.run
        if run.config.budget_metric == "macs":
            return run.sm.policy_mac_count(policy)
        return run.sm.policy_parameter_count(policy)

    def fits(self, policy) -> bool:
        """Whether ``policy``'s compact model is within the run's budget (always, without one)."""
        run = self.run
        if run.budget is None:
            return True
        limit = run.budget_macs if run.config.budget_metric == "macs" else run.budget_params
        return self.size(policy) <= limit

    def unspent_compute(self) -> float:
        """FBE the search stage planned but did not spend (e.g. measurements a futility stop skipped); under
        ``finetune_unit: compute`` the fine-tune gets them."""
        return 0.0

    def held_out(self) -> float:
        """The fraction of map-style training data held out for this strategy's policy steps (0: none)."""
        return 0.0

    # ---- checkpoint -----------------------------------------------------------------
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def check_state(self, state: dict) -> None:
        """Raise ValueError, with a phrase, for a ``state_dict`` of the right structure that no run reaches (a
        checkpoint is read as data, and checked before anything is restored)."""
