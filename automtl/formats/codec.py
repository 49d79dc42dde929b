"""Values of an ``.automtl`` graph in a YAML-safe tagged form, and back.

Plain YAML scalars and lists stand for themselves; everything else is a one-key mapping with a
``$`` tag (``{"$node": name}``, ``{"$tuple": [...]}``, ``{"$dtype": "float32"}``, ...). Decoding
accepts only these tags and builds only data: nodes, tuples, sizes, slices, dtypes, devices and
memory formats. Dicts appear only as the graph's output.
"""
from __future__ import annotations

import re
from typing import Any, Optional

import torch
from torch import fx

from ..errors import FileFormatError

#: The dtypes a file may name (a model's, an attribute's, a conversion's): those CNNs compute and index in. Not the
#: float8, unsigned 16-64 bit, complex, quantized or bit types, which few CPU kernels implement (the load-time dry run
#: on the meta device would pass a graph that then fails in every forward).
DTYPES = {str(d).split(".")[-1]: d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8,
                                             torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)}
_MEMORY_FORMATS = {n: getattr(torch, n) for n in ("contiguous_format", "channels_last", "preserve_format")}
_DEVICE = re.compile(r"^(cpu|cuda|mps|meta)(:[0-9]{1,3})?\Z")


def encode(v: Any, where: str):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, fx.Node):
        return {"$node": v.name}
    if isinstance(v, torch.Size):
        return {"$size": [int(d) for d in v]}
    if isinstance(v, tuple):
        return {"$tuple": [encode(x, where) for x in v]}
    if isinstance(v, list):
        return [encode(x, where) for x in v]
    if isinstance(v, dict):
        return {"$dict": [[encode(k, where), encode(x, where)] for k, x in v.items()]}
    if isinstance(v, slice):
        return {"$slice": [encode(v.start, where), encode(v.stop, where), encode(v.step, where)]}
    if isinstance(v, torch.dtype):
        return {"$dtype": str(v).split(".")[-1]}
    if isinstance(v, torch.device):
        return {"$device": str(v)}
    if isinstance(v, torch.memory_format):
        return {"$memory_format": str(v).split(".")[-1]}
    if v is Ellipsis:
        return {"$ellipsis": None}
    raise FileFormatError(
        f"{where} holds a value of type {type(v).__name__}, which an .automtl file cannot store; "
        "write a .pt2 with automtl.export() instead"
    )


def _hashable(value: Any) -> bool:
    """Whether ``value`` can be a dict key (a decoded list, slice or mapping cannot, nor a tuple holding one)."""
    try:
        hash(value)
    except TypeError:
        return False
    return True


def decode(v: Any, where: str, nodes: Optional[dict] = None):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return [decode(x, where, nodes) for x in v]
    if isinstance(v, dict) and len(v) == 1:
        (tag, val), = v.items()
        if tag == "$node" and nodes is not None:
            if not isinstance(val, str) or val not in nodes:  # a name: a mapping or list is no key of the nodes
                raise FileFormatError(f"{where} uses node {str(val)[:60]!r} before it is defined; the file is corrupted, re-save the model")
            return nodes[val]
        if tag == "$tuple" and isinstance(val, list):
            return tuple(decode(x, where, nodes) for x in val)
        if tag == "$size" and isinstance(val, list) and all(  # torch's sizes are int64: a larger one overflows
                isinstance(d, int) and not isinstance(d, bool) and -2**63 <= d < 2**63 for d in val):
            return torch.Size(val)
        if tag == "$dict" and isinstance(val, list) and all(isinstance(p, list) and len(p) == 2 for p in val):
            pairs = [(decode(k, where, nodes), decode(x, where, nodes)) for k, x in val]
            if all(_hashable(k) for k, _ in pairs):  # a list or mapping as a key: refused below, not a TypeError
                return dict(pairs)
        if tag == "$slice" and isinstance(val, list) and len(val) == 3:
            return slice(*(decode(x, where, nodes) for x in val))
        if tag == "$dtype" and isinstance(val, str) and val in DTYPES:
            return DTYPES[val]
        if tag == "$device" and isinstance(val, str) and _DEVICE.match(val):
            return torch.device(val)
        if tag == "$memory_format" and isinstance(val, str) and val in _MEMORY_FORMATS:
            return _MEMORY_FORMATS[val]
        if tag == "$ellipsis":
            return Ellipsis
    raise FileFormatError(f"{where} holds a value automtl cannot read ({str(v)[:60]}); the file is corrupted, re-save the model")
