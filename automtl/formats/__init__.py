"""Step 5 of the pipeline: the compact model as files that are data, not code.

- ``.automtl`` (:func:`save` / :func:`load`, in :mod:`.bundle`): a YAML description over a closed
  vocabulary (:mod:`.vocabulary`, :mod:`.modules`) and safetensors weights.
- ``.pt2`` (:func:`export` / :func:`load_pt2`, in :mod:`.pt2`): torch.export, checked before loading.
- ``.onnx`` (:func:`export_onnx`, in :mod:`.onnx`): behind the optional ``onnx`` extra.

:func:`write` picks the writer by the file's suffix (:data:`WRITERS`).
"""
from __future__ import annotations

import os
from typing import Callable, Optional

from .bundle import FORMAT_VERSION, describe, load, save
from .onnx import export_onnx
from .pt2 import check_pt2, export, load_pt2

__all__ = ["FORMAT_VERSION", "WRITERS", "check_pt2", "describe", "export", "export_onnx", "load", "load_pt2", "save",
           "write", "writer_for"]


def _save(compact, path, example_input=None) -> None:
    save(compact, path)  # a bundle records its input shape; it needs no example


#: File suffix -> writer ``(compact, path, example_input=None)``.
WRITERS: dict[str, Callable] = {".automtl": _save, ".pt2": export, ".onnx": export_onnx}


def writer_for(path: str | os.PathLike) -> Callable:
    """The writer of :data:`WRITERS` for ``path``'s suffix (case-insensitive).

    Raises:
        ConfigError: the suffix names no model format.
    """
    from ..errors import ConfigError

    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in WRITERS:
        raise ConfigError(f"cannot write a model to {os.fspath(path)!r}; name the file .pt2 (torch.export), .onnx "
                          "or .automtl")
    return WRITERS[suffix]


def write(compact, path: str | os.PathLike, batch: Optional[int] = None) -> None:
    """Write ``compact`` to ``path`` in the format its suffix names (:data:`WRITERS`), atomically.

    ``batch`` sets the batch size of the example input that .pt2 and .onnx trace with (the batch
    dimension stays dynamic; the rest is the model's input shape); default 2.

    Raises:
        ConfigError: an unknown suffix. AutomtlError: the model cannot be exported (see :func:`export`).

    Example:
        >>> automtl.formats.write(automtl.load("model.automtl"), "model.onnx")
    """
    writer = writer_for(path)
    example = None
    if batch is not None:
        import torch

        shape = compact.input_shape or (1, 3, 64, 64)
        example = torch.randn(batch, *shape[1:])
    writer(compact, path, example_input=example)
