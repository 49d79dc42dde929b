"""Peak memory of the search step and of inference, against one backbone's training step and inference.

    python benchmarks/memory.py                                   # ResNet-34 and MobileNetV2, 64 px
    python benchmarks/memory.py --backbones resnet18 --size 128 --batch 16
    python benchmarks/memory.py --cases search/batched,infer/compact/random   # some cases (and their baselines)

Every case runs in a fresh subprocess so that no allocator cache from an earlier case hides its
peak, and after one warm-up run (lazy kernel caches, optimizer state). Two figures per case:

- ``step peak``: the working memory of a step (activations, gradients, workspaces). On the CPU,
  the resident high-water mark during the measured runs minus the resident size just before
  them (freed heap trimmed and the mark reset through /proc/self/clear_refs first); on CUDA,
  ``torch.cuda.max_memory_allocated`` minus the memory allocated before;
- ``held``: weights, buffers and optimizer state that stay between steps, counted tensor by tensor;

and their sum, each as a ratio to the baseline. Cases, per backbone (3 dense tasks, batch ``--batch``):

- ``train/backbone``: one single-task training step (backbone + head, Adam), the baseline;
- ``search/batched``: one schedule cycle of the search stage (weight steps, then a policy step);
- ``search/per_task_loop``: the same cycle in AutoMTL's per-task formulation;
- ``infer/backbone``, ``infer/separate`` (T single-task models), ``infer/compact/<policy>``
  (all-share, all-specialize, random) and ``infer/automtl_hard/random`` (per-task hard inference).

Writes benchmarks/results/memory.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

CASES = ["train/backbone", "search/batched", "search/per_task_loop", "infer/backbone", "infer/separate",
         "infer/compact/all-share", "infer/compact/all-specialize", "infer/compact/random", "infer/automtl_hard/random"]


def _baseline(case: str) -> str:
    """The case whose memory ``case``'s ratios divide by."""
    return "train/backbone" if case.startswith(("train", "search")) else "infer/backbone"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    """The resident high-water mark (VmHWM) since the last :func:`_reset_peak`."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _reset_peak() -> None:
    """Give freed heap back to the OS and restart the high-water mark at the current size, so
    that the measured steps' own peak is seen (after a warm-up run has loaded kernels and caches)."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident set size (Linux >= 4.0)
        f.write("5")


def child(case: str, backbone: str, size: int, batch: int, steps: int) -> dict:
    """Build what ``case`` needs, then measure the peak of ``steps`` runs of it."""
    from search_step import TASKS, PerTaskLoop, baseline_step
    from search_step import batch as make_batch

    from automtl import Policy, compact, supermodel
    from automtl.backbones import build_backbone
    from automtl.config import SearchConfig
    from automtl.heads import DenseHead
    from automtl.losses import loss_for
    from automtl.reference import run_task_by_task
    from automtl.search import _make_optimizer, _Search

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    x, y = make_batch(size, batch)
    x, y = x.to(device), {k: v.to(device) for k, v in y.items()}
    example = torch.randn(1, 3, size, size)
    cfg = SearchConfig(quiet=True, device=device.type)
    r = cfg.weight_steps_per_policy_step
    kind, _, what = case.partition("/")

    if case == "train/backbone":
        bb = build_backbone(backbone)
        with torch.no_grad():
            channels = bb(example).shape[1]
        head = DenseHead(channels, TASKS[0].outputs)
        bb, head = bb.to(device), head.to(device)
        opt = _make_optimizer(cfg.weight_optimizer, list(bb.parameters()) + list(head.parameters()), cfg.lr,
                              cfg.momentum, cfg.weight_decay)
        loss = loss_for(TASKS[0])

        held = [bb, head, opt]

        def work():
            baseline_step(bb, head, loss, x, y[TASKS[0].name])
            opt.step()
            opt.zero_grad(set_to_none=True)
    elif case == "search/batched":
        sm = supermodel(build_backbone(backbone), TASKS, example)
        run = _Search(sm, [(x.cpu(), {k: v.cpu() for k, v in y.items()})], None, cfg, None)
        run._enter("search")
        iters = {k: s.iterate(0) for k, s in run.streams.items()}
        counter = iter(range(10 ** 6))
        held = [sm, run.weight_opt, run.policy_opt]

        def work():
            for i in range(r + 1):
                run._step("search", i, next(counter), iters, False)
    elif case == "search/per_task_loop":
        loop = PerTaskLoop(supermodel(build_backbone(backbone), TASKS, example).to(device), cfg)
        counter = iter(range(10 ** 6))
        held = [loop.sm, loop.weight_opt, loop.policy_opt]

        def work():
            for i in range(r + 1):
                loop.step(x, y, i == r, next(counter))
    else:
        sm = supermodel(build_backbone(backbone), TASKS, example).to(device).eval()
        policies = {"all-share": Policy.uniform(sm.layer_names, sm.task_names, "share"),
                    "all-specialize": Policy.uniform(sm.layer_names, sm.task_names, "specialize"),
                    "random": Policy.random(sm.layer_names, sm.task_names, sm.skip_legal, seed=0)}
        single = compact(sm, policies["all-share"]).eval()
        first = sm.task_names[0]
        one_model = single._subset((first,))  # the graph of one task: one backbone and one head
        if what == "backbone":
            fn, held = (lambda: single(x, tasks=[first])), [one_model]
        elif what == "separate":  # T single-task models hold T backbones; the run reuses one set of weights
            fn, held = (lambda: [single(x, tasks=[t]) for t in sm.task_names]), [one_model] * len(sm.task_names)
        elif what.startswith("compact/"):
            model = compact(sm, policies[what.split("/", 1)[1]]).eval()
            fn, held = (lambda: model(x)), [model]
        else:
            sm.hard(policies[what.split("/", 1)[1]])
            fn, held = (lambda: run_task_by_task(sm, x)), [sm]

        def work():
            with torch.inference_mode():
                fn()
    work()  # warm-up: loads lazy kernel caches and creates the optimizer state (counted as "held" below)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        _reset_peak()
        before = _rss_bytes()
    for _ in range(steps):
        work()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _peak_rss_bytes() - before
    return {"case": case, "kind": kind, "peak_bytes": peak, "held_bytes": _held_bytes(held), "device": device.type}


def _held_bytes(objects) -> int:
    """Bytes of the weights, buffers and optimizer state that stay between steps."""
    total = 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()

    for obj in objects:  # the same object listed twice counts twice (the T separate models)
        if isinstance(obj, torch.nn.Module):
            for t in {id(t): t for t in list(obj.parameters()) + list(obj.buffers())}.values():
                add(t)
        else:  # an optimizer
            for state in obj.state.values():
                for t in state.values():
                    add(t)
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default="resnet34,mobilenet_v2")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2, help="measured runs of each case (the peak is over all)")
    ap.add_argument("--cases", default=",".join(CASES),
                    help="comma-separated cases to measure (default: all); the baselines their ratios need are measured too")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here instead of benchmarks/results/memory.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        case, backbone = json.loads(args.child)
        print(json.dumps(child(case, backbone, args.size, args.batch, args.steps)))
        return 0
    asked = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in asked if c not in CASES]
    if unknown or not asked:
        ap.error(f"--cases takes some of {', '.join(CASES)}; {', '.join(unknown) or 'none'} given")
    asked += [_baseline(c) for c in asked]
    rows = []
    for backbone in args.backbones.split(","):
        measured = {}
        for case in [c for c in CASES if c in asked]:
            cmd = [sys.executable, __file__, "--child", json.dumps([case, backbone]), "--size", str(args.size),
                   "--batch", str(args.batch), "--steps", str(args.steps)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr)
                raise SystemExit(f"case {case} on {backbone} failed (exit {proc.returncode}); its error is above")
            measured[case] = json.loads(proc.stdout.strip().splitlines()[-1])
        for case, m in measured.items():
            base = measured[_baseline(case)]
            total, base_total = m["peak_bytes"] + m["held_bytes"], base["peak_bytes"] + base["held_bytes"]
            rows.append({"backbone": backbone, "size": args.size, "batch": args.batch, "case": case, "device": m["device"],
                         "step_peak_mib": round(m["peak_bytes"] / 2 ** 20, 1), "held_mib": round(m["held_bytes"] / 2 ** 20, 1),
                         "total_mib": round(total / 2 ** 20, 1), "step_peak_ratio": round(m["peak_bytes"] / base["peak_bytes"], 2),
                         "total_ratio": round(total / base_total, 2)})
            print(f"{backbone:<13} {case:<28} step peak {m['peak_bytes'] / 2 ** 20:7.1f} MiB "
                  f"({m['peak_bytes'] / base['peak_bytes']:5.2f}x)  held {m['held_bytes'] / 2 ** 20:7.1f} MiB  "
                  f"total {total / 2 ** 20:7.1f} MiB ({total / base_total:5.2f}x)", flush=True)
    payload = {"size": args.size, "batch": args.batch, "tasks": 3, "steps": args.steps,
               "note": "step_peak: peak over the measured steps minus memory before them (activations, gradients, "
                       "workspaces); held: weights, buffers and optimizer state kept between steps; total = both; ratios: "
                       "train and search cases against train/backbone, inference cases against infer/backbone",
               "results": rows}
    path = write_result("memory", payload, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
