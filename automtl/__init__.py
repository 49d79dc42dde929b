"""automtl: a model compiler for multi-task learning.

Any single-task PyTorch CNN in; a compact multi-task model out. The pipeline, one module a step:
``capture`` (torch.fx trace) -> ``supermodel`` (policy layers) -> ``search`` (train the policy)
-> ``compact`` (cross-task CSE) -> ``export`` (files) / ``render`` (graphviz).
"""
from .backbones import build_backbone, list_backbones, load_weights, register_backbone
from .capture import Capture, capture
from .compact import CompactModel, compact
from .config import SearchConfig
from .errors import AutomtlError, BackboneError, ConfigError, DataError, FileFormatError, TooLargeError, TraceError
from .formats import export, export_onnx, load, load_pt2, save
from .kinds import TaskKind, register_kind
from .policy import Policy
from .render import render
from .runs import compact_run, search_run
from .search import SearchResult, evaluate, search
from .supermodel import SuperModel, supermodel
from .tasks import Task

__version__ = "0.1.0"

__all__ = [
    "AutomtlError", "BackboneError", "Capture", "CompactModel", "ConfigError", "DataError", "FileFormatError",
    "Policy", "SearchConfig", "SearchResult", "SuperModel", "Task", "TaskKind", "TooLargeError", "TraceError",
    "build_backbone",
    "capture", "compact", "compact_run", "evaluate", "export", "export_onnx", "list_backbones", "load", "load_pt2",
    "load_weights", "register_backbone", "register_kind", "render", "save", "search", "search_run", "supermodel",
]
