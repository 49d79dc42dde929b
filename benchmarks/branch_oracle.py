"""Hand-picked branched architectures at equal compute: is there a branching the search should have found?

    python benchmarks/branch_oracle.py                       # MobileNetV2 scenes, seeds 0-2, 2 workers
    python benchmarks/branch_oracle.py --bench synthetic/resnet18
    python benchmarks/branch_oracle.py --only "depth owns features.18"   # all-share always runs too

On the MobileNetV2 scenes ``conflict`` finds no significant gradient conflict and delivers the all-share
architecture, so what ``convert`` delivers there is hard sharing less the price of its evidence. Whether
that is the right decision is a question about architectures, not about the search: would any branched
architecture within the 1.5x budget have done better at the same compute? This trains a few that a
practitioner would try first (the task that loses most to sharing, segmentation, given its own deepest
layers; every task its own last convolution) and the one conflict's evidence points to (depth, whose gradient
agrees least with the others' at the last convolution, given its own last layers), each exactly as the quality benchmark trains a retrained row
(``quality.run_job``: from the seed's initial weights, C FBE counted in hard-sharing steps of compute, the
learning rate annealed over all of C), beside the all-share policy trained the same way, which must
reproduce the benchmark's ``hard-sharing (cosine over C)`` row bitwise (the check that the comparison is
like for like). Δ_MTL is against that seed's single-task rows in ``quality.json``; the paired difference
is each architecture's Δ_MTL minus the all-share one of the same seed. Writes ``branch_oracle.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_result  # noqa: E402
from quality import BENCHMARKS, HARD_COSINE, QUICK, make_backbone, run_job, tasks_of  # noqa: E402

#: name -> {task: layer-name prefixes the task gets its own copy of}; every other choice is share.
ARCHITECTURES = {
    "mobilenet_v2": {
        "all-share": {},
        "segmentation owns features.18": {"segmentation": ["features.18."]},
        "segmentation owns features.16-18": {"segmentation": ["features.16.", "features.17.", "features.18."]},
        "segmentation owns features.15-18": {"segmentation": ["features.15.", "features.16.", "features.17.",
                                                              "features.18."]},
        "depth owns features.18": {"depth": ["features.18."]},
        "depth owns features.17-18": {"depth": ["features.17.", "features.18."]},
        "every task owns features.18": {t: ["features.18."] for t in ("segmentation", "depth", "normal")},
    },
    "resnet18": {
        "all-share": {},
        "segmentation owns layer4.1": {"segmentation": ["layer4.1."]},
        "segmentation owns layer4": {"segmentation": ["layer4."]},
        "every task owns layer4.1": {t: ["layer4.1."] for t in ("segmentation", "depth", "normal")},
        # where capacity_probe.py's trial copies point (segmentation's held-out loss lower on every seed)
        "segmentation owns layer4.0.downsample": {"segmentation": ["layer4.0.downsample."]},
    },
}


def build_policy(bench: dict, owned: dict):
    """The policy giving each task its own copy of the layers under its prefixes, and its parameter count."""
    from automtl import Policy, supermodel

    torch.manual_seed(0)
    sm = supermodel(make_backbone(bench["backbone"]), tasks_of(bench["data"]),
                    torch.randn(1, 3, bench["size"], bench["size"]))
    choices = [["specialize" if any(layer.startswith(p) for p in owned.get(task, ())) else "share"
                for task in sm.task_names] for layer in sm.layer_names]
    policy = Policy(sm.layer_names, sm.task_names, choices)
    base = sm.policy_parameter_count(Policy.uniform(sm.layer_names, sm.task_names, "share"))
    return policy, sm.policy_parameter_count(policy) / base


def _job(args):
    bench, seed, name, policy_dict = args
    return name, seed, run_job(bench, seed, f"{name} retrained", policy_dict=policy_dict)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", default="synthetic/mobilenet_v2", choices=[b for b in BENCHMARKS if b.startswith("synthetic/")])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", nargs="+", help="architectures to train (all-share always runs: the paired differences "
                    "need it)")
    ap.add_argument("--quick", action="store_true", help="quality.py --quick's sizes and one seed: checks that the "
                    "script runs (with --quality from a quality.py --quick run)")
    ap.add_argument("--quality", type=Path, default=RESULTS / "quality.json", help="the run whose single-task and "
                    f"{HARD_COSINE!r} rows the architectures are compared with")
    ap.add_argument("--out", type=Path, help="JSON to write (default: results/branch_oracle.json)")
    args = ap.parse_args(argv)
    if args.quick and args.out is None:
        ap.error("--quick needs --out: its figures must not replace results/branch_oracle.json")
    from automtl.metrics import delta_mtl

    bench = dict(BENCHMARKS[args.bench], **QUICK) if args.quick else BENCHMARKS[args.bench]
    seeds = 1 if args.quick else args.seeds
    quality = json.loads(args.quality.read_text())["jobs"][args.bench]
    known = ARCHITECTURES[bench["backbone"]]
    unknown = sorted(set(args.only or ()) - set(known))
    if unknown:
        ap.error(f"unknown architecture(s) {unknown}; known: {sorted(known)}")
    archs = {}
    for name, owned in known.items():
        if args.only and name != "all-share" and name not in args.only:
            continue
        policy, ratio = build_policy(bench, owned)
        archs[name] = {"owned": owned, "parameters_vs_all_share": round(ratio, 4), "policy": policy.to_dict()}
        print(f"{name}: {policy.counts()} ({ratio:.2f}x the all-share parameters)", flush=True)
    jobs = [(bench, seed, name, a["policy"]) for seed in range(seeds) for name, a in archs.items()]
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(_job, jobs))
    per_seed: dict = {}
    for name, seed, out in results:
        single = {k: v for t in tasks_of(bench["data"]) for k, v in quality[f"single:{t.name}/{seed}"]["metrics"].items()}
        per_seed.setdefault(name, {})[seed] = {"metrics": out["metrics"], "delta_mtl": delta_mtl(out["metrics"], single),
                                               "steps": out["steps"][2], "cpu_seconds": out["cpu_seconds"]}
    reproduced = all(per_seed["all-share"][s]["metrics"] == quality[f"{HARD_COSINE}/{s}"]["metrics"] for s in range(seeds))
    summary = {}
    for name, rows in per_seed.items():
        paired = [rows[s]["delta_mtl"] - per_seed["all-share"][s]["delta_mtl"] for s in sorted(rows)]
        summary[name] = {"delta_mtl": statistics.fmean(r["delta_mtl"] for r in rows.values()),
                         "vs_all_share": statistics.fmean(paired),
                         "vs_all_share_se": statistics.stdev(paired) / len(paired) ** 0.5 if len(paired) > 1 else None,
                         "parameters_vs_all_share": archs[name]["parameters_vs_all_share"]}
        se = summary[name]["vs_all_share_se"]
        print(f"{name:40s} Δ_MTL {summary[name]['delta_mtl']:+.2f}  vs all-share {summary[name]['vs_all_share']:+.2f}"
              + (f" ± {se:.2f}" if se is not None else ""), flush=True)
    print(f"all-share reproduces the quality run's {HARD_COSINE!r} rows bitwise: {reproduced}")
    write_result("branch_oracle", {"bench": args.bench, "cost_fbe": bench["cost"], "seeds": seeds, "quick": args.quick,
                                   "all_share_reproduces_quality": reproduced, "architectures": archs,
                                   "summary": summary, "per_seed": per_seed}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
