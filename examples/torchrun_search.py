"""Run the policy search on several processes (data parallel, one gradient average per step).

    torchrun --nproc_per_node 2 examples/torchrun_search.py [--steps 10,20,10] [--out runs/ddp]
    torchrun --nproc_per_node 2 examples/torchrun_search.py --out runs/ddp --resume   # after an interruption

Each rank reads its own shard of the data; all ranks draw the same Gumbel noise, so they
keep one policy; only rank 0 writes files (checkpoints every 10 steps). Runs on CPUs (gloo) or
GPUs (nccl) alike. A rank that stops answering makes the others fail after AUTOMTL_DIST_TIMEOUT
seconds (default 600) with a sentence naming the rank.
"""
import argparse
import os

import torch

import automtl
from automtl import SearchConfig
from automtl.data import SyntheticScenes, default_tasks


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="10,20,10", help="WARMUP,SEARCH,FINETUNE")
    ap.add_argument("--backbone", default="tiny")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--out", default="runs/ddp")
    ap.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint in --out")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warmup, search_steps, finetune = (int(s) for s in args.steps.split(","))
    torch.manual_seed(0)  # every rank starts from the same weights
    sm = automtl.supermodel(args.backbone, default_tasks("synthetic"), example_input=torch.randn(1, 3, args.size, args.size))
    # 256: gumbel's policy steps read a held-out 20 % of it, two batches of 8 on each of up to 3 processes
    train = SyntheticScenes(256, size=args.size, seed=0, split="train")
    val = SyntheticScenes(32, size=args.size, seed=0, split="val")
    config = SearchConfig(warmup_steps=warmup, search_steps=search_steps, finetune_steps=finetune, batch_size=8,
                          tau_every=5, quiet=True, out_dir=args.out, checkpoint_every=10, resume=args.resume)
    result = automtl.search(sm, train, val, config)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print("policy:", result.policy.counts(), "written to", os.path.join(args.out, "policy.yaml"))


if __name__ == "__main__":
    main()
