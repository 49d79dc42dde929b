"""The search's logs: the JSONL log (one record per line) and the optional TensorBoard events.

Only rank 0 writes. A resume drops what a killed run logged after its last checkpoint, from
both the JSONL file and the TensorBoard events, so the logs read as one uninterrupted run.
"""
from __future__ import annotations

import json
import math
from typing import Mapping

from ..errors import ConfigError, FileFormatError
from ..fileio import MAX_RESUMED_LOG_BYTES, atomic_path, atomic_write_text, iter_json_lines
from ..policy import CHOICES

LOG_NAME = "log.jsonl"


def _summary_writer_class():
    """torch's SummaryWriter, or a ConfigError saying how to install tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("tensorboard_dir (--tensorboard) needs the tensorboard package: "
                          "pip install 'automtl[tensorboard]'") from None
    return SummaryWriter


class _LogMixin:
    """JSONL and TensorBoard logging of :class:`~automtl.search._run._Search` (which sets the attributes used here)."""

    def _open_log(self, resumed: bool) -> None:
        if self.log_path is None or not self.dist.main:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if resumed and self.log_path.exists() and not self.log_path.is_symlink():
            # keep what the checkpoint knows about; drop lines a killed run wrote after it (read as a stream)
            with atomic_path(self.log_path) as tmp, open(tmp, "wb") as out:
                for _, line, rec in iter_json_lines(self.log_path, "log", FileFormatError, MAX_RESUMED_LOG_BYTES):
                    step = rec.get("step", 0) if isinstance(rec, dict) else None
                    if not isinstance(step, (int, float)) or isinstance(step, bool):
                        continue
                    if step <= self.start and not (rec.get("stage") == "val" and step == self.start and rec.get("final")):
                        out.write(line if line.endswith(b"\n") else line + b"\n")
        else:  # a new log; also for a resume whose log is gone or is a link (replaced, not followed)
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

    def _close_logs(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
