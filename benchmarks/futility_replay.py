"""Replay conflict's futility stop on gradient cosines recorded at every planned measurement.

    python benchmarks/futility_replay.py                                  # the quality benchmark's cases, seeds 100, 101
    python benchmarks/futility_replay.py --only synthetic/mobilenet_v2 --seeds 100

Each case runs the search stage of conflict@1.5x with the quality benchmark's schedule and the stop off
(``conflict_futility: 0``, so every planned measurement is taken) and keeps each measurement's cosines.
Then, for every ``conflict_futility`` and minimum number of measurements of the grid, it replays the
stop exactly as the strategy takes it (``Conflict.open_pairs`` on the statistics of the first n
measurements) and reports where it would stop, whether the groups of tasks that stay together in
every layer (the decision before the budget) are those of all K measurements, and which layers still
had open pairs at each measurement. This is how the defaults (0.05, 4 measurements) were checked
against measuring to the end; the seeds are tuning seeds (100 on), apart from the benchmark's 0-2.
Writes ``futility_replay.json``.

``--fraction 1 0.25`` also measures, at every measured step, the per-task gradients on the first quarter
of the same batch (a forward of its own at the same weights, training nothing) and replays the stop and the
decision on those cosines: cheaper evidence, from fewer samples. ``fraction_replay.json`` is
``--fraction 1 0.5 0.25 --futility 0.05 --minimum 4 --threads 2 --out results/fraction_replay.json``.
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from quality import BENCHMARKS, CONFLICT_EVERY, make_backbone, schedule, tasks_of  # noqa: E402

from automtl.search._strategy import register_strategy  # noqa: E402
from automtl.search.conflict import Conflict  # noqa: E402


@register_strategy("conflict-recorded")
class Recorded(Conflict):
    """conflict, keeping every measurement's (L, T, T) cosines: the full batch's, and those of the per-task
    gradients on the first share ``f`` of the same batch for each of ``fractions``."""

    #: shares of the batch measured beside the full batch (below 1)
    fractions: tuple = ()

    def __init__(self, run):
        super().__init__(run)
        self.recorded = {1.0: []}
        self.recorded.update({f: [] for f in self.fractions})
        self.batch = None
        take = run._batch

        def keep(*args, **kwargs):  # the step's batch, for the measurements on a part of it
            self.batch = take(*args, **kwargs)
            return self.batch

        run._batch = keep

    def search_step(self, i, g, iters, log):
        self.step = (i, g)
        return super().search_step(i, g, iters, log)

    def _measure(self, losses, total):
        parts = {f: self.measure_part(f).cpu() for f in self.fractions}  # before the step: the same weights
        self.samples = {1.0: self.part_size(1.0), **{f: self.part_size(f) for f in self.fractions}}
        cos = super()._measure(losses, total)
        self.recorded[1.0].append(cos.detach().cpu().clone())
        for f, c in parts.items():
            self.recorded[f].append(c)
        return cos

    def part_size(self, fraction: float) -> int:
        """Samples of this step's batch (of each task's, with per-task data) a measurement on ``fraction`` takes:
        at least 2, for the norm layers' batch statistics."""
        x = self.batch[0]
        batch = min(v.shape[0] for v in x.values()) if isinstance(x, dict) else x.shape[0]
        return min(batch, max(2, math.ceil(fraction * batch)))

    def measure_part(self, fraction: float) -> torch.Tensor:
        """The cosines (L, T, T) of the per-task gradients on the first :meth:`part_size` samples of this step's
        batch, at the weights the step's own measurement sees: a forward of its own (norm layers in training
        mode, so normalised with the part's statistics) and T backwards. It trains nothing: no optimizer step,
        the norm layers update copies of their running statistics, random draws are forked. Modelled cost
        f (0.2 + 0.8 T) FBE against the full batch's 0.8 (T - 1) (linear in the samples; not measured)."""
        run = self.run
        x, targets = self.batch
        ws = [layer.shared.conv.weight for layer in run.sm.policy_layers]
        n = self.part_size(fraction)
        if isinstance(x, dict):  # per-task batches, each with its targets
            x, targets = {t: v[:n] for t, v in x.items()}, {t: _first(y, n) for t, y in targets.items()}
        else:
            x, targets = x[:n], _first(targets, n)
        # the real buffers stay untouched (an in-place update would also break the step's pending backward)
        copies = {name: b.detach().clone() for name, b in self.net.named_buffers()}

        def net(inp):
            return torch.func.functional_call(self.net, copies, (inp,), strict=False)

        with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
            losses, _ = run.forward_losses(net, x, targets, "search", *self.step)
            grads = [self._grads(losses[t], ws) for t in run.tasks]
        return torch.stack([self._cosines([grads[t][l] for t in range(len(run.tasks))])
                            for l in range(len(ws))]).double()


def _first(obj, n: int):
    """``obj`` with every tensor (in dicts too) cut to its first ``n`` samples; anything else as it is."""
    if isinstance(obj, torch.Tensor):
        return obj[:n] if obj.dim() > 0 else obj
    if isinstance(obj, dict):
        return {k: _first(v, n) for k, v in obj.items()}
    return obj


def record(key: str, seed: int, steps=None, size=None, fractions=()) -> tuple:
    """Run the search stage of one case; return (its strategy, {batch fraction: the recorded (n, L, T, T)
    cosines}), the full batch's (1.0) and those of each of ``fractions`` at the same steps."""
    from automtl import supermodel
    from automtl.convert import DEFAULT_SCHEDULE
    from automtl.data import make_dataset
    from automtl.config import SearchConfig
    from automtl.search._run import _Search

    bench = BENCHMARKS[key] if key in BENCHMARKS else dict(data="synthetic", size=size or 32, batch=4, backbone=key,
                                                           cost=40)
    size = size or bench["size"]
    opts = {"size": size} if bench["data"] == "synthetic" else {}
    train = make_dataset(bench["data"], "train", n=bench.get("train", 64), seed=seed, **opts)
    tasks = tasks_of(bench["data"])
    torch.manual_seed(seed)
    sm = supermodel(make_backbone(bench["backbone"]), tasks, torch.randn(1, 3, size, size))
    warmup, search, _ = schedule("conflict", bench["cost"], len(tasks)) if steps is None else (steps, steps, 0)
    cfg = SearchConfig(**{**DEFAULT_SCHEDULE, "seed": seed, "batch_size": bench["batch"], "quiet": True,
                          "checkpoint_every": 0, "strategy": "conflict-recorded", "warmup_steps": warmup,
                          "search_steps": search, "finetune_steps": 0, "budget": "1.5x",
                          "conflict_every": CONFLICT_EVERY if steps is None else 1, "conflict_futility": 0.0})
    Recorded.fractions = tuple(f for f in fractions if 0 < f < 1.0)
    run = _Search(sm, train, None, cfg, None)
    try:
        run.run()
    finally:
        run.close()
    return run.strategy, {f: torch.stack(c) for f, c in run.strategy.recorded.items()}


def replay(strategy: Conflict, cos: torch.Tensor, futility: float, minimum: int, threshold: float = 0.0) -> dict:
    """Where the stop would end the measurements, whether the decision there is the one from all of them
    (both with ``conflict_threshold`` = ``threshold``), and the pairs still open at the look before the stop
    (layer, tasks, mean cosine and its standard error)."""
    cfg = strategy.run.config
    thr = threshold
    saved = (cfg.conflict_futility, cfg.conflict_threshold, strategy.cos_sum, strategy.cos_sq, strategy.count)
    cfg.conflict_futility, cfg.conflict_threshold = futility, threshold

    def load(n):
        strategy.cos_sum, strategy.cos_sq, strategy.count = cos[:n].sum(0), (cos[:n] ** 2).sum(0), n

    def groups():
        mean, se = strategy.statistics()
        return [sorted(map(sorted, strategy._groups(mean[l], se[l], thr, strategy.critical_value()))) for l in range(mean.shape[0])]

    try:
        K = len(cos)
        load(K)
        final = groups()
        T = cos.shape[-1]
        a, b = torch.triu_indices(T, T, 1)
        stop, open_layers, last_open, last_pairs = K, {}, [], []
        for n in range(minimum, K):
            load(n)
            mask = strategy.open_pairs()
            layers = sorted({int(l) for l in mask.nonzero()[:, 0]})
            open_layers[n] = layers
            if not layers:
                stop = n
                break
            mean, se = strategy.statistics()
            last_open = layers
            last_pairs = [{"look": n, "layer": l, "tasks": [int(a[p]), int(b[p])],
                           "mean": round(0.5 * float(mean[l, a[p], b[p]] + mean[l, b[p], a[p]]), 4),
                           "se": round(float(se[l, a[p], b[p]]), 4)} for l, p in mask.nonzero().tolist()]
        load(stop)
        decision = groups()
        return {"futility": futility, "minimum": minimum, "threshold": threshold, "stop": stop, "planned": K,
                "same_decision": decision == final,
                "branched": {l: grp for l, grp in enumerate(decision) if len(grp) > 1}, "last_open_layers": last_open, "open_layers": open_layers,
                "last_open_pairs": last_pairs}
    finally:
        cfg.conflict_futility, cfg.conflict_threshold, strategy.cos_sum, strategy.cos_sq, strategy.count = saved


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", default=list(BENCHMARKS), help="quality benchmark cases (or a builtin backbone)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[100, 101], help="tuning seeds (the benchmark's are 0-2)")
    ap.add_argument("--futility", nargs="+", type=float, default=[0.05, 0.1, 0.2])
    ap.add_argument("--minimum", nargs="+", type=int, default=[3, 4, 6])
    ap.add_argument("--threshold", nargs="+", type=float, default=[0.0],
                    help="conflict_threshold values to replay (a margin: below 0, a conflict must be larger to count)")
    ap.add_argument("--fraction", nargs="+", type=float, default=[1.0],
                    help="shares of the batch to measure the cosines on (below 1: beside the full batch's, at the "
                         "same steps; the stop and decision replayed on each)")
    ap.add_argument("--steps", type=int, default=None, help="warm-up and search steps (measuring every step) "
                                                            "instead of the benchmark's schedule: for a smoke run")
    ap.add_argument("--size", type=int, default=None, help="input size for a backbone outside the quality benchmarks")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="the JSON file (default results/futility_replay.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    grid = list(itertools.product(args.futility, args.minimum, args.threshold))
    rows = []
    for key in args.only:
        for seed in args.seeds:
            strategy, recorded = record(key, seed, args.steps, args.size, args.fraction)
            full = {s: replay(strategy, recorded[1.0], *s) for s in grid}  # each fraction is compared with these
            for fraction in args.fraction:
                part = 1.0 if fraction >= 1.0 else fraction
                for futility, minimum, threshold in grid:
                    s = (futility, minimum, threshold)
                    r = {"case": key, "seed": seed, "fraction": fraction, "samples": strategy.samples[part],
                         **(full[s] if part == 1.0 else replay(strategy, recorded[part], *s))}
                    if part < 1.0:  # the full batch's decision at its own stop, same settings
                        r["same_branches_as_full_batch"] = r["branched"] == full[s]["branched"]
                    rows.append(r)
                    print(f"{key} seed {seed} fraction {fraction} futility {futility} minimum {minimum} threshold "
                          f"{threshold}: stop {r['stop']}/{r['planned']}, same decision {r['same_decision']}"
                          f"{', as the full batch ' + str(r['same_branches_as_full_batch']) if fraction < 1 else ''}, "
                          f"branched {r['branched']}, layers open at the look before {r['last_open_layers']}", flush=True)
    print(f"wrote {write_result('futility_replay', {'results': rows}, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
