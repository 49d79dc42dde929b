"""T task-owned copies of one convolution: T separate calls, or one grouped convolution?

When every task specializes a layer, its T copies run on T different inputs. They can run as T
calls (what :mod:`automtl.paths` does), or as one convolution with ``groups = T * groups`` over the
inputs stacked along channels (weights stacked along output channels). Both compute the same
FLOPs; this measures forward+backward of each on layer shapes of ResNet-34 and MobileNetV2 at
64 px, batch 8, and reports the ratio grouped / separate (below 1: grouped is faster).

    python benchmarks/grouped_copies.py --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import write_result

RESULTS = Path(__file__).with_name("results") / "grouped_copies.json"

#: (name, in channels, out channels, kernel, stride, groups, input size) at a 64 px input
LAYERS = [
    ("resnet34 layer1 3x3", 64, 64, 3, 1, 1, 16),
    ("resnet34 layer3 3x3", 256, 256, 3, 1, 1, 4),
    ("mobilenet_v2 dw 3x3", 144, 144, 3, 1, 144, 16),
    ("mobilenet_v2 pw 1x1", 24, 144, 1, 1, 1, 16),
    ("mobilenet_v2 late pw 1x1", 160, 960, 1, 1, 1, 2),
]


def _cpu_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return statistics.median(times)


def measure(layer, tasks: int, batch: int, repeats: int) -> dict:
    name, cin, cout, k, stride, groups, size = layer
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, cin, size, size, generator=g) for _ in range(tasks)]
    ws = [torch.randn(cout, cin // groups, k, k, generator=g, requires_grad=True) for _ in range(tasks)]

    def separate():
        out = sum(F.conv2d(x, w, stride=stride, padding=k // 2, groups=groups).square().mean() for x, w in zip(xs, ws))
        out.backward()

    def grouped():
        y = F.conv2d(torch.cat(xs, 1), torch.cat(ws, 0), stride=stride, padding=k // 2, groups=groups * tasks)
        y.square().mean().mul(tasks).backward()

    sep, grp = _cpu_time(separate, repeats), _cpu_time(grouped, repeats)
    return {"layer": name, "tasks": tasks, "separate_s": sep, "grouped_s": grp, "grouped_over_separate": grp / sep}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(layer, args.tasks, args.batch, args.repeats) for layer in LAYERS]
    for r in rows:
        print(f"{r['layer']:28s} separate {r['separate_s'] * 1e3:7.2f} ms  grouped {r['grouped_s'] * 1e3:7.2f} ms  "
              f"ratio {r['grouped_over_separate']:.2f}")
    report = {"threads": torch.get_num_threads(), "batch": args.batch, "tasks": args.tasks, "clock": "cpu",
              "note": "forward+backward of T task copies on T inputs; ratio below 1 means one grouped conv is faster",
              "rows": rows}
    print(f"wrote {write_result('grouped_copies', report, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
