"""Child process of tests/test_faults.py under torchrun: distributed faults on two gloo ranks.

``asymmetric``: a custom task whose loss has no gradient path on rank 1 (as a loss that returns a
constant when that rank's batch has no label): the head gets gradients on rank 0 only.
``freeze``: rank 1 stops itself (SIGSTOP) before the search; rank 0 must fail with a sentence.
"""
import json
import os
import signal
import sys

import torch
from torch import nn

torch.set_num_threads(1)

from automtl import SearchConfig, Task  # noqa: E402
from automtl.data import SyntheticScenes  # noqa: E402
from automtl.search import search  # noqa: E402
from automtl.supermodel import supermodel  # noqa: E402


class MeanHead(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.fc = nn.Linear(channels, 1)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


def aux_loss(pred, target):
    if os.environ.get("RANK") == "1":
        return torch.zeros(())  # no graph: this rank's batch "had no label"
    return (pred.squeeze(1) - target.float().mean((1, 2))).pow(2).mean()


class WithAux(torch.utils.data.Dataset):
    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return x, {**y, "aux": y["depth"][0]}


def main():
    args = json.loads(sys.argv[1])
    if args["case"] == "freeze" and os.environ.get("RANK") == "1":
        os.kill(os.getpid(), signal.SIGSTOP)
    torch.manual_seed(0)
    train = SyntheticScenes(16, size=16, seed=0)
    tasks = [train.tasks[0], Task("aux", head=MeanHead(32), loss=aux_loss, metric=lambda: None)]
    sm = supermodel("tiny", tasks, torch.randn(1, 3, 16, 16))
    cfg = SearchConfig(warmup_steps=3, search_steps=0, finetune_steps=0, batch_size=4, quiet=True, budget=None)
    search(sm, WithAux(train), None, cfg)
    torch.save({k: v for k, v in sm.state_dict().items() if k.startswith("heads.aux")},
               args["result"].format(rank=os.environ.get("RANK", "0")))


if __name__ == "__main__":
    main()
