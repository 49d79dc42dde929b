"""Custom tasks and heads on a custom backbone, through the Python API.

    python examples/custom_tasks.py [--steps 40,80,80] [--out runs/custom]

The backbone is a small CNN written here; one task is builtin (segmentation), the other is a
custom "edges" task that brings its own head, loss and metric. The data are the synthetic
scenes, with an edge map derived from their segmentation.
"""
import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

import automtl
from automtl import SearchConfig, Task
from automtl.data import SyntheticScenes


class MyBackbone(nn.Module):
    """Any traceable CNN: here four conv-BN-ReLU stages with one residual connection."""

    def __init__(self, width=24):
        super().__init__()
        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
        self.stem = block(3, width, 2)
        self.a = block(width, width, 1)
        self.b = block(width, 2 * width, 2)
        self.c = block(2 * width, 2 * width, 1)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.a(x)
        return self.c(self.b(x))


def edge_loss(pred, target):
    """Binary cross-entropy on the edge map, at the target's resolution."""
    pred = F.interpolate(pred, size=target.shape[-2:], mode="bilinear", align_corners=False)
    return F.binary_cross_entropy_with_logits(pred, target)


class EdgeF1:
    """A streaming metric: the F1 score of edge pixels (higher is better)."""

    primary = "edge_f1"

    def __init__(self):
        self.reset()

    def reset(self):
        self.tp = self.fp = self.fn = 0.0

    def update(self, pred, target):
        pred = F.interpolate(pred, size=target.shape[-2:], mode="bilinear", align_corners=False) > 0
        target = target > 0.5
        self.tp += float((pred & target).sum())
        self.fp += float((pred & ~target).sum())
        self.fn += float((~pred & target).sum())

    def compute(self):
        return {"edge_f1": 100 * 2 * self.tp / max(2 * self.tp + self.fp + self.fn, 1.0)}


class ScenesWithEdges(Dataset):
    """The synthetic scenes, with an edge map (where the segmentation label changes) as a target."""

    def __init__(self, n, size, seed, split):
        self.scenes = SyntheticScenes(n, size=size, seed=seed, split=split)

    def __len__(self):
        return len(self.scenes)

    def __getitem__(self, i):
        x, y = self.scenes[i]
        seg = y["segmentation"].float()
        edges = torch.zeros_like(seg)
        edges[1:, :] += (seg[1:, :] != seg[:-1, :]).float()
        edges[:, 1:] += (seg[:, 1:] != seg[:, :-1]).float()
        return x, {"segmentation": y["segmentation"], "edges": (edges > 0).float().unsqueeze(0)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="40,80,80", help="WARMUP,SEARCH,FINETUNE")
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--out", default="runs/custom")
    args = ap.parse_args(argv)
    warmup, search_steps, finetune = (int(s) for s in args.steps.split(","))
    torch.manual_seed(0)

    edge_head = nn.Sequential(nn.Conv2d(48, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 1, 1))
    tasks = [
        Task("segmentation", kind="segmentation", classes=4),
        Task("edges", head=edge_head, loss=edge_loss, metric=EdgeF1),
    ]
    sm = automtl.supermodel(MyBackbone(), tasks, example_input=torch.randn(1, 3, args.size, args.size))
    train = ScenesWithEdges(args.samples, args.size, seed=0, split="train")
    val = ScenesWithEdges(max(args.samples // 4, 8), args.size, seed=0, split="val")
    config = SearchConfig(warmup_steps=warmup, search_steps=search_steps, finetune_steps=finetune,
                          batch_size=16, budget="1.5x", quiet=True, tau_every=10)
    result = automtl.search(sm, train, val, config)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = automtl.compact(sm, result.policy)
    automtl.save(model, out / "model.automtl")   # the head is made of torch.nn modules: it can be saved as data
    automtl.export(model, out / "model.pt2")
    result.policy.save(out / "policy.yaml")
    print("policy:", result.policy.counts())
    for task, metrics in result.metrics.items():
        print(task, {k: round(v, 3) for k, v in metrics.items()})
    print(f"compact model: {model.num_parameters():,} parameters; files in {out}")


if __name__ == "__main__":
    main()
