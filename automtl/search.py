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
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler

from .compact import compact
from .config import SearchConfig, parse_budget
from .data.checks import BatchChecks
from .errors import AutomtlError, ConfigError, DataError, FileFormatError
from .fileio import atomic_path, atomic_write_text
from .losses import loss_for
from .metrics import metric_for
from .policy import SHARE, SKIP, SPECIALIZE, Policy
from .supermodel import SuperModel
from .weighting import make_weighting

__all__ = ["search", "evaluate", "SearchConfig", "SearchResult", "parse_budget"]

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"
POLICY_NAME = "policy.yaml"
_CKPT_FORMAT = 1
#: Config fields that may change between a run and its resume (they do not change the numbers).
_RESUME_FREE = {
    "out_dir", "log_dir", "log_every", "checkpoint_every", "resume", "quiet", "device", "val_every",
    "val_batches", "finetune_steps", "policy_file",
}


def _seed(*parts) -> int:
    """A 63-bit seed from any tuple, identical in every process (unlike ``hash()``)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


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
            "stages": self.stages, "history": self.history,
        }


# ---------------------------------------------------------------------------------------------
# distributed helpers
# ---------------------------------------------------------------------------------------------
def dist_timeout():
    """How long a rank waits for the others in one collective: ``AUTOMTL_DIST_TIMEOUT`` seconds (default 600)."""
    from datetime import timedelta

    try:
        seconds = float(os.environ.get("AUTOMTL_DIST_TIMEOUT", "600"))
    except ValueError:
        raise ConfigError(f"AUTOMTL_DIST_TIMEOUT={os.environ['AUTOMTL_DIST_TIMEOUT']!r} must be a number of seconds") from None
    return timedelta(seconds=max(seconds, 1.0))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


class _Dist:
    """The torch.distributed context of a run: world 1 when not launched by torchrun."""

    def __init__(self, device_type: str):
        self.created = False
        if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            rank = os.environ.get("RANK", "?")
            try:
                dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=dist_timeout())
            except Exception as exc:  # a missing MASTER_ADDR, a peer that never came, a refused port
                raise AutomtlError(
                    f"rank {rank} could not join the process group of {os.environ.get('WORLD_SIZE')} ranks "
                    f"({_first_line(exc)}); launch the search with torchrun --nproc-per-node N") from None
            self.created = True
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1
        self.main = self.rank == 0

    @contextlib.contextmanager
    def collective(self, what: str):
        """Turn a failed collective (a peer died, froze past the timeout) into one sentence naming this rank."""
        try:
            yield
        except RuntimeError as exc:
            raise AutomtlError(
                f"rank {self.rank} lost the other ranks while {what} ({_first_line(exc)}); a rank died or stopped "
                f"answering for {dist_timeout().total_seconds():.0f} s (AUTOMTL_DIST_TIMEOUT), see its log, then "
                "continue the run with --resume") from None

    def all_reduce_grads(self, params: Sequence[torch.Tensor]) -> None:
        """Average the gradients of ``params`` over ranks, over the same list on every rank.

        A parameter that got no gradient on some rank (a task whose batch there had no label and
        whose custom loss has no graph) contributes zeros there; one that got none on any rank keeps
        ``grad = None``, exactly as in a single process, so the optimizer leaves it alone.
        """
        if not self.active:
            return
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32,
                               device=params[0].device if params else "cpu")
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        with self.collective("averaging gradients"):
            dist.all_reduce(present)
        self.all_reduce_mean(grads)
        for p, g, n in zip(params, grads, present.tolist()):
            p.grad = g if n > 0 else None

    def all_reduce_mean(self, tensors: Sequence[torch.Tensor], bucket_elems: int = 1 << 24) -> None:
        """Average tensors over ranks in place, flattened into buckets (one call per bucket)."""
        if not self.active:
            return
        for group in self._buckets(tensors, bucket_elems):
            flat = torch.cat([t.reshape(-1) for t in group])
            with self.collective("averaging gradients"):
                dist.all_reduce(flat)
            flat.div_(self.world)
            self._unflatten(flat, group)

    def broadcast(self, tensors: Sequence[torch.Tensor], bucket_elems: int = 1 << 24) -> None:
        """Overwrite tensors with rank 0's values."""
        if not self.active:
            return
        for group in self._buckets(tensors, bucket_elems):
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            with self.collective("receiving rank 0's values"):
                dist.broadcast(flat, 0)
            self._unflatten(flat, group)

    @staticmethod
    def _buckets(tensors, bucket_elems):
        by_key: dict = {}
        for t in tensors:
            by_key.setdefault((t.dtype, t.device), []).append(t)
        for group in by_key.values():
            bucket, size = [], 0
            for t in group:
                bucket.append(t)
                size += t.numel()
                if size >= bucket_elems:
                    yield bucket
                    bucket, size = [], 0
            if bucket:
                yield bucket

    @staticmethod
    def _unflatten(flat, group):
        offset = 0
        with torch.no_grad():
            for t in group:
                n = t.numel()
                t.copy_(flat[offset:offset + n].view_as(t))
                offset += n

    def all_gather(self, t: torch.Tensor) -> list:
        if not self.active:
            return [t]
        out = [torch.empty_like(t) for _ in range(self.world)]
        with self.collective("comparing ranks"):
            dist.all_gather(out, t.contiguous())
        return out

    def close(self) -> None:
        if self.created and dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def _simple_loader(loader: DataLoader) -> bool:
    """A loader we can rebuild exactly: map-style data, plain batch sampler, random or sequential order."""
    if isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
        return False
    if type(loader.batch_sampler) is not BatchSampler:
        return False
    s = loader.sampler
    if isinstance(s, RandomSampler):
        return not s.replacement and s.num_samples == len(loader.dataset)
    return isinstance(s, SequentialSampler)


class _Stream:
    """The training batches of one data source as a deterministic function of the position.

    A map-style :class:`DataLoader` (or :class:`Dataset`) is re-iterated epoch by epoch with a
    sampler of our own: shuffled (when the loader shuffles) by a generator seeded with
    ``(seed, loader seed, name, epoch)``, padded and sharded over ranks like
    ``DistributedSampler``, and started mid-epoch on resume without loading the skipped
    batches. Any other re-iterable is read as it comes; rank ``r`` takes every ``world``-th
    batch, and a resume skips by reading (exact if the iterable is deterministic).
    """

    def __init__(self, source, name: str, seed: int, rank: int, world: int, batch_size: int):
        self.name, self.seed, self.rank, self.world = name, seed, rank, world
        if isinstance(source, DataLoader):
            if _simple_loader(source):
                self.kind = "loader"
                self.loader = source
                self.shuffle = isinstance(source.sampler, RandomSampler)
                self.base = source.generator.initial_seed() if source.generator is not None else 0
            else:
                self.kind = "iterable"
                self.source = source
        elif isinstance(source, Dataset) and not isinstance(source, IterableDataset) and hasattr(source, "__len__"):
            if len(source) == 0:
                raise DataError(f"training data {name!r} is empty; check the dataset's root and split")
            self.kind = "loader"
            self.loader = DataLoader(source, batch_size=batch_size, shuffle=True)
            self.shuffle = True
            self.base = 0
        elif hasattr(source, "__iter__"):
            if iter(source) is source:
                raise DataError(
                    f"training data {name!r} is a one-shot iterator; pass a DataLoader, a Dataset or a list of "
                    "batches so that it can be read for more than one epoch"
                )
            self.kind = "iterable"
            self.source = source
        else:
            raise DataError(f"training data {name!r} is a {type(source).__name__}; pass a DataLoader or a Dataset")
        if self.kind == "loader":
            n = len(self.loader.dataset)
            if n == 0:
                raise DataError(f"training data {name!r} is empty")
            if not self._epoch_batches(0):
                raise DataError(
                    f"training data {name!r} has {n} samples, fewer than one batch of {self.loader.batch_size} "
                    f"per rank with drop_last; use a smaller batch size"
                )

    def _epoch_batches(self, epoch: int) -> list:
        n = len(self.loader.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(_seed("automtl-data", self.seed, self.base, self.name, epoch))
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        if self.world > 1:
            total = -(-n // self.world) * self.world
            while len(order) < total:
                order = order + order[: total - len(order)]
            order = order[self.rank:total:self.world]
        bs = self.loader.batch_size
        batches = [order[i:i + bs] for i in range(0, len(order), bs)]
        if len(batches) > 1 and len(batches[-1]) < bs:
            batches.pop()  # as training loops do: a short last batch (of one sample, BatchNorm fails) is not trained on
        elif self.loader.drop_last and batches and len(batches[-1]) < bs:
            batches.pop()
        return batches

    def iterate(self, start: int) -> Iterator:
        """Batches from position ``start`` on, forever."""
        if self.kind == "loader":
            nb = len(self._epoch_batches(0))
            epoch, skip = divmod(start, nb)
            ld = self.loader
            while True:
                batches = self._epoch_batches(epoch)[skip:]
                kwargs: dict = dict(
                    batch_sampler=batches, num_workers=ld.num_workers, collate_fn=ld.collate_fn,
                    pin_memory=ld.pin_memory, timeout=ld.timeout, worker_init_fn=ld.worker_init_fn,
                    generator=torch.Generator().manual_seed(_seed("automtl-workers", self.seed, self.name, epoch)),
                )
                if ld.num_workers > 0:
                    kwargs.update(multiprocessing_context=ld.multiprocessing_context, prefetch_factor=ld.prefetch_factor)
                yield from DataLoader(ld.dataset, **kwargs)
                epoch, skip = epoch + 1, 0
        else:
            first = start * self.world + self.rank
            j = 0
            while True:
                empty = True
                for batch in self.source:
                    empty = False
                    if _single_sample(batch) and getattr(self.source, "batch_size", None) not in (None, 1):
                        continue  # a loader's short last batch of one sample: BatchNorm cannot train on it
                    if j >= first and j % self.world == self.rank:
                        yield batch
                    j += 1
                if empty:
                    raise DataError(f"training data {self.name!r} yielded no batches")


def _single_sample(batch) -> bool:
    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    return isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 1


def _split_batch(batch, where: str):
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise DataError(f"{where} must yield (x, {{task: target}}) pairs; it yielded {type(batch).__name__}")
    x, y = batch
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{where} yielded inputs of type {type(x).__name__}; the input must be an image batch tensor")
    return x, y


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _task_target(y, task: str):
    """The target of ``task`` in a batch's targets, or None when the batch has none."""
    if isinstance(y, Mapping):
        return y.get(task)
    return y


def _check_task_keys(data: Mapping, tasks: Sequence[str], where: str) -> None:
    if set(data) != set(tasks):
        raise DataError(
            f"{where} is a dict of per-task loaders for {sorted(data)} but the tasks are {list(tasks)}; "
            "give one loader per task"
        )


def _epoch_iter(source, batch_size: int):
    """One pass over validation data, in its own order."""
    if isinstance(source, Dataset) and not isinstance(source, IterableDataset) and hasattr(source, "__len__") \
            and not isinstance(source, DataLoader):
        return iter(DataLoader(source, batch_size=batch_size))
    return iter(source)


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    supermodel: SuperModel,
    data,
    *,
    mix: Optional[torch.Tensor] = None,
    max_batches: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
    amp: bool = False,
    batch_size: int = 8,
) -> tuple[dict, dict]:
    """Validation metrics ``{task: {metric: value}}`` and mean losses ``{task: loss}`` of the
    supermodel in its current mode (``mix`` overrides the mode's operator weights).

    ``data`` is a loader (or Dataset) of ``(x, {task: target})`` or a dict of per-task
    loaders; per-task loaders are evaluated one task at a time, so that every sample of every
    task counts exactly once. A batch without a task's target is skipped for that task.
    """
    sm = supermodel
    if device is None:
        device = next(sm.parameters()).device
    device = torch.device(device)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" else contextlib.nullcontext()
    metrics = {t.name: metric_for(t) for t in sm.tasks}
    loss_fns = {t.name: loss_for(t) for t in sm.tasks}
    loss_sum = {t: 0.0 for t in sm.task_names}
    loss_n = {t: 0 for t in sm.task_names}
    is_supermodel = isinstance(sm, SuperModel)  # a CompactModel (or any {task: output} model) has no modes
    if is_supermodel and mix is None and sm.mode != "hard":
        # noiseless operator weights: uniform in warm-up, the policy probabilities when searching
        mix = sm.mixing_weights() if sm.mode == "warmup" else sm.policy_probabilities()
    was_training = sm.training
    sm.eval()

    def consume(batches, tasks, where):
        for k, batch in enumerate(batches):
            if max_batches is not None and k >= max_batches:
                break
            x, y = _split_batch(batch, where)
            x, y = _to(x, device), _to(y, device)
            with ctx:
                out = sm(x, mix=mix) if is_supermodel else sm(x)
            for t in tasks:
                target = _task_target(y, t)
                if target is None:
                    continue
                pred = out[t].float()
                metrics[t].update(pred, target)
                loss = float(loss_fns[t](pred, target))
                loss_sum[t] += loss * x.shape[0]
                loss_n[t] += x.shape[0]

    try:
        if isinstance(data, Mapping):
            _check_task_keys(data, sm.task_names, "validation data")
            for t in sm.task_names:
                consume(_epoch_iter(data[t], batch_size), [t], f"validation data of task {t!r}")
        else:
            consume(_epoch_iter(data, batch_size), sm.task_names, "validation data")
    finally:
        sm.train(was_training)
    results = {t: {k: float(v) for k, v in m.compute().items()} for t, m in metrics.items()}
    losses = {t: (loss_sum[t] / loss_n[t] if loss_n[t] else float("nan")) for t in sm.task_names}
    return results, losses


# ---------------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------------
class _Progress:
    """A one-line progress bar on stderr (stage, step/total, loss, it/s, ETA); silent unless a TTY."""

    def __init__(self, enabled: bool, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(enabled) and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.active = False
        self._width = 0

    def start(self, stage: str, total: int, done: int = 0) -> None:
        self.stage, self.total, self.first = stage, total, done
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.loss = None
        self.active = True

    def update(self, done: int, loss: float) -> None:
        if not self.enabled or not self.active:
            return
        self.loss = loss if self.loss is None else 0.9 * self.loss + 0.1 * loss  # smoothed for reading
        now = time.perf_counter()
        if now - self.last < 0.1 and done < self.total:
            return
        loss = self.loss
        self.last = now
        rate = (done - self.first) / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        eta_s = "--:--" if not math.isfinite(eta) else f"{int(eta // 60):02d}:{int(eta % 60):02d}"
        frac = done / max(self.total, 1)
        bar = "#" * int(frac * 20)
        line = f"{self.stage:<8} [{bar:<20}] {done}/{self.total} loss {loss:.4f} {rate:.2f} it/s ETA {eta_s}"
        pad = max(self._width - len(line), 0)
        self._width = len(line)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.active:
            self.stream.write("\n")
            self.stream.flush()
        self.active = False
        self._width = 0


# ---------------------------------------------------------------------------------------------
# the search
# ---------------------------------------------------------------------------------------------
def _make_optimizer(kind: str, params, lr: float, momentum: float, weight_decay: float):
    """The weight optimizer. Adam uses the fused kernel where torch has one (CPU and CUDA): the
    supermodel holds about T+1 copies of the backbone, and a per-tensor Adam over them costs
    as much as a forward+backward at small image sizes."""
    params = list(params)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=True)
    try:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def _rng_state() -> dict:
    keys_kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available; use device: cpu or auto")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


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
        self.finetune_net = None
        self.weight_opt = _make_optimizer(cfg.weight_optimizer, weights, cfg.lr, cfg.momentum, cfg.weight_decay)
        self.policy_opt = torch.optim.Adam(sm.policy_parameters(), lr=cfg.policy_lr)
        self.finetune_opt = _make_optimizer(cfg.weight_optimizer, weights, cfg.finetune_lr or cfg.lr, cfg.momentum, cfg.weight_decay)

        self.per_task = isinstance(train_data, Mapping)
        if self.per_task:
            _check_task_keys(train_data, self.tasks, "training data")
            self.streams = {t: _Stream(train_data[t], t, cfg.seed, self.dist.rank, self.dist.world, cfg.batch_size) for t in self.tasks}
        else:
            self.streams = {"": _Stream(train_data, "train", cfg.seed, self.dist.rank, self.dist.world, cfg.batch_size)}

        self.base_params = sm.policy_parameter_count(Policy.uniform(sm.layer_names, sm.task_names, "share"))
        self.base_macs = sm.policy_mac_count(Policy.uniform(sm.layer_names, sm.task_names, "share"))
        self.budget = cfg.budget_multiple
        self.budget_params = self.budget * self.base_params if self.budget is not None else None
        self.budget_macs = self.budget * self.base_macs if self.budget is not None else None
        L = len(sm.layer_names)
        self.depth_weight = ((L - torch.arange(L, dtype=torch.float32)) / L).to(self.device)

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
            "finetune_opt": self.finetune_opt.state_dict(),
            "weighting": self.weighting.state_dict(),
            "weighting_opt": gn_opt.state_dict() if gn_opt is not None else None,
            "rng": _rng_state(),
            "data_position": g,
            "policy": self.policy.to_dict() if self.policy is not None else None,
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
        self.finetune_opt.load_state_dict(ckpt["finetune_opt"])
        self.weighting.load_state_dict(ckpt["weighting"])
        if ckpt.get("weighting_opt") is not None and hasattr(self.weighting, "_opt"):
            self.weighting._opt().load_state_dict(ckpt["weighting_opt"])
        _set_rng_state(ckpt["rng"])
        if ckpt.get("policy") is not None:
            self.policy = Policy.from_dict(ckpt["policy"], f"checkpoint {str(path)!r}")
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

    def _log(self, rec: dict) -> None:
        self.history.append(rec)
        if self._log_file is not None:
            self._log_file.write(json.dumps(rec) + "\n")
            self._log_file.flush()

    def _elapsed(self) -> float:
        return self.elapsed0 + (time.perf_counter() - self.t0)

    # ---- schedule ----------------------------------------------------------------
    def _stage_of(self, g: int) -> str:
        for name, length, offset in self.plan:
            if g < offset + length:
                return name
        return "done"

    def _is_policy_step(self, i: int) -> bool:
        r = self.config.weight_steps_per_policy_step
        return i % (r + 1) == r

    def _tau(self, i: int) -> float:
        cfg = self.config
        done = i // (cfg.weight_steps_per_policy_step + 1)  # policy steps taken before step i
        return max(cfg.tau_min, cfg.tau_start * cfg.tau_decay ** (done // cfg.tau_every))

    def _shared_parameters(self) -> list:
        """For GradNorm: the weight of the deepest conv that tasks still share (last layer's shared
        conv while searching; in hard mode the deepest layer some task shares, else the operators
        the tasks own there)."""
        layers = self.sm.policy_layers
        if self.sm.mode != "hard":
            return [layers[-1].shared.conv.weight]
        for layer, row in zip(reversed(layers), reversed(self.policy.choices)):
            if SHARE in row:
                return [layer.shared.conv.weight]
        last, row = layers[-1], self.policy.choices[-1]
        params = [last.specialized[t].conv.weight for t, c in enumerate(row) if c == SPECIALIZE]
        return params or [p for p in self.sm.heads.parameters()][:1]

    # ---- one step ----------------------------------------------------------------
    def _batch(self, iters: dict):
        if self.per_task:
            xs, ys = {}, {}
            for t in self.tasks:
                x, y = _split_batch(next(iters[t]), f"training data of task {t!r}")
                self.checks(x, {t: _task_target(y, t)}, task_names=[t])
                xs[t] = x.to(self.device, non_blocking=True)
                ys[t] = _to(_task_target(y, t), self.device)
            return xs, ys
        x, y = _split_batch(next(iters[""]), "training data")
        self.checks(x, y if isinstance(y, Mapping) else {})
        return x.to(self.device, non_blocking=True), _to(y, self.device) if isinstance(y, Mapping) else {}

    def _autocast(self):
        if self.config.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _sharing_reg(self) -> torch.Tensor:
        """Depth-weighted pull toward *share*: sum over layers of (L-l)/L * mean over tasks of -log p(share)."""
        logp = self.sm.masked_logits().log_softmax(-1)[..., SHARE]
        return (self.depth_weight[:, None] * -logp).mean(-1).sum()

    def _resource(self):
        """Hinge penalty of the expected compact-model size over the budget, and the expectation."""
        if self.budget is None:
            return None, None
        probs = self.sm.policy_probabilities()
        if self.config.budget_metric == "macs":
            expected = self.sm.expected_mac_count(probs)
            limit = self.budget_macs
        else:
            expected = self.sm.expected_parameter_count(probs)
            limit = self.budget_params
        return F.relu(expected / limit - 1.0), expected

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

    def _step(self, stage: str, i: int, g: int, iters: dict, log: bool = True) -> dict:
        sm, cfg = self.sm, self.config
        x, targets = self._batch(iters)
        policy_step = stage == "search" and self._is_policy_step(i)
        gen = torch.Generator().manual_seed(_seed("automtl-gumbel", cfg.seed, g))
        hard_layers: list = []
        tau = None
        if stage == "search":
            tau = self._tau(i)
            sm.tau = tau
            if policy_step:
                mix = sm.mixing_weights(gen)
            else:
                with torch.no_grad():
                    mix = sm.mixing_weights(gen)
                if cfg.hard_weight_steps:
                    # a Gumbel-max sample of the policy: only the sampled operators run and learn
                    choices = mix.argmax(-1).tolist()
                    hard_layers = sm.policy_layers
                    for layer, row in zip(hard_layers, choices):
                        layer.choices = tuple(row)
        elif stage == "warmup":
            mix = sm.mixing_weights()
        else:
            mix = None
        if self.dist.active:
            # like DDP's broadcast_buffers: every rank starts the step with rank 0's BN statistics
            self.dist.broadcast(self.buffers + self.weighting_state)
        try:
            with self._autocast():
                out = self.finetune_net(x) if stage == "finetune" and self.finetune_net is not None else sm(x, mix=mix)
            losses = {}
            for t in self.tasks:
                target = targets.get(t)
                pred = out[t].float()
                # a batch without the task's key counts as all-missing: a zero with a grad path
                losses[t] = self.loss_fns[t](pred, target) if target is not None else pred.sum() * 0.0
        finally:
            for layer in hard_layers:
                layer.choices = None
        values = torch.stack([losses[t].detach().float().reshape(()) for t in self.tasks])
        if self.dist.active:
            synced = values.clone()
            self.dist.all_reduce_mean([synced])
            # value = the mean over ranks (so value-driven balancers agree), gradient = the local one
            losses = {t: losses[t] + (synced[k] - values[k]).to(losses[t].dtype) for k, t in enumerate(self.tasks)}
            values = synced
        self._check_finite(values, self.tasks, stage, i, g)
        total, weights = self.weighting(losses, shared_parameters=self.shared, step=g)
        rec: dict = {"stage": stage, "step": g + 1, "stage_step": i + 1, "kind": "policy" if policy_step else "weight",
                     "losses": {t: float(v) for t, v in zip(self.tasks, values.tolist())},
                     "weights": weights}
        if policy_step:
            reg = self._sharing_reg()
            objective = total + cfg.reg_weight * reg
            resource, expected = self._resource()
            if expected is not None:
                rec["expected_" + cfg.budget_metric] = float(expected.detach())
            if resource is not None:
                objective = objective + cfg.budget_weight * resource
                rec["resource"] = float(resource.detach())
            rec["reg"] = float(reg.detach())
            self._check_finite(objective.detach().reshape(1), ["search objective"], stage, i, g)
            (grad,) = torch.autograd.grad(objective, [sm.policy_logits])
            sm.policy_logits.grad = grad
            self.dist.all_reduce_mean([grad])
            self.policy_opt.step()
            self.policy_opt.zero_grad(set_to_none=True)
            rec["objective"] = float(objective.detach())
        else:
            opt = self.finetune_opt if stage == "finetune" else self.weight_opt
            opt.zero_grad(set_to_none=True)
            total.backward()
            self.dist.all_reduce_grads(self.weight_params)
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_([p for p in self.weight_params if p.grad is not None], cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        rec["total"] = float(total.detach())
        opt = self.finetune_opt if stage == "finetune" else self.weight_opt
        rec["lr"] = opt.param_groups[0]["lr"]
        rec["tau"] = tau
        if stage == "search" and log:
            with torch.no_grad():
                rec.setdefault("expected_params", float(sm.expected_parameter_count()))
                if cfg.budget_metric == "macs":
                    rec.setdefault("expected_macs", float(sm.expected_mac_count()))
        return rec

    # ---- stages ------------------------------------------------------------------
    def _enter(self, stage: str) -> None:
        sm = self.sm
        if stage == "warmup":
            sm.warmup()
        elif stage == "search":
            sm.soft(self.config.tau_start)
        else:
            sm.hard(self.policy)
            # Fine-tune through a compact view of the supermodel: same modules and parameters,
            # but what tasks share runs once (hard mode runs it on every task's copy of the batch).
            # Per-task batches differ per task, so there the supermodel itself runs.
            if not self.per_task:
                self.finetune_net = compact(sm, self.policy, copy_weights=False)
        self.shared = self._shared_parameters()

    def _leave(self, stage: str) -> None:
        if stage == "search" and self.policy is None:
            self._discretize()

    def _discretize(self) -> None:
        cfg = self.config
        self.policy = self.sm.discretize(sample=cfg.discretize == "sample", seed=cfg.seed)
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
        if self.given_policy is not None and self.out_dir is not None and self.dist.main:
            self.given_policy.save(self.out_dir / POLICY_NAME)
        # ranks start from rank 0's weights (as DDP does), whatever their initialisation
        self.dist.broadcast([p.data for p in self.sm.parameters()] + self.buffers)
        g = self.start
        for stage, length, offset in self.plan:
            first = max(g - offset, 0)
            if first < length:
                self._enter(stage)
                iters = {k: s.iterate(g) for k, s in self.streams.items()}
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
            stages=[p[0] for p in self.plan if p[1] > 0],
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
    run = _Search(supermodel, train_data, val_data, cfg, policy)
    try:
        return run.run()
    finally:
        run.close()
