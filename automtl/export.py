"""Step 5 of the pipeline: write the compact model to files that are data, not code.

Three formats:

- ``.automtl`` (:func:`save` / :func:`load`): a zip holding ``model.yaml`` (the tasks, the
  policy, the modules by torch.nn class name and constructor arguments, and the fx graph as
  a list of nodes), ``weights.pt`` (the state dict, tensors only) and ``checksums`` (sha256
  of both). Loading rebuilds the graph from data: functions come only from an allowlist of
  torch/operator names, modules only from ``torch.nn``, weights through
  ``torch.load(weights_only=True)``. Nothing is imported and no arbitrary object is unpickled.
- ``.pt2`` (:func:`export`): ``torch.export`` of all tasks with a dynamic batch; loads with
  ``torch.export.load`` where automtl is not installed.
- ``.onnx`` (:func:`export_onnx`): behind the optional ``onnx`` extra.

Before saving, modules automtl owns (the conv+BN unit, the builtin heads) and torch.nn
containers called as a whole are inlined by tracing, so the bundle only names torch.nn leaf
modules; a node keeps its name and ``automtl_*`` meta, and the nodes inlined from it carry
the same meta.
"""
from __future__ import annotations

import builtins
import contextlib
import hashlib
import inspect
import io
import keyword
import operator
import os
import pickle
import re
import sys
import warnings
import zipfile
import zlib
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
import yaml
from torch import fx, nn

from .compact import META_CHOICE, META_LAYER, META_SOURCE, META_TASKS, CompactModel
from .errors import AutomtlError, FileFormatError
from .fileio import atomic_path
from .policy import Policy
from .tasks import Task

__all__ = ["save", "load", "export", "export_onnx", "FORMAT_VERSION"]

#: Version of the ``.automtl`` bundle layout; a reader refuses newer ones.
FORMAT_VERSION = 1
MODEL_ENTRY, WEIGHTS_ENTRY, CHECKSUMS_ENTRY = "model.yaml", "weights.pt", "checksums"
_META_KEYS = (META_TASKS, META_LAYER, META_CHOICE, META_SOURCE)
_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PATH_PART = re.compile(r"^[A-Za-z0-9_]+$")
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
#: Constructor arguments that only say where/how to allocate; the weights decide those.
_ALLOCATION_ARGS = ("device", "dtype")
#: torch.* names that touch files, global state or the process: never callable from a bundle.
_TORCH_DENY = {"load", "save", "from_file", "compile", "set_default_dtype", "set_default_device",
               "set_default_tensor_type", "manual_seed", "seed", "set_num_threads", "set_num_interop_threads",
               "set_grad_enabled", "set_printoptions", "use_deterministic_algorithms", "set_rng_state",
               "set_flush_denormal", "set_warn_always", "set_float32_matmul_precision"}

try:  # the C loader/dumper are much faster on big graphs
    _Loader, _Dumper = yaml.CSafeLoader, yaml.CSafeDumper
except AttributeError:  # pragma: no cover
    _Loader, _Dumper = yaml.SafeLoader, yaml.SafeDumper


# ---------------------------------------------------------------------------------------
# Function allowlist
# ---------------------------------------------------------------------------------------
def _torch_allowed(name: str) -> bool:
    if name.startswith("_") or name in _TORCH_DENY:
        return False
    return hasattr(torch._C._VariableFunctions, name) or name in getattr(torch.functional, "__all__", ())


def _operator_allowed(name: str) -> bool:
    return not name.startswith("_") and name not in ("attrgetter", "itemgetter", "methodcaller", "call")


_NAMESPACES = (  # (recorded prefix, namespace, is this name allowed)
    ("operator", operator, _operator_allowed),
    ("torch.nn.functional", F, lambda n: not n.startswith("_")),
    ("torch", torch, _torch_allowed),
    ("builtins", builtins, lambda n: n == "getattr"),
)


def _function_name(fn) -> Optional[str]:
    """The allowlisted qualified name of ``fn``, or None when it is not on the allowlist."""
    name = getattr(fn, "__name__", None)
    if not isinstance(name, str):
        return None
    for prefix, ns, allowed in _NAMESPACES:
        if allowed(name) and getattr(ns, name, None) is fn:
            return f"{prefix}.{name}"
    return None


def _resolve_function(qualname: Any, where: str):
    """Look ``qualname`` up in the allowlisted namespaces only (nothing is imported)."""
    if isinstance(qualname, str):
        prefix, _, name = qualname.rpartition(".")
        for p, ns, allowed in _NAMESPACES:
            if prefix == p and _IDENT.match(name) and allowed(name):
                fn = getattr(ns, name, None)
                if callable(fn) and not isinstance(fn, type):
                    return fn
    raise FileFormatError(
        f"{where} calls function {qualname!r}, which is not on automtl's allowlist of torch and operator "
        "functions; the file was not written by automtl.save or was edited, so re-save the model"
    )


def _method_allowed(name: Any) -> bool:
    return isinstance(name, str) and bool(_IDENT.match(name)) and not name.startswith("_") and hasattr(torch.Tensor, name)


def _torch_nn_class(cls: type) -> bool:
    """True for a public class of the torch.nn namespace itself (not a user's subclass of one)."""
    return (isinstance(cls, type) and issubclass(cls, nn.Module) and not cls.__name__.startswith("_")
            and getattr(nn, cls.__name__, None) is cls)


# ---------------------------------------------------------------------------------------
# Lowering: only torch.nn leaf modules are left as call_module targets
# ---------------------------------------------------------------------------------------
class _InlineTracer(fx.Tracer):
    """Traces through everything except torch.nn leaf modules."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _torch_nn_class(type(m)) and not isinstance(m, _CONTAINERS)


def _needs_inlining(m: nn.Module) -> bool:
    return isinstance(m, _CONTAINERS) or type(m).__module__.split(".")[0] == "automtl"


def _lower(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose call_module nodes all call torch.nn leaf modules (sharing gm's modules)."""
    graph = fx.Graph()
    env: dict = {}
    traced: dict = {}  # module id -> its traced graph (one module can be called by several task classes)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if _needs_inlining(mod):
                env[node] = _inline(graph, gm, node, mod, env, traced)
                continue
            if isinstance(mod, nn.Identity):
                env[node] = fx.map_arg(node.args[0], lambda n: env[n])
                continue
            if not _torch_nn_class(type(mod)):
                _custom_module_error(node.target, mod)
        env[node] = graph.node_copy(node, lambda n: env[n])
    lowered = fx.GraphModule(gm, graph, "CompactNet")
    lowered.graph.eliminate_dead_code()
    lowered.recompile()
    return lowered


def _custom_module_error(target: str, mod: nn.Module):
    cls = type(mod)
    raise FileFormatError(
        f"module {target!r} is a {cls.__module__}.{cls.__qualname__}, not a torch.nn module, so an .automtl "
        "file cannot describe it as data; build that head from torch.nn modules, or write a .pt2 with "
        "automtl.export() instead"
    )


def _inline(graph: fx.Graph, gm: fx.GraphModule, node: fx.Node, mod: nn.Module, env: dict, traced: dict):
    """Emit the traced body of ``mod`` in place of ``node``; returns the value that replaces it."""
    try:
        if id(mod) not in traced:
            traced[id(mod)] = _InlineTracer().trace(mod)
        sub = traced[id(mod)]
    except Exception as exc:  # fx raises many types: all mean "not traceable"
        raise FileFormatError(
            f"module {node.target!r} ({type(mod).__name__}) cannot be traced into torch.nn operations "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); write a .pt2 with automtl.export() instead"
        ) from exc
    args = list(fx.map_arg(node.args, lambda n: env[n]))
    kwargs = dict(fx.map_arg(node.kwargs, lambda n: env[n]))
    local: dict = {}
    result = None
    body = [n for n in sub.nodes if n.op not in ("placeholder", "output")]
    for n in sub.nodes:
        if n.op == "placeholder":
            if args:
                local[n] = args.pop(0)
            elif n.target in kwargs:
                local[n] = kwargs.pop(n.target)
            elif n.args:
                local[n] = n.args[0]  # the parameter's default value
            else:
                raise FileFormatError(f"module {node.target!r} is called without its argument {n.target!r}")
            continue
        if n.op == "output":
            result = fx.map_arg(n.args[0], lambda m: local[m])
            continue
        sub_mod = sub_target = None
        if n.op in ("call_module", "get_attr"):
            sub_target = f"{node.target}.{n.target}"
            if n.op == "call_module":
                sub_mod = gm.get_submodule(sub_target)
                if not _torch_nn_class(type(sub_mod)):
                    _custom_module_error(sub_target, sub_mod)
                if isinstance(sub_mod, nn.Identity):
                    local[n] = fx.map_arg(n.args[0], lambda m: local[m])
                    continue
        last = n is body[-1] or all(u.op == "output" for u in n.users)
        new = graph.create_node(n.op, sub_target if sub_target is not None else n.target,
                                fx.map_arg(n.args, lambda m: local[m]), fx.map_arg(n.kwargs, lambda m: local[m]),
                                name=node.name if last else f"{node.name}_{n.name}")
        new.meta = {k: v for k, v in node.meta.items() if k in _META_KEYS}
        local[n] = new
    return result


# ---------------------------------------------------------------------------------------
# Values: YAML-safe tagged form
# ---------------------------------------------------------------------------------------
_DTYPES = {str(d).split(".")[-1]: d for d in vars(torch).values() if isinstance(d, torch.dtype)}
_MEMORY_FORMATS = {n: getattr(torch, n) for n in ("contiguous_format", "channels_last", "preserve_format")}


def _encode(v: Any, where: str):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, fx.Node):
        return {"$node": v.name}
    if isinstance(v, torch.Size):
        return {"$size": [int(d) for d in v]}
    if isinstance(v, tuple):
        return {"$tuple": [_encode(x, where) for x in v]}
    if isinstance(v, list):
        return [_encode(x, where) for x in v]
    if isinstance(v, dict):
        return {"$dict": [[_encode(k, where), _encode(x, where)] for k, x in v.items()]}
    if isinstance(v, slice):
        return {"$slice": [_encode(v.start, where), _encode(v.stop, where), _encode(v.step, where)]}
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


def _decode(v: Any, where: str, nodes: Optional[dict] = None):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return [_decode(x, where, nodes) for x in v]
    if isinstance(v, dict) and len(v) == 1:
        (tag, val), = v.items()
        if tag == "$node" and nodes is not None:
            if val not in nodes:
                raise FileFormatError(f"{where} uses node {val!r} before it is defined; the file is corrupted, re-save the model")
            return nodes[val]
        if tag == "$tuple" and isinstance(val, list):
            return tuple(_decode(x, where, nodes) for x in val)
        if tag == "$size" and isinstance(val, list) and all(isinstance(d, int) for d in val):
            return torch.Size(val)
        if tag == "$dict" and isinstance(val, list) and all(isinstance(p, list) and len(p) == 2 for p in val):
            return {_decode(k, where, nodes): _decode(x, where, nodes) for k, x in val}
        if tag == "$slice" and isinstance(val, list) and len(val) == 3:
            return slice(*(_decode(x, where, nodes) for x in val))
        if tag == "$dtype" and val in _DTYPES:
            return _DTYPES[val]
        if tag == "$device" and isinstance(val, str):
            try:
                return torch.device(val)
            except (RuntimeError, ValueError):
                pass
        if tag == "$memory_format" and val in _MEMORY_FORMATS:
            return _MEMORY_FORMATS[val]
        if tag == "$ellipsis":
            return Ellipsis
    raise FileFormatError(f"{where} holds a value automtl cannot read ({str(v)[:60]}); the file is corrupted, re-save the model")


# ---------------------------------------------------------------------------------------
# Modules: torch.nn class + constructor arguments read back from the instance
# ---------------------------------------------------------------------------------------
def _constructor_args(name: str, mod: nn.Module) -> dict:
    cls = type(mod)
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    args: dict = {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in _ALLOCATION_ARGS:
            continue
        value = getattr(mod, p.name, inspect.Parameter.empty)
        if isinstance(value, torch.Tensor) or (value is None and p.name in ("bias", "weight") and p.default is True):
            value = value is not None  # bias=True/False is stored as a parameter or None
        if value is inspect.Parameter.empty:
            if p.default is inspect.Parameter.empty:
                raise FileFormatError(
                    f"module {name!r} ({cls.__name__}) does not keep its constructor argument {p.name!r}, so an "
                    ".automtl file cannot describe it; write a .pt2 with automtl.export() instead"
                )
            continue  # an initialisation-only argument: the weights override it
        args[p.name] = _encode(value, f"module {name!r} argument {p.name!r}")
    return args


def _build_module(spec: dict, meta: bool):
    name, cls_name, args = spec.get("name"), spec.get("class"), spec.get("args", {})
    cls = getattr(nn, cls_name, None) if isinstance(cls_name, str) and _IDENT.match(cls_name) else None
    if cls is None or not _torch_nn_class(cls) or cls in _CONTAINERS:
        raise FileFormatError(
            f"module {name!r} has class {cls_name!r}, which is not a torch.nn module automtl can build; "
            "the file was not written by automtl.save or was edited, so re-save the model"
        )
    if not isinstance(args, dict) or not all(isinstance(k, str) and _IDENT.match(k) for k in args):
        raise FileFormatError(f"module {name!r} has malformed constructor arguments; the file is corrupted, re-save the model")
    kwargs = {k: _decode(v, f"module {name!r} argument {k!r}") for k, v in args.items()}
    if meta and "device" in inspect.signature(cls.__init__).parameters:
        kwargs["device"] = "meta"  # no memory, no random init: the weights fill it
    try:
        return cls(**kwargs)
    except Exception as exc:  # a constructor refusing its arguments
        raise FileFormatError(
            f"module {name!r} ({cls_name}) cannot be built from its stored arguments ({exc}); "
            "the file is corrupted or edited, re-save the model"
        ) from None


# ---------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------
def _describe_task(task: Task) -> dict:
    d = task.describe()
    d["ignore_index"] = task.ignore_index
    return d


def describe(compact: CompactModel) -> tuple[dict, fx.GraphModule]:
    """The bundle description of ``compact`` and the lowered GraphModule it describes."""
    if not isinstance(compact, CompactModel):
        raise AutomtlError(f"save() needs an automtl CompactModel (from automtl.compact), got {type(compact).__name__}")
    gm = _lower(compact.graph_module)
    modules, attributes, nodes = [], [], []
    seen_modules: set = set()
    for node in gm.graph.nodes:
        where = f"node {node.name!r}"
        target = node.target
        if node.op == "call_module" and target not in seen_modules:
            seen_modules.add(target)
            mod = gm.get_submodule(target)
            spec = {"name": target, "class": type(mod).__name__, "args": _constructor_args(target, mod)}
            _check_rebuild(spec, mod)
            modules.append(spec)
        elif node.op == "get_attr":
            value = _fetch(gm, target)
            if not isinstance(value, torch.Tensor):
                raise FileFormatError(f"{where} reads attribute {target!r}, which is not a tensor; write a .pt2 with automtl.export() instead")
            attributes.append({"name": target, "kind": "parameter" if isinstance(value, nn.Parameter) else "buffer",
                               "shape": list(value.shape), "dtype": str(value.dtype).split(".")[-1]})
        elif node.op == "call_function":
            fname = _function_name(target)
            if fname is None:
                raise FileFormatError(
                    f"{where} calls {getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', target)}, "
                    "which is not on automtl's allowlist of torch and operator functions; write a .pt2 with automtl.export() instead"
                )
            target = fname
        elif node.op == "call_method" and not _method_allowed(target):
            raise FileFormatError(f"{where} calls method {target!r}, which is not a public torch.Tensor method; write a .pt2 with automtl.export() instead")
        meta = {}
        for key in _META_KEYS:
            if key in node.meta:
                val = node.meta[key]
                meta[key] = list(val) if isinstance(val, tuple) else val
        entry = {"name": node.name, "op": node.op, "target": target, "args": _encode(tuple(node.args), where)["$tuple"]}
        if node.kwargs:
            entry["kwargs"] = {k: _encode(v, where) for k, v in node.kwargs.items()}
        entry["meta"] = meta
        nodes.append(entry)
    desc = {
        "automtl_bundle": FORMAT_VERSION,
        "automtl_version": _package_version(),
        "input_shape": list(compact.input_shape) if compact.input_shape is not None else None,
        "tasks": [_describe_task(t) for t in compact.tasks],
        "policy": compact.policy.to_dict() if compact.policy is not None else None,
        "modules": modules,
        "attributes": attributes,
        "nodes": nodes,
    }
    return desc, gm


def _package_version() -> Optional[str]:
    import automtl  # at call time: automtl/__init__ may import this module

    return getattr(automtl, "__version__", None)


def _fetch(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _check_rebuild(spec: dict, mod: nn.Module) -> None:
    """Refuse at save time what load could not rebuild exactly (a class keeping state we do not see)."""
    rebuilt = _build_module(spec, meta=True)
    same_state = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == {k: tuple(v.shape) for k, v in mod.state_dict().items()}
    if repr(rebuilt) != repr(mod) or not same_state:
        raise FileFormatError(
            f"module {spec['name']!r} ({spec['class']}) cannot be rebuilt from its constructor arguments "
            f"(rebuilt as {rebuilt!r}); write a .pt2 with automtl.export() instead"
        )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save(compact: CompactModel, path: str | os.PathLike) -> None:
    """Write ``compact`` as an ``.automtl`` bundle (atomically): a description and tensors, no code.

    Raises FileFormatError when the model holds something that is not data (a custom head class,
    a function off the allowlist): such models can still be written with :func:`export`.
    """
    desc, gm = describe(compact)
    text = yaml.dump(desc, Dumper=_Dumper, sort_keys=False, default_flow_style=None, width=120).encode()
    state = {k: v.detach().cpu() for k, v in gm.state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    weights = buf.getvalue()
    checksums = f"{_sha256(text)}  {MODEL_ENTRY}\n{_sha256(weights)}  {WEIGHTS_ENTRY}\n".encode()
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w") as zf:
            zf.writestr(MODEL_ENTRY, text, compress_type=zipfile.ZIP_DEFLATED)
            zf.writestr(WEIGHTS_ENTRY, weights, compress_type=zipfile.ZIP_STORED)
            zf.writestr(CHECKSUMS_ENTRY, checksums, compress_type=zipfile.ZIP_STORED)


def _read_entries(path: str) -> dict:
    if not os.path.exists(path):
        raise FileFormatError(f"model file {path!r} does not exist; check the path")
    if os.path.isdir(path):
        raise FileFormatError(f"{path!r} is a directory, not an .automtl model file; pass the file itself")
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            for entry in (MODEL_ENTRY, WEIGHTS_ENTRY, CHECKSUMS_ENTRY):
                if entry not in names:
                    raise FileFormatError(f"model file {path!r} has no {entry} entry; it is not a complete .automtl bundle, re-save the model")
            return {e: zf.read(e) for e in (MODEL_ENTRY, WEIGHTS_ENTRY, CHECKSUMS_ENTRY)}
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError) as exc:
        raise FileFormatError(
            f"model file {path!r} is not a valid .automtl bundle (truncated or corrupted zip: {exc}); save the model again"
        ) from None
    except OSError as exc:
        raise FileFormatError(f"model file {path!r} cannot be read ({exc.strerror or exc}); check the path and its permissions") from None


def _check_checksums(path: str, entries: dict) -> None:
    expected: dict = {}
    try:
        for line in entries[CHECKSUMS_ENTRY].decode("ascii").splitlines():
            if line.strip():
                digest, name = line.split(None, 1)
                expected[name.strip()] = digest.lower()
    except (UnicodeDecodeError, ValueError):
        raise FileFormatError(f"model file {path!r} has an unreadable checksums entry; the file is corrupted, save the model again") from None
    for entry in (MODEL_ENTRY, WEIGHTS_ENTRY):
        if entry not in expected:
            raise FileFormatError(f"model file {path!r} has no checksum for {entry}; the file is corrupted, save the model again")
        if _sha256(entries[entry]) != expected[entry]:
            raise FileFormatError(
                f"model file {path!r}: {entry} does not match its checksum, so the file is corrupted or its parts "
                "come from different models; save the model again"
            )


def _load_weights(path: str, data: bytes) -> dict:
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise FileFormatError(
            f"refused to load model file {path!r}: its weights.pt holds Python objects other than tensors, "
            "which could run code; only load .automtl files written by automtl.save from a source you trust"
        ) from None
    except Exception as exc:  # torch raises RuntimeError/EOFError/... on a damaged archive
        raise FileFormatError(f"model file {path!r} has an unreadable weights.pt ({type(exc).__name__}); save the model again") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise FileFormatError(f"model file {path!r}: weights.pt is not a mapping of names to tensors; save the model again")
    return state


def _parse_description(path: str, raw: bytes) -> dict:
    try:
        desc = yaml.load(raw.decode("utf-8"), Loader=_Loader)
    except (UnicodeDecodeError, yaml.YAMLError):
        raise FileFormatError(f"model file {path!r} has a model.yaml that is not valid YAML; the file is corrupted, save the model again") from None
    if not isinstance(desc, dict) or "automtl_bundle" not in desc:
        raise FileFormatError(f"model file {path!r} has no automtl_bundle version in model.yaml; it is not an .automtl bundle")
    version = desc["automtl_bundle"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise FileFormatError(f"model file {path!r} has an invalid format version {version!r}; it is not an .automtl bundle")
    if version > FORMAT_VERSION:
        raise FileFormatError(
            f"model file {path!r} uses .automtl format version {version}, newer than this automtl reads "
            f"({FORMAT_VERSION}); upgrade automtl"
        )
    for key, typ in (("tasks", list), ("modules", list), ("nodes", list)):
        if not isinstance(desc.get(key), typ):
            raise FileFormatError(f"model file {path!r}: model.yaml has no {key!r} list; the file is corrupted, save the model again")
    return desc


def _dotted(target: Any) -> bool:
    return isinstance(target, str) and all(_PATH_PART.match(p) for p in target.split("."))


_RESERVED = set(dir(fx.GraphModule)) | {"graph", "code", "_code", "meta"}


def _build_graph_module(path: str, desc: dict) -> fx.GraphModule:
    root: dict = {}
    for spec in desc["modules"]:
        name = spec.get("name") if isinstance(spec, dict) else None
        if not _dotted(name) or name.split(".")[0] in _RESERVED or name in root:
            raise FileFormatError(f"model file {path!r} has an invalid or repeated module name {name!r}; the file is corrupted, save the model again")
        root[name] = _build_module(spec, meta=True)
    for spec in desc.get("attributes") or []:
        name = spec.get("name") if isinstance(spec, dict) else None
        dtype = _DTYPES.get(spec.get("dtype")) if isinstance(spec, dict) else None
        shape = spec.get("shape") if isinstance(spec, dict) else None
        if (not _dotted(name) or name.split(".")[0] in _RESERVED or name in root or dtype is None
                or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)):
            raise FileFormatError(f"model file {path!r} has an invalid attribute entry {name!r}; the file is corrupted, save the model again")
        t = torch.empty(shape, dtype=dtype, device="meta")
        root[name] = nn.Parameter(t, requires_grad=t.is_floating_point()) if spec.get("kind") == "parameter" else t

    graph = fx.Graph()
    env: dict = {}
    has_output = False
    for i, nd in enumerate(desc["nodes"]):
        if not isinstance(nd, dict):
            raise FileFormatError(f"model file {path!r}: node {i} of model.yaml is malformed; the file is corrupted, save the model again")
        name, op, target = nd.get("name"), nd.get("op"), nd.get("target")
        where = f"node {name!r} of model file {path!r}"
        if not isinstance(name, str) or not _IDENT.match(name) or keyword.iskeyword(name) or name in env:
            raise FileFormatError(f"model file {path!r} has an invalid or repeated node name {name!r}; the file is corrupted, save the model again")
        if op not in _OPS or has_output:
            raise FileFormatError(f"{where} has operation {op!r} where none is allowed; the file is corrupted, save the model again")
        raw_args, raw_kwargs = nd.get("args", []), nd.get("kwargs", {})
        if (not isinstance(raw_args, list) or not isinstance(raw_kwargs, dict)
                or not all(isinstance(k, str) and _IDENT.match(k) and not keyword.iskeyword(k) for k in raw_kwargs)):
            raise FileFormatError(f"{where} has malformed arguments; the file is corrupted, save the model again")
        args = _decode({"$tuple": raw_args}, where, env)
        kwargs = {k: _decode(v, where, env) for k, v in raw_kwargs.items()}
        if op == "placeholder":
            if not isinstance(target, str) or not _IDENT.match(target) or keyword.iskeyword(target):
                raise FileFormatError(f"{where} has an invalid input name {target!r}; the file is corrupted, save the model again")
        elif op == "call_function":
            target = _resolve_function(target, where)
            if target is builtins.getattr and not (len(args) == 2 and isinstance(args[1], str) and not args[1].startswith("_")):
                raise FileFormatError(f"{where} reads a private attribute with getattr, which automtl files never do; re-save the model")
        elif op == "call_method":
            if not _method_allowed(target):
                raise FileFormatError(f"{where} calls method {target!r}, which is not a public torch.Tensor method; re-save the model")
        elif op == "call_module":
            if target not in root or not isinstance(root[target], nn.Module):
                raise FileFormatError(f"{where} calls module {target!r}, which the file does not describe; the file is corrupted, save the model again")
        elif op == "get_attr":
            if target not in root or isinstance(root[target], nn.Module):
                raise FileFormatError(f"{where} reads attribute {target!r}, which the file does not describe; the file is corrupted, save the model again")
        else:
            target = "output"
            has_output = True
        node = graph.create_node(op, target, args, kwargs, name=name)
        meta = nd.get("meta") or {}
        if isinstance(meta, dict):
            for key in _META_KEYS:
                if key in meta:
                    val = meta[key]
                    node.meta[key] = tuple(val) if isinstance(val, list) else val
        env[name] = node
    if not has_output:
        raise FileFormatError(f"model file {path!r} has a graph with no output; the file is corrupted, save the model again")
    try:
        graph.lint()
    except Exception as exc:
        raise FileFormatError(f"model file {path!r} has an inconsistent graph ({exc}); the file is corrupted, save the model again") from None
    return fx.GraphModule(root, graph, "CompactNet")


def _fill_weights(path: str, gm: fx.GraphModule, state: dict) -> None:
    expected = gm.state_dict(keep_vars=True)
    for key, value in expected.items():
        if key not in state:
            raise FileFormatError(f"model file {path!r}: weights.pt has no tensor {key!r} that model.yaml describes; the weights belong to another model, save the model again")
        if tuple(state[key].shape) != tuple(value.shape):
            raise FileFormatError(
                f"model file {path!r}: tensor {key!r} has shape {tuple(state[key].shape)} in weights.pt but "
                f"{tuple(value.shape)} in model.yaml; the weights belong to another model, save the model again"
            )
    for key in state:
        if key not in expected:
            raise FileFormatError(f"model file {path!r}: weights.pt has tensor {key!r} that model.yaml does not describe; the weights belong to another model, save the model again")
    gm.load_state_dict(state, strict=True, assign=True)
    for name, t in list(gm.named_parameters()) + list(gm.named_buffers()):
        if t.is_meta:
            raise FileFormatError(f"model file {path!r}: tensor {name!r} has no stored value; the file is corrupted, save the model again")


def load(path: str | os.PathLike) -> CompactModel:
    """Read an ``.automtl`` bundle back as a :class:`CompactModel` (in eval mode).

    The graph is rebuilt from data; weights are read with ``weights_only=True``. Any damage,
    mismatch or disallowed content raises FileFormatError.
    """
    path = os.fspath(path)
    entries = _read_entries(path)
    _check_checksums(path, entries)
    desc = _parse_description(path, entries[MODEL_ENTRY])
    try:
        tasks = [Task.from_description(d) for d in desc["tasks"]]
        policy = Policy.from_dict(desc["policy"], f"the policy in {path!r}") if desc.get("policy") is not None else None
    except AutomtlError as exc:
        raise FileFormatError(f"model file {path!r} has an invalid task or policy description ({exc}); save the model again") from None
    if policy is not None and policy.tasks != [t.name for t in tasks]:
        raise FileFormatError(f"model file {path!r} has a policy for tasks {policy.tasks} but tasks {[t.name for t in tasks]}; the file is corrupted, save the model again")
    gm = _build_graph_module(path, desc)
    state = _load_weights(path, entries[WEIGHTS_ENTRY])
    _fill_weights(path, gm, state)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    outputs = out.args[0]
    names = [t.name for t in tasks]
    if not isinstance(outputs, dict) or list(outputs) != names:
        raise FileFormatError(f"model file {path!r}: the graph's outputs do not match its tasks {names}; the file is corrupted, save the model again")
    input_shape = desc.get("input_shape")
    if not (isinstance(input_shape, list) and all(isinstance(d, int) for d in input_shape)):
        input_shape = None
    model = CompactModel(gm, tasks, policy, input_shape=input_shape)
    return model.eval()


# ---------------------------------------------------------------------------------------
# .pt2 and ONNX
# ---------------------------------------------------------------------------------------
def _example(compact: CompactModel, example_input: Optional[torch.Tensor]) -> torch.Tensor:
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
    # batch 2: an example batch of 1 would let the tracer treat the batch as the constant 1
    return torch.randn(2, *shape[1:], dtype=p.dtype if p is not None else torch.float32,
                       device=p.device if p is not None else "cpu")


def _failing_op(exc: BaseException, gm: fx.GraphModule) -> str:
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


class _Restore:
    """Put the model in eval mode for an export and restore its mode afterwards."""

    def __init__(self, module: nn.Module):
        self.module, self.modes = module, {m: m.training for m in module.modules()}

    def __enter__(self):
        self.module.eval()
        return self.module

    def __exit__(self, *exc):
        for m, mode in self.modes.items():
            m.training = mode


def export(compact: CompactModel, path: str | os.PathLike, example_input: Optional[torch.Tensor] = None) -> None:
    """Write all tasks of ``compact`` as a ``.pt2`` (torch.export, dynamic batch, eval mode), atomically.

    ``torch.export.load(path).module()(x)`` then returns ``{task: output}`` for any batch size,
    with no automtl installed. The example input (default: the model's input shape at batch 2)
    fixes every dimension but the batch.
    """
    if not isinstance(compact, CompactModel):
        raise AutomtlError(f"export() needs an automtl CompactModel (from automtl.compact), got {type(compact).__name__}")
    x = _example(compact, example_input)
    gm = compact.graph_module
    noise = io.StringIO()  # on failure torch prints the whole traced graph to stderr; our one sentence replaces it
    with _Restore(gm):
        try:
            with contextlib.redirect_stderr(noise):
                program = torch.export.export(gm, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), strict=False)
            sys.stderr.write(noise.getvalue())
        except Exception as exc:  # torch.export raises many types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise AutomtlError(
                f"torch.export cannot export the compact model at {_failing_op(exc, gm)}: {first}; make that "
                "operation traceable (no data-dependent Python control flow) or save an .automtl bundle instead"
            ) from exc
    buf = io.BytesIO()
    torch.export.save(program, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


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
    """
    try:
        import onnx
    except ImportError:
        raise AutomtlError("ONNX export needs the onnx package; install it with pip install 'automtl[onnx]'") from None
    if not isinstance(compact, CompactModel):
        raise AutomtlError(f"export_onnx() needs an automtl CompactModel (from automtl.compact), got {type(compact).__name__}")
    x = _example(compact, example_input)
    names = list(compact.task_names)
    wrapper = _TupleOutputs(compact.graph_module, names)
    with atomic_path(path) as tmp, _Restore(wrapper):
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
            raise AutomtlError(f"ONNX export of the compact model failed at {_failing_op(exc, compact.graph_module)}: {first}; "
                               "write a .pt2 with automtl.export() instead") from exc
