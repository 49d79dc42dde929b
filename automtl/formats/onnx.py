"""ONNX export (optional extra ``automtl[onnx]``)."""
from __future__ import annotations

import os
import warnings
from typing import Optional, Sequence

import torch
from torch import fx, nn

from ..compact import CompactModel
from ..errors import AutomtlError, ConfigError
from ..fileio import atomic_path
from ._export_common import EvalMode, example_input_for, failing_op


class _TupleOutputs(nn.Module):
    """ONNX outputs are positional: the task outputs in task order."""

    def __init__(self, gm: fx.GraphModule, names: Sequence[str]):
        super().__init__()
        self.gm, self.names = gm, list(names)

    def forward(self, x):
        out = self.gm(x)
        return tuple(out[n] for n in self.names)


def export_onnx(compact: CompactModel, path: str | os.PathLike, example_input: Optional[torch.Tensor] = None,
                opset_version: int = 17) -> None:
    """Write ``compact`` as ONNX (input ``input``, one output per task, dynamic batch), atomically.

    Needs the optional extra: ``pip install 'automtl[onnx]'``. Uses the TorchScript-based
    exporter, which needs no packages beyond ``onnx``.

    Raises:
        ConfigError: ``path`` is not named ``.onnx``. AutomtlError: onnx is missing, or the export fails.
    """
    if os.path.splitext(os.fspath(path))[1].lower() != ".onnx":
        raise ConfigError(f"export_onnx() writes an ONNX model, so {os.fspath(path)!r} would hold another format "
                          "than its name says; name it .onnx")
    try:
        import onnx
    except ImportError:
        raise AutomtlError("ONNX export needs the onnx package; install it with pip install 'automtl[onnx]'") from None
    if not isinstance(compact, CompactModel):
        raise AutomtlError(f"export_onnx() needs an automtl CompactModel (from automtl.compact), got {type(compact).__name__}")
    x = example_input_for(compact, example_input)
    names = list(compact.task_names)
    wrapper = _TupleOutputs(compact.graph_module, names)
    with atomic_path(path) as tmp, EvalMode(wrapper):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    wrapper, (x,), str(tmp), dynamo=False, input_names=["input"], output_names=names,
                    dynamic_axes={"input": {0: "batch"}, **{n: {0: "batch"} for n in names}},
                    opset_version=opset_version,
                )
            onnx.checker.check_model(str(tmp))
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise AutomtlError(f"ONNX export of the compact model failed at {failing_op(exc, compact.graph_module)}: {first}; "
                               "write a .pt2 with automtl.export() instead") from exc
