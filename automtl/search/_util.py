"""Shared machinery of every search strategy: seeds, the distributed context, optimizers, RNG state, progress (tqdm)."""
from __future__ import annotations

import contextlib
import os
import random
import sys
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from ..errors import AutomtlError, ConfigError, FileFormatError, first_line
from ..seeding import check_mt19937, generator_state, is_generator, python_state, set_generator_state, stable_seed

_seed = stable_seed  # the name the search's modules import



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
                    f"({first_line(exc, 200)}); launch the search with torchrun --nproc-per-node N") from None
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
                f"rank {self.rank} lost the other ranks while {what} ({first_line(exc, 200)}); a rank died or stopped "
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

    def all_gather_object(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        with self.collective("gathering the ranks' state"):
            dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.created and dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------------
class _Progress:
    """A tqdm bar per stage on stderr (stage, step/total, smoothed loss, it/s, ETA); off unless ``enabled``
    and stderr is a TTY (tqdm's ``disable=None``), so logs and pipes get no carriage returns."""

    def __init__(self, enabled: bool, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(enabled)
        self.bar = None
        self.loss = None

    def start(self, stage: str, total: int, done: int = 0) -> None:
        self.close()
        if not self.enabled:
            return
        from tqdm import tqdm

        self.loss = None
        # disable=None: tqdm turns itself off when the stream is not a TTY
        self.bar = tqdm(total=total, initial=done, desc=f"{stage:<8}", file=self.stream, disable=None,
                        dynamic_ncols=True, leave=True, unit="step")

    def update(self, done: int, loss: float) -> None:
        if self.bar is None or self.bar.disable:
            return
        self.loss = loss if self.loss is None else 0.9 * self.loss + 0.1 * loss  # smoothed for reading
        self.bar.set_postfix_str(f"loss {self.loss:.4f}", refresh=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


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


def _rng_state(model: Optional[torch.nn.Module] = None) -> dict:
    """The global generators' states, and (``"modules"``) those of the generators ``model``'s modules own (a
    backbone's ``torch.Generator``, ``random.Random`` or numpy generator), by ``module.attribute``."""
    keys_kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if model is not None:
        state["modules"] = {f"{name}.{attr}" if name else attr: _encode(generator_state(v))
                            for name, m in model.named_modules() for attr, v in vars(m).items()
                            if is_generator(v) and not isinstance(v, random.SystemRandom)}  # the OS's has no state
    return state


def check_rng_state(state: dict) -> None:
    """Raise ValueError where the global generators' states (of :func:`_rng_state`'s structure) are out of their
    bounds: numpy's position past its key (a crash at the next draw) or key words beyond 32 bits, Python's words."""
    npst = state["numpy"]
    keys = npst["keys"]
    if keys.dtype != torch.int64 or keys.numel() and not (0 <= int(keys.min()) and int(keys.max()) < 2 ** 32):
        raise ValueError("numpy's MT19937 key words are integers from 0 to 2**32 - 1")
    check_mt19937(keys, npst["pos"], npst["has_gauss"])
    python_state(state["python"])


def _set_rng_state(state: dict, model: Optional[torch.nn.Module] = None) -> None:
    check_rng_state(state)
    npst, keys = state["numpy"], state["numpy"]["keys"]
    torch.set_rng_state(state["torch"])
    random.setstate(python_state(state["python"]))
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if model is not None:
        for key, saved in state.get("modules", {}).items():
            name, _, attr = key.rpartition(".")
            try:
                generator = vars(model.get_submodule(name) if name else model)[attr]
            except (AttributeError, KeyError):
                raise FileFormatError(f"the checkpoint holds the state of a generator {key!r} that this model's "
                                      "modules do not own; resume with the backbone the run was started with, or "
                                      "delete the checkpoint to start over") from None
            try:
                set_generator_state(generator, _decode(saved))
            except (TypeError, ValueError, RuntimeError, AttributeError, IndexError, KeyError, OverflowError) as exc:
                raise FileFormatError(f"the checkpoint's state of the generator {key!r} does not fit it "
                                      f"({first_line(exc)}); delete the checkpoint to start over") from None


def _encode(value):
    """``value`` with numpy arrays as tensors (a checkpoint is read with ``weights_only``)."""
    if isinstance(value, np.ndarray):
        return {"ndarray": torch.from_numpy(value.astype(np.int64)), "dtype": str(value.dtype)}
    if isinstance(value, (tuple, list)):
        return type(value)(_encode(v) for v in value)
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return value.item() if isinstance(value, np.generic) else value


def _decode(value):
    if isinstance(value, dict) and set(value) == {"ndarray", "dtype"}:
        return value["ndarray"].numpy().astype(value["dtype"])
    if isinstance(value, (tuple, list)):
        return type(value)(_decode(v) for v in value)
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    return value


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available; use device: cpu or auto")
        count = torch.cuda.device_count()
        if local_rank >= count:  # each process of a machine takes the GPU of its local rank
            raise ConfigError(
                f"process {local_rank} of this machine has no GPU of its own: the machine has {count} and each process "
                f"takes one; run at most {count} per machine (torchrun --nproc-per-node {count}) or use device: cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")
