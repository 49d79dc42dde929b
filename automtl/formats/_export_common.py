"""What the .pt2 and ONNX writers share: the example input, eval mode, naming a failing operation."""
from __future__ import annotations

from typing import Optional

import torch
from torch import fx, nn

from ..compact import CompactModel
from ..errors import AutomtlError


def example_input_for(compact: CompactModel, example_input: Optional[torch.Tensor]) -> torch.Tensor:
    if example_input is not None:
        if not isinstance(example_input, torch.Tensor) or example_input.dim() != 4:
            raise AutomtlError("example_input must be an image batch tensor of shape (N, C, H, W)")
        # a batch of 1 would let the tracer treat the batch size as the constant 1
        return torch.cat([example_input, example_input]) if example_input.shape[0] == 1 else example_input
    shape = compact.input_shape
    if shape is None:
        placeholder = next(n for n in compact.graph_module.graph.nodes if n.op == "placeholder")
        meta = placeholder.meta.get("tensor_meta")
        shape = tuple(meta.shape) if hasattr(meta, "shape") else (2, 3, 64, 64)
    p = next(compact.parameters(), None)
    # the images' dtype where known (a backbone may cast its input itself), else the weights'
    dtype = getattr(compact, "input_dtype", None) or (p.dtype if p is not None else torch.float32)
    # batch 2: an example batch of 1 would let the tracer treat the batch as the constant 1
    return torch.randn(2, *shape[1:], dtype=dtype, device=p.device if p is not None else "cpu")


def failing_op(exc: BaseException, gm: fx.GraphModule) -> str:
    """Name the module or generated-code line that was running when ``exc`` was raised."""
    names = {id(m): n for n, m in gm.named_modules()}
    found = None
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        obj = frame.f_locals.get("self")
        if isinstance(obj, nn.Module) and id(obj) in names and names[id(obj)]:
            found = f"module {names[id(obj)]!r} ({type(obj).__name__})"
        elif frame.f_code.co_filename.startswith("<eval_with_key"):
            lines = gm.code.splitlines()
            line = lines[frame.f_lineno - 1].strip() if 0 < frame.f_lineno <= len(lines) else ""
            found = f"operation `{line.split(';')[0]}`" if line else found
        tb = tb.tb_next
    return found or "an unknown operation"


class EvalMode:
    """Put the model in eval mode (``train=True``: train mode) for an export and restore its mode afterwards."""

    def __init__(self, module: nn.Module, train: bool = False):
        self.module, self.modes, self.mode = module, {m: m.training for m in module.modules()}, train

    def __enter__(self):
        self.module.train(self.mode)
        return self.module

    def __exit__(self, *exc):
        for m, mode in self.modes.items():
            m.training = mode
