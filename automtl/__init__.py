"""automtl: a model compiler for multi-task learning.

Any single-task PyTorch CNN in; a compact multi-task model out. The pipeline, one module a step:
``capture`` (torch.fx trace) -> ``supermodel`` (policy layers) -> ``search`` (train the policy)
-> ``compact`` (cross-task CSE) -> ``export`` / ``render``.
"""
from .backbones import build_backbone, list_backbones, load_weights
from .capture import Capture, capture
from .compact import CompactModel, compact
from .errors import AutomtlError, BackboneError, ConfigError, DataError, FileFormatError
from .policy import Policy
from .supermodel import SuperModel, supermodel
from .tasks import Task

__version__ = "0.1.0"

__all__ = [
    "AutomtlError", "BackboneError", "Capture", "CompactModel", "ConfigError", "DataError", "FileFormatError",
    "Policy", "SuperModel", "Task", "build_backbone", "capture", "compact", "list_backbones", "load_weights",
    "supermodel",
]
