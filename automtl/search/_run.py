"""Step 3 of the pipeline: warm-up → policy search → discretize → fine-tune.

:func:`search` trains a :class:`~automtl.supermodel.SuperModel` and returns the discrete
:class:`~automtl.policy.Policy` it found, the training history and the validation metrics.

Determinism is the organising rule: everything a step does is a function of the run's seed
and the step number, so that a killed run resumed from its last checkpoint ends bitwise equal
to an uninterrupted one, and every DDP rank draws the same Gumbel noise:

* the training batches of step ``g`` are batch ``g`` of an endless sequence whose epoch ``e``
  is ordered by a generator seeded with ``(seed, e)`` (a resume starts the sampler at ``g``
  instead of replaying the skipped batches);
* the Gumbel noise of step ``g`` comes from a generator seeded with ``(seed, g)``;
* the global RNG states (torch, python, numpy) go into the checkpoint for anything else
  (dropout, augmentation in the main process).

Under ``torchrun`` (``WORLD_SIZE`` > 1) each rank reads its own shard of the training data and
the gradients of both parameter groups are averaged with one bucketed ``all_reduce`` per step
(no ``DistributedDataParallel`` wrapper: the two optimizers, the alternating schedule and the
supermodel's ``mix=`` forward make a manual reduction simpler and equally exact). BatchNorm
buffers and the loss balancer's state are broadcast from rank 0 before every step, as DDP does
with buffers. Only rank 0 writes files. Validation is not sharded: every rank evaluates the
whole validation set, so metrics agree without a reduction.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from ..compact import compact
from ..config import SearchConfig, parse_budget
from ..cost import check_budget
from ..data.checks import BatchChecks
from ..errors import AutomtlError, ConfigError, FileFormatError
from ..fileio import atomic_path, atomic_write_text
from ..losses import loss_for
from ..policy import CHOICES, SHARE, SPECIALIZE, Policy
from ..supermodel import SuperModel
from ..weighting import make_weighting
from ._data import _Stream, _check_task_keys, _split_batch, _task_target, _to
from ._evaluate import evaluate
from ._strategy import strategy_class
from ._util import _Dist, _Progress, _make_optimizer, _resolve_device, _rng_state, _set_rng_state


__all__ = ["search", "evaluate", "SearchConfig", "SearchResult", "parse_budget"]

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"
POLICY_NAME = "policy.yaml"
_CKPT_FORMAT = 1
#: Config fields that may change between a run and its resume (they do not change the numbers).
_RESUME_FREE = {
    "out_dir", "log_dir", "tensorboard_dir", "log_every", "checkpoint_every", "resume", "quiet", "device", "val_every",
    "val_batches", "finetune_steps", "policy_file",
}


def _summary_writer_class():
    """torch's SummaryWriter, or a ConfigError saying how to install tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("tensorboard_dir (--tensorboard) needs the tensorboard package: "
                          "pip install 'automtl[tensorboard]'") from None
    return SummaryWriter


@dataclass
class SearchResult:
    """What a search found: the discrete policy, how training went, and how good it is.

    ``metrics`` is ``{task: {metric: value}}`` on the validation data (the format of
    :func:`automtl.metrics.delta_mtl`), ``losses`` the mean validation loss per task.
    ``params`` / ``macs`` are the compact model's parameter count and estimated MACs per
    sample under ``policy``; ``base_*`` those of the single backbone + heads (all-share);
    ``budget_*`` the budget in the same unit (None without a budget).
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
            "stages": self.stages, "strategy": self.strategy, "evidence": self.policy.evidence,
            "history": self.history,
        }


class _Search:
    """One run of the search; its state is exactly what a checkpoint holds."""

    def __init__(self, sm: SuperModel, train_data, val_data, config: SearchConfig, policy: Optional[Policy]):
        if not isinstance(sm, SuperModel):
            raise ConfigError(f"search needs an automtl SuperModel (from automtl.supermodel), got {type(sm).__name__}")
        self.sm, self.config, self.val_data = sm, config, val_data
        cfg = config
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device_name = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.dist = _Dist(device_name)
        try:
            self._setup(sm, train_data, device_name, local_rank, policy)
        except BaseException:
            self.dist.close()
            raise

    def _setup(self, sm, train_data, device_name, local_rank, policy) -> None:
        cfg = self.config
        self.device = _resolve_device(device_name, local_rank)
        sm.to(self.device)
        sm.train()
        self.tasks = list(sm.task_names)
        self.buffers = list(sm.buffers())  # after .to(device): the tensors broadcast under DDP

        if policy is None and cfg.policy_file is not None:
            policy = Policy.load(cfg.policy_file)
        if policy is not None:
            if not isinstance(policy, Policy):
                raise ConfigError(f"policy= must be an automtl Policy, got {type(policy).__name__}")
            policy.check(sm.layer_names, sm.task_names, sm.skip_legal)
        self.given_policy = policy
        self.policy: Optional[Policy] = policy
        stages = [("finetune", cfg.finetune_steps)] if policy is not None else [
            ("warmup", cfg.warmup_steps), ("search", cfg.search_steps), ("finetune", cfg.finetune_steps)]
        self.plan, offset = [], 0
        for name, length in stages:
            self.plan.append((name, length, offset))
            offset += length
        self.total_steps = offset

        self.loss_fns = {t.name: loss_for(t) for t in sm.tasks}
        self.checks = BatchChecks(sm.tasks, int(sm.input_shape[1]))
        self.weighting = make_weighting(cfg.weighting, self.tasks, **cfg.weighting_options).to(self.device)
        weights = list(sm.weight_parameters()) + list(self.weighting.parameters())
        self.weight_params = weights
        self.weighting_state = list(self.weighting.buffers()) + list(self.weighting.parameters())
        self.shared = None
        self.stage_net = None  # a module to run instead of the supermodel in this stage (compact views)
        self.evidence: Optional[dict] = None
        self.strategy = strategy_class(cfg.strategy)(self)
        self.weight_opt = _make_optimizer(cfg.weight_optimizer, weights, cfg.lr, cfg.momentum, cfg.weight_decay)
        self.policy_opt = torch.optim.Adam(sm.policy_parameters(), lr=cfg.policy_lr)

        self.per_task = isinstance(train_data, Mapping)
        if self.per_task:
            _check_task_keys(train_data, self.tasks, "training data")
            sources = {t: (train_data[t], t) for t in self.tasks}
        else:
            sources = {"": (train_data, "train")}
        self.streams = {}
        held_out = self.strategy.held_out() if policy is None else 0.0
        for key, (source, name) in sources.items():
            stream = _Stream(source, name, cfg.seed, self.dist.rank, self.dist.world, cfg.batch_size)
            parts = stream.split(held_out) if held_out > 0 else None
            if parts is None:
                self.streams[key] = stream
                continue
            # weight steps read one part, the strategy's policy steps the held-out one, fine-tune all
            prefix = lambda part: part if not key else f"{part}:{key}"  # noqa: E731
            self.streams[key], self.streams[prefix("policy")] = parts
            self.streams[prefix("all")] = stream

        self.base_params = sm.policy_parameter_count(Policy.uniform(sm.layer_names, sm.task_names, "share"))
        self.base_macs = sm.policy_mac_count(Policy.uniform(sm.layer_names, sm.task_names, "share"))
        self.budget = cfg.budget_multiple
        self.budget_params = self.budget * self.base_params if self.budget is not None else None
        self.budget_macs = self.budget * self.base_macs if self.budget is not None else None

        self.out_dir = Path(cfg.out_dir) if cfg.out_dir is not None else None
        log_dir = Path(cfg.log_dir) if cfg.log_dir is not None else self.out_dir
        self.ckpt_path = self.out_dir / CHECKPOINT_NAME if self.out_dir is not None else None
        self.log_path = log_dir / LOG_NAME if log_dir is not None else None
        earlier = [p for p in (self.ckpt_path, self.log_path) if p is not None and p.exists() and p.stat().st_size > 0]
        if earlier and not cfg.resume and self.given_policy is None:
            raise ConfigError(
                f"{str(earlier[0].parent)!r} already holds a search ({', '.join(p.name for p in earlier)}); continue it with "
                "resume=True (--resume), delete it, or choose another out_dir")
        self.history: list = []
        self.progress = _Progress(self.dist.main and not cfg.quiet)
        self.last_saved = -1
        self.elapsed0 = 0.0
        self.start = 0
        self._log_file = None
        self._tb = None
        if cfg.tensorboard_dir is not None and self.dist.main:
            _summary_writer_class()  # fail before training when tensorboard is missing
        self.t0 = time.perf_counter()

    # ---- checkpoints -------------------------------------------------------------
    def _fingerprint(self) -> dict:
        cfg = {k: v for k, v in self.config.to_dict().items() if k not in _RESUME_FREE}
        return {"config": cfg, "tasks": self.tasks, "layers": list(self.sm.layer_names),
                "plan": [p[0] for p in self.plan], "world": self.dist.world,
                "policy": self.given_policy.to_dict() if self.given_policy is not None else None}

    def _state(self, g: int) -> dict:
        gn_opt = getattr(self.weighting, "_optimizer", None)
        return {
            "format": _CKPT_FORMAT,
            "global_step": g,
            "stage": self._stage_of(g),
            "fingerprint": self._fingerprint(),
            "model": self.sm.state_dict(),
            "weight_opt": self.weight_opt.state_dict(),
            "policy_opt": self.policy_opt.state_dict(),
            "weighting": self.weighting.state_dict(),
            "weighting_opt": gn_opt.state_dict() if gn_opt is not None else None,
            "rng": _rng_state(),
            "data_position": g,
            "policy": self.policy.to_dict() if self.policy is not None else None,
            "strategy": self.strategy.state_dict(),
            "history": self.history,
            "elapsed": self._elapsed(),
        }

    def _save(self, g: int) -> None:
        if self.ckpt_path is None or g == self.last_saved:
            return
        if self.dist.main:
            state = self._state(g)
            with atomic_path(self.ckpt_path) as tmp:
                torch.save(state, tmp)
        self.last_saved = g

    def _load(self) -> None:
        path = self.ckpt_path
        if path is None:
            raise ConfigError("resume needs out_dir (where the checkpoint is); set out_dir in the config")
        if not path.exists():
            return  # nothing to resume: start from the beginning
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user problem
            raise FileFormatError(f"checkpoint {str(path)!r} cannot be read ({exc}); delete it to start over") from None
        if not isinstance(ckpt, dict) or ckpt.get("format") != _CKPT_FORMAT:
            raise FileFormatError(f"checkpoint {str(path)!r} is not an automtl search checkpoint; delete it to start over")
        old, new = ckpt["fingerprint"], self._fingerprint()
        if old != new:
            diff = [k for k in new["config"] if old["config"].get(k) != new["config"][k]]
            what = f"config field(s) {', '.join(diff)}" if diff else next(
                (k for k in ("tasks", "layers", "plan", "world", "policy") if old.get(k) != new.get(k)), "setup")
            raise ConfigError(
                f"checkpoint {str(path)!r} was written by a different run ({what} differ); resume with the same "
                "settings, or use another out_dir"
            )
        try:
            self.sm.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise FileFormatError(f"checkpoint {str(path)!r} does not fit this supermodel: {exc}") from None
        self.weight_opt.load_state_dict(ckpt["weight_opt"])
        self.policy_opt.load_state_dict(ckpt["policy_opt"])
        self.weighting.load_state_dict(ckpt["weighting"])
        if ckpt.get("weighting_opt") is not None and hasattr(self.weighting, "_opt"):
            self.weighting._opt().load_state_dict(ckpt["weighting_opt"])
        _set_rng_state(ckpt["rng"])
        if ckpt.get("policy") is not None:
            self.policy = Policy.from_dict(ckpt["policy"], f"checkpoint {str(path)!r}")
        self.strategy.load_state_dict(ckpt.get("strategy") or {})
        self.history = list(ckpt["history"])
        self.elapsed0 = float(ckpt.get("elapsed", 0.0))
        self.start = int(ckpt["global_step"])
        self.last_saved = self.start

    # ---- logging -----------------------------------------------------------------
    def _open_log(self, resumed: bool) -> None:
        if self.log_path is None or not self.dist.main:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if resumed and self.log_path.exists():
            # keep what the checkpoint knows about; drop lines a killed run wrote after it
            keep = []
            for line in self.log_path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("step", 0) <= self.start and not (rec.get("stage") == "val" and rec.get("step", 0) == self.start and rec.get("final")):
                    keep.append(line)
            atomic_write_text(self.log_path, "".join(k + "\n" for k in keep))
        elif not resumed:
            atomic_write_text(self.log_path, "")
        self._log_file = open(self.log_path, "a")

    def _open_tensorboard(self, resumed: bool) -> None:
        if self.config.tensorboard_dir is None or not self.dist.main:
            return
        # a resume purges the events a killed run wrote after its checkpoint, as the JSONL log drops them
        self._tb = _summary_writer_class()(self.config.tensorboard_dir, purge_step=self.start + 1 if resumed else None)

    def _log(self, rec: dict) -> None:
        self.history.append(rec)
        if self._log_file is not None:
            self._log_file.write(json.dumps(rec) + "\n")
            self._log_file.flush()
        if self._tb is not None:
            self._tensorboard(rec)

    def _tensorboard(self, rec: dict) -> None:
        """The record as TensorBoard scalars: ``loss/<task>``, ``loss/total``, ``weight/<task>``, ``search/tau``,
        ``size/expected_<metric>`` / ``size/budget_<metric>`` / ``size/expected_vs_budget``,
        ``policy/<task>/<layer>/<choice>``; validation records ``val/<task>/<metric>`` and ``val_loss/<task>``."""
        tb, step = self._tb, int(rec.get("step", 0))

        def scalar(tag, value):
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                tb.add_scalar(tag, float(value), step)

        if rec.get("stage") == "val":
            for task, metrics in (rec.get("metrics") or {}).items():
                for name, value in (metrics or {}).items():
                    scalar(f"val/{task}/{name}", value)
            for task, value in (rec.get("losses") or {}).items():
                scalar(f"val_loss/{task}", value)
            tb.flush()
            return
        for task, value in (rec.get("losses") or {}).items():
            scalar(f"loss/{task}", value)
        scalar("loss/total", rec.get("total"))
        for task, value in (rec.get("weights") or {}).items() if isinstance(rec.get("weights"), Mapping) else ():
            scalar(f"weight/{task}", value)
        scalar("search/tau", rec.get("tau"))
        for metric, limit in (("params", self.budget_params), ("macs", self.budget_macs)):
            expected = rec.get(f"expected_{metric}")
            if expected is None:
                continue
            scalar(f"size/expected_{metric}", expected)
            if limit:
                scalar(f"size/budget_{metric}", limit)
                if metric == self.config.budget_metric:
                    scalar("size/expected_vs_budget", expected / limit)
        for task, layers in (rec.get("policy_probs") or {}).items():
            for layer, probs in layers.items():
                for choice, p in zip(CHOICES, probs):
                    scalar(f"policy/{task}/{layer}/{choice}", p)

    def _elapsed(self) -> float:
        return self.elapsed0 + (time.perf_counter() - self.t0)

    # ---- schedule ----------------------------------------------------------------
    def _stage_of(self, g: int) -> str:
        for name, length, offset in self.plan:
            if g < offset + length:
                return name
        return "done"

    def policy_steps_before(self, g: int) -> int:
        """How many policy steps (gumbel's alternating schedule) the search stage took before step ``g``."""
        for name, length, offset in self.plan:
            if name == "search":
                n = min(max(g - offset, 0), length)
                return n // (self.config.weight_steps_per_policy_step + 1)
        return 0

    def _position(self, key: str, g: int) -> int:
        """Where stream ``key`` stands at global step ``g``: every stream is a function of ``g``, so a
        resume starts each one exactly where the uninterrupted run had it."""
        if key == "policy":
            return self.policy_steps_before(g)
        if key == "" and "policy" in self.streams:
            return g - self.policy_steps_before(g)
        return g


    def _shared_parameters(self) -> list:
        """For GradNorm: the weight of the deepest conv that tasks still share (last layer's shared
        conv while searching; in hard mode the deepest layer some task shares, else the operators
        the tasks own there)."""
        layers = self.sm.policy_layers
        if self.sm.mode != "hard":
            return [layers[-1].shared.conv.weight]
        for layer, row in zip(reversed(layers), reversed(self.sm.policy.choices)):
            if SHARE in row:
                return [layer.shared.conv.weight]
        last, row = layers[-1], self.sm.policy.choices[-1]
        params = [last.specialized[t].conv.weight for t, c in enumerate(row) if c == SPECIALIZE]
        return params or [p for p in self.sm.heads.parameters()][:1]

    # ---- one step ----------------------------------------------------------------
    def _batch(self, iters: dict, part: str = ""):
        """The next training batch of data part ``part`` ("" training, "policy" held out, "all")."""
        if part and part not in iters:
            part = ""
        if self.per_task:
            xs, ys = {}, {}
            for t in self.tasks:
                key = t if not part else f"{part}:{t}"
                key = key if key in iters else t
                x, y = _split_batch(next(iters[key]), f"training data of task {t!r}")
                self.checks(x, {t: _task_target(y, t)}, task_names=[t])
                xs[t] = x.to(self.device, non_blocking=True)
                ys[t] = _to(_task_target(y, t), self.device)
            return xs, ys
        x, y = _split_batch(next(iters[part]), "training data")
        self.checks(x, y if isinstance(y, Mapping) else {})
        return x.to(self.device, non_blocking=True), _to(y, self.device) if isinstance(y, Mapping) else {}


    def _autocast(self):
        if self.config.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _check_finite(self, values: torch.Tensor, names: Sequence[str], stage: str, i: int, g: int) -> None:
        bad = [(n, float(v)) for n, v in zip(names, values.tolist()) if not math.isfinite(v)]
        if bad:
            name, v = bad[0]
            where = f"the last good checkpoint is {str(self.ckpt_path)!r}" if self.last_saved >= 0 and self.ckpt_path else "no checkpoint was written"
            what = f"the loss of task {name!r}" if name in self.tasks else f"the {name}"
            raise AutomtlError(
                f"{what} is {v} at step {g + 1} ({stage} step {i + 1}); stopping ({where}). "
                "Lower the learning rate, enable grad_clip, or check that task's targets"
            )

    # ---- the shared step helpers (strategies build their steps from these) -----------
    def sync_buffers(self) -> None:
        if self.dist.active:
            # like DDP's broadcast_buffers: every rank starts the step with rank 0's BN statistics
            self.dist.broadcast(self.buffers + self.weighting_state)

    def forward_losses(self, net, x, targets, stage: str, i: int, g: int, mix=None) -> tuple[dict, torch.Tensor]:
        """Per-task losses of one forward (``net(x)``, or the supermodel under ``mix`` when ``net`` is None),
        and their values averaged over ranks; raises on a non-finite loss."""
        with self._autocast():
            out = net(x) if net is not None else self.sm(x, mix=mix)
        losses = {}
        for t in self.tasks:
            target = targets.get(t)
            pred = out[t].float()
            # a batch without the task's key counts as all-missing: a zero with a grad path
            losses[t] = self.loss_fns[t](pred, target) if target is not None else pred.sum() * 0.0
        values = torch.stack([losses[t].detach().float().reshape(()) for t in self.tasks])
        if self.dist.active:
            synced = values.clone()
            self.dist.all_reduce_mean([synced])
            # value = the mean over ranks (so value-driven balancers agree), gradient = the local one
            losses = {t: losses[t] + (synced[k] - values[k]).to(losses[t].dtype) for k, t in enumerate(self.tasks)}
            values = synced
        self._check_finite(values, self.tasks, stage, i, g)
        return losses, values

    def weight_step(self, total: Optional[torch.Tensor], opt) -> None:
        """Backward ``total`` (None: the gradients are already in ``.grad``), average over ranks, clip, step."""
        if total is not None:
            opt.zero_grad(set_to_none=True)
            if getattr(self.weighting, "jacobian", False):
                self.weighting.backward(self.weight_params)  # torchjd: aggregate the per-task gradients
            else:
                total.backward()
        self.dist.all_reduce_grads(self.weight_params)
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in self.weight_params if p.grad is not None], self.config.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def record(self, stage: str, i: int, g: int, kind: str, values, weights, total, opt) -> dict:
        return {"stage": stage, "step": g + 1, "stage_step": i + 1, "kind": kind,
                "losses": {t: float(v) for t, v in zip(self.tasks, values.tolist())}, "weights": weights,
                "total": float(total.detach()), "lr": opt.param_groups[0]["lr"], "tau": None}

    def _step(self, stage: str, i: int, g: int, iters: dict, log: bool = True) -> dict:
        if stage == "search":
            return self.strategy.search_step(i, g, iters, log)
        x, targets = self._batch(iters, "all" if stage == "finetune" else "")
        net, mix = self.strategy.warmup_forward(g) if stage == "warmup" else (self.stage_net, None)
        self.sync_buffers()
        losses, values = self.forward_losses(net, x, targets, stage, i, g, mix)
        shared = self.strategy.shared_parameters() if stage == "warmup" else self.shared
        total, weights = self.weighting(losses, shared_parameters=shared, step=g)
        opt = self.weight_opt
        self.weight_step(total, opt)
        return self.record(stage, i, g, "weight", values, weights, total, opt)


    # ---- stages ------------------------------------------------------------------
    def hard_view(self, policy: Policy):
        """Put the supermodel in ``hard(policy)`` and return a compact view of it to train: same modules
        and parameters, but what tasks share runs once (hard mode runs it on every task's copy of the
        batch). Per-task batches differ per task, so there the supermodel itself runs (None)."""
        self.sm.hard(policy)
        return None if self.per_task else compact(self.sm, policy, copy_weights=False)

    def _enter(self, stage: str) -> None:
        self.stage_net = None
        if stage == "warmup":
            self.stage_net = self.strategy.enter_warmup()
        elif stage == "search":
            self.strategy.enter_search()
        else:
            self.stage_net = self.hard_view(self.policy)
            # the fine-tune continues the weight optimizer: its moment estimates carry over with the weights
            # (a fresh Adam's first steps undo part of the training), at finetune_lr when one is set
            for group in self.weight_opt.param_groups:
                group["lr"] = self.config.finetune_lr or self.config.lr
        self.shared = self._shared_parameters()

    def _leave(self, stage: str) -> None:
        if stage == "search" and self.policy is None:
            self._discretize()

    def _discretize(self) -> None:
        """The strategy's decision; choices its evidence does not support fall back to share."""
        policy, evidence = self.strategy.decide()
        evidence = dict(evidence or {})
        evidence["strategy"] = self.strategy.name
        used = self.sm.policy_mac_count(policy) / self.base_macs if self.config.budget_metric == "macs" \
            else self.sm.policy_parameter_count(policy) / self.base_params
        evidence["budget"] = {"metric": self.config.budget_metric, "used": round(float(used), 4),
                              "limit": self.budget}
        policy.evidence = evidence
        self.policy = policy
        if self.out_dir is not None and self.dist.main:
            self.policy.save(self.out_dir / POLICY_NAME)

    def _validate(self, g: int, stage: str, final: bool = False) -> tuple[dict, dict]:
        if self.val_data is None:
            return {}, {}
        self.dist.broadcast(self.buffers)
        metrics, losses = evaluate(self.sm, self.val_data, max_batches=self.config.val_batches, device=self.device,
                                   amp=self.config.amp, batch_size=self.config.batch_size)
        rec = {"stage": "val", "step": g, "during": stage, "metrics": metrics, "losses": losses, "time": self._elapsed()}
        if final:
            rec["final"] = True
        self._log(rec)
        return metrics, losses

    def run(self) -> SearchResult:
        cfg = self.config
        self.t0 = time.perf_counter()
        resumed = False
        if cfg.resume:
            self._load()
            resumed = self.start > 0
        self._open_log(resumed)
        self._open_tensorboard(resumed)
        if self.given_policy is not None and self.out_dir is not None and self.dist.main:
            self.given_policy.save(self.out_dir / POLICY_NAME)
        # ranks start from rank 0's weights (as DDP does), whatever their initialisation
        self.dist.broadcast([p.data for p in self.sm.parameters()] + self.buffers)
        g = self.start
        for stage, length, offset in self.plan:
            first = max(g - offset, 0)
            if first < length:
                self._enter(stage)
                iters = {k: s.iterate(self._position(k, g)) for k, s in self.streams.items()}
                self.progress.start(stage, length, first)
                try:
                    for i in range(first, length):
                        log = (g + 1) % cfg.log_every == 0 or i == length - 1
                        rec = self._step(stage, i, g, iters, log)
                        rec["time"] = self._elapsed()
                        g += 1
                        if log:
                            self._log(rec)
                        self.progress.update(i + 1, rec["total"])
                        if cfg.val_every and g % cfg.val_every == 0:
                            self._validate(g, stage)
                        if cfg.checkpoint_every and g % cfg.checkpoint_every == 0 and i < length - 1:
                            self._save(g)
                finally:
                    self.progress.close()
                    for it in iters.values():
                        close = getattr(it, "close", None)
                        if close is not None:
                            close()
                self.strategy.stage_done(stage)
                self._leave(stage)
                self._save(g)
            else:
                self._leave(stage)
        if self.policy is None:  # no search stage ran (search_steps = 0 still discretizes above)
            self._discretize()
        # the last step updated each rank's BN statistics on its own shard: end with rank 0's
        self.dist.broadcast(self.buffers)
        self.sm.hard(self.policy)
        metrics, losses = self._validate(g, "final", final=True)
        self._check_ranks_agree()
        self.sm.eval()
        pol = self.policy
        return SearchResult(
            policy=pol, history=list(self.history), metrics=metrics, losses=losses,
            params=self.sm.policy_parameter_count(pol), base_params=self.base_params,
            macs=self.sm.policy_mac_count(pol), base_macs=self.base_macs,
            budget=self.budget, budget_metric=cfg.budget_metric, budget_params=self.budget_params,
            budget_macs=self.budget_macs, checkpoint=str(self.ckpt_path) if self.ckpt_path is not None and self.last_saved >= 0 else None,
            stages=[p[0] for p in self.plan if p[1] > 0], strategy=cfg.strategy,
        )

    def _check_ranks_agree(self) -> None:
        """Under DDP, every rank must end with the same policy logits and weights; raise if not."""
        if not self.dist.active:
            return
        logits = self.sm.policy_logits.detach().reshape(-1)
        with torch.no_grad():
            state = list(self.sm.weight_parameters()) + [b for b in self.sm.buffers() if b.is_floating_point()]
            checksum = torch.stack([p.detach().double().sum() for p in state]).sum().reshape(1)
        probe = torch.cat([logits.double(), checksum.to(logits.device)])
        gathered = self.dist.all_gather(probe)
        for r, other in enumerate(gathered):
            if not torch.equal(other, gathered[0]):
                raise AutomtlError(
                    f"rank {r} ended with different policy logits or weights than rank 0; the ranks trained "
                    "different paths (check that every rank runs the same seed and config)"
                )

    def close(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self.progress.close()
        self.dist.close()


def search(
    supermodel: SuperModel,
    train_data,
    val_data=None,
    config: Optional[Union[SearchConfig, Mapping[str, Any], str, os.PathLike]] = None,
    *,
    policy: Optional[Policy] = None,
    resume: Optional[bool] = None,
    quiet: Optional[bool] = None,
    **overrides,
) -> SearchResult:
    """Search a sharing policy for ``supermodel`` and fine-tune it; return a :class:`SearchResult`.

    ``train_data`` / ``val_data``: loaders (or Datasets) yielding ``(x, {task: target})``, or
    dicts ``{task: loader}`` of per-task data. ``config``: a :class:`SearchConfig`, a dict or a
    YAML path; keyword ``overrides`` change single fields. ``policy`` (or
    ``config.policy_file``) skips warm-up and search and fine-tunes that policy only.
    ``resume=True`` continues from ``out_dir/checkpoint.pt`` when it exists.

    The supermodel is trained in place and left in ``hard(result.policy)`` mode, in eval mode.
    Raises ConfigError before any training when no policy can meet ``budget`` (in ``budget_metric``).
    """
    if config is None:
        cfg = SearchConfig()
    elif isinstance(config, SearchConfig):
        cfg = config
    elif isinstance(config, Mapping):
        cfg = SearchConfig.from_dict(config)
    elif isinstance(config, (str, os.PathLike)):
        cfg = SearchConfig.from_yaml(config)
    else:
        raise ConfigError(f"config must be a SearchConfig, a dict or a YAML path, got {type(config).__name__}")
    if resume is not None:
        overrides["resume"] = bool(resume)
    if quiet is not None:
        overrides["quiet"] = bool(quiet)
    if overrides:
        cfg = cfg.replace(**overrides)
    check_budget(supermodel, cfg)
    run = _Search(supermodel, train_data, val_data, cfg, policy)
    try:
        return run.run()
    finally:
        run.close()
