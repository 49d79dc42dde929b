"""The discrete sharing policy: for every policy layer and task, share, specialize or skip.

A policy is plain data. It is saved as readable YAML (layer -> task -> choice) so that a
person can edit it and feed it back.
"""
from __future__ import annotations

import hashlib
import math
import numbers
import os
import re
import warnings
import random as _random
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch
import yaml

from .errors import ConfigError, FileFormatError, finite_number, shown

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,128}\Z")

SHARE, SPECIALIZE, SKIP = 0, 1, 2
CHOICES = ("share", "specialize", "skip")
_FORMAT = 1


def _names(names, part: str) -> list:
    """A policy's ``part`` ("layers" or "tasks") as a list of strings (YAML may read a name as a number)."""
    if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
        raise ConfigError(f"a policy's {part} are a list of names (e.g. supermodel.{part[:-1]}_names), got a "
                          f"{type(names).__name__}")
    names = list(names)
    odd = next((x for x in names if not isinstance(x, (str, int)) or isinstance(x, bool)), None)
    if odd is not None:
        raise ConfigError(f"a policy's {part} are names (e.g. supermodel.{part[:-1]}_names), got a {type(odd).__name__}")
    return [str(x) for x in names]


@dataclass
class Policy:
    """``choices[l][t]`` is the choice (0 share, 1 specialize, 2 skip) of task ``t`` at layer ``l``.

    ``evidence`` (optional, from a search) says what backs each choice: ``kind`` ("margin": the
    policy probability of the choice minus the best other choice's; "conflict": the conflict threshold minus
    the task's best gradient cosine with another task in that layer), ``scores[l][t]``, the
    ``threshold`` a score must clear, ``undecided`` (``(l, t)`` pairs whose evidence did not clear it:
    they share), ``strategy`` and ``budget`` (``used`` and ``limit`` as multiples of the single model),
    and ``of_choices``, the fingerprint of the choices it describes (:func:`choices_fingerprint`): once
    the choices are edited (in the file or in ``choices``), :attr:`current_evidence` is None, so what
    inspect, render and reports show is never the searched policy's evidence beside other choices.
    It is not part of equality: two policies with the same choices are the same policy.
    """

    layers: list
    tasks: list
    choices: list
    evidence: Optional[dict] = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.layers, self.tasks = _names(self.layers, "layers"), _names(self.tasks, "tasks")
        try:
            self.choices = [[_choice_index(c) for c in row] for row in self.choices]
        except TypeError:
            raise ConfigError("a policy's choices must be a table (a list of rows, one per layer) of share, "
                              "specialize or skip (or 0, 1, 2)") from None
        if len(self.choices) != len(self.layers) or any(len(r) != len(self.tasks) for r in self.choices):
            raise ConfigError(
                f"a policy over {len(self.layers)} layers and {len(self.tasks)} tasks needs a "
                f"{len(self.layers)}x{len(self.tasks)} table of choices"
            )
        for row in self.choices:
            for c in row:
                if c not in (SHARE, SPECIALIZE, SKIP):
                    raise ConfigError(f"policy choice {c!r} is not one of 0 (share), 1 (specialize), 2 (skip)")

    # ---- construction -------------------------------------------------------------
    @classmethod
    def uniform(cls, layers: Sequence[str], tasks: Sequence[str], choice: str | int) -> "Policy":
        """Every task makes the same ``choice`` at every layer (e.g. all-share = hard sharing)."""
        c = _choice_index(choice)
        layers, tasks = _names(layers, "layers"), _names(tasks, "tasks")
        return cls(layers, tasks, [[c] * len(tasks) for _ in layers])

    @classmethod
    def random(cls, layers: Sequence[str], tasks: Sequence[str], skip_legal: Sequence[bool] = None,
               seed: int = 0, probs: Sequence[float] = (1 / 3, 1 / 3, 1 / 3)) -> "Policy":
        """A random policy (seeded) drawing each choice with ``probs`` (share, specialize, skip).

        Skip is only drawn where it is legal; elsewhere its probability goes to share and specialize
        in proportion (all of it to share when both are 0).
        """
        if len(probs) != 3 or any(not p >= 0 for p in probs) or sum(probs) <= 0:
            raise ConfigError(f"probs must be three non-negative weights for share, specialize, skip, got {tuple(probs)}")
        layers, tasks = _names(layers, "layers"), _names(tasks, "tasks")
        rng = _random.Random(seed)
        skip_legal = list(skip_legal) if skip_legal is not None else [True] * len(layers)
        without_skip = [probs[0], probs[1], 0.0] if probs[0] + probs[1] > 0 else [1.0, 0.0, 0.0]
        rows = []
        for legal in skip_legal:
            weights = list(probs) if legal else without_skip
            rows.append([rng.choices((SHARE, SPECIALIZE, SKIP), weights=weights)[0] for _ in tasks])
        return cls(layers, tasks, rows)

    # ---- views --------------------------------------------------------------------
    def column(self, task: str) -> list[int]:
        t = self.tasks.index(task)
        return [row[t] for row in self.choices]

    def row(self, layer: str) -> list[int]:
        return self.choices[self.layers.index(layer)]

    def counts(self) -> dict:
        """How often each choice is made, over all layers and tasks."""
        flat = [c for row in self.choices for c in row]
        return {name: flat.count(i) for i, name in enumerate(CHOICES)}

    @property
    def current_evidence(self) -> Optional[dict]:
        """:attr:`evidence` while it describes these choices; None once they were edited after the search."""
        ev = self.evidence
        if ev is None or ev.get("of_choices") is None:
            return ev
        # read once a cell by score()/undecided() (a grid of 10,000 cells): the fingerprint is computed again only
        # when the choices changed since, which a comparison of the tables tells
        seen = self.__dict__.get("_fingerprinted")  # (the choices as they were, their fingerprint)
        if seen is None or seen[0] != self.choices:
            seen = ([list(row) for row in self.choices], choices_fingerprint(self.choices))
            self.__dict__["_fingerprinted"] = seen
        return ev if seen[1] == ev["of_choices"] else None

    def score(self, layer: int, task: int) -> Optional[float]:
        """The evidence score of a choice (None without evidence, or once the choices were edited)."""
        ev = self.current_evidence or {}
        scores = ev.get("scores")
        return None if scores is None else scores[layer][task]

    def undecided(self, layer: int, task: int) -> bool:
        """True when the evidence did not support a choice, so it fell back to share."""
        pairs = (self.current_evidence or {}).get("undecided") or []
        cached = self.__dict__.get("_undecided")
        if cached is None or cached[0] is not pairs or cached[1] != len(pairs):
            cached = (pairs, len(pairs), {(int(l), int(t)) for l, t in pairs})
            self.__dict__["_undecided"] = cached
        return (layer, task) in cached[2]

    def check(self, layers: Sequence[str], tasks: Sequence[str], skip_legal: Sequence[bool]) -> None:
        """Raise ConfigError unless this policy fits a supermodel with these layers and tasks."""
        if list(tasks) != self.tasks:
            raise ConfigError(f"the policy is for tasks {self.tasks} but the model has tasks {list(tasks)}; use a policy made for this model")
        if list(layers) != self.layers:
            missing = [l for l in layers if l not in self.layers]
            extra = [l for l in self.layers if l not in layers]
            detail = "; ".join(part for part in (f"missing {missing[:3]}" if missing else "",
                                                 f"unknown {extra[:3]}" if extra else "") if part) or "in another order"
            raise ConfigError(f"the policy's layers do not match the model's ({detail}); use a policy made for this backbone")
        for name, row, legal in zip(self.layers, self.choices, skip_legal):
            if not legal and SKIP in row:
                raise ConfigError(f"layer {name!r} cannot be skipped (its shape changes and no 1x1 projection cheaper than the layer reproduces it); choose share or specialize there")

    # ---- files --------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {
            "automtl_policy": _FORMAT,
            "tasks": list(self.tasks),
            "layers": {l: {t: CHOICES[c] for t, c in zip(self.tasks, row)} for l, row in zip(self.layers, self.choices)},
        }
        if self.current_evidence is not None:
            out["evidence"] = _evidence_to_yaml(self.current_evidence, self.layers, self.tasks)
        return out

    @classmethod
    def from_dict(cls, data: dict, source: str = "policy") -> "Policy":
        if not isinstance(data, dict) or "layers" not in data or "tasks" not in data:
            raise FileFormatError(f"{source} is not an automtl policy (it needs 'tasks' and 'layers' keys); write one with automtl search")
        version = data.get("automtl_policy", _FORMAT)
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= _FORMAT:
            raise FileFormatError(f"{source} is policy format {str(version)[:20]!r}, which this automtl does not read (it "
                                  f"reads format {_FORMAT}); write it again with this version, or upgrade automtl")
        tasks = data["tasks"]
        layers = data["layers"]
        if not isinstance(tasks, list) or not isinstance(layers, dict):
            raise FileFormatError(f"{source}: 'tasks' must be a list and 'layers' a mapping of layer -> task -> choice")
        if len(tasks) > 256 or len(layers) > 10_000:
            raise FileFormatError(f"{source} has {len(tasks)} tasks and {len(layers)} layers, more than any model automtl "
                                  "builds (256 tasks, 10000 layers); check the file")
        for name in [*tasks, *layers]:
            if not isinstance(name, str) or not _NAME.match(name):
                raise FileFormatError(f"{source}: {str(name)[:40]!r} is not a task or layer name (1 to 128 letters, digits, "
                                      "'_', '.' or '-'); fix the file or write it again with automtl search")
        rows = []
        for lname, per_task in layers.items():
            if not isinstance(per_task, dict):
                raise FileFormatError(f"{source}: layer {lname!r} must map each task to share, specialize or skip")
            if set(per_task) != set(tasks):
                raise FileFormatError(
                    f"{source}: layer {lname!r} gives choices for {str(sorted(map(str, per_task)))[:200]} but the policy's tasks are {tasks}"
                )
            rows.append([_choice_index(per_task[t], f"{source}: layer {lname!r}, task {t!r}") for t in tasks])
        evidence = _evidence_from_yaml(data.get("evidence"), list(layers), tasks, source)
        if evidence is not None and evidence.get("of_choices") not in (None, choices_fingerprint(rows)):
            warnings.warn(f"{source}: its choices were edited after the search, so the search's evidence (scores, "
                          "undecided choices, budget used) describes other choices and is left out", stacklevel=2)
            evidence = None
        return cls(list(layers), tasks, rows, evidence)

    def save(self, path: str | os.PathLike) -> None:
        """Write the policy as YAML, atomically."""
        from .fileio import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Policy":
        from .fileio import read_yaml

        data = read_yaml(path, "policy file", FileFormatError)
        return cls.from_dict(data, f"policy file {str(path)!r}")


def choices_fingerprint(choices: Sequence[Sequence[int]]) -> str:
    """16 hex digits naming a table of choices: evidence records the one it describes (``of_choices``)."""
    text = ";".join(",".join(str(int(c)) for c in row) for row in choices)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _choice_index(choice, where: str = "policy") -> int:
    if isinstance(choice, numbers.Integral) and not isinstance(choice, bool) and int(choice) in (SHARE, SPECIALIZE, SKIP):
        return int(choice)
    if isinstance(choice, torch.Tensor) and choice.numel() == 1 and not choice.is_floating_point():
        return _choice_index(int(choice), where)
    if isinstance(choice, str) and choice.strip().lower() in CHOICES:
        return CHOICES.index(choice.strip().lower())
    raise ConfigError(f"{where}: choice {choice!r} is not one of share, specialize, skip")


def score_meaning(evidence: Optional[dict]) -> str:
    """What the score beside a choice is, for legends."""
    ev = evidence or {}
    return "probability margin over the best other choice" if ev.get("kind") == "margin" else "gradient-conflict score"


def undecided_meaning(evidence: Optional[dict]) -> str:
    """What "undecided" meant for this evidence, for legends: a probability margin below the threshold
    (gumbel), or a positive conflict score without a significant conflict (``critical_value`` standard errors;
    ``confidence`` in policies written before the t test) from every other task (conflict)."""
    ev = evidence or {}
    if ev.get("kind") == "conflict":
        if "critical_value" not in ev:  # written before the t test: z standard errors
            crit = ev.get("confidence")
        elif ev["critical_value"] is None:  # fewer than two measurements: no spread, so no conflict
            return "a conflict score above 0, and too few gradient measurements (under 2) for any conflict"
        else:
            crit = ev["critical_value"]
        return f"a conflict score above 0, but no conflict of {crit} standard errors from every other task"
    return f"a margin below {ev.get('threshold')}"


def _evidence_to_yaml(ev: dict, layers: list, tasks: list) -> dict:
    """Evidence as readable YAML: scores and undecided choices by layer and task name."""
    out = {k: v for k, v in ev.items() if k not in ("scores", "undecided", "over_budget")}
    if ev.get("scores") is not None:
        out["scores"] = {l: {t: float(v) for t, v in zip(tasks, row)} for l, row in zip(layers, ev["scores"])}
    for key in ("undecided", "over_budget"):
        if key in ev:
            by_layer: dict = {}
            for l, t in ev[key]:
                by_layer.setdefault(layers[l], []).append(tasks[t])
            out[key] = by_layer
    return out


#: The evidence a search writes, key by key: what each value may be (a closed vocabulary: a file is data).
_EVIDENCE_KINDS = ("margin", "conflict")
_BUDGET_METRICS = ("params", "macs")


def _finite(v) -> bool:
    return finite_number(v)  # a 400-digit integer too: not a finite float, where math.isfinite raises


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 10**9


def _budget(v) -> bool:
    return (isinstance(v, dict) and set(v) <= {"metric", "used", "limit"} and v.get("metric") in _BUDGET_METRICS
            and _finite(v.get("used")) and (v.get("limit") is None or _finite(v["limit"])))


def _plain(v) -> bool:
    """A value a strategy of its own may add to the evidence: a finite number, a bool, null or a name."""
    return v is None or isinstance(v, bool) or _finite(v) or (isinstance(v, str) and bool(_NAME.match(v)))


_EVIDENCE_VALUES = {
    "kind": lambda v: isinstance(v, str) and bool(_NAME.match(v)),  # margin, conflict, or a registered strategy's
    "strategy": lambda v: isinstance(v, str) and bool(_NAME.match(v)),
    "threshold": _finite, "confidence": _finite, "critical_value": lambda v: v is None or _finite(v),
    "steps": _count, "planned_steps": _count,
    "stopped_early": lambda v: isinstance(v, bool), "budget": _budget,
    "of_choices": lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{16}", v) is not None,
}


def _evidence_from_yaml(data, layers: list, tasks: list, source: str) -> Optional[dict]:
    """The inverse of :func:`_evidence_to_yaml`; policies written before evidence existed have none.

    Every key and value is checked against what a search writes (:data:`_EVIDENCE_VALUES`, finite
    scores, layer and task names of this policy), so what ``inspect`` and ``render`` show from a file
    is numbers and listed names only.
    """
    if data is None:
        return None
    bad = (f"{source}: 'evidence' must hold what a search writes (kind, strategy, threshold, confidence, critical_value, steps, "
           "planned_steps, stopped_early, budget, scores as layer -> task -> number, undecided and over_budget as "
           "layer -> [tasks]); delete the evidence section to use the choices alone")
    if not isinstance(data, dict):
        raise FileFormatError(bad)
    for key, value in data.items():
        if key in ("scores", "undecided", "over_budget"):
            continue
        check = _EVIDENCE_VALUES.get(key, _plain) if isinstance(key, str) and _NAME.match(key) else None
        if check is None or not check(value):
            raise FileFormatError(f"{source}: evidence {str(key)[:40]!r} is {shown(value, 40)}, not what a search "
                                  "writes there; delete the evidence section to use the choices alone")
    ev = {k: v for k, v in data.items() if k not in ("scores", "undecided", "over_budget")}
    layer_index = {name: i for i, name in enumerate(layers)}
    task_index = {name: i for i, name in enumerate(tasks)}
    for key in ("scores", "undecided", "over_budget"):  # names first: an edited policy's evidence may be stale
        part = data.get(key)
        named = part if isinstance(part, dict) else {}
        stale = [f"layer {str(l)[:60]!r}" for l in named if l not in layer_index]
        stale += [f"task {str(t)[:60]!r}" for ts in named.values() if isinstance(ts, (dict, list))
                  for t in ts if isinstance(t, str) and _NAME.match(t) and t not in task_index]
        if key == "scores" and part is not None and isinstance(part, dict) and not stale:
            stale += [f"no score for layer {l!r}" for l in layers if l not in part][:1]
        if stale:  # the policy was edited by hand: the search's evidence no longer describes it
            warnings.warn(f"{source}: its evidence names {stale[0]}, which the policy's layers and tasks do not match "
                          "(were they edited?); the evidence is left out", stacklevel=3)
            return None
    try:
        if data.get("scores") is not None:
            ev["scores"] = [[float(data["scores"][l][t]) for t in tasks] for l in layers]
            if not all(math.isfinite(v) for row in ev["scores"] for v in row) or any(
                    len(data["scores"][l]) != len(tasks) for l in layers) or len(data["scores"]) != len(layers):
                raise ValueError
        for key in ("undecided", "over_budget"):
            if key in data:
                pairs = {(layer_index[l], task_index[t]) for l, ts in data[key].items() for t in ts}
                ev[key] = [list(p) for p in sorted(pairs)]
    except (AttributeError, KeyError, TypeError, ValueError, OverflowError):
        raise FileFormatError(bad) from None
    return ev
