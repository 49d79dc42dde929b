"""Child process of tests/test_search.py: a tiny, seeded search whose final state is saved.

Run as ``python search_worker.py '<json args>'`` (or under torch.distributed.run). It is a
script, not a test module: subprocesses are how the tests kill a run and launch two ranks.
"""
import json
import os
import sys
import time

import torch

torch.set_num_threads(1)

from automtl.data import SyntheticScenes, make_loader  # noqa: E402
from automtl.search import search  # noqa: E402
from automtl.supermodel import supermodel  # noqa: E402


class Faulty(torch.utils.data.Dataset):
    """The same samples, slower (gives a test time to SIGKILL the run mid-way) or raising from the
    ``crash_after``-th read on (a run that dies at a known step on every rank)."""

    def __init__(self, data, delay=0.0, crash_after=None):
        self.data, self.delay, self.crash_after, self.reads = data, delay, crash_after, 0

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        self.reads += 1
        if self.crash_after is not None and self.reads > self.crash_after:
            raise RuntimeError("the machine went away")
        time.sleep(self.delay)
        return self.data[i]


class Jitter(torch.nn.Module):
    """Called as one operation (a leaf): scales by draws from a Python and a numpy generator it owns."""

    def __init__(self):
        import random

        import numpy as np

        super().__init__()
        self.py_gen, self.np_gen = random.Random(0), np.random.default_rng(0)

    def forward(self, x):
        return x * float(1 + 0.1 * self.py_gen.random() + 0.1 * self.np_gen.random()) if self.training else x


class OwnGenerators(torch.nn.Module):
    """Train-mode noise from a torch.Generator the backbone owns (traced), beside the leaf above."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        self.c2 = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        self.jitter, self.g = Jitter(), torch.Generator().manual_seed(5)

    def forward(self, x):
        y = self.jitter(self.c1(x))
        if self.training:
            y = y + 0.1 * torch.randn(y.shape, generator=self.g)
        return self.c2(y)


def main():
    args = json.loads(sys.argv[1])
    torch.manual_seed(0)
    train = SyntheticScenes(args.get("n_train", 32), size=32, seed=0)
    tasks = train.tasks
    if args.get("delay") or args.get("crash_after"):
        train = Faulty(train, args.get("delay", 0.0), args.get("crash_after"))
    if args.get("backbone") == "own generators":
        sm = supermodel(OwnGenerators(), tasks, torch.randn(1, 3, 32, 32), leaf_modules=[Jitter])
    else:
        sm = supermodel("tiny", tasks, torch.randn(1, 3, 32, 32))
    if os.environ.get("RANK", "0") != "0":
        # a different initialisation on purpose: the search must start every rank from rank 0's weights
        torch.manual_seed(123)
        for p in sm.parameters():
            p.data.add_(torch.randn_like(p) * 0.1)
    loader = make_loader(train, args.get("batch_size", 8), shuffle=True, seed=1)
    result = search(sm, loader, None, args["config"])
    out = args["result"].format(rank=os.environ.get("RANK", "0"))
    torch.save({"state": sm.state_dict(), "choices": result.policy.choices, "evidence": result.policy.evidence,
                "logits": sm.policy_logits.detach().clone(), "history_len": len(result.history)}, out)


if __name__ == "__main__":
    main()
