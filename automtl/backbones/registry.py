"""Find, build and load backbones by name.

A backbone is named on the command line and in configs as a builtin name
(``resnet34``), a timm or torchvision model (``timm:resnet50d``, ``torchvision:resnet18``), a
file (``path/to/net.py:MyNet``) or an importable module (``mypkg.nets:make_net``); this module turns any of these into an ``nn.Module``
and loads ImageNet-style checkpoints into the headless feature extractors.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, TypeVar

import torch
from torch import nn

from ..errors import BackboneError
from ..fileio import load_tensors, state_misfits
from .external import build_external, is_external

__all__ = ["BackboneSpec", "BACKBONES", "register_backbone", "list_backbones", "build_backbone", "load_weights",
           "count_parameters", "count_convs"]


@dataclass(frozen=True)
class BackboneSpec:
    """A builtin backbone: how to build it, what it is, and the input it expects by default.

    ``default_input`` is one sample's (C, H, W); ``family`` is the file the factory lives in.
    """

    name: str
    factory: Callable[..., nn.Module]
    description: str
    family: str
    default_input: Tuple[int, int, int] = (3, 224, 224)


#: Builtin backbones by name, in the order they are listed to users (the order they register).
BACKBONES: "OrderedDict[str, BackboneSpec]" = OrderedDict()

_Factory = TypeVar("_Factory", bound=Callable[..., nn.Module])


def register_backbone(name: str, *, description: str, default_input: Tuple[int, int, int] = (3, 224, 224),
                      family: Optional[str] = None) -> Callable[[_Factory], _Factory]:
    """Decorator that names a backbone factory (a function or an ``nn.Module`` class) in :data:`BACKBONES`.

    Put it above the factory, in the family's own file, as timm's ``@register_model`` does; the
    factory is returned unchanged. ``family`` defaults to the name of the factory's module file.

    Raises:
        ValueError: ``name`` is not a Python-style name, or is already taken by another factory.

    Example:
        >>> @register_backbone("resnet18", description="ResNet-18 features (512 ch at stride 32)")
        ... def resnet18(): ...
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"backbone name {name!r} must be a Python-style name such as 'resnet18'")

    def register(factory: _Factory) -> _Factory:
        old = BACKBONES.get(name)
        if old is not None and old.factory is not factory:
            raise ValueError(f"backbone name {name!r} is taken by {old.factory.__module__}.{old.factory.__qualname__}")
        fam = family or factory.__module__.rsplit(".", 1)[-1]
        BACKBONES[name] = BackboneSpec(name, factory, description, fam, tuple(default_input))
        return factory

    return register


#: Top-level names of the ImageNet classifier heads that feature extractors do not have.
_HEAD_PREFIXES = ("fc", "classifier")


def list_backbones() -> List[BackboneSpec]:
    """The builtin backbones, in registry order."""
    return list(BACKBONES.values())


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def count_convs(model: nn.Module) -> int:
    """Number of ``nn.Conv2d`` modules."""
    return sum(1 for m in model.modules() if isinstance(m, nn.Conv2d))


# ----------------------------------------------------------------------------- build


def build_backbone(spec: str, **kwargs: Any) -> nn.Module:
    """Build the backbone named by ``spec``; ``kwargs`` go to its factory or class.

    ``spec`` is a builtin name (see :data:`BACKBONES`), ``timm:NAME`` or ``torchvision:NAME``
    (headless; ``pretrained=True`` downloads the weights, needs ``automtl[timm]`` or
    ``automtl[torchvision]``), ``path/to/file.py:Attr`` or ``package.module:Attr``. ``Attr`` may
    be an ``nn.Module`` subclass, a factory returning one, or a module instance (then no kwargs
    are allowed).

    Example:
        >>> backbone = build_backbone("resnet18")
    """
    if not isinstance(spec, str) or not spec.strip():
        raise BackboneError(f"backbone spec {spec!r} is not a name; give a builtin name such as 'resnet34' "
                            "or 'path/to/file.py:ClassName' or 'package.module:ClassName'")
    spec = spec.strip()
    if spec in BACKBONES:
        return _call(BACKBONES[spec].factory, spec, kwargs)
    if is_external(spec):
        return build_external(spec, kwargs)
    source, sep, attr = spec.rpartition(":")
    if not sep or not source or _looks_like_drive(source, attr):
        if spec.endswith(".py") or os.sep in spec or "/" in spec:
            raise BackboneError(f"backbone spec {spec!r} names a file but no class; "
                                f"append ':ClassName' (for example '{spec}:MyNet')")
        return _unknown_name(spec)
    if not attr.isidentifier():
        raise BackboneError(f"backbone spec {spec!r} has {attr!r} after the colon, which is not a Python name; "
                            "write 'file.py:ClassName' or 'package.module:ClassName'")
    if source.endswith(".py") or os.sep in source or "/" in source:
        mod = _import_file(source)
    else:
        mod = _import_module(source)
    if not hasattr(mod, attr):
        raise BackboneError(f"{source!r} has no attribute {attr!r}; it defines {_describe_candidates(mod)}")
    obj = getattr(mod, attr)
    if isinstance(obj, nn.Module):
        if kwargs:
            raise BackboneError(f"{spec!r} is already a module instance, so it takes no arguments; "
                                f"drop {', '.join(sorted(kwargs))} or point to a class or factory instead")
        return obj
    if not callable(obj):
        raise BackboneError(f"{spec!r} is a {type(obj).__name__}, not a torch.nn.Module, class or factory; "
                            "point to something that builds the backbone")
    return _call(obj, spec, kwargs)


def names_code(spec: str) -> bool:
    """Whether building ``spec`` runs code it names (``path/to/file.py:Attr``, ``package.module:Attr``), not a
    builtin or a timm/torchvision model looked up by name."""
    from .external import is_external

    spec = spec.strip() if isinstance(spec, str) else spec
    return isinstance(spec, str) and spec not in BACKBONES and not is_external(spec) and ":" in spec


def _looks_like_drive(source: str, attr: str) -> bool:
    """``C:\\nets\\a.py`` (no attribute) splits at the drive colon; treat it as having no colon."""
    return len(source) == 1 and source.isalpha() and ("\\" in attr or "/" in attr)


def _unknown_name(name: str) -> nn.Module:
    names = list(BACKBONES)
    squash = {n.replace("_", ""): n for n in names}  # "ResNet-34" and "resnet_34" mean resnet34
    exact = squash.get(re.sub(r"[-_\s]", "", name.lower()))
    close = [exact] if exact else difflib.get_close_matches(name.lower(), names, n=2, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise BackboneError(f"unknown backbone {name!r}; {hint}builtin backbones are {', '.join(names)}, "
                        "or give 'timm:NAME', 'torchvision:NAME', 'path/to/file.py:ClassName' or 'package.module:ClassName'")


def _import_file(path: str) -> Any:
    """Load a user file under a private module name, so it cannot shadow a real module."""
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(full):
        raise BackboneError(f"backbone file {path!r} does not exist; check the path "
                            f"(resolved to {full!r})")
    name = "_automtl_user_backbone_" + hashlib.sha1(full.encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, full)
    if spec is None or spec.loader is None:
        raise BackboneError(f"backbone file {path!r} cannot be loaded as Python; give a .py file")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses, pickling and typing look the module up here
    try:
        spec.loader.exec_module(mod)
    except SystemExit as e:
        sys.modules.pop(name, None)
        raise BackboneError(f"backbone file {path!r} calls sys.exit({e.code!r}) when imported; a backbone file must "
                            "only define the model, so put script code under if __name__ == '__main__':") from None
    except BaseException as e:
        sys.modules.pop(name, None)
        if not isinstance(e, Exception):
            raise
        raise BackboneError(f"backbone file {path!r} failed to import ({_one_line(e)}); "
                            "fix the file or its imports") from e
    return mod


def _import_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except SystemExit as e:
        raise BackboneError(f"backbone module {name!r} calls sys.exit({e.code!r}) when imported; a backbone module "
                            "must only define the model") from None
    except Exception as e:
        raise BackboneError(f"backbone module {name!r} could not be imported ({_one_line(e)}); "
                            "check that it is installed or on PYTHONPATH") from e


def _call(factory: Callable[..., Any], spec: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """Call ``factory(**kwargs)``, turning bad arguments and non-module results into BackboneError."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        try:
            sig.bind(**kwargs)
        except TypeError as e:
            accepted = [p for p in sig.parameters if p not in ("self", "args", "kwargs")]
            raise BackboneError(f"backbone {spec!r} does not accept these arguments ({e}); "
                                f"it accepts {', '.join(accepted) if accepted else 'none'}") from e
    try:
        model = factory(**kwargs)
    except BackboneError:
        raise
    except (Exception, SystemExit) as e:
        raise BackboneError(f"building backbone {spec!r} failed ({_one_line(e)}); "
                            "check its arguments and code") from e
    if not isinstance(model, nn.Module):
        raise BackboneError(f"backbone {spec!r} returned a {type(model).__name__}, not a torch.nn.Module; "
                            "point to an nn.Module subclass or a function that returns one")
    return model


def _describe_candidates(mod: Any, limit: int = 8) -> str:
    """A short list of what a module offers that could be a backbone (classes, functions, modules)."""
    names = [n for n, v in vars(mod).items()
             if not n.startswith("_") and (inspect.isclass(v) or inspect.isfunction(v) or isinstance(v, nn.Module))
             and getattr(v, "__module__", mod.__name__) == mod.__name__]
    if not names:
        return "no public classes or functions"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0]}" if msg else type(e).__name__


# ----------------------------------------------------------------------------- weights


def load_weights(model: nn.Module, path: str | os.PathLike) -> Dict[str, Any]:
    """Load a checkpoint into ``model`` and return ``{"loaded": n, "ignored": [keys]}``.

    Accepts a plain state dict or one wrapped under ``"state_dict"`` or ``"model"``,
    strips the ``module.`` prefix that DataParallel adds, and drops the ImageNet
    classifier (``fc.*``, ``classifier.*``) that our headless backbones lack,
    reporting those keys under ``"ignored"``. Anything else that does not fit is
    an error, because a partly loaded backbone silently trains from scratch.
    """
    path = os.fspath(path)
    obj = load_tensors(path, "weights file", BackboneError, "save it with torch.save(model.state_dict(), path)")
    state = _unwrap(obj, path)
    state = OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in state.items())

    own = model.state_dict()
    heads = _HEAD_PREFIXES + _named_classifiers(model)
    ignored = [k for k in state if k not in own and
               (k.split(".", 1)[0] in heads or k.rsplit(".", 1)[0] in heads or k.endswith("num_batches_tracked"))]
    for k in ignored:
        del state[k]
    misfits = state_misfits(state, own)
    # BN fills a missing num_batches_tracked itself, so old checkpoints without it are fine.
    missing = [k for k in misfits["missing"] if not k.endswith("num_batches_tracked")]
    unexpected, mismatched, other_kind = misfits["unexpected"], misfits["reshaped"], misfits["other_kind"]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) such as {_first(missing)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es) such as {_first(mismatched)} (file vs model)")
    if other_kind:
        problems.append(f"{len(other_kind)} tensor(s) of another kind of number such as {_first(other_kind)} "
                        "(file vs model)")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) such as {_first(unexpected)}")
    if problems:
        raise BackboneError(f"weights file {path!r} does not fit the {type(model).__name__} backbone: "
                            f"{'; '.join(problems)}; use weights saved from the same architecture")
    try:
        model.load_state_dict(state, strict=True)
    except Exception as e:  # e.g. dtype or BN buffers that the key check cannot see
        raise BackboneError(f"weights file {path!r} could not be loaded ({_one_line(e)}); "
                            "use weights saved from the same architecture") from e
    return {"loaded": len(state), "ignored": ignored}


def _named_classifiers(model: nn.Module) -> Tuple[str, ...]:
    """The classifier's module paths that timm records (``head.fc``, ``last_linear``): a headless model lacks them."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    names = [names] if isinstance(names, str) else list(names or [])
    return tuple(n for n in names if isinstance(n, str))


def _unwrap(obj: Any, path: str) -> "OrderedDict[str, torch.Tensor]":
    """Peel ``{"state_dict": ...}``/``{"model": ...}`` wrappers and check it maps names to tensors."""
    for _ in range(3):
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), None)
            if inner is not None:
                obj = inner
                continue
        break
    if not isinstance(obj, Mapping) or not obj:
        raise BackboneError(f"weights file {path!r} holds a {type(obj).__name__}, not a state dict; "
                            "save it with torch.save(model.state_dict(), path)")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise BackboneError(f"weights file {path!r} is not a state dict of tensors (entries such as "
                            f"{_first(bad)} are not); save it with torch.save(model.state_dict(), path)")
    return OrderedDict(obj)


def _first(keys: List[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")
