"""Multiply-accumulates, counted by torch's own ``torch.utils.flop_counter.FlopCounterMode``.

The counter sees every op that runs (convolutions, transposed convolutions, ``linear``/``mm``/
``bmm``/``matmul``, attention), whether a module or a functional call issues it, so a module
called twice counts twice and only what runs counts. It reports FLOPs; a multiply-accumulate is
two of them, so MACs = FLOPs / 2 (the convention of the papers' "FLOPs" tables, which count MACs).
Ops without a FLOP formula in torch (elementwise, pooling, normalization) count zero, as they
did in the hand-written count this replaces.
"""
from __future__ import annotations

import contextlib
from typing import Callable

from torch.utils.flop_counter import FlopCounterMode

__all__ = ["macs_of", "shapes_only"]


def macs_of(fn: Callable[[], object]) -> int:
    """Multiply-accumulates of one call of ``fn()`` (all samples together)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops()) // 2


@contextlib.contextmanager
def shapes_only(static: bool):
    """Under ``static``, a fake-tensor mode (shapes only, no arithmetic) and a converter for inputs."""
    if not static:
        yield None
        return
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode.from_tensor
