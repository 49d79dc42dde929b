"""The search's checkpoint: what it holds, how it is written, and how a resume reads it back.

A checkpoint is the run's whole state at a global step (model, the three optimizers, the loss
balancer and the RNG states (each rank's, under torchrun; the global generators and those the backbone's modules own), the strategy's state, the history), so that a resumed run ends bitwise
equal to an uninterrupted one. A fingerprint of the settings that change the numbers refuses a
resume by a different run.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from ..errors import ConfigError, FileFormatError, finite_number, first_line, shown
from ..fileio import atomic_path, load_tensors, state_dict_of
from ..policy import Policy
from ._util import _rng_state, _set_rng_state, check_rng_state

CHECKPOINT_NAME = "checkpoint.pt"
_CKPT_FORMAT = 1
#: Config fields that may change between a run and its resume: they do not change the numbers, except
#: ``finetune_steps``, which may be changed to lengthen or shorten a run's fine-tune (its learning-rate
#: schedule then follows the new length from the resumed step on).
_RESUME_FREE = {
    "out_dir", "log_dir", "tensorboard_dir", "log_every", "checkpoint_every", "resume", "quiet", "device", "val_every",
    "val_batches", "finetune_steps", "policy_file",
}


def _unlike(reference, value, where: str) -> Optional[str]:
    """Where ``value`` differs in structure from ``reference`` (its keys, lengths, tensor shapes and dtypes, number
    types), as a phrase, or None. A reference ``None`` takes anything a checkpoint holds (a lazily made state)."""
    if reference is None:
        return None
    if isinstance(reference, torch.Tensor):
        if not isinstance(value, torch.Tensor) or value.shape != reference.shape or value.dtype != reference.dtype:
            got = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
            return f"{where} is {got}, not {tuple(reference.shape)} {reference.dtype}"
        return None
    if isinstance(reference, dict):
        if not isinstance(value, dict) or set(value) != set(reference):
            keys = sorted(k if isinstance(k, str) else shown(k, 40) for k in value) if isinstance(value, dict) \
                else type(value).__name__
            return f"{where} holds {str(keys)[:120]}, not {sorted(map(str, reference))}"
        return next((d for k in reference if (d := _unlike(reference[k], value[k], f"{where}[{k!r}]"))), None)
    if isinstance(reference, (tuple, list)):
        if not isinstance(value, (tuple, list)) or len(value) != len(reference):
            return f"{where} is not a sequence of {len(reference)}"
        return next((d for i, (a, b) in enumerate(zip(reference, value)) if (d := _unlike(a, b, f"{where}[{i}]"))), None)
    if isinstance(reference, bool) or not isinstance(reference, (int, float)):
        return None if type(value) is type(reference) or isinstance(reference, str) and isinstance(value, str) \
            else f"{where} is {type(value).__name__}, not {type(reference).__name__}"
    if not finite_number(value):  # a 400-digit integer too: no float holds it
        return f"{where} is {shown(value, 40)}, not a finite number in a float's range"
    return None


#: The parts of a checkpoint that hold tensors; the others are plain data, compared with ``==`` to this run's.
_TENSOR_PARTS = frozenset({"model", "weight_opt", "policy_opt", "weighting", "rng", "strategy", "ranks"})


def _not_plain(value, where: str) -> Optional[str]:
    """Where ``value`` is not plain data (None, bools, numbers, strings, and lists, tuples and dicts of them), as a
    phrase, or None. A tensor in a part a resume compares with ``==`` (a fingerprint, a step) made that comparison
    raise instead of refusing. (:func:`~automtl.fileio.load_tensors` bounds how deeply a checkpoint nests.)"""
    stack = [(value, where)]
    while stack:
        item, at = stack.pop()
        if isinstance(item, dict):
            stack.extend((k, f"a key of {at}") for k in item)
            stack.extend((v, f"{at}[{shown(k, 40)}]" if isinstance(k, (str, int)) else at) for k, v in item.items())
        elif isinstance(item, (list, tuple)):
            stack.extend((v, f"{at}[{i}]") for i, v in enumerate(item))
        elif item is not None and not isinstance(item, (bool, int, float, str)):
            return f"{at} is a {type(item).__name__}, where a run writes plain numbers and names"
    return None


def _as_plain(value):
    """``value`` with every tensor in it (in dicts, lists and tuples) as its numbers (``tolist``)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _as_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_as_plain(v) for v in value)
    return value


def _not_state_dict(value, where: str) -> Optional[str]:
    """Where ``value`` is not a mapping of names to tensors, as a phrase, or None."""
    try:
        state_dict_of(value, where, ValueError, "")
    except ValueError as exc:
        return first_line(exc).rstrip("; ")
    return None


def _out_of_bounds(check, where: str) -> Optional[str]:
    """The phrase of the ValueError ``check()`` raises (a value of the right type that no run reaches), or None."""
    try:
        check()
    except (ValueError, OverflowError) as exc:
        return f"{where} is out of bounds: {first_line(exc)}"
    return None


#: Optimizer settings that are flags (a bool, or None where torch decides).
_OPTIMIZER_FLAGS = frozenset({"foreach", "fused", "capturable", "differentiable", "maximize", "amsgrad", "nesterov",
                              "decoupled_weight_decay"})


def _optimizer_unlike(opt: torch.optim.Optimizer, saved, where: str) -> Optional[str]:
    """Where an optimizer's saved state does not fit ``opt``: its groups' settings, and per parameter the entries
    ``opt``'s kind keeps (found by one step of the same kind on a one-element parameter), of its parameter's shape."""
    current = opt.state_dict()
    if not isinstance(saved, dict) or set(saved) != {"state", "param_groups"}:
        return f"{where} is not an optimizer state"
    # flags a run may set otherwise where it resumes (fused Adam where the build has it, else None): None or a bool
    groups = [{k: None if k in _OPTIMIZER_FLAGS else v for k, v in g.items() if k != "params"}
              for g in current["param_groups"]]
    if isinstance(saved["param_groups"], list) and any(
            isinstance(g, dict) and any(g.get(k) is not None and not isinstance(g.get(k), bool) for k in _OPTIMIZER_FLAGS)
            for g in saved["param_groups"]):
        return f"{where}'s settings hold a flag ({', '.join(sorted(_OPTIMIZER_FLAGS))}) that is neither a bool nor None"
    found = _unlike(groups, [{k: v for k, v in g.items() if k != "params"} if isinstance(g, dict) else g
                             for g in saved["param_groups"]] if isinstance(saved["param_groups"], list) else None,
                    f"{where}'s settings")
    if found:
        return found
    ids = [i for g in current["param_groups"] for i in g["params"]]
    if (found := next((f for g in saved["param_groups"] if (f := _not_plain(
            g.get("params") if isinstance(g, dict) else g, f"{where}'s parameter ids"))), None)):
        return found
    if any(not isinstance(g, dict) or g.get("params") != cg["params"]
           for g, cg in zip(saved["param_groups"], current["param_groups"])):
        return f"{where}'s groups hold other parameters"
    if not isinstance(saved["state"], dict) or not set(saved["state"]) <= set(ids):
        return f"{where} holds the state of parameters it does not have"
    params = [p for g in opt.param_groups for p in g["params"]]
    probe = torch.zeros(1, requires_grad=True)
    kind = type(opt)([probe], **{k: v for k, v in opt.defaults.items() if k != "params"})
    probe.grad = torch.zeros(1)
    kind.step()
    expected = kind.state[probe]
    for i, entry in saved["state"].items():
        p = params[ids.index(i)]
        if not isinstance(entry, dict) or set(entry) != set(expected):
            keys = sorted(k if isinstance(k, str) else shown(k, 40) for k in entry) if isinstance(entry, dict) \
                else type(entry).__name__
            return f"{where}'s state of parameter {i} holds {str(keys)[:120]}, not {sorted(expected)}"
        for k, ref in expected.items():
            like = torch.empty(p.shape, dtype=p.dtype) if isinstance(ref, torch.Tensor) and ref.dim() else ref
            if (found := _unlike(like, entry[k], f"{where}'s {k} of parameter {i}")) and ref is not None:
                return found
    return None


#: What changed, in words, when a resume finds the data's description (``_Search.data_description``) changed.
_DATA_CHANGES = {"train": "the training data's sizes or order", "input_shape": "the input's shape",
                 "tasks": "the tasks' kinds, classes or ignore_index"}


def _only_the_seed_differs(was, now) -> bool:
    """Two descriptions of the training streams that differ in their loaders' generator seeds (``base``) only."""
    if not (isinstance(was, dict) and isinstance(now, dict)) or was == now or set(was) != set(now):
        return False
    strip = lambda d: {k: {f: v for f, v in s.items() if f != "base"} if isinstance(s, dict) else s  # noqa: E731
                       for k, s in d.items()}
    return strip(was) == strip(now)


class _CheckpointMixin:
    """Checkpoint save/load of :class:`~automtl.search._run._Search` (which sets the attributes used here)."""

    def _fingerprint(self) -> dict:
        # plain values only (a resume compares them with ==): a tensor option (torchjd's pref_vector) as its numbers
        cfg = {k: _as_plain(v) for k, v in self.config.to_dict().items() if k not in _RESUME_FREE}
        return {"config": cfg, "tasks": self.tasks, "layers": list(self.sm.layer_names),
                "plan": [p[0] for p in self.plan], "world": self.dist.world,
                "policy": self.given_policy.to_dict() if self.given_policy is not None else None,
                "data": self.data_description}

    def _state(self, g: int) -> dict:
        return {
            "format": _CKPT_FORMAT,
            "global_step": g,
            "stage": self._stage_of(g),
            "fingerprint": self._fingerprint(),
            "model": self.sm.state_dict(),
            "weight_opt": self.weight_opt.state_dict(),
            "policy_opt": self.policy_opt.state_dict(),
            "weighting": self.weighting.state_dict(),
            "rng": _rng_state(self.sm),
            "data_position": g,
            "policy": self.policy.to_dict() if self.policy is not None else None,
            "strategy": self.strategy.state_dict(),
            "history": self.history,
            "elapsed": self._elapsed(),
            "finetune_steps": self.config.finetune_steps,  # may change on resume (_RESUME_FREE): a warning says so
        }

    def _save(self, g: int) -> None:
        if self.ckpt_path is None or g == self.last_saved:
            return
        # what differs between ranks: a torchjd aggregator's state follows that rank's own Jacobian (GradVac,
        # Nash-MTL), and its random draws (GradVac's, PCGrad's order) that rank's generators
        ranks = self.dist.all_gather_object({"weighting": self.weighting.state_dict(), "rng": _rng_state(self.sm)}) \
            if self.dist.active else None
        if self.dist.main:
            state = self._state(g)
            if ranks is not None:
                state["ranks"] = ranks
            with atomic_path(self.ckpt_path) as tmp:
                torch.save(state, tmp)
        self.last_saved = g

    def _load(self) -> None:
        path = self.ckpt_path
        if path is None:
            raise ConfigError("resume needs out_dir (where the checkpoint is); set out_dir in the config")
        if not path.exists():
            return  # nothing to resume: start from the beginning
        ckpt = load_tensors(path, "checkpoint", FileFormatError, "delete it to start over")
        if not isinstance(ckpt, dict) or not all(isinstance(k, str) for k in ckpt) \
                or _not_plain(ckpt.get("format"), "") or ckpt.get("format") != _CKPT_FORMAT:
            raise FileFormatError(f"checkpoint {str(path)!r} is not an automtl search checkpoint; delete it to start over")
        found = next((f for k, v in ckpt.items() if k not in _TENSOR_PARTS and (f := _not_plain(v, f"its {k}"))), None)
        if found:
            raise FileFormatError(f"checkpoint {str(path)!r} is damaged ({found}); delete it to start over")
        old, new = ckpt.get("fingerprint"), self._fingerprint()
        if not isinstance(old, dict) or not isinstance(old.get("config"), dict):
            raise FileFormatError(f"checkpoint {str(path)!r} is damaged (its fingerprint is missing); delete it to start over")
        if "data" not in old:  # written before the data was part of it: checked on what it holds
            new.pop("data")
        if old != new:
            diff = [k for k in new["config"] if old["config"].get(k) != new["config"][k]]
            part = next((k for k in ("tasks", "layers", "plan", "world", "policy") if old.get(k) != new.get(k)), None)
            what = f"config field(s) {', '.join(diff)} differ" if diff else f"{part} differ" if part else None
            if not diff and part == "world" and isinstance(old["world"], int):
                was = old["world"]
                what = (f"it was written by {was} process{'es' if was != 1 else ''} and this run has {new['world']}: "
                        + (f"resume it under torchrun --nproc-per-node {was}" if was > 1 else "resume it without torchrun"))
                raise ConfigError(f"checkpoint {str(path)!r} cannot continue here ({what}), or use another out_dir")
            if what is None:
                was, now = old.get("data") if isinstance(old.get("data"), dict) else {}, new["data"]
                what = next((f"{_DATA_CHANGES[k]} changed" for k in _DATA_CHANGES if was.get(k) != now.get(k)),
                            "setup differs")
                if _only_the_seed_differs(was.get("train"), now.get("train")):
                    what = ("the training loader's generator seed changed (one seeded from entropy differs each run: "
                            "seed it with torch.Generator().manual_seed(N) for an order a resume can continue)")
            raise ConfigError(
                f"checkpoint {str(path)!r} was written by a different run ({what}); resume with the same "
                "settings and data, or use another out_dir"
            )
        name = str(path)
        self._check(ckpt, name)
        kept = {"model": {k: v.clone() for k, v in self.sm.state_dict().items()}, "rng": _rng_state(self.sm)}
        try:
            self._restore(ckpt, name)
            # the fine-tune's length follows the checkpoint's policy and the compute its search left (finetune_unit:
            # compute), so the run's last step is known only now
            self._fit_finetune()
            total = sum(length for _, length, _ in self.plan)
            if self.start > total:
                raise FileFormatError(f"checkpoint {name!r} is at step {shown(self.start, 30)}, beyond this run's {total} steps; "
                                      "delete it to start over (or, after a shorter finetune_steps, give the one it ran with)")
            was = ckpt.get("finetune_steps")  # absent from checkpoints written before it was kept
            begun = next((offset for stage, _, offset in self.plan if stage == "finetune"), total)
            if isinstance(was, int) and not isinstance(was, bool) and was != self.config.finetune_steps \
                    and self.start > begun and self.dist.main:
                warnings.warn(f"resuming in the fine-tune (step {self.start}) with finetune_steps {self.config.finetune_steps}, "
                              f"where the run was started with {shown(was, 30)}: its length and learning-rate anneal follow "
                              "the new value from here on (the rate jumps to where the new schedule is), so the result is "
                              "neither length's uninterrupted run", stacklevel=2)
        except BaseException:
            self.sm.load_state_dict(kept["model"])  # the caller's supermodel as it was
            _set_rng_state(kept["rng"], self.sm)
            raise

    def _check(self, ckpt: dict, name: str) -> None:
        """Refuse, in one sentence, a checkpoint whose parts do not fit this run (before any of it is restored)."""
        g = ckpt.get("global_step")
        if isinstance(g, bool) or not isinstance(g, int) or g < 0:
            raise FileFormatError(f"checkpoint {name!r} is at step {shown(g, 30)}, not a step of a run; delete it to start over")
        if ckpt.get("stage") not in [stage for stage, _, _ in self.plan] + ["done"]:
            raise FileFormatError(f"checkpoint {name!r} is damaged (its stage {shown(ckpt.get('stage'))} is none of this "
                                  "run's); delete it to start over")
        history = ckpt.get("history")
        if not isinstance(history, list) or len(history) > 2 * g + 2 or not all(
                isinstance(h, dict) and isinstance(h.get("stage"), str) and isinstance(h.get("step"), int)
                and not isinstance(h.get("step"), bool) and 0 <= h["step"] <= g for h in history):
            raise FileFormatError(f"checkpoint {name!r} is damaged (its history is not this run's records up to step "
                                  f"{shown(g, 30)}); delete it to start over")
        if ckpt.get("data_position") != g:
            raise FileFormatError(f"checkpoint {name!r} is damaged (its data position {shown(ckpt.get('data_position'), 30)} "
                                  f"is not its step {shown(g, 30)}); delete it to start over")
        own = ckpt
        if "ranks" in ckpt:
            ranks = ckpt["ranks"]
            if not isinstance(ranks, list) or len(ranks) != self.dist.world or not all(isinstance(r, dict) for r in ranks):
                raise FileFormatError(f"checkpoint {name!r} is damaged (its per-rank states do not match the "
                                      f"{self.dist.world} rank(s)); delete it to start over")
            own = ranks[self.dist.rank]
        rng = own.get("rng")
        reference = _rng_state(self.sm)
        modules = rng.get("modules", {}) if isinstance(rng, dict) else {}
        found = (("model" not in ckpt or not isinstance(ckpt["model"], dict)) and "the model's weights are missing") \
            or _not_state_dict(ckpt["model"], "the model's weights") \
            or _optimizer_unlike(self.weight_opt, ckpt.get("weight_opt"), "the weight optimizer") \
            or _optimizer_unlike(self.policy_opt, ckpt.get("policy_opt"), "the policy optimizer") \
            or _unlike({"torch": reference["torch"], "numpy": reference["numpy"],
                        "python": (*reference["python"][:2], None)},  # a cached Gaussian or None
                       {k: rng.get(k) for k in ("torch", "python", "numpy")} if isinstance(rng, dict) else rng,
                       "the random state") \
            or (not isinstance(modules, dict) or not all(isinstance(k, str) for k in modules)) \
            and "the random state's module generators are not a mapping of names" \
            or (not isinstance(ckpt.get("strategy", {}), dict) and "the strategy's state is not a mapping") \
            or _unlike(self.strategy.state_dict(), ckpt.get("strategy", {}), "the strategy's state") \
            or _unlike(0.0, ckpt.get("elapsed", 0.0), "the elapsed time") \
            or _out_of_bounds(lambda: check_rng_state(rng), "the random state") \
            or _out_of_bounds(lambda: self.strategy.check_state(ckpt.get("strategy") or {}), "the strategy's state")
        if found:
            raise FileFormatError(f"checkpoint {name!r} is damaged ({found}); delete it to start over")

    def _restore(self, ckpt: dict, name: str) -> None:
        statistics = {k for k in self.sm.state_dict() if k.endswith(("automtl_input_mean", "automtl_input_std"))}
        if statistics and isinstance(ckpt.get("model"), dict) and not statistics & set(ckpt["model"]):
            raise FileFormatError(f"checkpoint {name!r} is of a run started by an automtl that fed the pretrained backbone "
                                  "unstandardised images, and this one standardises them: its weights were trained "
                                  "on other inputs; start the run again with --overwrite")
        try:
            self.sm.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise FileFormatError(f"checkpoint {name!r} does not fit this supermodel: {first_line(exc)}; "
                                  "delete it to start over") from None
        own = ckpt["ranks"][self.dist.rank] if "ranks" in ckpt else ckpt  # this rank's balancer and generators
        self.weight_opt.load_state_dict(ckpt["weight_opt"])
        self.policy_opt.load_state_dict(ckpt["policy_opt"])
        try:
            self.weighting.load_state_dict(own["weighting"])
        except (RuntimeError, KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise FileFormatError(f"checkpoint {name!r} does not hold this loss weighting's state ({first_line(exc)}); "
                                  "delete it to start over") from None
        try:
            _set_rng_state(own["rng"], self.sm)
        except (RuntimeError, KeyError, TypeError, ValueError, IndexError, OverflowError) as exc:
            raise FileFormatError(f"checkpoint {name!r} holds a random state that does not fit ({first_line(exc)}); "
                                  "delete it to start over") from None
        if ckpt.get("policy") is not None:
            self.policy = Policy.from_dict(ckpt["policy"], f"checkpoint {name!r}")
        self.strategy.load_state_dict(ckpt.get("strategy") or {})
        self.history = list(ckpt["history"])
        self.elapsed0 = float(ckpt.get("elapsed", 0.0))
        self.start = int(ckpt["global_step"])
        self.last_saved = self.start
