"""Backbones from timm and torchvision by name: ``timm:resnet50d``, ``torchvision:resnet18``.

Each is built headless: timm models without their classifier (``num_classes=0``) and with
``forward_features`` as their forward, so the traced output is the unpooled feature map timm
itself calls the features; torchvision classifiers with their ``fc``/``classifier`` head replaced
by an identity. Where the features are cut is then decided as for any CNN (``automtl.features``).
Weights are downloaded only when asked (``pretrained=True``); without a network that is one
sentence naming ``--weights`` as the way out.
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
import importlib.util
import os
import traceback
import warnings
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from ..errors import BackboneError

__all__ = ["SOURCES", "is_external", "build_external", "list_external"]

#: Names a spec may start with, and the pip extra that brings each package.
SOURCES = {"timm": "automtl[timm]", "torchvision": "automtl[torchvision]"}
#: Attributes that hold a torchvision classifier's head.
_TORCHVISION_HEADS = ("fc", "classifier", "head", "heads")
_HEADLESS_CLASSES: Dict[type, type] = {}
_NORMALIZING_CLASSES: Dict[type, type] = {}


def is_external(spec: str) -> bool:
    """Whether ``spec`` names a timm or torchvision model (``timm:NAME``, ``torchvision:NAME``)."""
    return spec.partition(":")[0] in SOURCES and ":" in spec


def _import(source: str, spec: str) -> Any:
    if importlib.util.find_spec(source) is None:
        raise BackboneError(f"backbone {spec!r} needs the {source} package, which is not installed; "
                            f"install it with pip install '{SOURCES[source]}'")
    try:
        return importlib.import_module(source)
    except Exception as e:  # e.g. a torchvision build for another torch: its compiled ops do not load
        first = (str(e).strip().splitlines() or [""])[0]
        culprit = _failing_package(e) or source
        because = f" because {culprit} does" if culprit != source else ""
        raise BackboneError(f"the {source} package is installed but fails to import{because} ({type(e).__name__}: "
                            f"{first}); install the {culprit} release built for your torch") from e


def _failing_package(exc: BaseException) -> Optional[str]:
    """The installed package in whose code an import failed (the last frame outside torch and the import system
    and automtl that lies in a site-packages or dist-packages folder): timm fails to import when torchvision does."""
    found = None
    for frame in traceback.extract_tb(exc.__traceback__):
        parts = os.path.normpath(frame.filename).split(os.sep)
        for marker in ("site-packages", "dist-packages"):
            if marker in parts and parts.index(marker) + 1 < len(parts):
                top = parts[parts.index(marker) + 1].removesuffix(".py")
                if top not in ("torch", "automtl"):
                    found = top
    return found


def _names(source: str, mod: Any) -> List[str]:
    if source == "timm":
        return list(mod.list_models())
    # Only the image classifiers: detection, segmentation, video and quantized models are not backbones.
    return sorted(mod.models.list_models(module=mod.models))


def _pretrained_names(source: str, mod: Any) -> set:
    if source == "timm":
        return {n.split(".")[0] for n in mod.list_pretrained()}
    return set(_names(source, mod))  # every torchvision classifier publishes ImageNet weights


def list_external(source: str, pattern: Optional[str] = None) -> List[Dict[str, Any]]:
    """The models ``source`` offers (``[{"name", "pretrained"}]``), optionally filtered by a glob pattern."""
    if source not in SOURCES:
        raise BackboneError(f"unknown backbone source {source!r}; choose builtin, {' or '.join(SOURCES)}")
    mod = _import(source, f"{source}:...")
    names = _names(source, mod)
    if pattern:
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    pretrained = _pretrained_names(source, mod)
    return [{"name": f"{source}:{n}", "pretrained": n in pretrained} for n in names]


def build_external(spec: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """Build ``timm:NAME`` or ``torchvision:NAME`` headless; ``pretrained=True`` downloads its weights, and the model
    then standardises its input with their statistics (:func:`normalizing_input`); ``input_statistics=True`` does
    that alone (a pretrained run's backbone rebuilt for the weights it saved)."""
    source, _, name = spec.partition(":")
    name = name.strip()
    kwargs = dict(kwargs)
    pretrained = bool(kwargs.pop("pretrained", False))
    # a run's pretrained backbone rebuilt for weights it saved: the input statistics, no download
    statistics = bool(kwargs.pop("input_statistics", False)) or pretrained
    mod = _import(source, spec)
    names = _names(source, mod)
    if name.split(".")[0] not in set(names):  # timm names may carry a weight tag: resnet18.a1_in1k
        close = difflib.get_close_matches(name.lower(), names, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(repr(f'{source}:{c}') for c in close)}? " if close else ""
        raise BackboneError(f"{source} has no model named {name!r}; {hint}"
                            f"list them with automtl backbones --source {source}")
    try:
        model = _create(source, mod, name, pretrained, statistics, kwargs)
    except BackboneError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        if pretrained and _is_download_error(e):
            raise BackboneError(f"the pretrained weights of {spec!r} could not be downloaded ({type(e).__name__}); "
                                "connect to the internet, or leave pretrained off and pass a saved state dict with --weights "
                                "(loaded as it is: standardise your images as the weights expect)") from e
        raise BackboneError(f"building backbone {spec!r} failed ({type(e).__name__}: {first[:200]}); "
                            "check its arguments") from e
    return model


def _create(source: str, mod: Any, name: str, pretrained: bool, statistics: bool, kwargs: Dict[str, Any]) -> nn.Module:
    if source == "timm":
        model = _forward_features(mod.create_model(name, pretrained=pretrained, num_classes=0, **kwargs))
        cfg = getattr(model, "pretrained_cfg", None) or {}
        return normalizing_input(model, cfg.get("mean"), cfg.get("std"), kwargs.get("in_chans", 3)) if statistics else model
    weights = "DEFAULT" if pretrained else None
    if name in ("googlenet", "inception_v3"):
        # Their auxiliary classifiers only exist for training on ImageNet labels.
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", not pretrained)
    model = mod.models.get_model(name, weights=weights, **kwargs)
    for attr in _TORCHVISION_HEADS:
        if isinstance(getattr(model, attr, None), nn.Module):
            setattr(model, attr, nn.Identity())
    if statistics:  # the weights' own preprocessing (ImageNet's statistics for every classification model)
        transform = mod.models.get_model_weights(name).DEFAULT.transforms()
        model = normalizing_input(model, getattr(transform, "mean", None), getattr(transform, "std", None))
    return model


def normalizing_input(model: nn.Module, mean, std, channels: int = 3) -> nn.Module:
    """``model`` standardising its input first: ``(x - mean) / std`` per channel, the statistics pretrained weights
    were trained on (ImageNet's for torchvision; timm's ``pretrained_cfg``), so images in [0, 1], as automtl's data
    sets give them, reach the weights as in their training. Part of the model (what automtl saves or exports takes
    images in [0, 1] too); the statistics are buffers outside the state dict. The model moves to a subclass whose
    ``forward`` standardises and calls the class's own, so module paths and state dict keys stay as they were.

    Raises:
        BackboneError: ``mean`` or ``std`` is not a sequence of positive-std channel values of one length.
    """
    if mean is None or std is None:
        return model
    try:
        mean_t, std_t = (torch.tensor([float(v) for v in values]).view(1, -1, 1, 1) for values in (mean, std))
    except (TypeError, ValueError) as exc:
        raise BackboneError(f"the pretrained weights' input statistics mean={mean!r}, std={std!r} are not numbers "
                            f"({exc})") from None
    if mean_t.numel() != std_t.numel() or not bool((std_t > 0).all()):
        raise BackboneError(f"the pretrained weights' input statistics mean={mean!r}, std={std!r} do not fit each "
                            "other; report it with the model's name")
    if mean_t.numel() != channels:  # timm adapts the first layer's weights to in_chans, not the statistics
        warnings.warn(f"the pretrained weights' input statistics are for {mean_t.numel()} channels and the backbone "
                      f"takes {channels}: its input is passed on as it is, so standardise your images yourself",
                      UserWarning, stacklevel=3)
        return model
    cls = type(model)
    if cls not in _NORMALIZING_CLASSES:
        def forward(self, x):
            return cls.forward(self, (x - self.automtl_input_mean) / self.automtl_input_std)

        _NORMALIZING_CLASSES[cls] = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                                                "__qualname__": cls.__qualname__})
    from ..capture import placement

    model.__class__ = _NORMALIZING_CLASSES[cls]
    where = placement(model)
    model.register_buffer("automtl_input_mean", mean_t.to(**where), persistent=False)
    model.register_buffer("automtl_input_std", std_t.to(**where), persistent=False)
    return model


def _forward_features(model: nn.Module) -> nn.Module:
    """Make ``forward`` the model's own ``forward_features``.

    torch.fx traces the class's ``forward``, so the model moves to a subclass that only renames
    the method; its modules, parameter names (and so its state dict keys) stay as timm made them.
    """
    cls = type(model)
    if not callable(getattr(cls, "forward_features", None)):
        return model
    if cls not in _HEADLESS_CLASSES:
        _HEADLESS_CLASSES[cls] = type(cls.__name__, (cls,), {"forward": cls.forward_features,
                                                            "__module__": cls.__module__,
                                                            "__qualname__": cls.__qualname__})
    model.__class__ = _HEADLESS_CLASSES[cls]
    return model


def _is_download_error(e: BaseException) -> bool:
    """A failure to reach or read a hub: no network, no cached file, a refused connection."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (OSError, ConnectionError, TimeoutError)):
            return True
        if type(e).__module__.startswith(("huggingface_hub", "requests", "urllib", "httpx")):
            return True
        e = e.__cause__ or e.__context__
    return False
