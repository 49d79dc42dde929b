"""Shared pieces of the benchmark scripts: timing by median of repeats, machine facts, JSON output."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """What the figures were measured on."""
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "cpu": _cpu_model(),
        # the kernels torch dispatches to: another capability rounds differently, and long trainings drift apart
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return platform.processor() or None


def synchronizer(device) -> Callable[[], None]:
    """What a timed call is wrapped in on ``device``: ``torch.cuda.synchronize`` on a GPU, where a call only queues
    its kernels, else nothing."""
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


def median_time(fn, repeats: int = 5, warmup: int = 1) -> dict:
    """Median (and spread) of ``repeats`` wall-clock runs of ``fn`` after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def write_result(name: str, payload: dict, path: Optional[Path] = None) -> Path:
    """Write ``payload`` with the machine facts as JSON, atomically, to ``path`` (default
    ``benchmarks/results/<name>.json``) and return the path."""
    path = Path(path) if path is not None else RESULTS / f"{name}.json"
    payload = {"benchmark": name, "machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S"), **payload}
    write_text(path, json.dumps(payload, indent=2) + "\n")
    return path


def write_text(path: Path, text: str) -> None:
    """Write a result file atomically (its folder made first): a killed run leaves the old one whole."""
    from automtl.fileio import atomic_write_text

    atomic_write_text(path, text)
