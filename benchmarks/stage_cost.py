"""Cost of a step of each stage of a search, in steps of the same run's warm-up (FBE).

    python benchmarks/stage_cost.py --threads 1      # the two quality benchmarks' models, conflict and gumbel

The constants of ``automtl.protocol.STEP_COST`` come from here: for each strategy, one search with
``--steps`` steps in every stage on the quality benchmark's data, sizes and batch (ResNet-18 on
synthetic scenes at 64 px, batch 8; the small ResNet on MultiFashion at 36 px, batch 32), every step
logged, gumbel's weight and policy steps in ``convert``'s proportion; the median step time of each
stage over the median warm-up step (the hard-sharing model, 1 FBE). conflict is run with ``conflict_every=1`` and no futility stop so that its search median is the measured step.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from quality import BENCHMARKS, make_backbone, tasks_of  # noqa: E402

CASES = {"resnet18": "synthetic/resnet18", "small_resnet": "multifashion/small_resnet"}


def measure(name: str, strategy: str, steps: int, size=None) -> dict:
    from automtl import supermodel
    from automtl.convert import DEFAULT_SCHEDULE
    from automtl.data import make_dataset
    from automtl.search import search

    bench = BENCHMARKS[CASES[name]] if name in CASES else dict(data="synthetic", size=size or 32, batch=4, backbone=name)
    size = size or bench["size"]
    opts = {"size": size} if bench["data"] == "synthetic" else {}
    train = make_dataset(bench["data"], "train", n=max(64, 4 * bench["batch"]), seed=0, **opts)
    torch.manual_seed(0)
    sm = supermodel(make_backbone(bench["backbone"]), tasks_of(bench["data"]), torch.randn(1, 3, size, size))
    res = search(sm, train, None, dict(strategy=strategy, warmup_steps=steps, search_steps=steps, finetune_steps=steps,
                                       batch_size=bench["batch"], quiet=True, log_every=1, checkpoint_every=0, seed=0,
                                       budget="1.5x", conflict_every=1, conflict_futility=0.0,
                                       weight_steps_per_policy_step=DEFAULT_SCHEDULE["weight_steps_per_policy_step"]))
    logged = [h for h in res.history if h.get("stage") in ("warmup", "search", "finetune")]
    per: dict = {}
    for a, b in zip(logged, logged[1:]):
        if a["stage"] == b["stage"]:
            per.setdefault(b["stage"], []).append(b["time"] - a["time"])
    skip = min(2, steps // 4)  # the first steps of a stage pay for allocation
    med = {k: statistics.median(v[skip:]) for k, v in per.items()}
    return {"backbone": name, "strategy": strategy, "tasks": sm.num_tasks, "steps": steps, "size": size,
            "batch": bench["batch"], "policy": res.policy.counts(),
            "median_step_s": med, "fbe": {k: v / med["warmup"] for k, v in med.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", nargs="+", default=list(CASES))
    ap.add_argument("--strategies", nargs="+", default=["conflict", "gumbel"])
    ap.add_argument("--steps", type=int, default=20, help="steps in each stage")
    ap.add_argument("--size", type=int, default=None, help="input size for a backbone outside the quality benchmarks")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="the JSON file (default results/stage_cost.json)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.backbones:
        for strategy in args.strategies:
            row = measure(name, strategy, args.steps, args.size)
            rows.append(row)
            print(f"{name} {strategy} (T={row['tasks']}): " + ", ".join(f"{k} {v:.2f}" for k, v in row["fbe"].items()),
                  flush=True)
    print(f"wrote {write_result('stage_cost', {'results': rows}, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
