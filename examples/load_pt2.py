"""Run an exported model.pt2: checked by automtl.load_pt2, or with plain torch for a file you trust.

    python examples/load_pt2.py runs/quickstart/model.pt2 [--size 64]
    python examples/load_pt2.py runs/quickstart/model.pt2 --plain-torch   # no automtl needed

``automtl.load_pt2`` refuses archives that hold pickles, guard code or non-aten operators before
torch reads them, so use it for a .pt2 from anyone else. ``torch.export.load`` alone unpickles
parts of the archive and runs its guard code: use it only on files you made or trust completely.
"""
import argparse

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--plain-torch", action="store_true", help="torch.export.load only (trusted files; no automtl needed)")
    args = ap.parse_args(argv)
    if args.plain_torch:
        program = torch.export.load(args.path)
    else:
        import automtl

        program = automtl.load_pt2(args.path)
    model = program.module()
    images = torch.rand(args.batch, 3, args.size, args.size)
    with torch.no_grad():
        outputs = model(images)
    for task, y in outputs.items():
        print(f"{task}: {tuple(y.shape)}")


if __name__ == "__main__":
    main()
