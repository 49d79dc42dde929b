"""Training data as a deterministic function of the step (exact resume, DDP shards), and batch helpers."""
from __future__ import annotations

import difflib
from typing import Iterator, Mapping, Optional, Sequence

import torch
from torch.utils.data import (BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler,
                              default_collate)

from ..data.collate import stack_samples
from ..errors import DataError
from ._util import _seed

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
        self.subset = None  # dataset indices this stream reads (None: all)
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
            self.loader = DataLoader(source, batch_size=batch_size, shuffle=True, collate_fn=stack_samples)
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

    def describe(self) -> dict:
        """What a resume must find unchanged (it restarts this stream at its position): the number of samples, the
        batch size and the order, where the source tells them."""
        if self.kind != "loader":
            return {"kind": "iterable", "type": type(self.source).__name__}
        return {"kind": "loader", "samples": len(self.loader.dataset), "batch_size": self.loader.batch_size,
                "shuffle": self.shuffle, "drop_last": bool(self.loader.drop_last), "base": self.base}

    def why_not_split(self, fraction: float) -> Optional[str]:
        """Why :meth:`split` gives None, as a phrase (for the warning that policy steps read the training batches);
        None where it splits."""
        if self.kind != "loader" or self.subset is not None:
            return "it is not a map-style data set; pass a Dataset, or a DataLoader over one"
        n, need = len(self.loader.dataset), self.loader.batch_size * self.world * 2
        k = int(round(fraction * n))
        if k >= need and n - k >= need:
            return None
        return (f"a share of {fraction:g} of its {n} samples leaves {k} held out and {n - k} to train, and each part "
                f"needs two batches of {self.loader.batch_size}"
                + (f" on each of {self.world} processes" if self.world > 1 else "") + f" ({need} samples); give it "
                "more samples or a smaller batch size")

    def split(self, fraction: float):
        """Two streams over disjoint parts of this map-style data: (the rest, ``fraction`` held out), drawn
        by a generator seeded with the run's seed; None when the data is not map-style or too small to
        give each part two batches per rank (:meth:`why_not_split`; then policy steps read the training batches)."""
        if self.why_not_split(fraction) is not None:
            return None
        n = len(self.loader.dataset)
        k = int(round(fraction * n))
        g = torch.Generator().manual_seed(_seed("automtl-holdout", self.seed, self.base, self.name))
        perm = torch.randperm(n, generator=g).tolist()
        parts = []
        for name, idx in ((self.name, sorted(perm[k:])), (self.name + "/held-out", sorted(perm[:k]))):
            part = object.__new__(_Stream)
            part.__dict__.update(self.__dict__)
            part.name, part.subset = name, idx
            parts.append(part)
        return tuple(parts)

    def _epoch_batches(self, epoch: int) -> list:
        n = len(self.loader.dataset) if self.subset is None else len(self.subset)
        if self.shuffle:
            g = torch.Generator().manual_seed(_seed("automtl-data", self.seed, self.base, self.name, epoch))
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        if self.subset is not None:
            order = [self.subset[i] for i in order]
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
                collate = stack_samples if ld.collate_fn is default_collate else ld.collate_fn  # sizes named
                kwargs: dict = dict(
                    batch_sampler=batches, num_workers=ld.num_workers, collate_fn=collate,
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


def one_shot(data) -> bool:
    """An iterator that can be read once only (a generator), itself or in a per-task dict."""
    if isinstance(data, Mapping):
        return any(one_shot(v) for v in data.values())
    return hasattr(data, "__next__")


def _single_sample(batch) -> bool:
    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    return isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 1


def _split_batch(batch, where: str):
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        what = f"a {type(batch).__name__} of {len(batch)} items" if isinstance(batch, (tuple, list)) else \
            f"a {type(batch).__name__}"
        raise DataError(f"{where} must yield (x, {{task: target}}) pairs; it yielded {what}")
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


def check_batch_targets(y, where: str) -> None:
    """A batch of a loader shared by the tasks gives its targets as a dict ``{task: target}`` (a task a batch has
    no target for is left out of that batch's loss: partial labels)."""
    if not isinstance(y, Mapping):
        raise DataError(f"{where} yields targets that are a {type(y).__name__}, not a dict {{task: target}}; "
                        "give each batch as (x, {task: target})")


#: Training batches after which a task that has had no target in any of them is an error, not partial labels.
TARGET_GRACE_BATCHES = 16


class TargetTally:
    """Which tasks the batches of a shared loader gave a target for: partial labels leave a task out of some
    batches, a task left out of all of them is a name the data does not have (its head would learn nothing)."""

    def __init__(self, tasks: Sequence[str]):
        self.tasks, self.batches, self.keys = list(tasks), 0, set()
        self.seen = {t: 0 for t in self.tasks}

    def add(self, y, where: str = "training data") -> None:
        """Count one batch's targets: a dict ``{task: target}``, or one task's bare target.

        Raises:
            DataError: a task has no target in the batch while the batch has one under a name no task has that is
                close to it (a typo: partial labels would otherwise hide it for :data:`TARGET_GRACE_BATCHES`).
        """
        self.batches += 1
        if isinstance(y, Mapping):
            self.keys.update(map(str, y))
            strays = [str(k) for k in y if str(k) not in self.seen]
            for t in self.tasks:  # a task with no target yet: one later is partial labels beside another target
                close = difflib.get_close_matches(t, strays, n=1, cutoff=0.75) \
                    if not self.seen[t] and t not in y else []
                if close:
                    raise DataError(f"{where} has no target for task {t!r} but one named {close[0]!r}, which no task "
                                    f"has; rename the task or the data's target so that they match")
        for t in self.tasks:
            self.seen[t] += (t in y) if isinstance(y, Mapping) else len(self.tasks) == 1

    def error(self, where: str) -> Optional[DataError]:
        """The DataError naming a task that had no target in any batch counted, or None."""
        never = [t for t in self.tasks if not self.seen[t]]
        if not never or not self.batches:
            return None
        keys = ", ".join(map(repr, sorted(self.keys))) or "none"
        return DataError(f"{where} had no target for task {never[0]!r} in {self.batches} batches (its targets: {keys}); "
                         "rename the task to one of the data's targets or give data with a target for it")


def _check_task_keys(data: Mapping, tasks: Sequence[str], where: str) -> None:
    if set(data) != set(tasks):
        raise DataError(
            f"{where} is a dict of per-task loaders for {sorted(data)} but the tasks are {list(tasks)}; "
            "give one loader per task"
        )


def _check_one_batch_size(data: Mapping, tasks: Sequence[str], where: str, batch_size: int) -> None:
    """Per-task training loaders run in one pass: their batch sizes, where they say one (a map-style data set is
    batched at ``batch_size``), must agree."""
    def size(source):
        if isinstance(source, Dataset) and not isinstance(source, IterableDataset):
            return batch_size
        b = getattr(source, "batch_size", None)  # a DataLoader given batch_sampler= has None; its sampler may say
        return b if b is not None else getattr(getattr(source, "batch_sampler", None), "batch_size", None)

    sizes = {t: size(data[t]) for t in tasks}
    if len({b for b in sizes.values() if b is not None}) > 1:  # found at the first step otherwise, after the setup
        shown = ", ".join(f"{t!r}: {b}" for t, b in sizes.items())
        raise DataError(f"{where} is a dict of per-task loaders with batch sizes {shown}; the tasks' batches run in "
                        "one pass, so give every task's loader the same batch_size")


def _epoch_iter(source, batch_size: int):
    """One pass over validation data, in its own order."""
    if isinstance(source, Dataset) and not isinstance(source, IterableDataset) and hasattr(source, "__len__") \
            and not isinstance(source, DataLoader):
        return iter(DataLoader(source, batch_size=batch_size, collate_fn=stack_samples))
    return iter(source)
