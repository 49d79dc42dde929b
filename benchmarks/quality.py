"""Quality of automtl against single-task models, hard sharing and a random-policy control.

    python benchmarks/quality.py                  # the full run (3 seeds, both benchmarks)
    python benchmarks/quality.py --quick          # a smoke run: 1 seed, few steps

For each benchmark and seed, every method gets the same number of weight-training steps:
  single-task   one model per task (all-share policy with one task), fine-tuned only;
  hard-sharing  the all-share policy (shared backbone, separate heads);
  automtl@B     warm-up -> policy search with budget B -> discretize -> fine-tune;
  random@1.5x   a random policy whose parameter count is closest to automtl@1.5x's, fine-tuned
                from the same start (the control that shows the search matters).
Writes benchmarks/results/quality.json and quality.md (mean and spread over seeds of the per-task
metrics, the multi-task gain Δ_MTL against the single-task models, and parameters).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_result  # noqa: E402

from automtl import Policy, Task, supermodel  # noqa: E402
from automtl.backbones import TinyCNN, build_backbone  # noqa: E402
from automtl.config import SearchConfig  # noqa: E402
from automtl.data import make_dataset  # noqa: E402
from automtl.metrics import delta_mtl  # noqa: E402
from automtl.search import search  # noqa: E402

BUDGETS = ("1.0x", "1.5x", "2.0x")
#: The metrics that enter Δ_MTL, per task kind (the usual ones of the MTL literature; the
#: within-N-degrees percentages of normals are reported but left out, as they can be 0 early on).
DELTA_METRICS = {"segmentation": ("miou", "pixel_acc"), "depth": ("abs_err", "rel_err"),
                 "normal": ("mean_angle", "median_angle"), "classification": ("accuracy",)}


def benchmarks(quick: bool) -> list[dict]:
    """The benchmark settings: data, tasks, backbones and image size."""
    scenes = dict(name="synthetic", data="synthetic", size=32, train=256 if not quick else 64, val=64 if not quick else 32,
                  tasks=lambda: [Task("segmentation", "segmentation", classes=4), Task("depth", "depth"), Task("normal", "normal")])
    fashion = dict(name="multifashion", data="multifashion", size=36, train=1024 if not quick else 64, val=256 if not quick else 32,
                   tasks=lambda: [Task("left", "classification", classes=10), Task("right", "classification", classes=10)])
    return [
        {**scenes, "backbone": "resnet18"},
        {**scenes, "backbone": "mobilenet_v2"},
        {**fashion, "backbone": "small_resnet"},
    ]


def make_backbone(name: str):
    """Builtin backbones, plus the small ResNet of the MultiFashion benchmark (TinyCNN, width 32)."""
    return TinyCNN(width=32) if name == "small_resnet" else build_backbone(name)


def datasets(bench: dict, seed: int):
    opts = {"size": bench["size"]} if bench["data"] == "synthetic" else {}
    train = make_dataset(bench["data"], "train", n=bench["train"], seed=seed, **opts)
    val = make_dataset(bench["data"], "val", n=bench["val"], seed=seed, **opts)
    return train, val


def run_method(bench, method, seed, steps, train, val, budget=None, policy_fn=None):
    """Train one method from the seed's initial weights; return its metrics and parameter count."""
    warmup, search_steps, finetune = steps
    torch.manual_seed(seed)
    tasks = bench["tasks"]()
    sm = supermodel(make_backbone(bench["backbone"]), tasks, torch.randn(1, 3, bench["size"], bench["size"]))
    base = dict(seed=seed, batch_size=16, quiet=True, log_every=50, checkpoint_every=0, lr=1e-3,
                weight_steps_per_policy_step=2, tau_every=max(1, search_steps // 40), tau_decay=0.93)
    if policy_fn is None:
        cfg = SearchConfig(**base, warmup_steps=warmup, search_steps=search_steps, finetune_steps=finetune, budget=budget)
        result = search(sm, train, val, cfg)
    else:
        policy = policy_fn(sm)
        # Same number of weight steps as automtl's three stages together.
        total = warmup + search_steps * base["weight_steps_per_policy_step"] // (base["weight_steps_per_policy_step"] + 1) + finetune
        cfg = SearchConfig(**base, warmup_steps=0, search_steps=0, finetune_steps=total)
        result = search(sm, train, val, cfg, policy=policy)
    metrics = {t.name: {k: result.metrics[t.name][k] for k in DELTA_METRICS[t.kind]} for t in tasks}
    return {"metrics": metrics, "parameters": result.params, "policy": result.policy.counts()}


def random_policy_near(sm, target_params: int, seed: int) -> Policy:
    """The seeded random policy (over a sweep of share probabilities) closest to ``target_params``."""
    best, best_gap = None, None
    for k in range(200):
        p_share = 0.2 + 0.75 * (k % 20) / 19
        rest = (1 - p_share) / 2
        pol = Policy.random(sm.layer_names, sm.task_names, sm.skip_legal, seed=seed * 1000 + k, probs=(p_share, rest, rest))
        gap = abs(sm.policy_parameter_count(pol) - target_params)
        if best_gap is None or gap < best_gap:
            best, best_gap = pol, gap
    return best


def run_benchmark(bench, seeds, steps, log):
    runs = []
    for seed in seeds:
        train, val = datasets(bench, seed)
        row = {"seed": seed, "methods": {}}
        t0 = time.time()
        single = {}
        single_params = 0
        for task in bench["tasks"]():
            one = dict(bench, tasks=lambda task=task: [Task(task.name, task.kind, classes=task.classes)])
            r = run_method(one, "single", seed, steps, train, val,
                           policy_fn=lambda sm: Policy.uniform(sm.layer_names, sm.task_names, "share"))
            single[task.name] = r["metrics"][task.name]
            single_params += r["parameters"]
        row["methods"]["single-task"] = {"metrics": single, "parameters": single_params}
        row["methods"]["hard-sharing"] = run_method(bench, "hard", seed, steps, train, val,
                                                    policy_fn=lambda sm: Policy.uniform(sm.layer_names, sm.task_names, "share"))
        for budget in BUDGETS:
            row["methods"][f"automtl@{budget}"] = run_method(bench, "automtl", seed, steps, train, val, budget=budget)
        target = row["methods"]["automtl@1.5x"]["parameters"]
        row["methods"]["random@1.5x"] = run_method(bench, "random", seed, steps, train, val,
                                                   policy_fn=lambda sm: random_policy_near(sm, target, seed))
        for name, m in row["methods"].items():
            m["delta_mtl"] = delta_mtl(m["metrics"], single) if name != "single-task" else 0.0
        log(f"{bench['name']}/{bench['backbone']} seed {seed}: " + ", ".join(
            f"{n} {m['delta_mtl']:+.2f}%" for n, m in row["methods"].items()) + f" ({time.time() - t0:.0f} s)")
        runs.append(row)
    return runs


def summarize(runs):
    """Mean and standard deviation over seeds, per method."""
    methods = list(runs[0]["methods"])
    out = {}
    for name in methods:
        deltas = [r["methods"][name]["delta_mtl"] for r in runs]
        params = [r["methods"][name]["parameters"] for r in runs]
        metrics = {}
        for task, values in runs[0]["methods"][name]["metrics"].items():
            for metric in values:
                xs = [r["methods"][name]["metrics"][task][metric] for r in runs]
                metrics[f"{task}/{metric}"] = {"mean": statistics.fmean(xs), "std": statistics.pstdev(xs)}
        out[name] = {"delta_mtl": {"mean": statistics.fmean(deltas), "std": statistics.pstdev(deltas)},
                     "parameters": statistics.fmean(params), "metrics": metrics}
    return out


def markdown(results) -> str:
    lines = []
    for res in results:
        b = res["benchmark"]
        lines.append(f"#### {b['name']} ({b['backbone']}, {len(res['seeds'])} seeds, {b['size']}x{b['size']})\n")
        summary = res["summary"]
        primary = [k for k in next(iter(summary.values()))["metrics"]]
        lines.append("| method | Δ_MTL % | params (M) | " + " | ".join(primary) + " |")
        lines.append("|---|---:|---:|" + "---:|" * len(primary))
        for name, s in summary.items():
            cells = [f"{s['metrics'][k]['mean']:.3g} ± {s['metrics'][k]['std']:.2g}" for k in primary]
            lines.append(f"| {name} | {s['delta_mtl']['mean']:+.2f} ± {s['delta_mtl']['std']:.2f} | "
                         f"{s['parameters'] / 1e6:.2f} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed and few steps: checks that the script runs")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", default="40,80,40", help="WARMUP,SEARCH,FINETUNE steps of automtl")
    ap.add_argument("--only", help="comma-separated benchmark names or backbones to run")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    steps = (4, 6, 4) if args.quick else tuple(int(s) for s in args.steps.split(","))
    seeds = [0] if args.quick else list(range(args.seeds))
    chosen = [b for b in benchmarks(args.quick)
              if not args.only or b["name"] in args.only.split(",") or b["backbone"] in args.only.split(",")]
    results = []
    started = time.time()
    for bench in chosen:
        runs = run_benchmark(bench, seeds, steps, log=lambda m: print(m, flush=True))
        results.append({"benchmark": {k: v for k, v in bench.items() if k != "tasks"}, "seeds": seeds,
                        "steps": steps, "runs": runs, "summary": summarize(runs)})
    name = "quality_quick" if args.quick else "quality"
    path = write_result(name, {"results": results, "seconds": round(time.time() - started, 1)})
    (RESULTS / f"{name}.md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {path} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
