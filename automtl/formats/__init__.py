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

__all__ = ["FORMAT_VERSION", "WRITERS", "check_input_size", "check_pt2", "describe", "export", "export_onnx", "load",
           "load_pt2", "save", "write", "writer_for"]


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


def write(compact, path: str | os.PathLike, batch: Optional[int] = None,
          input_size: Optional[tuple[int, int]] = None) -> None:
    """Write ``compact`` to ``path`` in the format its suffix names (:data:`WRITERS`), atomically.

    ``batch`` sets the batch size of the example input that .pt2 and .onnx trace with (the batch
    dimension stays dynamic); default 2. ``input_size`` ``(height, width)`` in pixels sets the example's
    height and width, which a .pt2 or .onnx then takes and no other; default the model's input shape
    (a .automtl runs at any size, so it takes no ``input_size``).

    Raises:
        ConfigError: an unknown suffix, or an ``input_size`` for a .automtl. AutomtlError: the model cannot
            be exported (see :func:`export`), e.g. at an input size its layers cannot take.

    Example:
        >>> automtl.formats.write(automtl.load("model.automtl"), "model.onnx", input_size=(480, 640))
    """
    writer = writer_for(path)
    check_input_size(path, input_size)
    example = None
    if batch is not None or input_size is not None:
        import torch

        from ._export_common import example_input_for

        like = example_input_for(compact, None)  # the model's input dtype and device, its channels and size
        example = torch.randn(batch or 2, like.shape[1], *(input_size or like.shape[2:]), dtype=like.dtype,
                              device=like.device)
    writer(compact, path, example_input=example)


def check_input_size(path: str | os.PathLike, input_size: Optional[tuple[int, int]]) -> None:
    """ConfigError for an ``input_size`` given for a .automtl file, which runs at any size (before a model is read)."""
    if input_size is not None and writer_for(path) is _save:
        from ..errors import ConfigError

        raise ConfigError(f"{os.fspath(path)!r} is a .automtl model, which runs at any input size; leave out the input "
                          "size, which fixes the height and width of a .pt2 or .onnx")
