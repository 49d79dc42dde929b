"""Time capture + supermodel build for every builtin backbone (3 dense tasks).

    python benchmarks/build_time.py [--repeats 5] [--size 224] [--backbones resnet50,mobilenet_v2]

Writes benchmarks/results/build_time.json. The backbone itself is built once, outside the timing:
what is timed is automtl's work (copy, fx trace, shape propagation at the example input,
policy layers with their task copies, heads). Target: under 1 s for ResNet-50 on 2 cores.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_time, write_result  # noqa: E402

from automtl import Task, supermodel  # noqa: E402
from automtl.backbones import build_backbone, count_parameters, list_backbones  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--size", type=int, default=224, help="example input side (shape propagation runs at this size)")
    ap.add_argument("--backbones", default=",".join(s.name for s in list_backbones()))
    args = ap.parse_args(argv)
    tasks = [Task("segment", "segmentation", classes=13), Task("depth", "depth"), Task("normal", "normal")]
    example = torch.randn(1, 3, args.size, args.size)
    rows = []
    for name in args.backbones.split(","):
        backbone = build_backbone(name)
        timing = median_time(lambda: supermodel(backbone, tasks, example), repeats=args.repeats)
        sm = supermodel(backbone, tasks, example)
        rows.append({"backbone": name, "backbone_parameters": count_parameters(backbone),
                     "supermodel_parameters": count_parameters(sm), "policy_layers": len(sm.layer_names), **timing})
        print(f"{name:<18} build {timing['median_s']:.3f} s (median of {args.repeats})  "
              f"{len(sm.layer_names)} policy layers", flush=True)
    path = write_result("build_time", {"example_input": list(example.shape), "tasks": 3, "results": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
