"""The search configuration: one dataclass, loadable from YAML, that fixes a whole run.

Every field that changes what a search computes is here, so that a config file plus a seed
reproduce a run (and a resumed run can check that it continues the same one).
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

import yaml

from .errors import ConfigError, finite_number, shown

#: Largest image side automtl accepts: larger inputs exhaust memory before they fail usefully.
MAX_INPUT_SIZE = 1024
#: Samples a run generates or takes from a data set (--samples, train_samples, val_samples, eval --samples).
MAX_SAMPLES = 10_000_000

__all__ = ["SearchConfig", "parse_budget"]

#: Integer fields and their lower bound (None: any integer).
_INTS = {
    "seed": None, "batch_size": 1, "warmup_steps": 0, "search_steps": 0, "finetune_steps": 0,
    "weight_steps_per_policy_step": 0, "conflict_every": 1, "tau_every": 1, "log_every": 1, "checkpoint_every": 0, "val_every": 0,
}
#: The largest whole number a config field takes (steps, seeds, batch sizes...): far beyond any run.
MAX_INT = 2**31 - 1
#: Float fields: positive, non-negative or any finite number.
_FLOATS = {
    "lr": "pos", "momentum": "nonneg", "weight_decay": "nonneg", "policy_lr": "pos", "tau_start": "pos",
    "tau_decay": "pos", "tau_min": "pos", "reg_weight": "nonneg", "budget_weight": "nonneg",
    "min_margin": "nonneg", "conflict_confidence": "nonneg", "conflict_threshold": "any",
    "holdout_fraction": "nonneg", "finetune_decay_fraction": "pos", "conflict_futility": "nonneg",
}
_BUDGET = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*[xX×]?\s*\Z")


def parse_numbers(option: str, text: Optional[str], n: int, form: str, positive: bool = False) -> tuple:
    """A command-line option's ``text`` "a,b,..." (``--steps``, ``--samples``) as ``n`` whole numbers (all None
    when the option is not given); ConfigError naming ``option`` and the expected ``form`` otherwise."""
    if text is None:
        return (None,) * n
    parts = text.split(",")  # "" (an unset shell variable) is refused, not read as the option left out
    if len(parts) != n or not all(p.strip().isdigit() and (int(p) > 0 or not positive) for p in parts):
        what = "positive whole numbers" if positive else "whole numbers"
        raise ConfigError(f"{option} {shown(text)} must be {'two' if n == 2 else 'three'} {what} {form}")
    return tuple(int(p) for p in parts)


def parse_budget(value: Union[str, float, int, None]) -> Optional[float]:
    """A resource budget as a multiple of the single backbone + heads: ``"1.5x"``, ``1.5`` or ``"2"``.

    ``None``, ``"none"`` and ``"inf"`` mean no budget (the resource term is off).
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"budget {shown(value)} is not a multiple; write it like '1.5x' or 1.5")
    if isinstance(value, int) and not finite_number(value):  # a 400-digit integer: float() would overflow
        raise ConfigError(f"budget {shown(value)} is beyond any model size; write 'none' for no budget" if value > 0 else
                          f"budget {shown(value)} must be a positive multiple of the single model, such as '1.5x'")
    if isinstance(value, (int, float)):
        mult = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if not text:  # an unset shell variable, not a request to switch the budget off
            raise ConfigError("the budget is empty; write it like '1.5x', or 'none' for no budget")
        if text in ("none", "inf", "infinite", "off"):
            return None
        m = _BUDGET.match(text)
        if not m and _BUDGET.match(text.lstrip("-").lstrip()) and text.startswith("-"):  # -1.5x: a sign, not a typo
            raise ConfigError(f"budget {shown(value)} must be a positive multiple of the single model, such as '1.5x'")
        if not m:
            raise ConfigError(
                f"budget {shown(value)} is not a multiple of the single model; write it like '1.5x' (or 1.5)"
            )
        mult = float(m.group(1))
        if math.isinf(mult):  # a number too large for a float, not a request for no budget
            raise ConfigError(f"budget {shown(value)} is beyond any model size; write 'none' for no budget")
    else:
        raise ConfigError(f"budget {shown(value)} is not a multiple; write it like '1.5x' or 1.5")
    if math.isinf(mult):
        return None
    if not (mult > 0) or math.isnan(mult):
        raise ConfigError(f"budget {shown(value)} must be a positive multiple of the single model, such as '1.5x'")
    return mult


_CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "weight_optimizer": ("adam", "sgd"),
    "budget_metric": ("params", "macs"),
    "discretize": ("argmax", "sample"),
    "paths": ("sampled", "soft"),
    "finetune_schedule": ("cosine", "constant"),
    "finetune_unit": ("steps", "compute"),
}
#: What a value of a choice is often written as, for the did-you-mean (``device: gpu`` is not "cpu").
_ALIASES = {"gpu": "cuda"}


def check_keys(keys, known, where: str) -> None:
    """Raise ConfigError for the first of ``keys`` not in ``known``, suggesting the closest known one (else listing
    them all)."""
    known = list(known)
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys are {', '.join(known)}"
            raise ConfigError(f"{where}: unknown key {shown(key)}{hint}")


class KeywordChecked(type):
    """Metaclass of the config dataclasses: an unknown keyword is a ConfigError with a did-you-mean
    (``SearchConfig(warmup_step=3)``), as in their files, not Python's TypeError."""

    def __call__(cls, *args, **kwargs):
        params = inspect.signature(cls.__init__).parameters.values()  # a subclass may take arguments of its own
        known = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)][1:]
        if any(p.kind == p.VAR_KEYWORD for p in params):  # passed on to the dataclass's own __init__
            known += [f.name for f in dataclasses.fields(cls) if f.init]
        check_keys(kwargs, known, cls.__name__)
        return super().__call__(*args, **kwargs)


#: Search fields that say where a session writes (checkpoints, logs, TensorBoard), which policy file it reads and
#: whether it resumes: they are the session's, not the run's. A run directory's ``supermodel.yaml`` does not set them
#: for a later session (a handed-over run would otherwise have ``automtl compact`` write logs where its file says).
SESSION_FIELDS = ("out_dir", "log_dir", "tensorboard_dir", "policy_file", "resume")


@dataclass
class SearchConfig(metaclass=KeywordChecked):
    """How :func:`automtl.search` runs. Step counts are optimizer steps (one batch each).

    Stages: ``warmup_steps`` of the hard-sharing model (gumbel with ``paths="soft"``: every
    operator under the uniform mix); ``search_steps`` of the strategy (gumbel: every
    ``weight_steps_per_policy_step`` weight steps followed by one policy step); discretize;
    ``finetune_steps`` of the discrete architecture only, continuing the weight optimizer.
    """

    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = False  # bf16 autocast, CUDA only
    batch_size: int = 8  # only used when a Dataset (not a loader) is passed
    # stage lengths
    warmup_steps: int = 500
    search_steps: int = 1000
    finetune_steps: int = 1000
    weight_steps_per_policy_step: int = 4  # AutoMTL: 400 weight / 100 policy steps
    # gumbel: "sampled" runs one Gumbel-max path per task (GDAS), what tasks share once; "soft" mixes all operators (AutoMTL)
    paths: str = "sampled"
    # weights
    weight_optimizer: str = "adam"  # adam | sgd
    lr: float = 1e-3
    momentum: float = 0.9  # sgd only
    weight_decay: float = 1e-4
    finetune_lr: Optional[float] = None  # None: lr
    finetune_schedule: str = "cosine"  # cosine: the fine-tune's learning rate decays to 0 (SGDR's half cosine); constant
    finetune_decay_fraction: float = 1.0  # cosine: the last part of the fine-tune that decays (before it: constant)
    # steps: finetune_steps optimizer steps; compute: finetune_steps steps of the hard-sharing model's compute
    # (the discrete architecture runs finetune_steps x MACs(all share) / MACs(policy) steps), plus the compute the
    # search planned for measurements it did not take (conflict's futility stop), at the constant rate before the anneal
    finetune_unit: str = "steps"
    grad_clip: Optional[float] = None  # max gradient norm, None: off
    # policy
    policy_lr: float = 0.01
    tau_start: float = 5.0
    tau_decay: float = 0.965
    tau_every: int = 100  # policy steps between temperature decays
    tau_min: float = 0.1
    reg_weight: float = 0.0005  # depth-weighted regulariser toward sharing
    budget: Optional[Union[str, float]] = None  # e.g. "1.5x"; None: no resource term
    budget_metric: str = "params"  # params | macs
    budget_weight: float = 1.0
    discretize: str = "argmax"  # argmax | sample
    # strategy: what happens between warm-up and the discrete policy (see automtl/search/)
    strategy: str = "gumbel"  # gumbel | conflict
    holdout_fraction: float = 0.2  # gumbel: share of map-style training data its policy steps read
    min_margin: float = 0.1  # gumbel: margin of a choice over the best other below which it shares
    conflict_threshold: float = 0.0  # conflict: gradient cosine below which two tasks conflict (Recon: 0)
    conflict_confidence: float = 2.0  # conflict: z of the false-conflict rate Φ(-z) of its t test
    conflict_every: int = 4  # conflict: search steps per gradient measurement (the others are plain steps)
    # conflict: stop measuring once every pair of tasks in every layer conflicts beyond doubt or has a conditional
    # power below this to conflict by the last planned measurement (futility stopping); 0: measure to the end
    conflict_futility: float = 0.05
    # losses
    weighting: str = "equal"
    weighting_options: dict = field(default_factory=dict)
    # files and reporting
    out_dir: Optional[str] = None  # checkpoints and policy.yaml
    log_dir: Optional[str] = None  # log.jsonl; None: out_dir
    tensorboard_dir: Optional[str] = None  # TensorBoard event files (extra automtl[tensorboard]); None: none
    log_every: int = 10
    checkpoint_every: int = 100  # 0: only at the end of each stage
    val_every: int = 0  # 0: validate at the end only
    val_batches: Optional[int] = None  # None: the whole validation set
    resume: bool = False
    policy_file: Optional[str] = None  # fine-tune this policy only
    quiet: bool = False

    def __post_init__(self) -> None:
        self.validate()

    # ---- validation -------------------------------------------------------------
    def validate(self) -> "SearchConfig":
        """Check types and ranges (numbers become floats, names lower case); raise ConfigError naming the field."""
        self._validate_numbers()
        self._validate_names()
        for name in ("amp", "resume", "quiet"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"config field {name!r} must be true or false, got {shown(getattr(self, name))}")
        if self.weighting_options is None:
            self.weighting_options = {}
        if not isinstance(self.weighting_options, Mapping):
            raise ConfigError(f"config field 'weighting_options' must be a mapping, got {shown(self.weighting_options)}")
        self.weighting_options = dict(self.weighting_options)
        named = next((k for k in self.weighting_options if not isinstance(k, str)), None)
        if named is not None:
            raise ConfigError(f"config field 'weighting_options' has the option name {shown(named)}; option names are "
                              "words (e.g. temperature: 2.0)")
        for name in ("out_dir", "log_dir", "tensorboard_dir", "policy_file"):
            v = getattr(self, name)
            if v is not None:
                if not isinstance(v, (str, os.PathLike)):
                    raise ConfigError(f"config field {name!r} must be a path, got {shown(v)}")
                setattr(self, name, os.fspath(v))
        parse_budget(self.budget)
        return self

    def _validate_numbers(self) -> None:
        for name, low in _INTS.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"config field {name!r} must be an integer, got {shown(v)}")
            if low is not None and v < low:
                raise ConfigError(f"config field {name!r} must be at least {low}, got {shown(v, 30)}")
            if abs(v) > MAX_INT:
                raise ConfigError(f"config field {name!r} is {shown(v, 30)}, beyond the {MAX_INT} automtl takes; "
                                  "use a smaller number")
        for name, kind in _FLOATS.items():
            v = getattr(self, name)
            if not finite_number(v):  # a 400-digit integer too, which no float holds
                raise ConfigError(f"config field {name!r} must be a finite number in a float's range, got {shown(v)}")
            if (kind == "pos" and v <= 0) or (kind == "nonneg" and v < 0):
                raise ConfigError(f"config field {name!r} must be {'positive' if kind == 'pos' else 'non-negative'}, got {shown(v, 30)}")
            setattr(self, name, float(v))
        for name in ("finetune_lr", "grad_clip"):
            v = getattr(self, name)
            if v is None:
                continue
            if not finite_number(v) or not v > 0:
                raise ConfigError(f"config field {name!r} must be a positive number or null, got {shown(v)}")
            setattr(self, name, float(v))
        if self.val_batches is not None and (isinstance(self.val_batches, bool) or not isinstance(self.val_batches, int) or self.val_batches < 1):
            raise ConfigError(f"config field 'val_batches' must be a positive integer or null, got {shown(self.val_batches)}")
        if not 0 < self.finetune_decay_fraction <= 1:
            raise ConfigError(f"config field 'finetune_decay_fraction' must be above 0 and at most 1, got {self.finetune_decay_fraction}")
        if not 0 <= self.conflict_futility < 0.5:  # from 0.5 on, a pair in conflict now could count as futile
            raise ConfigError(f"config field 'conflict_futility' must be at least 0 and below 0.5, got {self.conflict_futility}")
        if not self.momentum < 1:  # SGD's velocity grows without bound from 1 on
            raise ConfigError(f"config field 'momentum' must be below 1, got {self.momentum}")
        if not self.tau_decay <= 1:
            raise ConfigError(f"config field 'tau_decay' is a decay: at most 1 (the Gumbel-softmax temperature falls or "
                              f"stays), got {self.tau_decay}")
        if not self.tau_min <= self.tau_start:
            raise ConfigError(f"config field 'tau_min' ({self.tau_min}) is above 'tau_start' ({self.tau_start}); the "
                              "temperature starts at tau_start and falls to tau_min")
        if not self.min_margin <= 1:  # a margin between two probabilities
            raise ConfigError(f"config field 'min_margin' is a margin between two probabilities: at most 1 (above, every "
                              f"choice would fall back to share), got {self.min_margin}")
        if not 0 <= self.holdout_fraction < 1:
            raise ConfigError(f"config field 'holdout_fraction' must be at least 0 and below 1, got {self.holdout_fraction}")

    def _validate_names(self) -> None:
        for name, options in _CHOICES.items():
            v = getattr(self, name)
            if not isinstance(v, str) or v.lower() not in options:
                close = [_ALIASES[v.lower()]] if isinstance(v, str) and _ALIASES.get(v.lower()) in options else \
                    difflib.get_close_matches(str(v).lower(), options, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ConfigError(f"config field {name!r} is {shown(v)}; {hint}choose one of {', '.join(options)}")
            setattr(self, name, v.lower())
        if not isinstance(self.strategy, str) or not self.strategy:
            raise ConfigError(f"config field 'strategy' must be a strategy name such as 'conflict', got {shown(self.strategy)}")
        if not isinstance(self.weighting, str) or not self.weighting:
            raise ConfigError(f"config field 'weighting' must be a weighting name such as 'equal', got {shown(self.weighting)}")

    @property
    def budget_multiple(self) -> Optional[float]:
        """The budget as a float multiple of the single model, or None."""
        return parse_budget(self.budget)

    # ---- construction -----------------------------------------------------------
    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def check_keys(cls, keys, where: str = "config") -> None:
        """Raise ConfigError for a key that is not a field, suggesting the closest one."""
        check_keys(keys, cls.fields(), where)

    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]], where: str = "config") -> "SearchConfig":
        """Build from a mapping; an unknown key is a ConfigError with a did-you-mean."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where} must be a mapping of field: value, got {type(data).__name__}")
        cls.check_keys(data, where)
        return cls(**dict(data))

    @classmethod
    def from_yaml(cls, path: Union[str, os.PathLike]) -> "SearchConfig":
        """Load a YAML file of field: value pairs; bad YAML is a ConfigError naming the line."""
        from .fileio import read_yaml

        where = f"config file {os.fspath(path)!r}"
        data = read_yaml(path, "config file", exponent_floats=True)
        return cls.from_dict(data or {}, where)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self, path: Optional[Union[str, os.PathLike]] = None) -> str:
        """The config as YAML text; written atomically to ``path`` when given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            from .fileio import atomic_write_text

            atomic_write_text(path, text)
        return text

    def replace(self, **changes) -> "SearchConfig":
        """A copy with some fields changed (unknown names are a ConfigError)."""
        self.check_keys(changes, "search option")
        return dataclasses.replace(self, **changes)
