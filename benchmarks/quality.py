"""Quality of automtl at equal compute: against single-task models, hard sharing and a random control.

    python benchmarks/quality.py                  # the full run: 3 benchmarks x 3 seeds, 2 workers
    python benchmarks/quality.py --resume         # go on after an interrupted run
    python benchmarks/quality.py --only small_resnet --seeds 3   # MultiFashion alone (~10 min)
    python benchmarks/quality.py --seed-base 100 --only small_resnet --out /tmp/tune   # tuning seeds
    python benchmarks/quality.py --quick --out /tmp/q   # a smoke run: 1 seed, tiny data and steps

**Equal compute.** Every method of a benchmark gets the same training cost ``C``, counted in
backbone forward+backward equivalents (FBE: one step of the hard-sharing model, one backbone pass
and T heads). Each strategy's stage lengths are set from ``C`` with the measured cost of its steps
(``automtl.protocol.step_cost``: e.g. a gumbel search step runs one sampled path per task, what tasks
share computed once, about 1.5 FBE; AutoMTL's all-operator mix would cost about 4.2; a conflict search
step measures the per-task gradients once every 4 steps, each time T - 1 extra backwards, about
0.8 FBE each, until its futility stop, whose unspent FBE go to its fine-tune); every job also reports the
CPU seconds it took, and the summary its measured cost in FBE (CPU seconds / the CPU seconds per step
of the same seed's ``hard-sharing (cosine over C)`` run, which has no validation passes), so the match
can be checked (rows with curves also pay for their validations):
  single-task      one model per task trained for C steps (a generous reference: T x C in all);
  hard-sharing     the all-share policy trained for C steps, the learning rate constant and then annealed
                   over the same last part of C as convert's fine-tune (the same schedule shape);
  hard-sharing (cosine over C)   the same, annealed over all of C (the common recipe: secondary);
  S@B              what ``automtl convert`` delivers with strategy S and budget B: its search and its
                   own fine-tune, total cost C (the primary row; every fine-tune here counts its steps in
                   hard-sharing steps of MACs, ``finetune_unit: compute``, so a branched architecture
                   trains fewer steps and a skipping one more);
  S@B retrained    the architecture S@B found, trained from the seed's initial weights for C FBE
                   (AutoMTL's protocol; the search is not charged to it: secondary);
  random@1.5x      a random policy with the parameter count nearest the default strategy's 1.5x
                   architecture, trained for C FBE with hard sharing's schedule shape (the control
                   that shows the search matters).
Validation curves (every C/8 steps) are kept for single-task and the primary hard sharing, to show how
close to converged they are. The runs are independent jobs spread over ``--jobs`` worker processes of one
thread each; the JSON is rewritten after every job, and ``--resume`` goes on. Writes quality.json
and quality.md. Benchmark seeds are 0, 1, 2; calibration used seeds from 100 on (``--seed-base``).
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
# The cost of a step in FBE (step_cost) and the metrics of Δ_MTL (DELTA_METRICS): automtl/protocol.py.
from automtl.protocol import DELTA_METRICS, finetune_share, step_cost  # noqa: E402

STRATEGIES = ("conflict", "gumbel")
BUDGETS = ("1.5x", "2.0x")
DEFAULT_STRATEGY = "conflict"  # the strategy whose 1.5x architecture the random control matches

#: The benchmarks; ``cost`` is C in FBE. Synthetic scenes are rendered at 64 px: the builtin backbones
#: have stride 32, so at 32 px their feature map is 1x1 and no method learns segmentation.
SCENES = dict(data="synthetic", size=64, train=384, val=96, batch=8, cost=360)
BENCHMARKS = {
    "synthetic/resnet18": dict(SCENES, backbone="resnet18"),
    "synthetic/mobilenet_v2": dict(SCENES, backbone="mobilenet_v2"),
    "multifashion/small_resnet": dict(data="multifashion", backbone="small_resnet", size=36, train=2048, val=512,
                                      batch=32, cost=1200),
}
QUICK = dict(size=32, train=32, val=16, batch=8, cost=12)

#: How each strategy spends C: the share of C in warm-up and search (the rest is fine-tune).
SPLIT = {"gumbel": {"warmup": 0.25, "search": 0.45}, "conflict": {"warmup": 0.3, "search": 0.3}}
CONFLICT_EVERY = 4  # conflict: search steps per gradient measurement (SearchConfig's default)
#: Hard sharing with the learning rate decaying over all of C (the primary row decays over the same last
#: part of C as the default strategy's fine-tune: the same schedule shape as what convert delivers).
HARD_COSINE = "hard-sharing (cosine over C)"


def decay_fraction(bench: dict) -> float:
    """The share of C over which a convert run of the default strategy anneals its learning rate (its
    fine-tune; constant before): the baselines that compare with it get the same schedule shape."""
    T = len(tasks_of(bench["data"]))
    return finetune_share(DEFAULT_STRATEGY, *schedule(DEFAULT_STRATEGY, bench["cost"], T), T, CONFLICT_EVERY)


def schedule(strategy: str, cost: int, num_tasks: int) -> tuple[int, int, int]:
    """Warm-up, search and fine-tune steps of ``strategy`` whose cost is ``cost`` FBE."""
    c, split = step_cost(strategy, num_tasks, CONFLICT_EVERY), SPLIT[strategy]
    warmup = max(1, round(split["warmup"] * cost / c["warmup"]))
    search = max(1, round(split["search"] * cost / c["search"]))
    finetune = max(1, round((cost - warmup * c["warmup"] - search * c["search"]) / c["finetune"]))
    return warmup, search, finetune


def tasks_of(data: str):
    from automtl import Task

    if data == "synthetic":
        return [Task("segmentation", "segmentation", classes=4), Task("depth", "depth"), Task("normal", "normal")]
    return [Task("left", "classification", classes=10), Task("right", "classification", classes=10)]


def make_backbone(name: str):
    """Builtin backbones, plus the small ResNet of the MultiFashion benchmark (TinyCNN, width 32)."""
    from automtl.backbones import TinyCNN, build_backbone

    return TinyCNN(width=32) if name == "small_resnet" else build_backbone(name)


def bench_data(bench: dict, seed: int) -> tuple:
    """``(train, val, tasks)`` of a benchmark's seed: its data sets, made from the seed, and its tasks."""
    from automtl.data import make_dataset

    opts = {"size": bench["size"]} if bench["data"] == "synthetic" else {}
    train = make_dataset(bench["data"], "train", n=bench["train"], seed=seed, **opts)
    val = make_dataset(bench["data"], "val", n=bench["val"], seed=seed, **opts)
    return train, val, tasks_of(bench["data"])


def run_job(bench: dict, seed: int, method: str, target_params=None, policy_dict=None) -> dict:
    """Train one method of one benchmark and seed; return its metrics, size, policy and CPU seconds."""
    from automtl import Policy, supermodel
    from automtl.config import SearchConfig
    from automtl.convert import DEFAULT_SCHEDULE
    from automtl.search import search

    torch.set_num_threads(1)
    started, cpu0 = time.time(), time.process_time()
    train, val, tasks = bench_data(bench, seed)
    if method.startswith("single:"):
        tasks = [t for t in tasks if t.name == method.split(":", 1)[1]]
    torch.manual_seed(seed)
    sm = supermodel(make_backbone(bench["backbone"]), tasks, torch.randn(1, 3, bench["size"], bench["size"]))
    C = bench["cost"]
    base = {**DEFAULT_SCHEDULE, "seed": seed, "batch_size": bench["batch"], "quiet": True, "checkpoint_every": 0,
            "log_every": 50, "val_batches": None, "finetune_unit": "compute", **bench.get("overrides", {})}
    out: dict = {}
    if "@" in method and not method.endswith("retrained") and not method.startswith("random"):
        strategy, budget = method.split("@")
        warmup, search_steps, finetune = schedule(strategy, C, len(tasks))
        cfg = SearchConfig(**{**base, **bench.get(strategy, {}), "strategy": strategy, "warmup_steps": warmup,
                              "search_steps": search_steps, "finetune_steps": finetune, "budget": budget, "conflict_every": CONFLICT_EVERY,
                              "tau_every": max(1, search_steps // 24)})
        found = search(sm, train, val, cfg)
        out = {"metrics": _metrics(found, tasks), "parameters": found.params, "policy": found.policy.counts(),
               "policy_file": found.policy.to_dict(), "steps": [warmup, search_steps, found.steps["finetune"]]}
    else:
        if method.endswith("retrained"):
            policy = Policy.from_dict(policy_dict)
        elif method == "random@1.5x":
            policy = random_policy_near(sm, target_params, seed)
        else:
            policy = Policy.uniform(sm.layer_names, sm.task_names, "share")
        # curves for the single-task models and hard sharing; the secondary hard-sharing row trains without
        # validation passes, so its CPU seconds per step are the unit of the cost column
        curve = method.startswith("single:") or method == "hard-sharing"
        shape = decay_fraction(bench) if method in ("hard-sharing", "random@1.5x") else 1.0
        cfg = SearchConfig(**{**base, "warmup_steps": 0, "search_steps": 0, "finetune_steps": C, "budget": None,
                              "val_every": max(1, C // 8) if curve else 0, "finetune_decay_fraction": shape})
        cpu_steps = time.process_time()
        result = search(sm, train, val, cfg, policy=policy)
        out = {"metrics": _metrics(result, tasks), "parameters": result.params, "policy": result.policy.counts(),
               "policy_file": result.policy.to_dict(), "steps": [0, 0, result.steps["finetune"]],
               "cpu_per_step": (time.process_time() - cpu_steps) / result.steps["finetune"]}
        if curve:
            out["curve"] = [{"step": h["step"], "metrics": _metrics_of(h["metrics"], tasks)}
                            for h in result.history if h.get("stage") == "val"]
    out.update(cpu_seconds=round(time.process_time() - cpu0, 2), seconds=round(time.time() - started, 1))
    return out


def _metrics_of(metrics: dict, tasks) -> dict:
    return {t.name: {k: metrics[t.name][k] for k in DELTA_METRICS[t.kind]} for t in tasks}


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


def methods_of(bench: dict, rows=None) -> list[str]:
    """The jobs that need nothing else; retrained rows and the random control wait for their search.
    ``rows`` (row names, with what they need: :func:`with_inputs`) keeps only those, besides the single-task
    models, ``hard-sharing (cosine over C)`` and ``hard-sharing``, which every Δ_MTL, cost in FBE and paired
    difference needs."""
    singles = [f"single:{t.name}" for t in tasks_of(bench["data"])]
    searches = [f"{s}@{b}" for s in STRATEGIES for b in BUDGETS]
    return singles + [HARD_COSINE, "hard-sharing"] + [m for m in searches if rows is None or m in rows]


def input_row(row: str):
    """The row whose result ``row`` starts from (a retrained row its search, the random control the
    default strategy's 1.5x search), or None."""
    if row.endswith(" retrained"):
        return row.removesuffix(" retrained")
    return f"{DEFAULT_STRATEGY}@1.5x" if row == "random@1.5x" else None


def with_inputs(rows: list) -> list:
    """``rows`` and the rows whose results they start from."""
    need = set(rows) | {input_row(r) for r in rows}
    return [r for r in row_names() if r in need]


def dependents(done: dict, seed: int, rows=None) -> list:
    """(method, args) of the jobs whose inputs are now in ``done`` for this seed (only ``rows``, if given)."""
    jobs = []
    for row in row_names():
        source = input_row(row)
        found = done.get(f"{source}/{seed}") if source and (rows is None or row in rows) else None
        if found is not None:
            jobs.append((row, dict(policy_dict=found["policy_file"]) if row.endswith(" retrained")
                         else dict(target_params=found["parameters"])))
    return jobs


def row_names() -> list[str]:
    return (["single-task", "hard-sharing", HARD_COSINE] + [f"{s}@{b}" for s in STRATEGIES for b in BUDGETS] + ["random@1.5x"]
            + [f"{s}@{b} retrained" for s in STRATEGIES for b in BUDGETS])


def summarize(bench: dict, seeds, done: dict) -> dict:
    """Per seed: Δ_MTL of every method against that seed's single-task models and its cost in FBE (CPU
    seconds / the CPU seconds per step of the seed's hard sharing without validation passes); then mean and (population) standard
    deviation over the seeds where the method finished, and the paired difference from hard sharing (Δ_MTL of the row minus
    that of the same seed's hard sharing: mean and its standard error over seeds)."""
    from automtl.errors import ConfigError
    from automtl.metrics import delta_mtl

    def gain(metrics, single):
        try:
            return delta_mtl(metrics, single)
        except ConfigError:  # a zero baseline (a --quick run's untrained classifier): no ratio exists
            return None

    names = row_names()
    per_seed = {}
    for seed in seeds:
        singles = [done.get(f"single:{t.name}/{seed}") for t in tasks_of(bench["data"])]
        hard = done.get(f"{HARD_COSINE}/{seed}")
        if any(s is None for s in singles) or hard is None:
            continue
        unit = hard["cpu_per_step"]  # one hard-sharing step, no validation passes: 1 FBE
        single = {k: v for s in singles for k, v in s["metrics"].items()}
        row = {"single-task": {"metrics": single, "parameters": sum(s["parameters"] for s in singles),
                               "delta_mtl": 0.0, "policy": None, "fbe": sum(s["cpu_seconds"] for s in singles) / unit,
                               "seconds": sum(s["seconds"] for s in singles),
                               "curves": {s_: done[f"single:{s_}/{seed}"].get("curve") for s_ in
                                          [t.name for t in tasks_of(bench["data"])]}}}
        for name in names[1:]:
            r = done.get(f"{name}/{seed}")
            if r is not None:
                row[name] = {**r, "delta_mtl": gain(r["metrics"], single), "fbe": r["cpu_seconds"] / unit}
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
        paired = {seed: r[name]["delta_mtl"] - r["hard-sharing"]["delta_mtl"] for seed, r in per_seed.items()
                  if name in r and "hard-sharing" in r and r[name]["delta_mtl"] is not None
                  and r["hard-sharing"]["delta_mtl"] is not None} if name not in ("single-task", "hard-sharing") else {}
        vs_hard = {"mean": statistics.fmean(paired.values()), "per_seed": paired, "seeds": len(paired),
                   "se": statistics.stdev(paired.values()) / len(paired) ** 0.5 if len(paired) > 1 else None} if paired else None
        summary[name] = {"seeds": len(rows), "delta_mtl": {"mean": statistics.fmean(deltas), "std": statistics.pstdev(deltas)} if deltas else None,
                         "vs_hard_sharing": vs_hard,
                         "parameters": statistics.fmean(r["parameters"] for r in rows), "metrics": metrics,
                         "fbe": statistics.fmean(r["fbe"] for r in rows),
                         "seconds": statistics.fmean(r["seconds"] for r in rows),
                         "policy": {c: statistics.fmean(p[c] for p in policies) for c in policies[0]} if policies else None}
    return {"per_seed": per_seed, "summary": summary}


def markdown(results: dict) -> str:
    lines = []
    for key, res in results.items():
        b, summary = res["benchmark"], res["summary"]
        if not summary:
            continue
        lines.append(f"#### {key} ({b['size']}x{b['size']} px, C = {b['cost']} FBE, batch {b['batch']}, "
                     f"seeds: {len(res['per_seed'])})\n")
        metric_names = list(next(iter(summary.values()))["metrics"])
        lines.append("| method | Δ_MTL % (mean ± std) | − hard sharing (paired: mean ± s.e., seeds) | cost (FBE) | wall (s) | params (M) | share/spec/skip | "
                     + " | ".join(metric_names) + " |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(metric_names))
        for name, s in summary.items():
            pol = "/".join(f"{s['policy'][c]:.0f}" for c in ("share", "specialize", "skip")) if s["policy"] else "-"
            cells = [f"{s['metrics'][k]['mean']:.3g} ± {s['metrics'][k]['std']:.2g}" for k in metric_names]
            gain = f"{s['delta_mtl']['mean']:+.2f} ± {s['delta_mtl']['std']:.2f}" if s["delta_mtl"] else "n/a"
            vs = s.get("vs_hard_sharing")
            paired = "-" if not vs else (f"{vs['mean']:+.2f}" + (f" ± {vs['se']:.2f}" if vs["se"] is not None else "")
                                         + f" ({len(vs['per_seed'])})")
            lines.append(f"| {name} | {gain} | {paired} | {s['fbe']:.0f} | {s['seconds']:.0f} | "
                         f"{s['parameters'] / 1e6:.2f} | {pol} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def save_found_policies(benches: dict, done: dict, seed: int) -> None:
    """The default strategy's 1.5x policy of the first seed per synthetic-scene backbone, for inference.py."""
    from automtl import Policy

    for key, bench in benches.items():
        job = done[key].get(f"{DEFAULT_STRATEGY}@1.5x/{seed}")
        if bench["data"] == "synthetic" and job is not None:
            Policy.from_dict(job["policy_file"]).save(RESULTS / "found_policies" / f"{bench['backbone']}.yaml")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, tiny data and steps: checks that the script runs")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed-base", type=int, default=0, help="first seed (benchmark: 0; calibration used 100 on)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (one thread each)")
    ap.add_argument("--only", help="comma-separated benchmark names (e.g. synthetic/resnet18) or backbones")
    ap.add_argument("--rows", help="comma-separated rows to run (e.g. conflict@1.5x), with the rows they start from; the "
                                   f"single-task models, {HARD_COSINE!r} and hard-sharing always run: every Δ_MTL, cost "
                                   "and paired difference needs them")
    ap.add_argument("--resume", action="store_true", help="keep the finished jobs of the output JSON and run the rest")
    ap.add_argument("--rerun", help="with --resume: comma-separated benchmarks whose finished jobs are dropped and run "
                                    "again, all rows (after a change that moves their results); the others' are kept")
    ap.add_argument("--out", type=Path, default=RESULTS, help="directory for quality.json and quality.md")
    args = ap.parse_args(argv)
    seeds = [args.seed_base] if args.quick else list(range(args.seed_base, args.seed_base + args.seeds))
    wanted = args.only.split(",") if args.only else None
    benches = {k: dict(b, **{q: v for q, v in QUICK.items() if q != "size" or b["data"] == "synthetic"}) if args.quick else dict(b)
               for k, b in BENCHMARKS.items()
               if not wanted or k in wanted or b["backbone"] in wanted}
    rows = [r.strip() for r in args.rows.split(",") if r.strip()] if args.rows else None
    if rows is not None and set(rows) - set(row_names()):
        ap.error(f"--rows: no row named {', '.join(sorted(set(rows) - set(row_names())))}; choose from {', '.join(row_names())}")
    if rows is not None and args.out == RESULTS and not args.resume:
        ap.error("--rows runs part of the benchmark: write it elsewhere (--out DIR) or add it to the results (--resume)")
    rows = with_inputs(rows) if rows is not None else None
    rerun = [r.strip() for r in args.rerun.split(",") if r.strip()] if args.rerun else []
    if rerun and not args.resume:
        ap.error("--rerun drops finished jobs of a --resume: add --resume (without it every job runs anyway)")
    if set(rerun) - set(BENCHMARKS):
        ap.error(f"--rerun: no benchmark named {', '.join(sorted(set(rerun) - set(BENCHMARKS)))}; choose from {', '.join(BENCHMARKS)}")
    if not benches:
        ap.error(f"--only {args.only!r} matches no benchmark; choose from {', '.join(BENCHMARKS)}")
    out_json = args.out / "quality.json"
    done: dict = {k: {} for k in benches}
    earlier = 0.0  # seconds of the runs a --resume goes on from
    if args.resume and out_json.exists():
        old = json.loads(out_json.read_text())
        earlier = float(old.get("seconds", 0.0))
        for k, res in old.get("jobs", {}).items():
            if k in done and k not in rerun:
                done[k] = res
    started = time.time()

    def save(complete: bool) -> str:
        """Rewrite quality.json and quality.md from the jobs done so far; return the markdown."""
        results = {k: {"benchmark": benches[k], "schedules": {s: schedule(s, benches[k]["cost"], len(tasks_of(benches[k]["data"])))
                                                               for s in STRATEGIES},
                       **summarize(benches[k], seeds, done[k])} for k in benches}
        payload = {"complete": complete, "seeds": seeds, "quick": args.quick, "seconds": round(earlier + time.time() - started, 1),
                   "results": results, "jobs": done}
        write_result("quality", payload, out_json)
        table = markdown(results)
        write_text(args.out / "quality.md", table)
        return table

    queue = [(k, seed, m) for seed in seeds for k in benches for m in methods_of(benches[k], rows) if f"{m}/{seed}" not in done[k]]
    submitted = {(k, seed, m) for k, seed, m in queue} | {(k, int(j.rsplit("/", 1)[1]), j.rsplit("/", 1)[0])
                                                         for k in benches for j in done[k]}
    finished = 0
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        running = {pool.submit(run_job, benches[k], seed, m): (k, seed, m) for k, seed, m in queue}

        def submit_ready():
            for k in benches:
                for seed in seeds:
                    for m, kwargs in dependents(done[k], seed, rows):
                        if (k, seed, m) not in submitted:
                            submitted.add((k, seed, m))
                            running[pool.submit(run_job, benches[k], seed, m, **kwargs)] = (k, seed, m)

        submit_ready()
        while running:
            ready, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in ready:
                k, seed, m = running.pop(fut)
                done[k][f"{m}/{seed}"] = fut.result()
                finished += 1
                print(f"[{finished} done, {len(running)} running, {time.time() - started:.0f} s] {k} seed {seed} {m}: "
                      f"{done[k][f'{m}/{seed}']['seconds']:.0f} s", flush=True)
            submit_ready()
            save(complete=False)
    table = save(complete=True)
    if not args.quick and args.out == RESULTS:
        save_found_policies(benches, done, seeds[0])
    print(table)
    print(f"wrote {out_json} in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
