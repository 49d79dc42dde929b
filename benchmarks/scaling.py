"""How cost grows with the number of tasks: search step and compact inference for T = 2, 3, 5.

    python benchmarks/scaling.py --threads 1                      # ResNet-34, 64 px, batch 8
    python benchmarks/scaling.py --backbone mobilenet_v2 --tasks 2 3 5 --repeats 5

For each T (dense tasks taken in order from search_step.TASK_POOL: segmentation, depth, normal,
a second segmentation and a second depth task), one run of ``search_step.measure`` (the batched
search step and AutoMTL's per-task loop, each as a ratio to one single-task forward+backward)
and one of ``inference.run_one`` (all-task latency of the compact model of the all-share, a
seeded random and the all-specialize policy, T single-task models and AutoMTL-style per-task hard
inference, each as a ratio to one backbone). Writes benchmarks/results/scaling.json and
scaling.md (the table the top-level README shows).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_result, write_text  # noqa: E402
from inference import run_one  # noqa: E402
from search_step import TASK_POOL, measure  # noqa: E402


def row_for(T: int, step: dict, infer: list, clock: str) -> dict:
    v = step["variants"]
    k = "s" if clock == "wall" else "cpu_s"
    by_policy = {r["policy"].split("(")[0]: r for r in infer}
    backbone = by_policy["all-share"][f"backbone_{k}"]
    return {
        "tasks": T,
        "search_step": v["default"][clock]["ratio"],
        "per_task_loop_step": v["per_task_loop"][clock]["ratio"],
        "batched_speedup": v["default"][clock]["speedup_vs_per_task_loop"],
        **{f"compact_{p}": by_policy[p][f"compact_{k}"] / backbone for p in ("all-share", "random", "all-specialize")},
        "compact_random_vs_flop_bound": by_policy["random"][f"compact_{k}"] / by_policy["random"][f"flop_bound_{k}"],
        "separate": by_policy["random"][f"separate_{k}"] / backbone,
        "automtl_hard_random": by_policy["random"][f"automtl_hard_{k}"] / backbone,
    }


def markdown(rows: list, backbone: str, size: int, batch: int, clock: str) -> str:
    lines = [f"#### Scaling with tasks ({backbone}, {size}x{size} px, batch {batch}, {clock} clock)\n",
             "| T | search step | AutoMTL per-task loop | batched speedup | compact all-share | compact random | "
             "compact all-specialize | random vs FLOP bound | T single-task models | AutoMTL hard (random) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['tasks']} | {r['search_step']:.2f}x | {r['per_task_loop_step']:.2f}x | {r['batched_speedup']:.2f}x | "
                     f"{r['compact_all-share']:.2f}x | {r['compact_random']:.2f}x | {r['compact_all-specialize']:.2f}x | "
                     f"{r['compact_random_vs_flop_bound']:.2f} | {r['separate']:.2f}x | {r['automtl_hard_random']:.2f}x |")
    lines.append("\nSearch columns: one search step over one single-task forward+backward. Inference columns: all-task "
                 "latency over one backbone + head.\n")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="resnet34")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tasks", nargs="+", type=int, default=[2, 3, 5], choices=range(1, len(TASK_POOL) + 1), metavar="T")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="which timing the table shows (both are written)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="directory for scaling.json and scaling.md")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps, infers, rows = [], [], []
    for T in args.tasks:
        step = measure(args.backbone, args.size, args.batch, args.repeats, args.warmup, {"default": {}}, T)
        infer = run_one(args.backbone, args.size, args.batch, args.repeats, 0, args.clock, TASK_POOL[:T],
                        only=("all-share", "random", "all-specialize"))
        steps.append(step)
        infers.append(infer)
        rows.append({"wall": row_for(T, step, infer, "wall"), "cpu": row_for(T, step, infer, "cpu")})
        r = rows[-1][args.clock]
        print(f"T={T}: search step {r['search_step']:.2f}x (per-task loop {r['per_task_loop_step']:.2f}x), "
              f"compact random {r['compact_random']:.2f}x, separate {r['separate']:.2f}x", flush=True)
    table = markdown([r[args.clock] for r in rows], args.backbone, args.size, args.batch, args.clock)
    payload = {"backbone": args.backbone, "size": args.size, "batch": args.batch, "clock": args.clock,
               "rows": rows, "search_step": steps, "inference": infers}
    path = write_result("scaling", payload, args.out / "scaling.json")
    write_text(args.out / "scaling.md", table)
    print(table)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
