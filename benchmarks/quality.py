"""Quality of automtl against single-task models, hard sharing and a random-policy control.

    python benchmarks/quality.py                  # the full run: 3 benchmarks x 3 seeds, 2 workers
    python benchmarks/quality.py --resume         # go on after an interrupted run
    python benchmarks/quality.py --quick --out /tmp/q   # a smoke run: 1 seed, tiny data and steps

For each benchmark and seed, every architecture is trained from the seed's initial weights for the
same number of weight steps N (automtl's warm-up + weight steps of the search + fine-tune):
  single-task   one model per task (backbone + that task's head);
  hard-sharing  the all-share policy (one backbone, a head per task);
  automtl@B     the policy found by warm-up -> search with budget B -> discretize (AutoMTL's protocol:
                the found architecture is then trained like the others, the search is not charged
                to it). The run's own fine-tuned result, as ``automtl convert`` delivers it with
                the search's weights, is reported as "automtl@B search weights";
  random@1.5x   a random policy whose parameter count is the closest of a sweep over the simplex of
                (share, specialize, skip) probabilities to automtl@1.5x's (the control that shows
                the search matters).
Every method uses the search settings of ``automtl convert`` (its DEFAULT_SCHEDULE), with the
step counts of the benchmark. The runs are independent jobs spread over ``--jobs`` worker
processes of one thread each (the default 2 fills this project's 2-core machine); the JSON is
rewritten after every job, so an interrupted run keeps what it finished and ``--resume`` goes on.
Writes quality.json and quality.md: mean and spread over seeds of the per-task metrics, the
multi-task gain Δ_MTL against the single-task models, parameters and the policy's choice counts.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_result, write_text  # noqa: E402

BUDGETS = ("1.0x", "1.5x", "2.0x")
#: The metrics that enter Δ_MTL, per task kind (the usual ones of the MTL literature; the
#: within-N-degrees percentages of normals are left out, as they can be 0 early on).
DELTA_METRICS = {"segmentation": ("miou", "pixel_acc"), "depth": ("abs_err", "rel_err"),
                 "normal": ("mean_angle", "median_angle"), "classification": ("accuracy",)}

#: The benchmarks. Synthetic scenes are rendered at 64 px: the builtin backbones have stride 32, so
#: at 32 px their feature map is 1x1 and no method learns segmentation beyond the background.
SCENES = dict(data="synthetic", size=64, train=384, val=96, batch=8, steps=(20, 45, 50))
BENCHMARKS = {
    "synthetic/resnet18": dict(SCENES, backbone="resnet18"),
    "synthetic/mobilenet_v2": dict(SCENES, backbone="mobilenet_v2"),
    "multifashion/small_resnet": dict(data="multifashion", backbone="small_resnet", size=36, train=2048, val=512,
                                      batch=32, steps=(40, 90, 80)),
}
QUICK = dict(size=32, train=32, val=16, batch=8, steps=(2, 3, 2))


def tasks_of(data: str):
    from automtl import Task

    if data == "synthetic":
        return [Task("segmentation", "segmentation", classes=4), Task("depth", "depth"), Task("normal", "normal")]
    return [Task("left", "classification", classes=10), Task("right", "classification", classes=10)]


def make_backbone(name: str):
    """Builtin backbones, plus the small ResNet of the MultiFashion benchmark (TinyCNN, width 32)."""
    from automtl.backbones import TinyCNN, build_backbone

    return TinyCNN(width=32) if name == "small_resnet" else build_backbone(name)


def weight_steps(steps) -> int:
    """Weight-training steps of automtl's three stages together (the other methods get as many)."""
    from automtl.convert import DEFAULT_SCHEDULE

    warmup, search_steps, finetune = steps
    r = DEFAULT_SCHEDULE["weight_steps_per_policy_step"]
    return warmup + search_steps * r // (r + 1) + finetune


def run_job(bench: dict, seed: int, method: str, target_params=None, overrides=None) -> dict:
    """Train one method of one benchmark and seed; return its metrics, size and policy."""
    from automtl import Policy, Task, supermodel
    from automtl.config import SearchConfig
    from automtl.convert import DEFAULT_SCHEDULE
    from automtl.data import make_dataset
    from automtl.search import search

    torch.set_num_threads(1)
    started = time.time()
    opts = {"size": bench["size"]} if bench["data"] == "synthetic" else {}
    train = make_dataset(bench["data"], "train", n=bench["train"], seed=seed, **opts)
    val = make_dataset(bench["data"], "val", n=bench["val"], seed=seed, **opts)
    tasks = tasks_of(bench["data"])
    if method.startswith("single:"):
        tasks = [t for t in tasks if t.name == method.split(":", 1)[1]]
    torch.manual_seed(seed)
    sm = supermodel(make_backbone(bench["backbone"]), tasks, torch.randn(1, 3, bench["size"], bench["size"]))
    warmup, search_steps, finetune = bench["steps"]
    base = {**DEFAULT_SCHEDULE, "seed": seed, "batch_size": bench["batch"], "quiet": True, "checkpoint_every": 0,
            "log_every": 50, "val_batches": None, "tau_every": max(1, search_steps // 24), **(overrides or {})}
    search_weights = None
    if method.startswith("automtl@"):
        cfg = SearchConfig(**{**base, "warmup_steps": warmup, "search_steps": search_steps,
                              "finetune_steps": finetune, "budget": method.split("@", 1)[1]})
        found = search(sm, train, val, cfg)
        search_weights = {"metrics": _metrics(found, tasks), "parameters": found.params}
        policy = found.policy
        # The found architecture is then trained from the seed's initial weights like every other method
        # (AutoMTL's protocol: the search's cost is not charged to the architecture it finds).
        torch.manual_seed(seed)
        sm = supermodel(make_backbone(bench["backbone"]), tasks, torch.randn(1, 3, bench["size"], bench["size"]))
    elif method == "random@1.5x":
        policy = random_policy_near(sm, target_params, seed)
    else:
        policy = Policy.uniform(sm.layer_names, sm.task_names, "share")
    cfg = SearchConfig(**{**base, "warmup_steps": 0, "search_steps": 0, "finetune_steps": weight_steps(bench["steps"]),
                          "budget": None})
    result = search(sm, train, val, cfg, policy=policy)
    return {"metrics": _metrics(result, tasks), "parameters": result.params, "policy": result.policy.counts(),
            "policy_file": result.policy.to_dict(), "search_weights": search_weights,
            "seconds": round(time.time() - started, 1)}


def _metrics(result, tasks) -> dict:
    return {t.name: {k: result.metrics[t.name][k] for k in DELTA_METRICS[t.kind]} for t in tasks}


def random_policy_near(sm, target_params: int, seed: int, samples: int = 4):
    """The seeded random policy closest to ``target_params`` over a sweep of choice probabilities.

    The sweep covers the whole simplex in steps of 0.1 (share, specialize, skip), so skip-heavy
    small policies and specialize-heavy large ones are both reachable.
    """
    from automtl import Policy

    best, best_gap, k = None, None, 0
    for i in range(11):
        for j in range(11 - i):
            probs = (i / 10, j / 10, (10 - i - j) / 10)
            for _ in range(samples):
                k += 1
                pol = Policy.random(sm.layer_names, sm.task_names, sm.skip_legal, seed=seed * 100_000 + k, probs=probs)
                gap = abs(sm.policy_parameter_count(pol) - target_params)
                if best_gap is None or gap < best_gap:
                    best, best_gap = pol, gap
    return best


def methods_of(bench: dict) -> list[str]:
    singles = [f"single:{t.name}" for t in tasks_of(bench["data"])]
    return singles + ["hard-sharing"] + [f"automtl@{b}" for b in BUDGETS]


def summarize(bench: dict, seeds, done: dict) -> dict:
    """Per seed: Δ_MTL of every method against that seed's single-task models; then mean and
    (population) standard deviation over the seeds where the method finished."""
    from automtl.errors import ConfigError
    from automtl.metrics import delta_mtl

    def gain(metrics, single):
        try:
            return delta_mtl(metrics, single)
        except ConfigError:  # a zero baseline (a --quick run's untrained classifier): no ratio exists
            return None

    names = (["single-task", "hard-sharing"] + [f"automtl@{b}" for b in BUDGETS] + ["random@1.5x"]
             + [f"automtl@{b} search weights" for b in BUDGETS])
    per_seed = {}
    for seed in seeds:
        singles = [done.get(f"single:{t.name}/{seed}") for t in tasks_of(bench["data"])]
        if any(s is None for s in singles):
            continue
        single = {k: v for s in singles for k, v in s["metrics"].items()}
        row = {"single-task": {"metrics": single, "parameters": sum(s["parameters"] for s in singles),
                               "delta_mtl": 0.0, "policy": None}}
        for name in names[1:]:
            r = done.get(f"{name.split()[0]}/{seed}")
            if r is not None and name.endswith("search weights"):
                r = {**r, **r["search_weights"]} if r.get("search_weights") else None
            if r is not None:
                row[name] = {**r, "delta_mtl": gain(r["metrics"], single)}
        per_seed[seed] = row
    summary = {}
    for name in names:
        rows = [r[name] for r in per_seed.values() if name in r]
        if not rows:
            continue
        deltas = [r["delta_mtl"] for r in rows if r["delta_mtl"] is not None]
        metrics = {}
        for task, values in rows[0]["metrics"].items():
            for metric in values:
                xs = [r["metrics"][task][metric] for r in rows]
                metrics[f"{task}/{metric}"] = {"mean": statistics.fmean(xs), "std": statistics.pstdev(xs)}
        policies = [r["policy"] for r in rows if r.get("policy")]
        summary[name] = {"seeds": len(rows), "delta_mtl": {"mean": statistics.fmean(deltas), "std": statistics.pstdev(deltas)} if deltas else None,
                         "parameters": statistics.fmean(r["parameters"] for r in rows), "metrics": metrics,
                         "policy": {c: statistics.fmean(p[c] for p in policies) for c in policies[0]} if policies else None}
    return {"per_seed": per_seed, "summary": summary}


def markdown(results: dict) -> str:
    lines = []
    for key, res in results.items():
        b, summary = res["benchmark"], res["summary"]
        if not summary:
            continue
        lines.append(f"#### {key} ({b['size']}x{b['size']} px, steps {'/'.join(map(str, b['steps']))}, "
                     f"batch {b['batch']}, seeds: {len(res['per_seed'])})\n")
        metric_names = list(next(iter(summary.values()))["metrics"])
        lines.append("| method | Δ_MTL % | params (M) | share/spec/skip | " + " | ".join(metric_names) + " |")
        lines.append("|---|---:|---:|---:|" + "---:|" * len(metric_names))
        for name, s in summary.items():
            pol = "/".join(f"{s['policy'][c]:.0f}" for c in ("share", "specialize", "skip")) if s["policy"] else "-"
            cells = [f"{s['metrics'][k]['mean']:.3g} ± {s['metrics'][k]['std']:.2g}" for k in metric_names]
            gain = f"{s['delta_mtl']['mean']:+.2f} ± {s['delta_mtl']['std']:.2f}" if s["delta_mtl"] else "n/a"
            lines.append(f"| {name} | {gain} | "
                         f"{s['parameters'] / 1e6:.2f} | {pol} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def save_found_policies(benches: dict, done: dict, seed: int) -> None:
    """automtl@1.5x's policy of the first seed per synthetic-scene backbone, for inference.py to time."""
    from automtl import Policy

    for key, bench in benches.items():
        job = done[key].get(f"automtl@1.5x/{seed}")
        if bench["data"] == "synthetic" and job is not None:
            Policy.from_dict(job["policy_file"]).save(RESULTS / "found_policies" / f"{bench['backbone']}.yaml")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, tiny data and steps: checks that the script runs")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (one thread each)")
    ap.add_argument("--only", help="comma-separated benchmark names (e.g. synthetic/resnet18) or backbones")
    ap.add_argument("--resume", action="store_true", help="keep the finished jobs of the output JSON and run the rest")
    ap.add_argument("--out", type=Path, default=RESULTS, help="directory for quality.json and quality.md")
    args = ap.parse_args(argv)
    seeds = [0] if args.quick else list(range(args.seeds))
    wanted = args.only.split(",") if args.only else None
    benches = {k: dict(b, **{q: v for q, v in QUICK.items() if q != "size" or b["data"] == "synthetic"}) if args.quick else dict(b)
               for k, b in BENCHMARKS.items()
               if not wanted or k in wanted or b["backbone"] in wanted}
    if not benches:
        ap.error(f"--only {args.only!r} matches no benchmark; choose from {', '.join(BENCHMARKS)}")
    out_json = args.out / "quality.json"
    done: dict = {k: {} for k in benches}
    if args.resume and out_json.exists():
        for k, res in json.loads(out_json.read_text()).get("jobs", {}).items():
            if k in done:
                done[k] = res
    started = time.time()

    def save(complete: bool) -> str:
        """Rewrite quality.json and quality.md from the jobs done so far; return the markdown."""
        results = {k: {"benchmark": benches[k], **summarize(benches[k], seeds, done[k])} for k in benches}
        payload = {"complete": complete, "seeds": seeds, "quick": args.quick, "seconds": round(time.time() - started, 1),
                   "results": results, "jobs": done}
        write_result("quality", payload, out_json)
        table = markdown(results)
        write_text(args.out / "quality.md", table)
        return table

    queue = [(k, seed, m) for seed in seeds for k in benches for m in methods_of(benches[k]) if f"{m}/{seed}" not in done[k]]
    waiting = [(k, seed) for seed in seeds for k in benches if f"random@1.5x/{seed}" not in done[k]]
    total = len(queue) + len(waiting)
    finished = 0
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        running = {pool.submit(run_job, benches[k], seed, m): (k, seed, m) for k, seed, m in queue}

        def submit_ready_controls():
            for k, seed in list(waiting):
                target = done[k].get(f"automtl@1.5x/{seed}")
                if target is not None:
                    waiting.remove((k, seed))
                    fut = pool.submit(run_job, benches[k], seed, "random@1.5x", target["parameters"])
                    running[fut] = (k, seed, "random@1.5x")

        submit_ready_controls()
        while running:
            ready, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in ready:
                k, seed, m = running.pop(fut)
                done[k][f"{m}/{seed}"] = fut.result()
                finished += 1
                print(f"[{finished}/{total} {time.time() - started:.0f} s] {k} seed {seed} {m}: "
                      f"{done[k][f'{m}/{seed}']['seconds']:.0f} s", flush=True)
            submit_ready_controls()
            save(complete=False)
    table = save(complete=True)
    if not args.quick and args.out == RESULTS:
        save_found_policies(benches, done, seeds[0])
    print(table)
    print(f"wrote {out_json} in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
