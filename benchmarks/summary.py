"""Turn the JSON in benchmarks/results/ into the markdown tables the top-level README shows.

    python benchmarks/summary.py            # writes benchmarks/results/summary.md and prints it
    python benchmarks/summary.py --out /tmp/summary.md
    python benchmarks/summary.py --readme README.md   # also splice them into the README between its markers

Reads whatever results exist (build_time, search_step, inference, memory, scaling, quality) and
skips the rest, so the README's tables are generated from the measurements, never typed in.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_text  # noqa: E402


START, END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"


def _load(name: str):
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def build_time(d) -> list:
    cells = ", ".join(f"{r['backbone']} {r['median_s']:.2f} s" for r in d["results"])
    return [f"**Capture + supermodel build** (3 tasks, 224 px example input, median of {d['results'][0]['repeats']}): {cells}.", ""]


def search_step(d) -> list:
    lines = [f"**One search step** over one single-task forward+backward (batch {d['results'][0]['batch']}, "
             f"{d['results'][0]['tasks']} dense tasks, {d['threads']} thread(s), CPU time; weight and policy steps in the "
             "default schedule). `per-task loop` is AutoMTL's formulation of the same supermodel, timed in the same run; "
             "`default` is gumbel on sampled paths (policy at initialisation, its most divergent state), `soft` gumbel mixing "
             "all operators (AutoMTL's formulation, batched), `conflict` convert's default strategy; target 2x, AutoMTL's "
             "reference code about 6.6x (ResNet-34) and 8x (MobileNetV2) at 64 px:", "",
             "| backbone | px | default (sampled) | weight / policy step | soft | conflict | per-task loop | speedup vs loop |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in d["results"]:
        v = r["variants"]
        loop = v.get("per_task_loop", {}).get("cpu")
        d_ = v["default"]["cpu"]
        other = " | ".join(f"{v[k]['cpu']['ratio']:.2f}x" if k in v else "-" for k in ("soft", "conflict"))
        lines.append(f"| {r['backbone']} | {r['size']} | {d_['ratio']:.2f}x | {d_['weight_ratio']:.2f}x / {d_['policy_ratio']:.2f}x | "
                     f"{other} | " + (f"{loop['ratio']:.2f}x | {d_['speedup_vs_per_task_loop']:.2f}x |" if loop else "- | - |"))
    return lines + [""]


def inference(d) -> list:
    clock = "cpu" if d.get("clock") == "cpu" else "wall"
    sfx = "cpu_s" if clock == "cpu" else "s"
    lines = [f"**All-task inference** of the compact model (batch {d['batch']}, {d['threads']} thread(s), {clock} clock), "
             "as a ratio to one backbone + head, to the FLOP bound of its own graph (target within 10%), to T "
             "single-task models, and AutoMTL-style per-task hard inference. `found` is the policy automtl found "
             "at 1.5x budget in the quality run (seed 0; target below 1.6x one backbone):", "",
             "| backbone | px | policy | share/spec/skip | compact / backbone | compact / FLOP bound | T models / backbone | per-task hard / backbone |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in d["results"]:
        c = r["choices"]
        b = r[f"backbone_{sfx}"]
        lines.append(f"| {r['backbone']} | {r['size']} | {r['policy']} | {c['share']}/{c['specialize']}/{c['skip']} | "
                     f"{r[f'compact_{sfx}'] / b:.2f}x | {r[f'compact_{sfx}'] / r[f'flop_bound_{sfx}']:.2f} | "
                     f"{r[f'separate_{sfx}'] / b:.2f}x | {r[f'automtl_hard_{sfx}'] / b:.2f}x |")
    return lines + [""]


def memory(d) -> list:
    lines = [f"**Memory** ({d['size']} px, batch {d['batch']}, {d['tasks']} tasks): peak working memory of a step "
             "(activations, gradients) and memory held between steps (weights, optimizer state), with their sum as a "
             "ratio to one single-task training step (train and search rows) or one backbone's inference (the rest):", "",
             "| backbone | case | step peak MiB | held MiB | total / baseline |", "|---|---|---:|---:|---:|"]
    for r in d["results"]:
        lines.append(f"| {r['backbone']} | {r['case']} | {r['step_peak_mib']:.0f} | {r['held_mib']:.0f} | {r['total_ratio']:.2f}x |")
    return lines + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS / "summary.md")
    ap.add_argument("--readme", type=Path, help=f"replace the text between {START!r} and {END!r} in this file")
    args = ap.parse_args(argv)
    parts = []
    for name, fn in (("build_time", build_time), ("search_step", search_step), ("inference", inference),
                     ("memory", memory)):
        d = _load(name)
        if d is not None:
            parts += fn(d)
    for name in ("scaling", "quality"):
        md = RESULTS / f"{name}.md"
        if md.exists():
            parts.append(md.read_text().strip())
            parts.append("")
    text = "\n".join(parts) + "\n"
    write_text(args.out, text)
    if args.readme is not None:
        readme = args.readme.read_text()
        if START not in readme or END not in readme:
            raise SystemExit(f"{args.readme} has no {START} ... {END} markers; add them where the tables go")
        head, rest = readme.split(START, 1)
        write_text(args.readme, head + START + "\n" + text + END + rest.split(END, 1)[1])
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
