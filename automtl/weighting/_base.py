"""The balancer protocol (:class:`LossWeighting`) and the one registry of balancers by name."""
from __future__ import annotations

import difflib
import inspect
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError, finite_number, first_line, shown

__all__ = ["LossWeighting", "WEIGHTINGS", "make_weighting", "rank_mean", "register_weighting"]


def rank_mean(t: Tensor) -> Tensor:
    """Average over DDP ranks (when running under torch.distributed), so that balancers driven
    by local statistics still give every rank the same weights."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


class LossWeighting(nn.Module):
    """Base balancer: holds the task order and checks that the losses match it."""

    def __init__(self, task_names: Sequence[str]):
        super().__init__()
        names = list(task_names)
        if not names:
            raise ConfigError("a loss weighting needs at least one task name")
        if len(set(names)) != len(names):
            raise ConfigError(f"loss weighting got repeated task names {names}; give each task once")
        self.task_names = names
        self._calls = 0

    def _stack(self, losses: Mapping[str, Tensor]) -> Tensor:
        missing = [n for n in self.task_names if n not in losses]
        extra = [n for n in losses if n not in self.task_names]
        if missing or extra:
            raise ConfigError(
                f"loss weighting was built for tasks {self.task_names} but got losses for {list(losses)}; "
                "build it with the same task names"
            )
        return torch.stack([losses[n].reshape(()) for n in self.task_names])

    def _step(self, step: Optional[int]) -> int:
        s = self._calls if step is None else int(step)
        self._calls += 1
        return s

    def _out(self, stacked: Tensor, w: Tensor) -> tuple[Tensor, dict[str, float]]:
        total = (w.to(device=stacked.device, dtype=stacked.dtype) * stacked).sum()
        return total, {n: float(v) for n, v in zip(self.task_names, w.detach().cpu().tolist())}

    def forward(  # pragma: no cover - overridden
        self, losses: Mapping[str, Tensor], shared_parameters: Optional[list[Tensor]] = None, step: Optional[int] = None
    ) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError



#: Balancers by name, for configs and the command line, in the order they are registered.
WEIGHTINGS: dict[str, type[LossWeighting]] = {}


def register_weighting(name: str):
    """Class decorator adding a :class:`LossWeighting` to :data:`WEIGHTINGS` under ``name`` (``--weighting name``)."""

    def deco(cls):
        WEIGHTINGS[name] = cls
        return cls

    return deco


def make_weighting(name: str, task_names: Sequence[str], **options) -> LossWeighting:
    """Build a balancer by name, turning a typo or a wrong option into one clear ConfigError."""
    key = str(name).lower()
    if key not in WEIGHTINGS:
        close = difflib.get_close_matches(key, list(WEIGHTINGS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown loss weighting {name!r}; {hint}choose one of {', '.join(WEIGHTINGS)}")
    cls = WEIGHTINGS[key]
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        accepted = [p for p in params if p not in ("self", "task_names")]
        unknown = [o for o in options if o not in accepted]
        if unknown:
            takes = ", ".join(accepted) if accepted else "no options"
            raise ConfigError(f"loss weighting {key!r} does not take option(s) {', '.join(unknown)}; it takes {takes}")
        options = {name: check_number_option(key, name, value, params[name].default) for name, value in options.items()}
    try:
        return cls(task_names, **options)  # torchjd's aggregators check their own options (**options)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConfigError(f"loss weighting {key!r} cannot use the options {dict(options)!r} ({first_line(exc)}); "
                          "fix weighting_options") from None


def check_number_option(weighting: str, name: str, value, default):
    """``value``, checked to be a number where the option's ``default`` is one: a whole number for an int (returned as
    an int: YAML may read 100.0), a finite real for a float (a string or NaN there failed in the first step, or
    trained on NaN); ConfigError otherwise. Other options are returned as given."""
    if isinstance(default, bool) or not isinstance(default, (int, float)):
        return value
    whole = isinstance(default, int)
    number = finite_number(value) and (not whole or float(value).is_integer())
    if not number or whole and not -2**63 <= value < 2**63:  # a 400-digit integer: no float or int64 holds it
        raise ConfigError(f"loss weighting {weighting!r} option {name!r} is {shown(value)}; give "
                          f"{'a whole number within int64' if whole else 'a finite number'} (default {default!r})")
    return int(value) if whole else value
