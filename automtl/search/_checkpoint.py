"""The search's checkpoint: what it holds, how it is written, and how a resume reads it back.

A checkpoint is the run's whole state at a global step (model, the three optimizers, the loss
balancer and the RNG states (each rank's, under torchrun; the global generators and those the backbone's modules own), the strategy's state, the history), so that a resumed run ends bitwise
equal to an uninterrupted one. A fingerprint of the settings that change the numbers refuses a
resume by a different run.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError, FileFormatError
from ..fileio import atomic_path, load_tensors
from ..policy import Policy
from ._util import _rng_state, _set_rng_state

CHECKPOINT_NAME = "checkpoint.pt"
_CKPT_FORMAT = 1
#: Config fields that may change between a run and its resume: they do not change the numbers, except
#: ``finetune_steps``, which may be changed to lengthen or shorten a run's fine-tune (its learning-rate
#: schedule then follows the new length from the resumed step on).
_RESUME_FREE = {
    "out_dir", "log_dir", "tensorboard_dir", "log_every", "checkpoint_every", "resume", "quiet", "device", "val_every",
    "val_batches", "finetune_steps", "policy_file",
}


class _CheckpointMixin:
    """Checkpoint save/load of :class:`~automtl.search._run._Search` (which sets the attributes used here)."""

    def _fingerprint(self) -> dict:
        cfg = {k: v for k, v in self.config.to_dict().items() if k not in _RESUME_FREE}
        return {"config": cfg, "tasks": self.tasks, "layers": list(self.sm.layer_names),
                "plan": [p[0] for p in self.plan], "world": self.dist.world,
                "policy": self.given_policy.to_dict() if self.given_policy is not None else None}

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
        own = ckpt["ranks"][self.dist.rank] if "ranks" in ckpt else ckpt  # this rank's balancer and generators
        self.weight_opt.load_state_dict(ckpt["weight_opt"])
        self.policy_opt.load_state_dict(ckpt["policy_opt"])
        try:
            self.weighting.load_state_dict(own["weighting"])
        except RuntimeError as exc:
            raise FileFormatError(f"checkpoint {str(path)!r} does not hold this loss weighting's state ({exc}); "
                                  "delete it to start over") from None
        _set_rng_state(own["rng"], self.sm)
        if ckpt.get("policy") is not None:
            self.policy = Policy.from_dict(ckpt["policy"], f"checkpoint {str(path)!r}")
        self.strategy.load_state_dict(ckpt.get("strategy") or {})
        self.history = list(ckpt["history"])
        self.elapsed0 = float(ckpt.get("elapsed", 0.0))
        self.start = int(ckpt["global_step"])
        self.last_saved = self.start
