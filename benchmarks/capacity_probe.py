"""Trial copies as evidence: would held-out losses have found the branch that gradient conflict cannot see?

    python benchmarks/capacity_probe.py                         # MobileNetV2 scenes, tuning seeds 100 101
    python benchmarks/capacity_probe.py --bench synthetic/resnet18 --seeds 100 101

Gradient conflict is first-order evidence: where two tasks' gradients are orthogonal it calls a task-owned
copy neutral, so on the MobileNetV2 scenes ``conflict`` shares everything, while ``branch_oracle.py`` found
that segmentation owning the last convolution (``features.18``) gains +0.34 ± 0.15 Δ_MTL over all-share and
depth owning it loses (−1.24 ± 1.41). A copy's gain beyond first order is capacity, and the direct evidence
of capacity is a trial: give the task its own copy and see whether its held-out loss drops.

This probe runs the benchmark's ``conflict@1.5x`` job (``quality.py``'s schedule and seeds) with *trial
copies* beside it: when the search stage starts, every task gets its own copy of each of the last ``--layers``
policy layers (initialised from the shared operator) with its own copy of its head, and every search step, after the ordinary hard-sharing
step (unchanged: the same batches, the same decisions), each trial layer runs one more forward in which every
task goes through its own copy there and shares the rest; the copies alone are trained on it (their task's
loss; the shared operators and the real heads get nothing from it, and the norm layers' running statistics are put
back). At the end of the search stage the held-out loss of each task through its copy is compared with its
loss through the shared operator, on a fresh draw of the same scene distribution (``--held-out`` images,
paired per batch of ``--batch``): the relative gain (shared − copy) / shared, with its standard error.

The question it answers is whether this evidence ranks the branches as the oracle does (segmentation at
``features.18`` up, depth there not) clearly enough to decide on, and what it costs (the extra forwards, in
CPU seconds against the job without trials). Writes ``capacity_probe.json``; changes nothing in automtl.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from quality import BENCHMARKS, CONFLICT_EVERY, QUICK, make_backbone, schedule, tasks_of  # noqa: E402


def _trial_strategy(layers: int, held_out_data, batch: int):
    """The ``conflict`` strategy with trial copies of the last ``layers`` policy layers beside it."""
    from automtl.compact import compact
    from automtl.policy import Policy
    from automtl.search._strategy import register_strategy
    from automtl.search._util import _make_optimizer
    from automtl.search.conflict import Conflict

    @register_strategy("conflict-trials")
    class ConflictTrials(Conflict):
        def enter_search(self) -> None:
            super().enter_search()
            run, sm = self.run, self.run.sm
            L = len(sm.layer_names)
            self.trial_layers = list(range(L - layers, L))
            with torch.no_grad():
                for l in self.trial_layers:
                    for own in sm.policy_layers[l].specialized:
                        own.load_state_dict(sm.policy_layers[l].shared.state_dict())
            self.views = {}
            for l in self.trial_layers:
                choices = [["specialize" if k == l else "share" for _ in sm.task_names] for k in range(L)]
                self.views[l] = compact(sm, Policy(sm.layer_names, sm.task_names, choices), copy_weights=False)
            # each trial has its own copy of the heads too, so that a task's head adapts to its copy's features
            # as the real head adapts to the shared operator's (without, the copy is judged through a head that
            # never saw its features)
            self.heads = {}
            for l, view in self.views.items():
                self.heads[l] = copy.deepcopy(sm.heads)
                holder = next(m.heads for m in view.modules() if isinstance(getattr(m, "heads", None), torch.nn.Module)
                              and all(getattr(m.heads, t, None) is sm.heads[t] for t in sm.task_names))
                for t in sm.task_names:  # torch.fx made its own container of the same head modules
                    setattr(holder, t, self.heads[l][t])
            self.copy_params = {l: [list(c.parameters()) + list(self.heads[l][task].parameters())
                                    for c, task in zip(sm.policy_layers[l].specialized, sm.task_names)]
                                for l in self.trial_layers}
            params = [p for ps in self.copy_params.values() for c in ps for p in c]
            cfg = run.config
            self.trial_opt = _make_optimizer(cfg.weight_optimizer, params, cfg.lr, cfg.momentum, cfg.weight_decay)
            mine = {id(b) for l in self.trial_layers for c in sm.policy_layers[l].specialized for b in c.buffers()}
            self.kept_buffers = [b for b in sm.buffers() if id(b) not in mine]
            self.trial_seconds = 0.0
            draw = run._batch  # the ordinary step draws the batch; keep it for the trial forwards

            def keep(*a, **k):
                self._last_batch = draw(*a, **k)
                return self._last_batch

            run._batch = keep

        def search_step(self, i, g, iters, log):
            rec = super().search_step(i, g, iters, log)
            t0 = time.process_time()
            run = self.run
            x, targets = self._last_batch
            saved = [b.detach().clone() for b in self.kept_buffers]
            for group in self.trial_opt.param_groups:
                group["lr"] = run.weight_opt.param_groups[0]["lr"]
            self.trial_opt.zero_grad(set_to_none=True)
            for l, view in self.views.items():
                out = view(x)
                for t, task in enumerate(run.tasks):
                    loss = run.loss_fns[task](out[task].float(), targets[task])
                    grads = torch.autograd.grad(loss, self.copy_params[l][t], retain_graph=t + 1 < len(run.tasks),
                                                allow_unused=True)
                    for p, gr in zip(self.copy_params[l][t], grads):
                        if gr is not None:
                            p.grad = gr
            self.trial_opt.step()
            self.trial_opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for b, s in zip(self.kept_buffers, saved):
                    b.copy_(s)
            self.trial_seconds += time.process_time() - t0
            return rec

        def decide(self):
            policy, evidence = super().decide()
            evidence["trials"] = self._held_out_gains()
            evidence["trial_cpu_seconds"] = round(self.trial_seconds, 2)
            return policy, evidence

        @torch.no_grad()
        def _held_out_gains(self) -> dict:
            run, sm = self.run, self.run.sm
            was = sm.training
            sm.eval()
            share = compact(sm, Policy.uniform(sm.layer_names, sm.task_names, "share"), copy_weights=False).eval()
            per = {(l, t): [] for l in self.trial_layers for t in run.tasks}
            base = {t: [] for t in run.tasks}
            loader = torch.utils.data.DataLoader(held_out_data, batch_size=batch, shuffle=False)
            for x, y in loader:
                ref = share(x)
                ref_loss = {t: float(run.loss_fns[t](ref[t].float(), y[t])) for t in run.tasks}
                for t in run.tasks:
                    base[t].append(ref_loss[t])
                for l, view in self.views.items():
                    out = view.eval()(x)
                    for t in run.tasks:
                        per[l, t].append(ref_loss[t] - float(run.loss_fns[t](out[t].float(), y[t])))
            sm.train(was)
            for view in self.views.values():
                view.train(was)
            gains = {}
            for (l, t), diffs in per.items():
                scale = statistics.fmean(base[t])
                gains.setdefault(sm.layer_names[l], {})[t] = {
                    "relative_gain": statistics.fmean(diffs) / scale,
                    "se": statistics.stdev(diffs) / len(diffs) ** 0.5 / scale}
            return gains

    return ConflictTrials


def _job(args):
    bench_key, seed, layers, held_out, batch, trials, quick = args
    from automtl import supermodel
    from automtl.config import SearchConfig
    from automtl.convert import DEFAULT_SCHEDULE
    from automtl.data import make_dataset
    from automtl.search import search

    torch.set_num_threads(1)
    bench = dict(BENCHMARKS[bench_key], **QUICK) if quick else BENCHMARKS[bench_key]
    opts = {"size": bench["size"]} if bench["data"] == "synthetic" else {}
    train = make_dataset(bench["data"], "train", n=bench["train"], seed=seed, **opts)
    val = make_dataset(bench["data"], "val", n=bench["val"], seed=seed, **opts)
    fresh = make_dataset(bench["data"], "val", n=held_out, seed=seed + 10_000, **opts)
    tasks = tasks_of(bench["data"])
    strategy = "conflict"
    if trials:
        cls = _trial_strategy(layers, fresh, batch)
        strategy = cls.name
    torch.manual_seed(seed)
    sm = supermodel(make_backbone(bench["backbone"]), tasks, torch.randn(1, 3, bench["size"], bench["size"]))
    warmup, search_steps, finetune = schedule("conflict", bench["cost"], len(tasks))
    base = {**DEFAULT_SCHEDULE, "seed": seed, "batch_size": bench["batch"], "quiet": True, "checkpoint_every": 0,
            "log_every": 50, "val_batches": None, "finetune_unit": "compute"}
    cfg = SearchConfig(**{**base, "strategy": strategy, "warmup_steps": warmup, "search_steps": search_steps,
                          "finetune_steps": 0, "budget": "1.5x", "conflict_every": CONFLICT_EVERY})
    cpu0 = time.process_time()
    found = search(sm, train, val, cfg)
    ev = found.policy.evidence
    return {"seed": seed, "trials": trials, "cpu_seconds": round(time.process_time() - cpu0, 2),
            "policy": found.policy.counts(), "gains": ev.get("trials"), "trial_cpu_seconds": ev.get("trial_cpu_seconds"),
            "conflict_scores": ev["scores"], "measurements": ev["steps"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", default="synthetic/mobilenet_v2", choices=[b for b in BENCHMARKS if b.startswith("synthetic/")])
    ap.add_argument("--seeds", type=int, nargs="+", default=[100, 101])
    ap.add_argument("--layers", type=int, default=4, help="trial copies of the last N policy layers")
    ap.add_argument("--held-out", type=int, default=192, help="fresh images the copies are judged on")
    ap.add_argument("--batch", type=int, default=4, help="images per paired held-out comparison")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--control", action="store_true", help="also run each seed without trials and check that the "
                    "trials changed nothing in the ordinary run (the same conflict scores, bitwise)")
    ap.add_argument("--quick", action="store_true", help="quality.py --quick's sizes: checks that the script runs")
    ap.add_argument("--out", type=Path, help="JSON to write (default: results/capacity_probe_BACKBONE.json)")
    args = ap.parse_args(argv)
    if args.quick and args.out is None:
        ap.error("--quick needs --out: its figures must not replace the results")
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(args.bench, s, args.layers, args.held_out, args.batch, trials, args.quick) for s in args.seeds
            for trials in ((True, False) if args.control else (True,))]
    with ProcessPoolExecutor(args.jobs) as pool:
        done = list(pool.map(_job, jobs))
    results = [r for r in done if r["trials"]]
    for r in results:
        control = next((c for c in done if not c["trials"] and c["seed"] == r["seed"]), None)
        if control is not None:
            r["control_cpu_seconds"] = control["cpu_seconds"]
            r["ordinary_run_unchanged"] = control["conflict_scores"] == r["conflict_scores"]
        print(f"seed {r['seed']}: policy {r['policy']}, search cpu {r['cpu_seconds']} s, of it trials "
              f"{r['trial_cpu_seconds']} s")
        for layer, per in r["gains"].items():
            print(f"  {layer:28s} " + "  ".join(f"{t} {g['relative_gain'] * 100:+6.2f}% ± {g['se'] * 100:.2f}"
                                                for t, g in per.items()))
    write_result(f"capacity_probe_{BENCHMARKS[args.bench]['backbone']}", {"bench": args.bench, "quick": args.quick, "layers": args.layers, "held_out": args.held_out,
                                    "batch": args.batch, "results": results}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
