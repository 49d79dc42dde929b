"""What the conflict strategy's gradient measurements cost where it keeps every layer shared.

    python benchmarks/measurement_cost.py                       # MobileNetV2 scenes, seeds 0-9, 2 workers
    python benchmarks/measurement_cost.py --only resnet18 --seeds 3
    python benchmarks/measurement_cost.py --quick --seeds 1 --singles DIR/quality.json --out DIR/mc.json   # a smoke run

Where the conflict search finds no significant conflict, ``automtl convert`` delivers the hard-sharing
architecture, trained for fewer steps than hard sharing gets for the same compute: each measurement
costs T - 1 extra backwards (``automtl.protocol.measure_cost``). This script tests that explanation of
``benchmarks/quality.py``'s MobileNetV2 row. Per seed it trains, with the quality benchmark's data,
config and cost C:

  conflict@1.5x           what convert delivers (the quality benchmark's primary row);
  hard-sharing            the all-share policy for C steps, annealed over conflict's nominal fine-tune
                          share (the quality benchmark's baseline);
  hard-sharing@conflict   the all-share policy for exactly as many steps as that seed's conflict run took
                          (warm-up + search + fine-tune), annealed over the same last steps as it (its nominal
                          fine-tune: a futility stop's unspent compute trains at the constant rate before).

If the explanation holds, conflict@1.5x - hard-sharing@conflict is about 0 (the same training: a measured
step takes the same optimizer step as a plain one) and hard-sharing@conflict - hard-sharing is the price
of the measurements. Δ_MTL is taken against the single-task models of ``--singles`` (the quality
benchmark's 10-seed run by default). Writes measurement_cost.json (per seed, and paired means with
standard errors over seeds).
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
from common import RESULTS, write_result  # noqa: E402
from quality import BENCHMARKS, QUICK, _metrics, bench_data, make_backbone, run_job, schedule, tasks_of  # noqa: E402

ROWS = ("conflict@1.5x", "hard-sharing", "hard-sharing@conflict")


def hard_sharing_for(bench: dict, seed: int, steps: list, anneal: int) -> dict:
    """The all-share policy trained for ``sum(steps)`` steps (a conflict run's warm-up, search and fine-tune),
    annealed over the last ``anneal``; the quality benchmark's data and config otherwise."""
    from automtl import Policy, supermodel
    from automtl.config import SearchConfig
    from automtl.convert import DEFAULT_SCHEDULE
    from automtl.search import search

    torch.set_num_threads(1)
    started, cpu0 = time.time(), time.process_time()
    train, val, tasks = bench_data(bench, seed)
    torch.manual_seed(seed)
    sm = supermodel(make_backbone(bench["backbone"]), tasks, torch.randn(1, 3, bench["size"], bench["size"]))
    total = sum(steps)
    cfg = SearchConfig(**{**DEFAULT_SCHEDULE, "seed": seed, "batch_size": bench["batch"], "quiet": True,
                          "checkpoint_every": 0, "log_every": 50, "val_batches": None, "finetune_unit": "compute",
                          **bench.get("overrides", {}), "warmup_steps": 0, "search_steps": 0, "finetune_steps": total,
                          "budget": None, "val_every": 0, "finetune_decay_fraction": anneal / total})
    result = search(sm, train, val, cfg, policy=Policy.uniform(sm.layer_names, sm.task_names, "share"))
    return {"metrics": _metrics(result, tasks), "steps": [0, 0, result.steps["finetune"]],
            "decay_fraction": anneal / total, "cpu_seconds": round(time.process_time() - cpu0, 2),
            "seconds": round(time.time() - started, 1)}


def paired(per_seed: dict, a: str, b: str) -> dict:
    """Mean and standard error over seeds of Δ_MTL(a) - Δ_MTL(b), with the per-seed values."""
    diffs = {s: r[a]["delta_mtl"] - r[b]["delta_mtl"] for s, r in per_seed.items() if a in r and b in r}
    if not diffs:
        return {"seeds": 0}
    se = statistics.stdev(diffs.values()) / len(diffs) ** 0.5 if len(diffs) > 1 else None
    return {"mean": statistics.fmean(diffs.values()), "se": se, "seeds": len(diffs), "per_seed": diffs}


def summarize(bench: dict, seeds: list, done: dict, singles: dict) -> dict:
    from automtl.metrics import delta_mtl

    per_seed = {}
    for seed in seeds:
        single = {}
        for t in tasks_of(bench["data"]):
            job = singles.get(f"single:{t.name}/{seed}")
            if job is None:
                break
            single.update(job["metrics"])
        else:
            per_seed[seed] = {row: {"delta_mtl": delta_mtl(done[f"{row}/{seed}"]["metrics"], single),
                                    "steps": done[f"{row}/{seed}"]["steps"]}
                              for row in ROWS if f"{row}/{seed}" in done}
    return {"per_seed": per_seed,
            "conflict - hard-sharing@conflict": paired(per_seed, "conflict@1.5x", "hard-sharing@conflict"),
            "hard-sharing@conflict - hard-sharing": paired(per_seed, "hard-sharing@conflict", "hard-sharing"),
            "conflict - hard-sharing": paired(per_seed, "conflict@1.5x", "hard-sharing")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="mobilenet_v2", help="the scenes benchmark's backbone: mobilenet_v2 or resnet18")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=2, help="worker processes, one thread each")
    ap.add_argument("--singles", type=Path, default=RESULTS / "quality_10seeds" / "quality.json",
                    help="a quality.json whose single-task jobs give the Δ_MTL baselines of these seeds")
    ap.add_argument("--out", type=Path, default=RESULTS / "measurement_cost.json")
    ap.add_argument("--quick", action="store_true", help="the quality benchmark's --quick sizes (tiny data and steps); "
                                                         "--singles must then be a --quick quality.json")
    ap.add_argument("--reuse", type=Path, help="an earlier measurement_cost.json whose conflict@1.5x and hard-sharing "
                                               "jobs are kept (hard-sharing@conflict runs again)")
    args = ap.parse_args(argv)
    key = f"synthetic/{args.only}"
    if key not in BENCHMARKS:
        ap.error(f"--only {args.only!r}: choose mobilenet_v2 or resnet18")
    bench, seeds = dict(BENCHMARKS[key], **(QUICK if args.quick else {})), list(range(args.seeds))
    singles = json.loads(args.singles.read_text())["jobs"].get(key, {})
    missing = [s for s in seeds if any(f"single:{t.name}/{s}" not in singles for t in tasks_of(bench["data"]))]
    if missing:
        ap.error(f"{args.singles} lacks {key}'s single-task models for seed(s) {missing}; run benchmarks/quality.py "
                 f"--only {args.only} --seeds {args.seeds} --rows single-task --out DIR and pass --singles DIR/quality.json")
    kept = json.loads(args.reuse.read_text())["jobs"] if args.reuse else {}
    done: dict = {k: v for k, v in kept.items() if k.split("/")[0] in ROWS[:2] and int(k.split("/")[1]) in seeds}
    anneal = schedule("conflict", bench["cost"], len(tasks_of(bench["data"])))[2]  # the all-share fine-tune's anneal
    started = time.time()
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        running = {pool.submit(run_job, bench, s, row): (s, row) for s in seeds for row in ROWS[:2] if f"{row}/{s}" not in done}
        running.update({pool.submit(hard_sharing_for, bench, s, done[f"conflict@1.5x/{s}"]["steps"], anneal):
                        (s, "hard-sharing@conflict") for s in seeds if f"conflict@1.5x/{s}" in done})
        while running:
            ready, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in ready:
                seed, row = running.pop(fut)
                done[f"{row}/{seed}"] = fut.result()
                print(f"[{len(done)}/{len(seeds) * len(ROWS)}, {time.time() - started:.0f} s] seed {seed} {row}", flush=True)
                if row == "conflict@1.5x":
                    steps = done[f"{row}/{seed}"]["steps"]
                    running[pool.submit(hard_sharing_for, bench, seed, steps, anneal)] = (seed, "hard-sharing@conflict")
    payload = {"bench": key, "seeds": seeds, "singles": str(args.singles), "seconds": round(time.time() - started, 1),
               **summarize(bench, seeds, done, singles), "jobs": done}
    write_result("measurement_cost", payload, args.out)
    for name in ("conflict - hard-sharing@conflict", "hard-sharing@conflict - hard-sharing", "conflict - hard-sharing"):
        p = payload[name]
        se = f" ± {p['se']:.2f} s.e." if p.get("se") is not None else ""
        print(f"{name}: {p.get('mean', float('nan')):+.2f}{se} Δ_MTL points ({p['seeds']} seeds)")
    print(f"wrote {args.out} in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
