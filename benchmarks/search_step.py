"""Time one policy-search step against one forward+backward of the single-task backbone.

A "search step" is the average step of the search stage in the schedule the default config
uses (``weight_steps_per_policy_step`` weight steps, then one policy step), for all tasks at
once, through the real code path of :mod:`automtl.search` (optimizer steps included). The
baseline is the plain backbone from ``build_backbone`` + one dense head + its loss, forward and
backward, measured in the same run and interleaved with the search steps so that machine
noise hits both alike. Reported as a ratio; AutoMTL's reference code measures about 6.6x
(ResNet-34, 64x64) and 8x (MobileNetV2) on the CPU these numbers were taken on.

The same run also times ``per_task_loop``: AutoMTL's own formulation of the same supermodel
(each task runs the whole graph with all three operators, one task after another), so the gain
of the batched pass is a ratio measured side by side (``speedup_vs_per_task_loop``).

    python benchmarks/search_step.py                      # all backbones and sizes, 3 tasks
    python benchmarks/search_step.py --sizes 64 --repeats 3 --backbones resnet34 --tasks 5
    python benchmarks/search_step.py --device cuda --sizes 224 --batch 32 --backbones resnet50 mobilenet_v2
"""
from __future__ import annotations

import argparse
import os
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
from automtl.reference import run_task_by_task
from automtl.search import _make_optimizer, _Search
from automtl.supermodel import supermodel
from automtl.tasks import Task
from common import synchronizer, write_result

#: Dense tasks in the order they are added for the scaling table (T = 2, 3, 5 takes the first T).
TASK_POOL = [Task("segmentation", "segmentation", classes=13), Task("depth", "depth"), Task("normal", "normal"),
             Task("parts", "segmentation", classes=7), Task("distance", "depth")]
TASKS = TASK_POOL[:3]
RESULTS = Path(__file__).with_name("results") / "search_step.json"


def batch(size: int, n: int, seed: int = 0, tasks=TASKS):
    """A random image batch and a random target of each task's kind."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = {}
    for t in tasks:
        if t.kind == "segmentation":
            y[t.name] = torch.randint(0, t.classes, (n, size, size), generator=g)
        elif t.kind == "depth":
            y[t.name] = torch.rand(n, 1, size, size, generator=g) + 0.5
        else:
            y[t.name] = F.normalize(torch.randn(n, 3, size, size, generator=g), dim=1)
    return x, y


class PerTaskLoop:
    """The search step of the original AutoMTL formulation, on the same supermodel: each task runs
    the whole graph on its own with all three operators of every layer computed and mixed
    (:func:`automtl.reference.run_task_by_task`), then one backward; same optimizers and schedule."""

    def __init__(self, sm, config: SearchConfig):
        self.sm, self.config = sm.soft(config.tau_start), config
        self.losses = {t.name: loss_for(t) for t in sm.tasks}
        # the same (fused) weight optimizer as automtl's search, so that only the forward/backward differs
        self.weight_opt = _make_optimizer(config.weight_optimizer, sm.weight_parameters(), config.lr,
                                          config.momentum, config.weight_decay)
        self.policy_opt = torch.optim.Adam(sm.policy_parameters(), lr=config.policy_lr)

    def step(self, x, y, policy_step: bool, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        with torch.set_grad_enabled(policy_step):
            mix = self.sm.mixing_weights(gen)
        out = run_task_by_task(self.sm, x, mix)
        total = sum(self.losses[t](out[t], y[t]) for t in self.sm.task_names)
        if policy_step:
            (self.sm.policy_logits.grad,) = torch.autograd.grad(total, [self.sm.policy_logits])
            self.policy_opt.step()
            self.policy_opt.zero_grad(set_to_none=True)
        else:
            total.backward()
            self.weight_opt.step()
            self.weight_opt.zero_grad(set_to_none=True)


def baseline_step(backbone, head, loss, x, target):
    """One forward + backward of the single-task model (backbone + one dense head + loss)."""
    y = head(backbone(x))
    y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
    loss(y, target).backward()


def measure(name: str, size: int, batch_size: int, repeats: int, warmup: int, variants: dict,
            num_tasks: int = 3, per_task_loop: bool = True, device: str = "cpu") -> dict:
    """Baseline, each variant of the batched search and (optionally) the per-task loop, interleaved.

    On ``device`` "cuda" the batch lives on the GPU for every contender (no host copies are timed) and
    each timed call ends with ``torch.cuda.synchronize()``."""
    torch.manual_seed(0)
    dev = torch.device(device)
    tasks = TASK_POOL[:num_tasks]
    backbone = build_backbone(name).to(dev)
    x, y = batch(size, batch_size, tasks=tasks)
    x, y = x.to(dev), {k: v.to(dev) for k, v in y.items()}
    with torch.no_grad():
        channels = backbone(x[:1]).shape[1]
    head = DenseHead(channels, 13).to(dev)
    seg_loss = loss_for(tasks[0])
    default = SearchConfig()
    r = default.weight_steps_per_policy_step
    runs = {}
    for label, overrides in variants.items():
        sm = supermodel(build_backbone(name), tasks, torch.randn(1, 3, size, size))
        cfg = SearchConfig(quiet=True, device=dev.type, **overrides)
        run = _Search(sm, [(x, y)], None, cfg, None)
        run._enter("search")
        iters = {k: s.iterate(0) for k, s in run.streams.items()}
        runs[label] = (run, iters)
    loop = (PerTaskLoop(supermodel(build_backbone(name), tasks, torch.randn(1, 3, size, size)).to(dev), default)
            if per_task_loop else None)
    sync = synchronizer(dev)

    def timed(fn):
        """Wall and CPU seconds of one call. CPU time (process_time) is what to read on a shared
        machine with one thread: other processes' load does not count in it."""
        sync()
        w, c = time.perf_counter(), time.process_time()
        fn()
        sync()
        return time.perf_counter() - w, time.process_time() - c

    def search_cycle(run, iters, g0):
        """One schedule cycle (r weight steps + 1 policy step): (wall, cpu) seconds per step."""
        return [timed(lambda i=i: run._step("search", i, g0 + i, iters, False)) for i in range(r + 1)]

    def loop_cycle(g0):
        return [timed(lambda i=i: loop.step(x, y, i == r, g0 + i)) for i in range(r + 1)]

    labels = list(runs) + (["per_task_loop"] if loop is not None else [])
    base_t, cycles = [], {k: [] for k in labels}
    for rep in range(warmup + repeats):
        dt = timed(lambda: baseline_step(backbone, head, seg_loss, x, y["segmentation"]))
        backbone.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        for label, (run, iters) in runs.items():
            c = search_cycle(run, iters, rep * (r + 1))
            if rep >= warmup:
                cycles[label].append(c)
        if loop is not None:
            c = loop_cycle(rep * (r + 1))
            if rep >= warmup:
                cycles["per_task_loop"].append(c)
        if rep >= warmup:
            base_t.append(dt)
    out = {"backbone": name, "size": size, "batch": batch_size, "tasks": len(tasks), "repeats": repeats, "device": dev.type,
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
            v = out["variants"].setdefault(label, {"config": variants.get(label, "AutoMTL per-task loop"),
                                                   "weight_steps_per_policy_step": r})
            v[clock] = {"search_step_s": step, "weight_step_s": weight, "policy_step_s": policy, "ratio": step / base,
                        "weight_ratio": weight / base, "policy_ratio": policy / base,
                        "cycle_median_ratio": cycle / base}
        if "per_task_loop" in out["variants"]:
            loop_step = out["variants"]["per_task_loop"][clock]["search_step_s"]
            for label in runs:
                out["variants"][label][clock]["speedup_vs_per_task_loop"] = loop_step / out["variants"][label][clock]["search_step_s"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbones", nargs="+", default=["resnet34", "mobilenet_v2"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=3, choices=range(1, len(TASK_POOL) + 1), metavar="T",
                    help=f"number of dense tasks (1 to {len(TASK_POOL)})")
    ap.add_argument("--no-per-task-loop", action="store_true", help="leave out the AutoMTL per-task loop (slow)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where every contender runs (cuda: the batch on the GPU, each timed call synchronized)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # conflict measures once every conflict_every steps: one per schedule cycle here, its last step, so the
    # "policy" columns are the measured step and the "weight" columns the plain ones
    every = SearchConfig().weight_steps_per_policy_step + 1
    # (no futility stop: every cycle's last step is a measured one)
    variants = {"default": {}, "soft": {"paths": "soft"},
                "conflict": {"strategy": "conflict", "conflict_every": every, "conflict_futility": 0.0}}
    results = []
    for name in args.backbones:
        for size in args.sizes:
            res = measure(name, size, args.batch, args.repeats, args.warmup, variants, args.tasks,
                          per_task_loop=not args.no_per_task_loop, device=args.device)
            results.append(res)
            for clock in ("wall", "cpu"):
                summary = ", ".join(
                    f"{k} {v[clock]['ratio']:.2f}x (weight {v[clock]['weight_ratio']:.2f}x, policy {v[clock]['policy_ratio']:.2f}x)"
                    for k, v in res["variants"].items())
                print(f"{name} {size}x{size} b{args.batch} [{clock}]: baseline "
                      f"{res[f'baseline_fwd_bwd_{clock}_s'] * 1e3:.1f} ms; {summary}", flush=True)
    report = {
        "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "note": "ratio = (r * median weight step + median policy step) / (r + 1) / median single-task forward+backward, "
                "r = weight_steps_per_policy_step of the default config; 'cpu' uses process CPU time, robust to other "
                "load with one thread",
        "reference": {"automtl_resnet34_64": 6.6, "automtl_mobilenet_v2_64": 8.0, "target": 3.0},
        "results": results,
    }
    print(f"wrote {write_result('search_step', report, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
