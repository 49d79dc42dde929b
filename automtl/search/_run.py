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

import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from ..compact import compact
from ..config import SearchConfig, parse_budget
from ..cost import check_budget
from ..data.checks import BatchChecks
from ..errors import AutomtlError, ConfigError, DataError
from ..losses import loss_for
from ..metrics import metric_for
from ..policy import Policy, choices_fingerprint
from ..seeding import seeded
from ..supermodel import SuperModel
from ..weighting import make_weighting
from ._checkpoint import CHECKPOINT_NAME, _CheckpointMixin
from ._data import TARGET_GRACE_BATCHES, _Stream, _check_one_batch_size, _check_task_keys, one_shot
from ._evaluate import _evaluate, check_validation_data, evaluate
from ._log import LOG_NAME, _LogMixin, _summary_writer_class
from ._result import SearchResult
from ._step import _StepMixin
from ._strategy import strategy_class
from ._util import _Dist, _Progress, _make_optimizer, _resolve_device


__all__ = ["search", "evaluate", "SearchConfig", "SearchResult", "parse_budget"]

POLICY_NAME = "policy.yaml"


class _Search(_CheckpointMixin, _LogMixin, _StepMixin):
    """One run of the search; its state is exactly what a checkpoint holds.

    Checkpoints (``_checkpoint.py``), logs (``_log.py``) and the step helpers the strategies build
    their steps from (``_step.py``) are mixed in, one concept per file.
    """

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
        self.device = _resolve_device(device_name, local_rank)
        sm.to(self.device)
        sm.train()
        self.tasks = list(sm.task_names)
        self.buffers = list(sm.buffers())  # after .to(device): the tensors broadcast under DDP

        policy = self._setup_plan(policy)
        self._setup_training()
        self._setup_streams(train_data, policy)
        if self.val_data is not None and self.config.val_every and one_shot(self.val_data):
            raise DataError("validation data is a one-shot iterator, which the first validation would use up, and the "
                            f"run validates every {self.config.val_every} steps; pass a DataLoader, a Dataset or a list "
                            "of batches")
        if self.val_data is not None:
            own_metrics = any(t.metric is not None for t in sm.tasks)
            with seeded(self.device, None):  # a loader's, dataset's or forward's draws here move no generator of the run
                if own_metrics and not one_shot(self.val_data):
                    # the first batch checked and evaluated: a task's own metric that makes no metric object or whose
                    # compute() returns no dict is refused before the training, not after it (eval mode: no running
                    # statistic moves)
                    _evaluate(sm, self.val_data, None, 1, self.device, False, self.config.batch_size, None,
                              every_task_seen=False)
                else:
                    check_validation_data(sm, self.val_data, self.config.batch_size)
                    for t in sm.tasks if own_metrics else ():  # what one-shot data cannot show: the metric objects
                        metric_for(t)
        self._setup_budget()
        self._setup_files()

    def _setup_plan(self, policy: Optional[Policy]) -> Optional[Policy]:
        """The given policy (checked) or None, and the stages to run: (name, length, first global step)."""
        cfg, sm = self.config, self.sm
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
        return policy

    def _setup_training(self) -> None:
        """Losses, batch checks, the loss balancer, the strategy and the three optimizers."""
        cfg, sm = self.config, self.sm
        self.loss_fns = {t.name: loss_for(t) for t in sm.tasks}
        self.checks = BatchChecks(sm.tasks, int(sm.input_shape[1]), dtype=sm.input_dtype)
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

    def _setup_streams(self, train_data, policy: Optional[Policy]) -> None:
        """The training data streams, the strategy's held-out part split off when it asks for one."""
        cfg = self.config
        self.per_task = isinstance(train_data, Mapping)
        if self.per_task:
            _check_task_keys(train_data, self.tasks, "training data")
            _check_one_batch_size(train_data, self.tasks, "training data", cfg.batch_size)
            sources = {t: (train_data[t], t) for t in self.tasks}
        else:
            sources = {"": (train_data, "train")}
        self.streams = {}
        held_out = self.strategy.held_out() if policy is None else 0.0
        for key, (source, name) in sources.items():
            stream = _Stream(source, name, cfg.seed, self.dist.rank, self.dist.world, cfg.batch_size)
            parts = stream.split(held_out) if held_out > 0 else None
            if parts is None:
                if held_out > 0 and cfg.search_steps > 0 and self.dist.main:  # the premise (decisions on unseen
                    warnings.warn(f"{self.strategy.name}'s policy steps read the training batches of {name!r}, not a "  # data)
                                  f"held-out part: {stream.why_not_split(held_out)}", stacklevel=2)
                self.streams[key] = stream
                continue
            # weight steps read one part, the strategy's policy steps the held-out one, fine-tune all
            prefix = lambda part: part if not key else f"{part}:{key}"  # noqa: E731
            self.streams[key], self.streams[prefix("policy")] = parts
            self.streams[prefix("all")] = stream
        # what a resume must find as it was (the fingerprint): the data's sizes and order, the input's shape
        # (not the validation data: it trains nothing, and may change on a resume as val_every may)
        self.data_description = {
            "train": {key: s.describe() for key, s in sorted(self.streams.items())},
            "input_shape": [int(d) for d in self.sm.input_shape[1:]],
            "tasks": [t.describe() for t in self.sm.tasks],
        }

    def _setup_budget(self) -> None:
        cfg, sm = self.config, self.sm
        self.base_params = sm.policy_parameter_count(Policy.uniform(sm.layer_names, sm.task_names, "share"))
        self.base_macs = sm.policy_mac_count(Policy.uniform(sm.layer_names, sm.task_names, "share"))
        self.budget = cfg.budget_multiple
        self.budget_params = self.budget * self.base_params if self.budget is not None else None
        self.budget_macs = self.budget * self.base_macs if self.budget is not None else None

    def _setup_files(self) -> None:
        """Where checkpoints and logs go (refusing to overwrite an earlier search), and the run's clocks."""
        cfg = self.config
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
        if stage == "finetune":
            self._finetune_lr(i)
        self.weight_step(total, opt)
        return self.record(stage, i, g, "weight", values, weights, total, opt)

    def _finetune_lr(self, i: int) -> None:
        """The learning rate of fine-tune step ``i``: ``finetune_lr`` (or ``lr``), under ``finetune_schedule``
        "cosine" decayed along half a cosine to 0 over the stage's last ``finetune_decay_fraction`` of
        ``finetune_steps`` (as fitted: :meth:`_fit_finetune`; Loshchilov & Hutter, SGDR, ICLR 2017), so that the delivered
        weights are an annealed point rather than one draw of constant-rate noise. The optimizer continues from
        the search (its moments carry over)."""
        cfg = self.config
        base = cfg.finetune_lr or cfg.lr
        if cfg.finetune_schedule == "cosine":
            length = next(n for name, n, _ in self.plan if name == "finetune")
            decay = min(self.decay_steps, length)
            k = max(i - (length - decay), 0)  # steps into the decay
            base *= 0.5 * (1.0 + math.cos(math.pi * k / decay))
        for group in self.weight_opt.param_groups:
            group["lr"] = base

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
        self.shared = self._shared_parameters()

    def _leave(self, stage: str) -> None:
        if stage == "search":
            if self.policy is None:
                self._discretize()
            self._fit_finetune()

    def _fit_finetune(self) -> None:
        """Under ``finetune_unit: compute``, the fine-tune's length in steps of the discrete architecture:
        ``finetune_steps`` hard-sharing steps' worth of MACs (a larger architecture trains fewer steps, a
        smaller one more), so architectures are compared at equal compute rather than equal steps; plus
        the compute the search stage planned and did not spend (the strategy's ``unspent_compute``), as
        steps at the constant rate before the anneal, whose length stays ``finetune_decay_fraction`` of the
        fitted ``finetune_steps``."""
        cfg = self.config
        nominal = cfg.finetune_steps
        if cfg.finetune_unit == "compute" and self.policy is not None and cfg.finetune_steps:
            ratio = self.base_macs / max(self.sm.policy_mac_count(self.policy), 1)
            nominal = max(1, round(cfg.finetune_steps * ratio))
            unspent = self.strategy.unspent_compute() if self.given_policy is None else 0.0
            for k, (name, _, offset) in enumerate(self.plan):
                if name == "finetune":  # in place: run()'s loop is iterating this list
                    self.plan[k] = (name, nominal + round(unspent * ratio), offset)
        self.decay_steps = max(1, round(nominal * cfg.finetune_decay_fraction))  # _finetune_lr's anneal

    def _discretize(self) -> None:
        """The strategy's decision; choices its evidence does not support fall back to share."""
        policy, evidence = self.strategy.decide()
        evidence = dict(evidence or {})
        evidence["strategy"] = self.strategy.name
        used = self.sm.policy_mac_count(policy) / self.base_macs if self.config.budget_metric == "macs" \
            else self.sm.policy_parameter_count(policy) / self.base_params
        evidence["budget"] = {"metric": self.config.budget_metric, "used": round(float(used), 4),
                              "limit": self.budget}
        evidence["of_choices"] = choices_fingerprint(policy.choices)  # edited choices leave this evidence behind
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
        self._fit_finetune()  # a given policy, or the one a resumed checkpoint holds
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
        tally = self.__dict__.get("_target_tally")  # a run shorter than the grace period: said, not refused
        missing = tally.error("training data") if tally is not None and 0 < tally.batches < TARGET_GRACE_BATCHES else None
        if missing is not None and self.dist.main:
            warnings.warn(f"{missing} (fewer batches than the {TARGET_GRACE_BATCHES} after which it is an error)",
                          stacklevel=3)
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
            stages=[p[0] for p in self.plan if p[1] > 0], strategy=cfg.strategy, steps={p[0]: p[1] for p in self.plan},
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
        self._close_logs()
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

    The supermodel is trained in place and left in ``hard(result.policy)`` mode, in eval mode, on the device it
    trained on (``config.device``; ``auto`` is the GPU where torch sees one): give it inputs there, or ``.cpu()`` it.
    Raises ConfigError before any training when no policy can meet ``budget`` (in ``budget_metric``).
    """
    if config is None:
        cfg = SearchConfig()
    elif isinstance(config, SearchConfig):
        cfg = config.validate()  # again: its fields may have been set after it was made
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
