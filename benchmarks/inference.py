"""All-task inference latency of the compact model against what it replaces (3 dense tasks, CPU or GPU).

    python benchmarks/inference.py [--backbones resnet18,resnet34,mobilenet_v2] [--sizes 64,128] [--batch 8]
                                   [--repeats 5] [--threads N] [--clock wall|cpu] [--device cpu|cuda] [--out FILE]

For every backbone and input size, and every policy (all-share, all-specialize, a seeded random
mix, and the policy in ``benchmarks/results/found_policies/<backbone>.yaml`` when that file
exists: ``quality.py`` writes there the policy automtl found at 1.5x budget, seed 0), one run measures, interleaved (one call of each per round, so that load from other
processes hits them all alike), the median latency of:

- ``compact``: the compact model computing all tasks in one pass;
- ``backbone``: one backbone and one head (the all-share compact model asked for one task);
- ``separate``: T single-task models (backbone + head) run one after another;
- ``automtl_hard``: the hard-policy supermodel run task by task, as AutoMTL's inference does
  (``automtl.reference.run_task_by_task`` with the supermodel in ``.hard(policy)`` mode);

and the ``flop_bound``: backbone latency x compact MACs / backbone MACs, the latency the compact
model would have if its time scaled with its multiply-accumulates. Target: compact within 10%
of its FLOP bound. Writes benchmarks/results/inference.json, with both wall-clock and process
CPU time. On a machine shared with other jobs, use ``--threads 1``: with more torch threads than
free cores, OpenMP barriers stall and timings swing by several times.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, synchronizer, write_result  # noqa: E402

from automtl import Policy, compact, supermodel  # noqa: E402
from automtl.backbones import build_backbone  # noqa: E402
from automtl.errors import AutomtlError  # noqa: E402
from automtl.reference import run_task_by_task  # noqa: E402
from automtl.report import count_macs, model_stats  # noqa: E402

from search_step import TASK_POOL  # noqa: E402

TASKS = TASK_POOL[:3]
FOUND = RESULTS / "found_policies"


def interleaved_medians(fns: dict, repeats: int, warmup: int = 1, sync=lambda: None) -> dict:
    """Median (and spread) of each callable over ``repeats`` rounds; each round calls every one once.

    Records wall-clock time and the process's CPU time: on a machine shared with other jobs the
    wall clock also counts the time the scheduler gave to them, the CPU time does not. ``sync`` is called
    before and after each timed call (``torch.cuda.synchronize`` on a GPU, where calls only queue work).
    """
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for _ in range(repeats):
            for key, fn in fns.items():
                sync()
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                sync()
                cpu[key].append(time.process_time() - start_cpu)
                wall[key].append(time.perf_counter() - start)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v),
                "cpu_median_s": statistics.median(cpu[k]), "repeats": repeats}
            for k, v in wall.items()}


def policies(sm, backbone: str, seed: int) -> dict:
    out = {
        "all-share": Policy.uniform(sm.layer_names, sm.task_names, "share"),
        "all-specialize": Policy.uniform(sm.layer_names, sm.task_names, "specialize"),
        f"random(seed={seed})": Policy.random(sm.layer_names, sm.task_names, sm.skip_legal, seed=seed),
    }
    found = FOUND / f"{backbone}.yaml"
    if found.exists():
        try:
            pol = Policy.load(found)
            pol.check(sm.layer_names, sm.task_names, sm.skip_legal)
            out["found"] = pol
        except AutomtlError as exc:
            print(f"  skipping {found}: {exc}", flush=True)
    return out


def run_one(name: str, size: int, batch: int, repeats: int, seed: int, clock: str = "wall", tasks=TASKS,
            only: tuple = (), device: str = "cpu") -> list:
    """Time every policy's compact model against its baselines; ``only`` keeps just those policy labels.
    Parameters and MACs are counted on the CPU; the timed models and the batch live on ``device``."""
    torch.manual_seed(0)
    sm = supermodel(build_backbone(name), tasks, torch.randn(1, 3, size, size)).eval()
    x = torch.randn(batch, 3, size, size)
    one = x[:1]
    first = sm.task_names[0]
    single = compact(sm, Policy.uniform(sm.layer_names, sm.task_names, "share")).eval()
    backbone_macs = count_macs(single, one, tasks=[first])
    pols = policies(sm, name, seed)
    if only:
        pols = {k: v for k, v in pols.items() if k.split("(")[0] in only}
    models = {label: compact(sm, pol).eval() for label, pol in pols.items()}
    stats = {label: model_stats(model, (1, 3, size, size), repeats=1, warmup=0) for label, model in models.items()}
    dev = torch.device(device)
    sm, single, x = sm.to(dev), single.to(dev), x.to(dev)
    models = {label: model.to(dev) for label, model in models.items()}

    def automtl_hard(pol):
        def run():
            sm.hard(pol)
            return run_task_by_task(sm, x)
        return run

    fns = {"backbone": lambda: single(x, tasks=[first]),
           "separate": lambda: [single(x, tasks=[t]) for t in sm.task_names]}
    for label, model in models.items():
        fns[f"compact/{label}"] = (lambda m: lambda: m(x))(model)
        fns[f"automtl_hard/{label}"] = automtl_hard(pols[label])
    timing = interleaved_medians(fns, repeats, sync=synchronizer(dev))
    key = "cpu_median_s" if clock == "cpu" else "median_s"
    rows = []
    for label, model in models.items():
        row = {"backbone": name, "size": size, "batch": batch, "tasks": len(tasks), "device": dev.type,
               "policy": label, "choices": pols[label].counts(),
               "parameters": stats[label]["parameters"], "macs_per_sample": stats[label]["macs"],
               "backbone_macs_per_sample": backbone_macs}
        for suffix, k in (("s", "median_s"), ("cpu_s", "cpu_median_s")):
            backbone_s = timing["backbone"][k]
            compact_s = timing[f"compact/{label}"][k]
            bound = backbone_s * stats[label]["macs"] / backbone_macs
            row.update({
                f"compact_{suffix}": compact_s, f"flop_bound_{suffix}": bound,
                f"compact_vs_flop_bound{'' if suffix == 's' else '_cpu'}": compact_s / bound,
                f"backbone_{suffix}": backbone_s, f"separate_{suffix}": timing["separate"][k],
                f"automtl_hard_{suffix}": timing[f"automtl_hard/{label}"][k],
            })
        row["compact_vs_backbone"] = row["compact_s"] / row["backbone_s"]
        row["speedup_vs_separate"] = row["separate_s"] / row["compact_s"]
        row["speedup_vs_automtl_hard"] = row["automtl_hard_s"] / row["compact_s"]
        row["timing"] = {k: v for k, v in timing.items() if k in ("backbone", "separate") or k.endswith("/" + label)}
        rows.append(row)
        sfx = "cpu_s" if clock == "cpu" else "s"
        ratio = row[f"compact_{sfx}"] / row[f"flop_bound_{sfx}"]
        print(f"{name:<13} {size:>4} {label:<16} compact {row[f'compact_{sfx}'] * 1e3:7.1f} ms  "
              f"bound {row[f'flop_bound_{sfx}'] * 1e3:7.1f} ms ({ratio:.2f}, {'ok' if ratio <= 1.10 else 'OVER'})  "
              f"backbone {row[f'backbone_{sfx}'] * 1e3:7.1f}  separate {row[f'separate_{sfx}'] * 1e3:7.1f}  "
              f"automtl-hard {row[f'automtl_hard_{sfx}'] * 1e3:7.1f} ms  [{clock}]", flush=True)
    sm.warmup()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default="resnet18,resnet34,mobilenet_v2")
    ap.add_argument("--sizes", default="64,128", help="input sides, comma-separated")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0, help="seed of the random policy")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where the timed models and the batch live (cuda: each call synchronized)")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here instead of benchmarks/results/inference.json")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="figure to print and check: wall-clock or process CPU time (both are written)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.backbones.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            rows.extend(run_one(name, size, args.batch, args.repeats, args.seed, args.clock, device=args.device))
    worst = max(r["compact_vs_flop_bound"] for r in rows)
    worst_cpu = max(r["compact_vs_flop_bound_cpu"] for r in rows)
    path = write_result("inference", {
        "tasks": [t.describe() for t in TASKS], "batch": args.batch, "repeats": args.repeats,
        "threads": torch.get_num_threads(), "clock": args.clock, "device": args.device,
        "target": "compact latency within 10% of its FLOP bound",
        "worst_compact_vs_flop_bound": worst, "worst_compact_vs_flop_bound_cpu": worst_cpu,
        "results": rows,
    }, args.out)
    print(f"worst compact / FLOP bound: {worst:.2f} wall-clock, {worst_cpu:.2f} CPU time; wrote {path}")


if __name__ == "__main__":
    main()
