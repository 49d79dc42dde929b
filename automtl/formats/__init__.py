"""Step 5 of the pipeline: the compact model as files that are data, not code.

- ``.automtl`` (:func:`save` / :func:`load`, in :mod:`.bundle`): a YAML description over a closed
  vocabulary (:mod:`.vocabulary`, :mod:`.modules`) and safetensors weights.
- ``.pt2`` (:func:`export` / :func:`load_pt2`, in :mod:`.pt2`): torch.export, checked before loading.
- ``.onnx`` (:func:`export_onnx`, in :mod:`.onnx`): behind the optional ``onnx`` extra.
"""
from .bundle import FORMAT_VERSION, describe, load, save
from .onnx import export_onnx
from .pt2 import check_pt2, export, load_pt2

__all__ = ["FORMAT_VERSION", "check_pt2", "describe", "export", "export_onnx", "load", "load_pt2", "save"]
