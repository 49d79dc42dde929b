"""Run an exported model.pt2 with plain torch: no automtl needed.

    python examples/load_pt2.py runs/quickstart/model.pt2 [--size 64]

This file imports nothing but torch, so it runs wherever torch does.
"""
import argparse

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args(argv)
    model = torch.export.load(args.path).module()
    images = torch.rand(args.batch, 3, args.size, args.size)
    with torch.no_grad():
        outputs = model(images)
    for task, y in outputs.items():
        print(f"{task}: {tuple(y.shape)}")


if __name__ == "__main__":
    main()
