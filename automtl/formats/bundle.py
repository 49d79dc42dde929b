"""The ``.automtl`` bundle: a compact model as data, never as code.

A bundle is a zip of exactly three entries:

- ``model.yaml``: the tasks, the policy, the modules (class and typed constructor arguments
  from :mod:`.modules`), the attributes and the fx graph as a list of nodes whose calls come
  from the closed vocabulary of :mod:`.vocabulary`;
- ``weights.safetensors``: every tensor, in safetensors (a header and raw bytes: a format that
  cannot carry code), stored uncompressed;
- ``checksums``: sha256 of both.

The reader bounds everything before it parses: a regular file under ``max_bytes``, exactly
these entries once each, declared sizes and compression ratios, YAML without aliases and with
bounded nesting, the safetensors header's size, and every tensor's dtype and shape against
what the graph expects. The graph's value kinds are checked through every node, and it is run
once on the ``meta`` device at its recorded input shape, before any weight is filled in.
"""
from __future__ import annotations

import copy
import hashlib
import os
import re
import zipfile
from typing import Optional

import torch
from torch import fx, nn

from ..compact import CompactModel, grouped_train_graph, per_class_train_graph
from ..errors import AutomtlError, ConfigError, FileFormatError, first_line
from ..fileio import MAX_YAML_BYTES, atomic_path, parse_yaml, read_regular_file, read_zip_entries
from ..tracecheck import put_back, same_bits, saved_buffers
from ._export_common import EvalMode
from .codec import DTYPES, encode
from .lowering import META_KEYS, lower
from .modules import MODULES, buildable
from .rebuild import RESERVED, bad, rebuild, shape_check
from .trainmode import META_TRAIN, switch_to_train, train_switches
from .vocabulary import FUNCTIONS, METHODS

__all__ = ["save", "load", "describe", "FORMAT_VERSION", "MAX_BUNDLE_BYTES"]

#: Version of the bundle layout. 1 (automtl 0.1) kept its weights as a torch pickle; it is refused.
FORMAT_VERSION = 2
MODEL_ENTRY, WEIGHTS_ENTRY, CHECKSUMS_ENTRY = "model.yaml", "weights.safetensors", "checksums"
ENTRIES = (MODEL_ENTRY, WEIGHTS_ENTRY, CHECKSUMS_ENTRY)
#: Default cap on a bundle's size; ``load(path, max_bytes=...)`` raises it for a larger model.
MAX_BUNDLE_BYTES = 2 * 2**30
_MAX_CHECKSUMS = 4096
_MAX_RATIO = 100  # model.yaml deflates about 10x; a zip bomb deflates 1000x
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
_FUNCTION_NAMES = {fn: name for name, (fn, _) in FUNCTIONS.items()}


# ---------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------
def _constructor_args(name: str, mod: nn.Module) -> dict:
    """The arguments that rebuild ``mod``, encoded. Only arguments of the installed constructor are written, and a
    keyword-only one only where the module built without it differs (other parameters, buffers or settings): torch
    adds arguments keyword-only, with the old behaviour as default (BatchNorm's ``bias`` in 2.13), so a file that
    leaves them out is read by a torch without them."""
    import inspect

    values: dict = {}
    params = inspect.signature(type(mod).__init__).parameters
    for key in MODULES[type(mod)]:
        param = params.get(key)
        if param is None:
            continue  # an argument of another torch release: not this class's
        value = getattr(mod, key, inspect.Parameter.empty)
        if isinstance(value, torch.Tensor) or (value is None and key in ("bias", "weight") and param.default is True):
            value = value is not None  # bias=True/False is kept as a parameter or None
        if value is inspect.Parameter.empty:
            continue  # an initialisation-only argument: the weights override it
        if key == "inplace":
            value = False  # the graph uses the returned value (capture made that explicit); a bundle never writes in place
        values[key] = value
    for key in [k for k in values if params[k].kind is inspect.Parameter.KEYWORD_ONLY]:
        rest = {k: v for k, v in values.items() if k != key}
        if _same_module(type(mod), values, rest):
            values = rest
    return {key: encode(value, f"module {name!r} argument {key!r}") for key, value in values.items()}


def _same_module(cls: type, args: dict, rest: dict) -> bool:
    """Whether ``cls(**args)`` and ``cls(**rest)``, built on the meta device, have the same parameters and buffers
    (their shapes) and settings (``extra_repr``): whether what ``rest`` leaves out changes the module. Both are built
    from the written arguments, so what the writer sets itself (``inplace=False``) counts on neither side."""
    try:
        built = [cls(**a, device="meta") for a in (args, rest)]
    except Exception:  # noqa: BLE001 - a constructor refusing the combination: the argument is needed
        return False
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731 - dtypes: the weights'
    return built[0].extra_repr() == built[1].extra_repr() and shapes(built[0]) == shapes(built[1])


def _safe_names(targets) -> dict:
    """A file-safe dotted name for each module/attribute path, unique: the same where it can be (a "-" kept, as in
    torchvision's ``block1-0``, so that a loaded model's state dict has the saved one's keys), else with ``_``."""
    out, used = {}, set()
    for target in targets:
        parts = [re.sub(r"[^A-Za-z0-9_-]", "_", p) or "_" for p in target.split(".")]
        # every part the reader refuses (a module's own attribute, a dunder; a first part that is no identifier)
        parts = [f"m_{p}" if p in RESERVED or p.startswith("__") or (i == 0 and not _IDENT.match(p)) else p
                 for i, p in enumerate(parts)]
        name, i = ".".join(parts), 1
        while name in used:
            name, i = f"{'.'.join(parts)}_{i}", i + 1
        used.add(name)
        out[target] = name
    return out


def _fetch(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _not_data(where: str, what: str) -> FileFormatError:
    return FileFormatError(f"{where} {what}, so an .automtl file cannot describe it as data; "
                           "write a .pt2 with automtl.export() instead")


def _describe_node(node: fx.Node, names: dict) -> dict:
    where = f"node {node.name!r}"
    target = node.target
    if node.op in ("call_module", "get_attr"):
        target = names[target]
    elif node.op == "call_function":
        target = _FUNCTION_NAMES.get(node.target)
        if target is None:
            fn = node.target
            raise _not_data(where, f"calls {getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}, "
                                   "which is not on automtl's reviewed vocabulary of tensor functions")
    elif node.op == "call_method" and target not in METHODS:
        raise _not_data(where, f"calls the tensor method {target!r}, which is not on automtl's reviewed vocabulary")
    meta = {k: list(v) if isinstance(v, tuple) else v for k, v in node.meta.items() if k in META_KEYS}
    entry = {"name": node.name, "op": node.op, "target": target, "args": encode(tuple(node.args), where)["$tuple"]}
    if node.kwargs:
        entry["kwargs"] = {k: encode(v, where) for k, v in node.kwargs.items()}
    entry["meta"] = meta
    if node.meta.get(META_TRAIN):
        entry["train"] = {k: encode(v, where) for k, v in node.meta[META_TRAIN].items()}
    return entry


def describe(compact: CompactModel) -> tuple[dict, dict]:
    """The bundle description of ``compact`` (YAML-able) and its tensors by bundle name.

    Raises:
        FileFormatError: the model holds something that is not data (a module class off the list,
            a function or method off the vocabulary, mixed floating dtypes).
    """
    if not isinstance(compact, CompactModel):
        raise AutomtlError(f"save() needs an automtl CompactModel (from automtl.compact), got {type(compact).__name__}")
    with EvalMode(compact.graph_module):  # modules inlined here must take their eval-mode branches
        gm = lower(compact.graph_module)
    # a module inlined here whose forward branches on self.training (timm's BatchNormAct2d: F.batch_norm(training=
    # self.training)) is written as its eval-mode branch, with the constants its train-mode branch takes instead
    # noted on the node; a train-mode branch that differs otherwise is not described: the file then trains otherwise
    switches = _train_switches(compact, gm)
    for node, change in (switches or {}).items():
        node.meta[META_TRAIN] = {**node.meta.get(META_TRAIN, {}), **change}
    # and the train graph a loaded model builds from that groups every norm as this one's does
    exact = switches is not None and _train_graph(gm, compact.task_names)[1]
    targets = list(dict.fromkeys(n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr")))
    names = _safe_names(targets)
    modules, attributes, tensors, frozen = [], [], {}, []
    for target in targets:
        obj = _fetch(gm, target)
        name = names[target]
        if isinstance(obj, nn.Module):
            if not buildable(obj):
                raise _not_data(f"module {target!r}", f"is a {type(obj).__module__}.{type(obj).__qualname__}, not one of "
                                                      "the torch.nn modules on automtl's reviewed list")
            modules.append({"name": name, "class": type(obj).__name__, "args": _constructor_args(target, obj)})
            tensors.update({f"{name}.{k}": v for k, v in obj.state_dict().items()})
            frozen += [f"{name}.{k}" for k, p in obj.named_parameters() if not p.requires_grad]
        elif isinstance(obj, torch.Tensor):
            attributes.append({"name": name, "kind": "parameter" if isinstance(obj, nn.Parameter) else "buffer",
                               "shape": list(obj.shape), "dtype": str(obj.dtype).split(".")[-1]})
            tensors[name] = obj
            if isinstance(obj, nn.Parameter) and not obj.requires_grad:
                frozen.append(name)
        else:
            raise _not_data(f"attribute {target!r}", f"is a {type(obj).__name__}, not a tensor")
    floating = {str(t.dtype).split(".")[-1] for k, t in tensors.items() if t.is_floating_point()}
    if len(floating) > 1:
        raise _not_data("the model", f"mixes floating dtypes {sorted(floating)}")
    desc = {
        "automtl_bundle": FORMAT_VERSION,
        "automtl_version": _package_version(),
        "dtype": floating.pop() if floating else "float32",
        "input_shape": _input_shape(compact),
        "tasks": [{**t.describe(), "ignore_index": t.ignore_index} for t in compact.tasks],
        "policy": compact.policy.to_dict() if compact.policy is not None else None,
        "modules": modules,
        "attributes": attributes,
        "nodes": [_describe_node(n, names) for n in gm.graph.nodes],
        # the forward does something only in training (dropout, stochastic depth) that this eval graph does not hold
        "trains_otherwise": compact.trains_otherwise or not exact,
    }
    if frozen:  # parameters the model does not train (requires_grad False): a loaded model leaves them as they are
        desc["frozen"] = frozen
    return desc, {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def _train_graph(gm: fx.GraphModule, task_names: list) -> tuple[Optional[fx.Graph], bool]:
    """The train graph a loaded model runs: the file's eval graph with its notes switched in, norm calls grouped,
    what reaches no output left out (a noted batch_norm there would still move its statistics); None where it is the
    eval graph. And whether it trains as the saved model did (every site that runs for several classes grouped)."""
    train = copy.deepcopy(gm.graph)
    switched = switch_to_train(train)
    grouped, exact = grouped_train_graph(gm, task_names, train)
    if grouped is None and not switched:
        return None, exact
    module = fx.GraphModule(gm, grouped if grouped is not None else train, "CompactNet")
    module.graph.eliminate_dead_code()
    return module.graph, exact


def _train_switches(compact: CompactModel, lowered: fx.GraphModule) -> Optional[dict]:
    """:func:`~.trainmode.train_switches` between ``lowered`` (the eval graph, lowered in eval mode) and the train
    graph (with a call per class), lowered in train mode; None where the train graph differs otherwise (a random mask)
    or a module's train-mode branch reads or writes a buffer while it is traced (a norm whose momentum is None reads
    its step counter as a number, and counts the step): what it wrote is put back."""
    source = compact.graph_module
    if compact.train_graph is not None:
        source = fx.GraphModule(source, per_class_train_graph(compact.train_graph), "CompactNet")
    buffers = saved_buffers(compact)
    try:
        with EvalMode(compact.graph_module, train=True):
            trained = lower(source, proxy_buffers=True)
    except Exception:  # noqa: BLE001 - any failure of the train-mode trace: the file then says it trains otherwise
        return None
    finally:
        moved = any(not same_bits(b, before) for b, before in buffers)
        put_back(buffers)
    return None if moved else train_switches(lowered.graph, trained.graph)


def _input_shape(compact: CompactModel) -> list:
    """The (N, C, H, W) the reader checks the graph at: the model's, or its input's traced shape."""
    shape = compact.input_shape
    if shape is None:
        placeholder = next(n for n in compact.graph_module.graph.nodes if n.op == "placeholder")
        meta = placeholder.meta.get("tensor_meta")
        shape = tuple(meta.shape) if hasattr(meta, "shape") else None
    if shape is None or len(shape) != 4:
        raise FileFormatError("the model has no (N, C, H, W) input shape to record; build it with automtl.compact, "
                              "or set model.input_shape = (1, C, H, W) before saving")
    return [int(d) for d in shape]


def _package_version() -> Optional[str]:
    import automtl  # at call time: automtl/__init__ imports this module

    return getattr(automtl, "__version__", None)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save(compact: CompactModel, path: str | os.PathLike) -> None:
    """Write ``compact`` as an ``.automtl`` bundle, atomically: a description and tensors, no code.

    The description is read back with the loader's own checks before anything is written, so
    whatever ``save`` writes, :func:`load` reads.

    Raises:
        ConfigError: ``path`` does not end in ``.automtl``.
        FileFormatError: the model holds something that is not data (a custom head class, an
            operation off the vocabulary); such models can still be written with ``export``.

    Example:
        >>> automtl.save(model, "model.automtl"); automtl.load("model.automtl")(x)
    """
    from safetensors.torch import save as st_save

    if os.path.splitext(os.fspath(path))[1].lower() != ".automtl":
        raise ConfigError(f"save() writes an .automtl bundle, so {os.fspath(path)!r} would hold another format than "
                          "its name says; name it .automtl, or write .pt2 / .onnx with automtl.export")
    desc, tensors = describe(compact)
    _refuse_shared_memory(tensors)
    import yaml

    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    text = yaml.dump(desc, Dumper=dumper, sort_keys=False, default_flow_style=None, width=120).encode()
    weights = st_save(tensors)
    where = os.fspath(path)
    try:
        rebuild(where, parse_yaml(text, f"model file {where!r} (model.yaml)", FileFormatError), weights)
    except FileFormatError as exc:  # what automtl describes, automtl must read: a bug of ours, not the user's file
        raise FileFormatError(
            f"save() reads the model's description back with load()'s checks before writing, and they refuse it "
            f"({first_line(exc, limit=None)}), so nothing was written to {where!r}; unless the model is beyond load()'s bounds "
            "this is a bug in automtl (please report it): write the model with automtl.export (.pt2) meanwhile") from exc
    checksums = f"{_sha256(text)}  {MODEL_ENTRY}\n{_sha256(weights)}  {WEIGHTS_ENTRY}\n".encode()
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w") as zf:
            zf.writestr(MODEL_ENTRY, text, compress_type=zipfile.ZIP_DEFLATED)
            zf.writestr(WEIGHTS_ENTRY, weights, compress_type=zipfile.ZIP_STORED)
            zf.writestr(CHECKSUMS_ENTRY, checksums, compress_type=zipfile.ZIP_STORED)


def _refuse_shared_memory(tensors: dict) -> None:
    """Tensors whose bytes overlap (a weight tied between two layers of the backbone) are one tensor under two names,
    which the description cannot say: written twice, the loaded model's two copies would train apart. Views of one
    storage that do not overlap (a table of constants sliced into a mean and a std) are written apart, as they are."""
    spans: dict = {}  # storage -> [(first byte, end byte, name)]
    for name, t in tensors.items():
        if t.numel() == 0:
            continue
        extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
        start = t.storage_offset() * t.element_size()
        spans.setdefault((t.device, t.untyped_storage().data_ptr()), []).append(
            (start, start + extent * t.element_size(), name))
    for found in spans.values():
        found.sort()
        for (_, end, first), (start, _, second) in zip(found, found[1:]):
            if start < end:
                raise FileFormatError(
                    f"the model's tensors {first!r} and {second!r} share memory (a weight tied between two layers of "
                    "the backbone), which an .automtl file does not describe; write a .pt2 with automtl.export() "
                    "instead")


# ---------------------------------------------------------------------------------------
# reading: structure
# ---------------------------------------------------------------------------------------
def _read_entries(path: str, max_bytes: int) -> dict:
    """The three entries of the bundle at ``path``, read under :func:`read_zip_entries`'s bounds."""
    data = read_regular_file(path, "model file", max_bytes, FileFormatError)

    def check_names(names: list) -> None:
        if "weights.pt" in names:
            raise bad(path, "is an .automtl bundle of format 1 (automtl 0.1), whose weights are a Python pickle; this "
                             "version refuses it, so compile the run again with this version (automtl compact RUN_DIR)")
        if sorted(names) != sorted(ENTRIES):
            missing, extra = sorted(set(ENTRIES) - set(names)), sorted(set(names) - set(ENTRIES))
            raise bad(path, f"does not hold exactly the entries {list(ENTRIES)} (missing {missing}, unexpected "
                             f"{[n[:60] for n in extra][:3]}); it is not an .automtl bundle automtl wrote, save the model again")

    caps = {MODEL_ENTRY: MAX_YAML_BYTES, CHECKSUMS_ENTRY: _MAX_CHECKSUMS, WEIGHTS_ENTRY: max_bytes}
    try:
        return read_zip_entries(data, f"model file {path!r}", FileFormatError, "save the model again", max_entries=16,
                                max_total=sum(caps.values()), max_ratio=_MAX_RATIO, caps=caps, stored=(WEIGHTS_ENTRY,),
                                check_names=check_names)
    except FileFormatError:
        _refuse_export(path)  # the bytes are read: a zip that is no bundle, named as an export
        raise


def _check_checksums(path: str, entries: dict) -> None:
    expected: dict = {}
    try:
        for line in entries[CHECKSUMS_ENTRY].decode("ascii").splitlines():
            if line.strip():
                digest, name = line.split(None, 1)
                expected[name.strip()] = digest.lower()
    except (UnicodeDecodeError, ValueError):
        raise bad(path, "has an unreadable checksums entry; the file is corrupted, save the model again") from None
    for entry in (MODEL_ENTRY, WEIGHTS_ENTRY):
        if _sha256(entries[entry]) != expected.get(entry):
            raise bad(path, f"has a {entry} that does not match its checksum, so the file is corrupted or its parts come "
                             "from different models; save the model again")


def _parse_description(path: str, raw: bytes) -> dict:
    desc = parse_yaml(raw, f"model file {path!r} (its model.yaml)", FileFormatError)
    if not isinstance(desc, dict) or "automtl_bundle" not in desc:
        raise bad(path, "has no automtl_bundle version in model.yaml; it is not an .automtl bundle")
    version = desc["automtl_bundle"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise bad(path, f"has an invalid format version {str(version)[:20]!r}; it is not an .automtl bundle")
    if version != FORMAT_VERSION:
        newer = "newer than this automtl reads; upgrade automtl" if version > FORMAT_VERSION else \
            "older than this automtl reads; compile the run again with this version (automtl compact RUN_DIR)"
        raise bad(path, f"uses .automtl format version {str(version)[:20]}, {newer}")
    for key in ("tasks", "modules", "nodes"):
        if not isinstance(desc.get(key), list):
            raise bad(path, f"has no {key!r} list in model.yaml; the file is corrupted, save the model again")
    if desc.get("dtype") not in ("float32", "float16", "bfloat16", "float64"):
        raise bad(path, f"declares the weight dtype {str(desc.get('dtype'))[:20]!r}, which is not a floating dtype; save the model again")
    return desc


#: What an export of a compact model is called, and how to read it instead of :func:`load`.
_EXPORTS = {".pt2": ("a torch.export archive", "run it with automtl.load_pt2"),
            ".onnx": ("an ONNX model", "run it with onnxruntime")}


def _refuse_export(path: str) -> None:
    """An exported file that is no bundle, given where one is read: say what it is, not why its bytes are wrong."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in _EXPORTS:
        what, how = _EXPORTS[suffix]
        raise bad(path, f"is {what}, not an .automtl model; give the .automtl it was exported from, or {how}") from None


def load(path: str | os.PathLike, max_bytes: int = MAX_BUNDLE_BYTES) -> CompactModel:
    """Read an ``.automtl`` bundle back as a :class:`CompactModel` in eval mode. Runs nothing from the file.

    The load-time bounds (README, "Files are data") are for inference, which runs without autograd: in train mode,
    autograd keeps what the backward needs (up to every node's output), bounded only by the element operations a
    sample and task (2^34). Fine-tune a loaded model only where you trust the file that far.

    Args:
        path: the bundle. Must be a regular file (not a pipe or device) of at most ``max_bytes``.
        max_bytes: cap on the file's size, 2 GiB by default; raise it for a larger model.

    Raises:
        FileFormatError: one sentence naming the file and what is wrong: an export (.pt2, .onnx), not
            a regular file, too large, not exactly the three entries, a zip bomb, YAML aliases, an operation or module
            off the reviewed vocabulary, a value that is not data, a tensor whose dtype or shape
            does not match the graph, a checksum mismatch.

    Example:
        >>> model = automtl.load("runs/quickstart/model.automtl")
        >>> model(torch.randn(2, 3, 64, 64))["depth"].shape
        torch.Size([2, 1, 64, 64])
    """
    path = os.fspath(path)
    entries = _read_entries(path, max_bytes)
    _check_checksums(path, entries)
    desc = _parse_description(path, entries[MODEL_ENTRY])
    gm, meta_twin, tasks, policy = rebuild(path, desc, entries[WEIGHTS_ENTRY])
    # the file holds the eval graph and the constants its calls take in train mode instead; in train mode its norms'
    # statistics move once a step, as the saved model's did
    train_graph = _train_graph(gm, [t.name for t in tasks])[0]
    model = CompactModel(gm, tasks, policy, input_shape=desc["input_shape"], train_graph=train_graph).eval()
    model.trains_otherwise = model.train_mode_left_out = desc.get("trains_otherwise", False)
    model.input_check = _InputCheck(path, meta_twin, tasks, DTYPES[desc["dtype"]], desc["input_shape"])
    return model


class _InputCheck:
    """Checks each new input shape of a loaded model on the meta device before it runs (see shape_check):
    sizes in a graph can come from the input, so a file that is harmless at its recorded shape could
    otherwise allocate without bound at another."""

    def __init__(self, path: str, gm, tasks: list, dtype: torch.dtype, recorded: list):
        self.path, self.gm, self.tasks, self.dtype, self.recorded = path, gm, tasks, dtype, tuple(recorded)
        self.seen = {(tuple(recorded), dtype, True)}

    def __call__(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise AutomtlError(f"model {self.path!r} takes an image batch tensor (N, C, H, W), got "
                               f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        key = (tuple(x.shape), self.dtype, x.device.type == "cpu")
        if key not in self.seen:
            try:
                shape_check(self.path, self.gm, self.tasks, self.dtype, x.shape, on_cpu=x.device.type == "cpu")
            except FileFormatError as exc:  # the file passed at its recorded shape: this input is what does not fit
                reason = str(exc).split("; the file is")[0]
                if "does not run at input shape" in reason:  # an operation refuses the size (too small, odd)
                    raise FileFormatError(f"{reason}; pass images of a size the model takes (it was saved for "
                                          f"{list(self.recorded)}), or check the file if it is not one automtl "
                                          "saved") from None
                raise FileFormatError(f"{reason} (input shape {list(x.shape)}); pass a smaller batch or image, or "
                                      "check the file if it is not one automtl saved") from None
            self.seen.add(key)

    def failure(self, x: torch.Tensor, exc: Exception) -> AutomtlError:
        """The error of a run that failed in an operation (an op without a kernel for the file's dtypes, a
        division of integers by zero): what failed, in one sentence."""
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        return AutomtlError(f"model {self.path!r} ({str(self.dtype).split('.')[-1]}) fails on an input of shape "
                            f"{tuple(x.shape)} and dtype {str(x.dtype).split('.')[-1]} ({type(exc).__name__}: {first}); "
                            "pass an input it takes, and if the file is not one automtl saved, it may be crafted or corrupted")
