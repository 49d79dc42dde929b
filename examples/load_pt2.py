"""Run an exported model.pt2: checked by automtl.load_pt2, or with plain torch for a file you trust.

    python examples/load_pt2.py runs/quickstart/model.pt2 [--batch 4]
    python examples/load_pt2.py runs/quickstart/model.pt2 --plain-torch   # no automtl needed

``automtl.load_pt2`` refuses archives that hold pickles, guard code or non-aten operators before
torch reads them, so use it for a .pt2 from anyone else. ``torch.export.load`` alone unpickles
parts of the archive and runs its guard code: use it only on files you made or trust completely.

The batch dimension of an exported model is dynamic; channels, height and width are those it was
exported with, read here from the program's input.
"""
import argparse

import torch


def image_shape(program) -> tuple:
    """The (C, H, W) of one image the program was exported with (its batch dimension is dynamic)."""
    name = program.graph_signature.user_inputs[0]
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == name)
    return tuple(int(s) for s in node.meta["val"].shape[1:])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--plain-torch", action="store_true", help="torch.export.load only (trusted files; no automtl needed)")
    args = ap.parse_args(argv)
    if args.plain_torch:
        program = torch.export.load(args.path)
    else:
        import automtl

        program = automtl.load_pt2(args.path)
    model = program.module()
    images = torch.rand(args.batch, *image_shape(program))
    with torch.no_grad():
        outputs = model(images)
    for task, y in outputs.items():
        print(f"{task}: {tuple(y.shape)}")


if __name__ == "__main__":
    main()
