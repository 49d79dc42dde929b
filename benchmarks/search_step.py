"""Time one policy-search step against one forward+backward of the single-task backbone.

A "search step" is the average step of the search stage in the schedule the default config
uses (``weight_steps_per_policy_step`` weight steps, then one policy step), for all tasks at
once, through the real code path of :mod:`automtl.search` (optimizer steps included). The
baseline is the plain backbone from ``build_backbone`` + one dense head + its loss, forward and
backward, measured in the same run and interleaved with the search steps so that machine
noise hits both alike. Reported as a ratio; AutoMTL's reference code measures about 6.6x
(ResNet-34, 64x64) and 8x (MobileNetV2) on the CPU these numbers were taken on.

    python benchmarks/search_step.py                      # all backbones and sizes
    python benchmarks/search_step.py --sizes 64 --repeats 3 --backbones resnet34
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from automtl.backbones import build_backbone
from automtl.config import SearchConfig
from automtl.heads import DenseHead
from automtl.losses import loss_for
from automtl.search import _Search
from automtl.supermodel import supermodel
from automtl.tasks import Task

TASKS = [Task("segmentation", "segmentation", classes=13), Task("depth", "depth"), Task("normal", "normal")]
RESULTS = Path(__file__).with_name("results") / "search_step.json"


def batch(size: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = {
        "segmentation": torch.randint(0, 13, (n, size, size), generator=g),
        "depth": torch.rand(n, 1, size, size, generator=g) + 0.5,
        "normal": F.normalize(torch.randn(n, 3, size, size, generator=g), dim=1),
    }
    return x, y


def baseline_step(backbone, head, loss, x, target):
    """One forward + backward of the single-task model (backbone + one dense head + loss)."""
    y = head(backbone(x))
    y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
    loss(y, target).backward()


def measure(name: str, size: int, batch_size: int, repeats: int, warmup: int, variants: dict) -> dict:
    torch.manual_seed(0)
    backbone = build_backbone(name)
    x, y = batch(size, batch_size)
    with torch.no_grad():
        channels = backbone(x[:1]).shape[1]
    head = DenseHead(channels, 13)
    seg_loss = loss_for(TASKS[0])
    default = SearchConfig()
    r = default.weight_steps_per_policy_step
    runs = {}
    for label, overrides in variants.items():
        sm = supermodel(build_backbone(name), TASKS, torch.randn(1, 3, size, size))
        cfg = SearchConfig(quiet=True, device="cpu", **overrides)
        run = _Search(sm, [(x, y)], None, cfg, None)
        run._enter("search")
        iters = {k: s.iterate(0) for k, s in run.streams.items()}
        runs[label] = (run, iters)

    def timed(fn):
        """Wall and CPU seconds of one call. CPU time (process_time) is what to read on a shared
        machine with one thread: other processes' load does not count in it."""
        w, c = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - w, time.process_time() - c

    def search_cycle(run, iters, g0):
        """One schedule cycle (r weight steps + 1 policy step): (wall, cpu) seconds per step."""
        return [timed(lambda i=i: run._step("search", i, g0 + i, iters, False)) for i in range(r + 1)]

    base_t, cycles = [], {k: [] for k in runs}
    for rep in range(warmup + repeats):
        dt = timed(lambda: baseline_step(backbone, head, seg_loss, x, y["segmentation"]))
        backbone.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        for label, (run, iters) in runs.items():
            c = search_cycle(run, iters, rep * (r + 1))
            if rep >= warmup:
                cycles[label].append(c)
        if rep >= warmup:
            base_t.append(dt)
    out = {"backbone": name, "size": size, "batch": batch_size, "tasks": len(TASKS), "repeats": repeats,
           "baseline_all_s": base_t, "variants": {}}
    for clock, k in (("wall", 0), ("cpu", 1)):
        base = statistics.median(t[k] for t in base_t)
        out[f"baseline_fwd_bwd_{clock}_s"] = base
        for label, cs in cycles.items():
            # medians of each kind of step, combined in the schedule's proportion (robust to one slow outlier)
            weight = statistics.median(s[k] for c in cs for s in c[:-1]) if r > 0 else 0.0
            policy = statistics.median(c[-1][k] for c in cs)
            step = (r * weight + policy) / (r + 1)
            cycle = statistics.median(sum(s[k] for s in c) / len(c) for c in cs)
            v = out["variants"].setdefault(label, {"config": variants[label], "weight_steps_per_policy_step": r})
            v[clock] = {"search_step_s": step, "weight_step_s": weight, "policy_step_s": policy, "ratio": step / base,
                        "weight_ratio": weight / base, "policy_ratio": policy / base,
                        "cycle_median_ratio": cycle / base}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbones", nargs="+", default=["resnet34", "mobilenet_v2"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = {"default": {}, "hard_weight_steps": {"hard_weight_steps": True}}
    results = []
    for name in args.backbones:
        for size in args.sizes:
            res = measure(name, size, args.batch, args.repeats, args.warmup, variants)
            results.append(res)
            for clock in ("wall", "cpu"):
                summary = ", ".join(
                    f"{k} {v[clock]['ratio']:.2f}x (weight {v[clock]['weight_ratio']:.2f}x, policy {v[clock]['policy_ratio']:.2f}x)"
                    for k, v in res["variants"].items())
                print(f"{name} {size}x{size} b{args.batch} [{clock}]: baseline "
                      f"{res[f'baseline_fwd_bwd_{clock}_s'] * 1e3:.1f} ms; {summary}", flush=True)
    report = {
        "benchmark": "search_step",
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "python": sys.version.split()[0]},
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "note": "ratio = (r * median weight step + median policy step) / (r + 1) / median single-task forward+backward, "
                "r = weight_steps_per_policy_step of the default config; 'cpu' uses process CPU time, robust to other "
                "load with one thread",
        "reference": {"automtl_resnet34_64": 6.6, "automtl_mobilenet_v2_64": 8.0, "target": 3.0},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
