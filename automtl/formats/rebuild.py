"""Rebuilding a compact model from a parsed bundle description, checking everything first.

The description's modules are built from :mod:`.modules` on the ``meta`` device, its nodes from
:mod:`.vocabulary` with value kinds checked through the whole graph, and the graph is run once on
``meta`` tensors at its recorded input shape (every activation bounded) before the safetensors
header is matched against the tensors the graph needs and the weights are read.
"""
from __future__ import annotations

import copy
import json
import keyword
import math
import operator
import re
import struct
from typing import Any, Optional

import torch
from torch import fx, nn
from torch.fx.operator_schemas import normalize_function

from ..errors import AutomtlError, FileFormatError
from ..kinds import KINDS, shape_fits
from ..policy import CHOICES, Policy
from ..tasks import MODULE_ATTRIBUTES, Task
from .codec import DTYPES, decode
from .lowering import META_KEYS
from .modules import build_module
from .trainmode import META_TRAIN, check_statistics, check_switches
from .vocabulary import FUNCTIONS, METHODS, check_graph

_MAX_HEADER = 16 * 2**20
#: Bounds on a description: a ResNet-152 with five tasks specialised everywhere has about 3,000 nodes.
MAX_NODES, MAX_MODULES = 20_000, 10_000
MAX_ATTRIBUTE_ELEMENTS = 2**31
_ATTRIBUTE_DTYPES = ("float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")
#: The keys of a format-2 description; anything else is refused rather than parsed and ignored.
DESCRIPTION_KEYS = {"automtl_bundle", "automtl_version", "dtype", "input_shape", "tasks", "policy", "modules",
                    "attributes", "nodes", "trains_otherwise", "frozen"}
#: The keys of a node's entry.
NODE_KEYS = {"name", "op", "target", "args", "kwargs", "meta", "train"}
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
_PART = re.compile(r"^[A-Za-z0-9_-]+\Z")  # a "-" as torchvision's RegNet names blocks ("block1-0"): fx reads it with getattr
#: bounds of a node's sharing notes (a layer's module path, task names): far above what a model writes
MAX_META_CHARS, MAX_META_ITEMS = 1024, 1024
#: Names a module or attribute may not take: they would shadow the GraphModule's own attributes.
RESERVED = MODULE_ATTRIBUTES
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def bad(path: str, what: str) -> FileFormatError:
    """The error for a bundle at ``path`` that ``what`` (a clause naming the fault and the fix)."""
    return FileFormatError(f"model file {path!r} {what}")


def _dotted(target: Any) -> bool:
    """A module or attribute path whose every part is a plain name that is no attribute of a module (``to``,
    ``forward``, a dunder): the generated code reads ``self.<path>``, which must reach the file's own object."""
    return (isinstance(target, str) and len(target) <= 512
            and all(_PART.match(p) and p not in RESERVED and not p.startswith("__") for p in target.split("."))
            and _IDENT.match(target.split(".")[0]) is not None)


#: Operations whose ``dim`` may name one past their input's axes: the axis they insert (``x[:, None]``,
#: ``torch.stack(..., dim=x.dim())``), by name so that torch's and aten's spellings (``aten.unsqueeze.default``) match.
_NEW_AXIS = frozenset({"unsqueeze", "unsqueeze_copy", "stack"})


def _op_name(target: Any) -> str:
    """``unsqueeze`` for ``torch.unsqueeze``, ``Tensor.unsqueeze`` and ``aten.unsqueeze.default`` alike."""
    return getattr(target, "_opname", None) or getattr(target, "__name__", "")


def _build_root(path: str, desc: dict) -> dict:
    if len(desc["modules"]) > MAX_MODULES or len(desc.get("attributes") or []) > MAX_MODULES or len(desc["nodes"]) > MAX_NODES:
        raise bad(path, f"describes more than {MAX_MODULES} modules or {MAX_NODES} nodes, beyond any model automtl "
                        "writes; it is crafted or corrupted")
    root: dict = {}
    for spec in desc["modules"]:
        name = spec.get("name") if isinstance(spec, dict) else None
        if not _dotted(name) or name in root:
            raise bad(path, f"has an invalid or repeated module name {str(name)[:60]!r}; the file is corrupted, save the model again")
        raw = spec.get("args", {})
        if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
            raise bad(path, f"has malformed constructor arguments for module {name!r}; the file is corrupted, save the model again")
        args = {k: decode(v, f"module {name!r} argument {k[:40]!r} of model file {path!r}") for k, v in raw.items()}
        root[name] = build_module(name, spec.get("class"), args, f"model file {path!r}")
    for spec in desc.get("attributes") or []:
        name = spec.get("name") if isinstance(spec, dict) else None
        dtype = DTYPES.get(spec.get("dtype")) if isinstance(spec, dict) and spec.get("dtype") in _ATTRIBUTE_DTYPES else None
        shape = spec.get("shape") if isinstance(spec, dict) else None
        if (not _dotted(name) or name in root or dtype is None or not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 2**31 for d in shape)):
            raise bad(path, f"has an invalid attribute entry {str(name)[:60]!r}; the file is corrupted, save the model again")
        if math.prod(shape) > MAX_ATTRIBUTE_ELEMENTS:
            raise bad(path, f"has an attribute {name!r} of {math.prod(shape)} elements, beyond its bounds; it is crafted or corrupted")
        t = torch.empty(shape, dtype=dtype, device="meta")
        root[name] = nn.Parameter(t, requires_grad=t.is_floating_point()) if spec.get("kind") == "parameter" else t
    for name, value in root.items():  # a.b where a is one of the file's modules: b must not replace one of a's own
        parts = name.split(".")  # attributes (a ReLU's `inplace`), but a tensor may be a's own tensor (a conv's
        for i in range(1, len(parts)):  # `weight`, read directly by a tied decoder)
            parent, part = root.get(".".join(parts[:i])), parts[i]
            own_tensor = (i == len(parts) - 1 and isinstance(value, torch.Tensor) and isinstance(parent, nn.Module)
                          and (part in parent._parameters or part in parent._buffers))
            if isinstance(parent, nn.Module) and not own_tensor and (hasattr(parent, part) or part in vars(parent)):
                raise bad(path, f"has a module or attribute {name[:60]!r} named like an attribute of its parent "
                                f"{type(parent).__name__}; it is crafted, save the model again")
    return root


def _build_node(path: str, graph: fx.Graph, env: dict, root: dict, nd: Any, i: int) -> fx.Node:
    if not isinstance(nd, dict):
        raise bad(path, f"has a malformed node {i} in model.yaml; the file is corrupted, save the model again")
    name, op, target = nd.get("name"), nd.get("op"), nd.get("target")
    if not isinstance(name, str) or not _IDENT.match(name) or len(name) > 256 or name in env or keyword.iskeyword(name):
        raise bad(path, f"has an invalid or repeated node name {str(name)[:60]!r}; the file is corrupted, save the model again")
    where = f"node {name!r} of model file {path!r}"
    unknown = set(nd) - NODE_KEYS
    if unknown:
        raise FileFormatError(f"{where} has keys {sorted(str(k)[:30] for k in unknown)[:3]} that format 2 does not have; "
                              "it is crafted or from another version, save the model again")
    raw_args, raw_kwargs = nd.get("args", []), nd.get("kwargs", {})
    if (not isinstance(raw_args, list) or not isinstance(raw_kwargs, dict)
            or not all(isinstance(k, str) and _IDENT.match(k) and not keyword.iskeyword(k) for k in raw_kwargs)):
        raise FileFormatError(f"{where} has malformed arguments; the file is corrupted, save the model again")
    args = decode({"$tuple": raw_args}, where, env)
    kwargs = {k: decode(v, where, env) for k, v in raw_kwargs.items()}
    if op == "placeholder":
        if not isinstance(target, str) or not _IDENT.match(target) or keyword.iskeyword(target) or args or kwargs:
            raise FileFormatError(f"{where} is an invalid input; the file is corrupted, save the model again")
        target = "x"  # the forward's parameter name is ours to choose: a stored one could shadow a name the code uses
    elif op == "call_function":
        if not isinstance(target, str) or target not in FUNCTIONS:  # a mapping or list is no key: refused, not a TypeError
            raise FileFormatError(f"{where} calls {str(target)[:80]!r}, which is not on automtl's reviewed vocabulary of "
                                  "tensor functions; the file was not written by automtl.save or was crafted, re-save the model")
        target = FUNCTIONS[target][0]
    elif op == "call_method":
        if not isinstance(target, str) or target not in METHODS:
            raise FileFormatError(f"{where} calls the method {str(target)[:60]!r}, which is not on automtl's reviewed list "
                                  "of tensor methods; the file was not written by automtl.save or was crafted, re-save the model")
    elif op == "call_module":
        if not isinstance(target, str) or not isinstance(root.get(target), nn.Module):
            raise FileFormatError(f"{where} calls module {str(target)[:60]!r}, which the file does not describe; the file is corrupted, save the model again")
    elif op == "get_attr":
        if not isinstance(target, str) or not isinstance(root.get(target), torch.Tensor):
            raise FileFormatError(f"{where} reads attribute {str(target)[:60]!r}, which the file does not describe; the file is corrupted, save the model again")
    elif op == "output":
        target = "output"
    else:
        raise FileFormatError(f"{where} has the operation {str(op)[:30]!r}, which a graph does not have; the file is corrupted, save the model again")
    node = graph.create_node(op, target, args, kwargs, name=name)
    if node.name != name or name == "self":  # a name the generated code would shadow (self: the module itself)
        raise bad(path, f"has a node named {name[:60]!r}, a name the generated code uses itself; it is crafted, "
                        "save the model again")
    if "train" in nd:  # the constants the call takes in train mode instead (a norm inlined in its eval branch)
        node.meta[META_TRAIN] = check_switches(node, nd["train"], where)
    meta = nd.get("meta") or {}
    if isinstance(meta, dict):
        for key in META_KEYS:
            val = meta.get(key)
            if isinstance(val, str) or (isinstance(val, list) and all(isinstance(v, str) for v in val)):
                if len(val) > MAX_META_ITEMS or any(len(v) > MAX_META_CHARS for v in ([val] if isinstance(val, str) else val)):
                    raise bad(path, f"has node {name!r} with a sharing note longer than any model has "
                                    f"({MAX_META_CHARS} characters, {MAX_META_ITEMS} entries); it is crafted or corrupted")
                node.meta[key] = tuple(val) if isinstance(val, list) else val
    return node


def _check_meta(path: str, graph: fx.Graph, tasks: list) -> None:
    """The sharing meta render reads must name the file's own tasks and real choices."""
    names = {t.name for t in tasks}
    for node in graph.nodes:
        members = node.meta.get(META_KEYS[0], ())
        choice = node.meta.get(META_KEYS[2])
        if not set(members) <= names or (choice is not None and choice not in ("share", "specialize", "skip")):
            raise bad(path, f"has node {node.name!r} whose sharing notes name tasks or choices the model does not have; "
                            "the file is corrupted, save the model again")


def _check_sharing(path: str, graph: fx.Graph, tasks: list, policy: Optional[Policy]) -> None:
    """The sharing notes and the policy that ``inspect`` and ``render`` report must be what the graph computes:
    a policy-layer node's tasks are those whose outputs it reaches; a task's choice at a layer is the choice noted
    on that layer's nodes it reaches (none but skip for skip), and a specialized layer's modules reach no other task."""
    (out,) = [n for n in graph.nodes if n.op == "output"]
    reach: dict = {n: set() for n in graph.nodes}  # node -> tasks whose output it reaches
    outputs = out.args[0] if isinstance(out.args[0], dict) else {}
    for name, value in outputs.items():
        if isinstance(value, fx.Node):
            reach[value].add(name)
    for n in reversed(list(graph.nodes)):
        for i in n.all_input_nodes:
            reach[i] |= reach[n]
    module_reach: dict = {}  # module path -> tasks any of its calls reaches
    for n in graph.nodes:
        if n.op == "call_module":
            module_reach.setdefault(n.target, set()).update(reach[n])
    layered = [n for n in graph.nodes if n.meta.get(META_KEYS[1]) is not None]
    by_layer: dict = {}
    for n in layered:
        by_layer.setdefault(n.meta[META_KEYS[1]], []).append(n)
    for n in layered:
        if reach[n] and set(n.meta.get(META_KEYS[0], ())) != reach[n]:
            raise bad(path, f"has node {n.name!r} noted as computing for tasks {list(n.meta.get(META_KEYS[0], ()))} "
                            f"though it feeds {sorted(reach[n])}; the file is corrupted or crafted, save the model again")
    if policy is None:
        return
    for li, layer in enumerate(policy.layers):
        for ti, task in enumerate(policy.tasks):
            choice = CHOICES[policy.choices[li][ti]]
            mine = [n for n in by_layer.get(layer, ()) if task in reach[n]]
            noted = {n.meta.get(META_KEYS[2]) for n in mine}
            own = [n for n in mine if n.op == "call_module" and n.meta.get(META_KEYS[2]) == "specialize"
                   and module_reach[n.target] != {task}]
            if noted - {"skip"} != ({choice} if choice != "skip" else set()) or own:
                raise bad(path, f"has a policy choosing {choice} for task {task!r} at layer {layer!r}, which is not what "
                                "its graph computes; the file is corrupted or crafted, save the model again")


def _build_graph_module(path: str, desc: dict) -> fx.GraphModule:
    root = _build_root(path, desc)
    graph = fx.Graph()
    env: dict = {}
    nodes = desc["nodes"]
    for i, nd in enumerate(nodes):
        env[nd.get("name") if isinstance(nd, dict) else i] = node = _build_node(path, graph, env, root, nd, i)
        if node.op == "output" and i != len(nodes) - 1:
            raise bad(path, "has nodes after its graph's output; the file is corrupted, save the model again")
    if not nodes or list(graph.nodes)[-1].op != "output" or sum(n.op == "placeholder" for n in graph.nodes) != 1:
        raise bad(path, "has a graph without exactly one input and an output; the file is corrupted, save the model again")
    check_graph(graph, f"model file {path!r}")
    try:
        graph.lint()
    except Exception as exc:  # fx raises several types for an inconsistent graph
        raise bad(path, f"has an inconsistent graph ({str(exc)[:120]}); the file is corrupted, save the model again") from None
    try:
        return fx.GraphModule(root, graph, "CompactNet")
    except Exception as exc:  # fx's code generation fails on nodes whose arguments do not fit their operator
        raise bad(path, f"has a graph torch.fx cannot turn into code ({type(exc).__name__}: {str(exc)[:100]}); "
                        "the file is corrupted or crafted, save the model again") from None


def _expected_tensors(gm: fx.GraphModule, desc: dict, dtype: torch.dtype) -> dict:
    """Name -> (dtype, shape) of every tensor the graph needs: a module's floating tensors in the
    model's dtype, an attribute in the dtype it declares."""
    attributes = {a["name"] for a in desc.get("attributes") or []}
    return {key: (dtype if t.is_floating_point() and key not in attributes else t.dtype, tuple(t.shape))
            for key, t in gm.state_dict(keep_vars=True).items()}


def _check_weights_header(path: str, data: bytes, expected: dict) -> None:
    """Check the safetensors header against ``expected`` (names, dtypes, shapes) before any tensor is read."""
    if len(data) < 8:
        raise bad(path, "has a truncated weights.safetensors; save the model again")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(_MAX_HEADER, len(data) - 8):
        raise bad(path, f"has a weights.safetensors header of {n} bytes, beyond its bounds; the file is corrupted or crafted")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad(path, "has an unreadable weights.safetensors header; the file is corrupted, save the model again") from None
    if not isinstance(header, dict):
        raise bad(path, "has an unreadable weights.safetensors header; the file is corrupted, save the model again")
    header.pop("__metadata__", None)
    for key in set(header) | set(expected):
        if key not in expected:
            raise bad(path, f"holds tensor {str(key)[:80]!r} in weights.safetensors, which model.yaml does not describe; the weights do not belong to this graph, save the model again")
        entry = header.get(key)
        if not isinstance(entry, dict):
            raise bad(path, f"has no tensor {key!r} in weights.safetensors although model.yaml uses it; the weights do not belong to this graph, save the model again")
        dtype, shape = _SAFETENSORS_DTYPES.get(entry.get("dtype")) if isinstance(entry.get("dtype"), str) else None, entry.get("shape")
        want_dtype, want_shape = expected[key]
        if dtype != want_dtype or not isinstance(shape, list) or tuple(shape) != want_shape:
            raise bad(path, f"stores tensor {key!r} as {str(entry.get('dtype'))[:30]} {str(shape)[:60]} but the graph needs "
                             f"{str(want_dtype).split('.')[-1]} {list(want_shape)}; the weights do not belong to this graph, save the model again")


def _read_weights(path: str, data: bytes) -> dict:
    from safetensors.torch import load as st_load

    try:
        return st_load(data)
    except Exception as exc:  # safetensors raises its own error type for malformed offsets
        raise bad(path, f"has a malformed weights.safetensors ({str(exc)[:120]}); save the model again") from None


#: Largest activation (elements) a bundle's graph may produce at its recorded input shape: 1 GiB of float32.
MAX_ACTIVATION = 2**28
#: Floating-point operations a sample and task (convolutions and matrix products, as torch's flop counter counts
#: them): about 3x a VGG-16 at automtl's largest input size (1024 px, 6.5e11), far above the builtin backbones.
MAX_FLOPS_PER_SAMPLE = 2 * 10**12
#: How many float32 FLOPs one FLOP of a float16 or bfloat16 product counts for against that bound. On one core of
#: the CPU the bound was sized on, 2048x2048 matrix products run at 46 GFLOP/s in float32 and 1.3 in float16 or
#: bfloat16 (35x), convolutions at 25 and 1.1 (23x): uncounted, a half-precision file within the bound ran for
#: hours. Counted at their full CPU cost (32), a float16 ResNet-50 at 768 px, a model meant for a GPU, was refused;
#: at 8 it loads up to 1024 px with one task, and a crafted half-precision file costs at most about 4x what a
#: float32 one may (some 3 minutes a sample and task on one core).
LOW_PRECISION_CPU_COST = 8
#: Element operations a sample and task that the flop counter does not see (every node's output elements once, a
#: pooling's window times, and every input element it reads): 2^34, some 13x the largest builtin backbone at
#: automtl's largest input size (ResNet-50 / VGG-16-BN at 1024 px, every layer a task's own: 1.3e9 a task), about a
#: minute of one CPU core for reductions (2e8 elements a second); a chain of 2^28-element nodes, reductions of a
#: 2^28-element expanded view (which takes no memory) or a 4096-wide pooling window on a large map stops here.
MAX_WORK_PER_SAMPLE = 2**34
#: Elements of all the activations alive at once (after each node, before any is freed), counted as float32 ones
#: (4 GiB; a float64 activation counts twice, a float16 one half): four of the largest. A
#: convolution torch's CPU kernels may unfold (``_unfolds_on_cpu``) counts the input it unfolds (in_channels/groups x
#: kernel x output positions x batch elements) as alive while it runs.
MAX_LIVE = 4 * MAX_ACTIVATION
#: The bounds above that scale with the tasks (each may run a backbone of its own) do so up to this many tasks: a
#: file picks its task count (up to 256), and would otherwise pick its budget.
MAX_TASK_BUDGETS = 16


def _pieces(name: str, x: torch.Tensor, args: tuple, kwargs: dict) -> int:
    """How many tensors ``x.<name>(*args, **kwargs)`` returns, without making them."""
    dim = kwargs.get("dim", (args[0] if args else 0) if name == "unbind" else (args[1] if len(args) > 1 else 0))
    length = x.shape[int(dim)] if isinstance(dim, int) and -x.dim() <= dim < x.dim() else 1
    names = ("split_size_or_sections", "split_size", "chunks", "sections", "indices_or_sections", "split_sizes")
    arg = args[0] if args else next((kwargs[k] for k in names if k in kwargs), None)
    if name == "unbind":
        return length
    if isinstance(arg, (list, tuple, torch.Size)):
        return len(arg) + (name == "tensor_split")
    if isinstance(arg, int) and arg > 0:
        return arg if name in ("chunk", "tensor_split") else -(-length // arg)
    return 1


#: Bounds on the plain values a graph computes (sizes, indices): an int's magnitude and a sequence's length.
MAX_COMPUTED_INT, MAX_SEQUENCE = 2**40, 256


def _nested(value):
    """``value`` and everything inside its tuples, lists and dicts, containers included (each before what it holds)."""
    stack = [value]
    while stack:
        v = stack.pop()
        yield v
        if isinstance(v, (tuple, list)):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.values())


def _shapes_in_order(value) -> list:
    """The shapes of the tensors ``value`` holds, in order (a tensor, or a tuple or list of them, nested)."""
    if isinstance(value, torch.Tensor):
        return [tuple(value.shape)]
    if isinstance(value, (tuple, list)):
        return [shape for v in value for shape in _shapes_in_order(v)]
    return []


def _float32_elements(numel: int, element_size: int) -> int:
    """``numel`` elements of ``element_size`` bytes counted as float32 elements of the same bytes (rounded up): the
    bound on what is alive at once is on memory, so a float64 activation counts twice and a float16 one half."""
    return -(-numel * element_size // 4)


def _bases(value) -> dict:
    """``{id: float32 elements}`` of the tensors ``value`` holds (nested), a view counted as the tensor it views."""
    bases = {}
    for v in _nested(value):
        if isinstance(v, torch.Tensor):
            base = v._base if v._base is not None else v
            bases[id(base)] = _float32_elements(base.numel(), base.element_size())
    return bases


class _LiveEnv(dict):
    """An interpreter's environment that keeps ``live``, the elements of the distinct tensors its values hold,
    up to date as values come and go: each node's check is O(its own output), not O(all live values)."""

    def __init__(self):
        super().__init__()
        self.live, self.count, self._held = 0, {}, {}  # elements; base id -> values holding it; node -> its bases

    def __setitem__(self, node, value):
        if node in self:
            del self[node]
        super().__setitem__(node, value)
        self._held[node] = held = _bases(value)
        for key, numel in held.items():
            self.count[key] = self.count.get(key, 0) + 1
            self.live += numel if self.count[key] == 1 else 0

    def __delitem__(self, node):
        super().__delitem__(node)
        for key, numel in self._held.pop(node).items():
            self.count[key] -= 1
            if not self.count[key]:
                del self.count[key]
                self.live -= numel



#: Per-sample input elements up to which torch may run a float32 CPU convolution on its native kernels, which unfold
#: the input, rather than oneDNN's (``ConvParams::use_mkldnn`` in ATen's Convolution.cpp: at batch 1, one group and a
#: kernel of 3 or less, an input of at most 20480 elements goes native).
NATIVE_FLOAT32_INPUT = 20480

#: Positional parameters of the convolution functions a graph may call (``torch.nn.functional``'s and aten's).
_CONV_PARAMETERS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_TRANSPOSE_PARAMETERS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_ATEN_CONVOLUTION_PARAMETERS = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed",
                                "output_padding", "groups")


def _conv_call(name: str, args: tuple, kwargs: dict) -> Optional[dict]:
    """The arguments of a call of convolution function ``name`` by parameter name, or None for another function."""
    base = name.split(".")[0]
    if base == "convolution":
        names = _ATEN_CONVOLUTION_PARAMETERS
    elif re.fullmatch(r"conv_transpose[123]d", base):
        names = _CONV_TRANSPOSE_PARAMETERS
    elif re.fullmatch(r"conv[123]d", base):
        names = _CONV_PARAMETERS
    else:
        return None
    return {**dict(zip(names, args)), **kwargs, "transposed": bool(kwargs.get("transposed", args[6] if base ==
            "convolution" and len(args) > 6 else "transpose" in base))}


def _ints(value, dims: int) -> Optional[tuple]:
    """An int or a sequence of ints as ``dims`` ints; None for anything else (a padding string, a symbol)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * dims
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value) * dims if len(value) == 1 else tuple(value)
    return None


def _unfolds_on_cpu(x: torch.Tensor, weight: torch.Tensor, call: dict) -> bool:
    """Whether torch's CPU kernels may run this convolution unfolding its input (im2col, or col2im for a transposed
    one) at some batch size and thread count: all but where ATen's ``use_mkldnn`` picks oneDNN whatever the batch
    (below 16) and threads (one). Native are: everything where oneDNN is switched off or not built in; every dtype
    but float32 (oneDNN takes bfloat16 and float16 only on CPUs with their instructions); a transposed convolution
    whose output padding reaches its stride; an unstrided, undilated 1x1 convolution; and one of one group and a
    kernel with a side of 3 or less (a 1-D kernel of k is (1, k)) on a small input. Settings it cannot read (a
    symbolic stride) count as native."""
    if x.dtype != torch.float32 or not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return True  # (oneDNN switched off, or a build without it: every convolution runs natively)
    dims = weight.dim() - 2
    stride, dilation = _ints(call.get("stride", 1), dims), _ints(call.get("dilation", 1), dims)
    output_padding, groups = _ints(call.get("output_padding", 0), dims), call.get("groups", 1)
    if stride is None or dilation is None or output_padding is None or not isinstance(groups, int):
        return True
    if call["transposed"] and any(o >= s for o, s in zip(output_padding, stride)):
        return True
    # the kernel's last two sides as ATen sees them: it runs a 1-D convolution as a 2-D one of kernel (1, k)
    kernel = (1, *weight.shape[2:]) if weight.dim() == 3 else tuple(weight.shape[-2:])
    if all(k == 1 for k in kernel) and all(s == 1 for s in stride) and all(d == 1 for d in dilation):
        return True
    return not (groups > 1 or all(k > 3 for k in kernel) or math.prod(x.shape[1:]) > NATIVE_FLOAT32_INPUT)


class _BoundedShapes(fx.Interpreter):
    """Runs on meta tensors and refuses a node whose output is larger than the bounds: a tensor of more
    than MAX_ACTIVATION elements, an int beyond MAX_COMPUTED_INT, a sequence longer than MAX_SEQUENCE.
    Each node is checked as it runs, so no value can grow across nodes (squaring a size again and again)."""

    def _check_pieces(self, n: fx.Node, name: str) -> None:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        x, rest = (args[0], args[1:]) if args else (kwargs.get("input", kwargs.get("tensor")), ())
        if isinstance(x, torch.Tensor):
            count = _pieces(name, x, tuple(rest), kwargs)
            if count > MAX_SEQUENCE:
                raise FileFormatError(f"has node {n.name!r} splitting a tensor into {count} pieces, more than the "
                                      f"{MAX_SEQUENCE} automtl allows; the file is crafted or corrupted")

    def run(self, *args, **kwargs):
        return super().run(*args, initial_env=_LiveEnv(), **kwargs)

    def call_function(self, target, args, kwargs):
        # every operator that takes a device makes its tensor on meta (an exported program's full/zeros/arange name
        # the CPU, or leave it out and get it by default): sized, never allocated
        meta = torch.device("meta")
        schema = getattr(target, "_schema", None)
        for i, arg in enumerate(schema.arguments if schema is not None else ()):
            if arg.name == "device":
                if not arg.kwarg_only and i < len(args):
                    args = (*args[:i], meta, *args[i + 1:])
                else:
                    kwargs = {**kwargs, "device": meta}
        if schema is None and "device" in kwargs:
            kwargs = {**kwargs, "device": meta}
        return super().call_function(target, args, kwargs)

    def _unfolded(self, n: fx.Node, args: tuple, kwargs: dict, out) -> int:
        """Elements of the input a convolution may unfold while it runs (0 for anything else): wherever torch's CPU
        kernels may (:func:`_unfolds_on_cpu`: a 3x3 convolution padded by 4000 on a 32x32 input took 7.2 GB; a 1x1
        one padded so on one thread, or a transposed one whose output padding reaches its stride, asked for 37-77 GB
        on inputs oneDNN would have taken). A LocalResponseNorm pads a squared copy of its input by ``size - 1``
        channels and pools it: both copies count."""
        if n.op == "call_module" and isinstance(self.fetch_attr(n.target), nn.LocalResponseNorm):
            x = args[0] if args else kwargs.get("input")
            if isinstance(x, torch.Tensor) and x.dim() >= 3:
                return 2 * x.shape[0] * (x.shape[1] + self.fetch_attr(n.target).size - 1) * math.prod(x.shape[2:])
            return 0
        if not self.unfolds:
            return 0
        if n.op == "call_module":
            mod = self.fetch_attr(n.target)
            if not isinstance(mod, nn.modules.conv._ConvNd):
                return 0
            call = dict(input=args[0] if args else kwargs.get("input"), weight=mod.weight, stride=mod.stride,
                        padding=mod.padding, dilation=mod.dilation, groups=mod.groups, transposed=bool(mod.transposed),
                        output_padding=mod.output_padding if len(args) < 2 and not kwargs else None)  # output_size: unread
        else:
            call = _conv_call(getattr(n.target, "__name__", str(n.target)), args, kwargs)
            if call is None:
                return 0
        x, weight = call.get("input"), call.get("weight")
        if not (isinstance(weight, torch.Tensor) and isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor)
                and weight.dim() >= 3 and x.dim() == weight.dim() and out.dim() == x.dim()):
            return 0
        if not _unfolds_on_cpu(x, weight, call):
            return 0  # oneDNN's kernels, which do not unfold
        kernel = tuple(weight.shape[2:])
        padding, stride = _ints(call.get("padding", 0), len(kernel)), _ints(call.get("stride", 1), len(kernel))
        if (not call["transposed"] and all(k == 1 for k in kernel) and padding is not None and not any(padding)
                and stride is not None and all(s == 1 for s in stride)):
            return 0  # a 1x1 convolution reads its input as it is, unless padded or strided
        # a convolution unfolds its input once per output position; a transposed one, its input's positions
        positions = math.prod(x.shape[2:]) if call["transposed"] else math.prod(out.shape[2:])
        return int(x.shape[0]) * math.prod(weight.shape[1:]) * positions

    def _hidden_copies(self, n: fx.Node, args: tuple, kwargs: dict, out) -> int:
        """Elements of what an operation makes while it runs and does not return, on every device: a convolution
        module padded other than by zeros pads a copy of its input first (a padding of 8000 took 3.3 GB for a 1x1
        output); an antialiased resize (``interpolate(..., antialias=True)``, aten's ``_upsample_*_aa``) resizes one
        spatial dimension into an intermediate before the other (a 2^15-element input and output took 4.4 GB)."""
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor):
            return 0
        if n.op == "call_module":
            mod = self.fetch_attr(n.target)
            if not isinstance(mod, nn.modules.conv._ConvNd) or mod.padding_mode == "zeros":
                return 0
            pads = mod._reversed_padding_repeated_twice  # last dimension first, two sides each
            spatial = len(pads) // 2
            if x.dim() <= spatial:
                return 0  # torch refuses it
            sides = [int(x.shape[-1 - i]) + int(pads[2 * i]) + int(pads[2 * i + 1]) for i in range(spatial)]
            return math.prod(x.shape[:x.dim() - spatial]) * math.prod(sides)  # batched or not
        if x.dim() < 3:
            return 0
        name = getattr(n.target, "__name__", str(n.target))
        antialias = (name == "interpolate" and bool(kwargs.get("antialias", args[6] if len(args) > 6 else False))) \
            or re.fullmatch(r"_upsample_\w+_aa(\.\w+)?", name) is not None
        if not (antialias and isinstance(out, torch.Tensor) and out.dim() == x.dim() == 4):
            return 0
        (h_in, w_in), (h_out, w_out) = x.shape[2:], out.shape[2:]
        return int(x.shape[0]) * int(x.shape[1]) * max(h_in * w_out, h_out * w_in)

    def _check_live(self, n: fx.Node, args: tuple, kwargs: dict, out) -> None:
        """The activations alive once ``n`` has run (the interpreter frees each after its last use, as the
        generated forward does), views counted once with the tensor they view, and what a convolution unfolds."""
        live = self.env.live + sum(numel for key, numel in _bases(out).items() if key not in self.env.count)
        x = args[0] if args else kwargs.get("input")
        size = x.element_size() if isinstance(x, torch.Tensor) else 4  # what is unfolded or copied is of the input's dtype
        hidden = self._hidden_copies(n, args, kwargs, out) if n.op in ("call_module", "call_function") else 0
        if hidden > MAX_ACTIVATION:
            raise FileFormatError(f"has node {n.name!r} that makes a {hidden}-element intermediate it does not return (a "
                                  f"padded copy or a half-resized image), more than the {MAX_ACTIVATION} automtl allows; "
                                  "the file is crafted or corrupted")
        if n.op in ("call_module", "call_function"):
            live += _float32_elements(self._unfolded(n, args, kwargs, out) + hidden, size)
        if live > MAX_LIVE:
            raise FileFormatError(f"has node {n.name!r} after which {live} activation elements (counted as float32 ones, "
                                  "a float64 one twice, and with what operations unfold or copy while they run) are alive "
                                  f"at once, more than the {MAX_LIVE} automtl allows; the file is crafted or corrupted")

    flop_counter = None  # the FlopCounterMode the graph runs under, when a caller counts
    _flops_seen = 0
    low_precision_flops = 0  # of them, those of products of float16 or bfloat16 tensors (LOW_PRECISION_CPU_COST)

    def _check_flop_dtypes(self, n: fx.Node, args: tuple, kwargs: dict) -> None:
        """A node the flop counter counts (a matrix product, a convolution) computes in floating point: torch's CPU
        kernels multiply int64 matrices about 100x slower than float32 ones (0.65 against 69 GFLOP/s on one core), so
        a FLOP bound sized on floating-point speed would let such a node run for hours, and no CNN does it. The FLOPs
        of float16 and bfloat16 products are tallied apart (:data:`LOW_PRECISION_CPU_COST`)."""
        if self.flop_counter is None:
            return
        total = self.flop_counter.get_total_flops()
        if total <= self._flops_seen:
            return
        added, self._flops_seen = total - self._flops_seen, total
        tensors = [v for v in _nested((args, kwargs)) if isinstance(v, torch.Tensor)]
        if any(v.dtype in (torch.float16, torch.bfloat16) for v in tensors):
            self.low_precision_flops += added
        integer = next((v.dtype for v in tensors if not v.is_floating_point()), None)
        if integer is not None:
            raise FileFormatError(f"has node {n.name!r} multiplying {str(integer).replace('torch.', '')} tensors (a "
                                  "matrix product or convolution), which no CNN computes and CPUs run about 100x slower "
                                  "than in floating point; the file is crafted or corrupted")

    shapes = None  # node -> the shapes of the tensors it made, when a caller asks (bounded_run's ``shapes``)
    unfolds = True  # the model runs on the CPU, whose kernels may unfold a convolution's input
    work = 0  # element operations so far: outputs once, a pooling's window times, inputs read (MAX_WORK_PER_SAMPLE)
    max_work = math.inf

    def _pooling_work(self, n: fx.Node, name: str) -> tuple:
        """``(window, read)``: elements a pooling reads for each it writes, and an adaptive pooling's whole input
        (it reads all of it whatever its output size); ``(1, 0)`` for anything else."""
        if n.op == "call_module":
            mod = self.fetch_attr(n.target)
            if isinstance(mod, nn.LocalResponseNorm):  # a window of `size` channels around each element
                return mod.size, 0
            kind, k = type(mod).__name__.lower(), getattr(mod, "kernel_size", None)
        elif n.op in ("call_function", "call_method"):
            kind, k = name.lower(), None
        else:
            return 1, 0
        if "pool" not in kind:
            return 1, 0
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        if "adaptive" in kind:
            return 1, sum(a.numel() for a in args if isinstance(a, torch.Tensor))
        if n.op != "call_module":
            k = kwargs.get("kernel_size", args[1] if len(args) > 1 else None)
        if isinstance(k, int):
            k = (k,) * (3 if "3d" in kind else 1 if "1d" in kind else 2)
        return (math.prod(int(v) for v in k), 0) if isinstance(k, (tuple, list)) and all(isinstance(v, int) for v in k) else (1, 0)

    def _check_dims(self, n: fx.Node, args: tuple, kwargs: dict) -> None:
        """Every dimension a call names within its input's rank: the meta device takes ``torch.softmax(x, 2**31)``
        (its kernels check on the CPU only), so a crafted file would load and fail at its first call."""
        whose, new_axis = "", False
        if n.op == "call_module":  # a module's own dims (Softmax(dim=7) on a 4-D map)
            mod, whose = self.fetch_attr(n.target), "module's "
            named = {"input": args[0] if args else None,
                     **{k: getattr(mod, k) for k in ("dim", "start_dim", "end_dim") if hasattr(mod, k)}}
        else:
            target = getattr(torch, n.target, None) if n.op == "call_method" else n.target
            if n.op not in ("call_function", "call_method") or not callable(target):
                return
            try:
                found = normalize_function(target, args, kwargs, normalize_to_only_use_kwargs=True)
            except Exception:  # no schema torch can match: the call itself is checked when it runs
                return
            if found is None:
                return
            named, new_axis = found.kwargs, _op_name(target) in _NEW_AXIS
        x = named.get("input", named.get("self"))
        if x is None and isinstance(named.get("tensors"), (list, tuple)) and named["tensors"]:
            x = named["tensors"][0]
        if not isinstance(x, torch.Tensor):
            return
        rank = max(x.dim(), 1) + (1 if new_axis else 0)  # one past the input's axes
        for key in ("dim", "dim0", "dim1", "start_dim", "end_dim", "dims"):
            value = named.get(key)
            if key == "dims" and not isinstance(value, (list, tuple)):
                continue  # tensordot's count of contracted dimensions
            for d in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(d, int) and not isinstance(d, bool) and not -rank <= d < rank:
                    raise FileFormatError(f"has node {n.name!r} whose {whose}{key} {d} names no dimension of its "
                                          f"{x.dim()}-dimensional input; the file is crafted or corrupted")

    @staticmethod
    def _check_power(n: fx.Node, args: tuple) -> None:
        """An integer power is refused before Python computes it: the bound on computed integers is checked on the
        result, and ``2 ** 10**12`` would take the machine's memory first."""
        if len(args) != 2 or not all(isinstance(a, int) and not isinstance(a, bool) for a in args):
            return
        base, exponent = args
        if abs(base) > 1 and exponent > 0 and math.log2(abs(base)) * exponent > math.log2(MAX_COMPUTED_INT):
            raise FileFormatError(f"has node {n.name!r} computing an integer beyond {MAX_COMPUTED_INT}, which no "
                                  "size or index of a model reaches; the file is crafted or corrupted")

    def run_node(self, n: fx.Node):
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        if name in ("unbind", "split", "chunk", "tensor_split", "split_with_sizes") and n.op != "call_module":
            self._check_pieces(n, name)  # before it runs: 2^28 pieces of a meta tensor would take minutes and GBs
        window, read = self._pooling_work(n, name)
        args, kwargs = (), {}
        if n.op not in ("get_attr", "placeholder", "output"):  # every element a node reads (a reduction of an
            args, kwargs = self.fetch_args_kwargs_from_env(n)  # expanded view reads far more than it writes)
            read += sum(v.numel() for v in _nested((args, kwargs)) if isinstance(v, torch.Tensor))
            self._check_dims(n, args, kwargs)
            if n.op == "call_function" and n.target is operator.pow:
                self._check_power(n, args)
        out = super().run_node(n)
        self._check_flop_dtypes(n, args, kwargs)
        if self.shapes is not None:
            self.shapes[n] = _shapes_in_order(out)
        if n.op != "get_attr":
            self._check_live(n, args, kwargs, out)
            made = [v for v in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(v, torch.Tensor)]
            self.work += sum(v.numel() for v in made) * window + read
            if self.work > self.max_work:
                raise FileFormatError(f"has node {n.name!r} after which the graph has done {self.work:.3g} element "
                                      f"operations (outputs, inputs read, pooling windows), more than the {self.max_work:.3g} automtl "
                                      "allows at this input shape; the file is crafted or corrupted")
        for v in _nested(out):
            if isinstance(v, torch.Tensor):
                if v.numel() > MAX_ACTIVATION:
                    raise FileFormatError(f"has node {n.name!r} producing {v.numel()} elements at this input "
                                          f"shape, more than the {MAX_ACTIVATION} automtl allows; the file is crafted or corrupted")
            elif isinstance(v, int) and not isinstance(v, bool):
                if abs(v) > MAX_COMPUTED_INT:
                    raise FileFormatError(f"has node {n.name!r} computing an integer beyond {MAX_COMPUTED_INT}, which no "
                                          "size or index of a model reaches; the file is crafted or corrupted")
            elif isinstance(v, (tuple, list, dict)):
                if len(v) > MAX_SEQUENCE:
                    raise FileFormatError(f"has node {n.name!r} computing a sequence of {len(v)} values, more than the "
                                          f"{MAX_SEQUENCE} automtl allows; the file is crafted or corrupted")
        return out


def _output_shapes_ok(task: Task, y: torch.Tensor, n: int) -> bool:
    if not isinstance(y, torch.Tensor) or not y.is_floating_point() or y.dim() < 1 or y.shape[0] != n:
        return False
    return task.spec is None or shape_fits(task.spec.output_shapes(task), tuple(y.shape[1:]))


def bounded_run(gm: fx.GraphModule, inputs: list, batch: int, num_tasks: int, on_cpu: bool = True,
                shapes: Optional[dict] = None):
    """Run ``gm`` on ``inputs`` (meta tensors) under the bounds above (each activation, computed value, the
    activations alive at once, element operations and FLOPs a sample and task); return its output.

    Raises:
        FileFormatError: a bound is exceeded, or an operation refuses its shapes: what, without the file's name.
    """
    from torch.utils.flop_counter import FlopCounterMode

    shape = list(inputs[-1].shape) if inputs else []
    num_tasks = min(max(num_tasks, 1), MAX_TASK_BUDGETS)
    try:
        interpreter = _BoundedShapes(gm)
        interpreter.unfolds, interpreter.shapes = on_cpu, shapes
        interpreter.max_work = MAX_WORK_PER_SAMPLE * max(batch, 1) * num_tasks
        with torch.no_grad(), FlopCounterMode(display=False) as flops:
            interpreter.flop_counter = flops
            out = interpreter.run(*inputs)
        low = interpreter.low_precision_flops
        per_sample = (flops.get_total_flops() + (LOW_PRECISION_CPU_COST - 1) * low) / max(batch, 1)
        limit = MAX_FLOPS_PER_SAMPLE * num_tasks  # each task may run a backbone of its own
        if per_sample > limit:
            counted = (f", {low / max(batch, 1):.3g} of them float16/bfloat16 FLOPs, counted {LOW_PRECISION_CPU_COST} "
                       "times as CPUs run them so much slower") if low else ""
            raise FileFormatError(f"computes {per_sample:.3g} FLOPs a sample at input shape {shape} (torch's flop "
                                  f"counter: convolutions and matrix products{counted}), more than the {limit:.0e} "
                                  f"automtl allows for {num_tasks} task(s); the file is crafted or corrupted")
    except FileFormatError as exc:  # without the note fx's interpreter appends ("While executing ...")
        raise FileFormatError(str(exc).split("\n\nWhile executing")[0].strip()) from None
    except Exception as exc:  # any op refusing its shapes
        raise FileFormatError(f"has a graph that does not run at input shape {shape} ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}); "
                              "the file is corrupted, crafted, or made for other input sizes") from None
    return out


def shape_check(path: str, gm: fx.GraphModule, tasks: list, dtype: torch.dtype, shape, on_cpu: bool = True) -> None:
    """Run the graph once on the meta device at ``shape``: every activation bounded, every task's
    output a floating tensor of its kind's shape. Nothing is computed and no memory is taken."""
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    distinct = len(set(output.args[0].values())) if isinstance(output.args[0], dict) else 1  # a task's own output each
    try:
        out = bounded_run(gm.eval(), [torch.empty(tuple(shape), device="meta", dtype=dtype)], int(shape[0]), distinct, on_cpu)
    except FileFormatError as exc:
        raise bad(path, str(exc)) from None
    for task in tasks:
        if not _output_shapes_ok(task, out.get(task.name), shape[0]):
            y = out.get(task.name)
            raise bad(path, f"computes for task {task.name!r} ({task.kind}) an output of shape "
                            f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__} and dtype "
                            f"{getattr(y, 'dtype', None)}, which does not fit the task; the file is corrupted or crafted")


def _dry_run(path: str, gm: fx.GraphModule, desc: dict, tasks: list, dtype: torch.dtype) -> None:
    """The load-time shape check, at the input shape the file records (required)."""
    shape = desc.get("input_shape")
    if not (isinstance(shape, list) and len(shape) == 4 and all(isinstance(d, int) and not isinstance(d, bool)
                                                                and 1 <= d <= 2**16 for d in shape)):
        raise bad(path, "has no valid input_shape (N, C, H, W); the file is corrupted, save the model again")
    if _float32_elements(math.prod(shape), dtype.itemsize) > MAX_LIVE:  # before anything of that shape is made
        raise bad(path, f"records an input of shape {tuple(shape)}, {math.prod(shape)} elements of {dtype}, more than "
                        f"the {MAX_LIVE} (float32) automtl allows alive at once; the file is crafted or corrupted")
    shape_check(path, gm, tasks, dtype, shape)


def rebuild(path: str, desc: dict, weights: bytes) -> tuple:
    """The checked parts of a CompactModel from a parsed description and the weights' bytes:
    ``(graph_module, meta_twin, tasks, policy)``; the twin is the same graph on the meta device."""
    if not isinstance(desc.get("tasks"), list) or not 1 <= len(desc["tasks"]) <= 256:
        raise bad(path, "has no list of 1 to 256 task descriptions; the file is corrupted, save the model again")
    for d in desc["tasks"]:  # a kind registered by the saving program: the file holds no code, its name only
        kind = d.get("kind") if isinstance(d, dict) else None
        if isinstance(kind, str) and kind != "custom" and kind not in KINDS and _IDENT.match(kind) and len(kind) <= 64:
            raise bad(path, f"has task {str(d.get('name'))[:60]!r} of kind {kind!r}, which is not registered in this "
                            "process; load it from Python after importing the code that registers it "
                            "(automtl.register_kind)")
    try:
        tasks = [Task.from_description(d) for d in desc["tasks"]]
        policy = Policy.from_dict(desc["policy"], f"the policy in {path!r}") if desc.get("policy") is not None else None
    except AutomtlError as exc:
        raise bad(path, f"has an invalid task or policy description ({exc}); save the model again") from None
    names = [t.name for t in tasks]
    if policy is not None and policy.tasks != names:
        raise bad(path, f"has a policy for tasks {policy.tasks} but tasks {names}; the file is corrupted, save the model again")
    unknown = set(desc) - DESCRIPTION_KEYS
    if unknown:
        raise bad(path, f"has keys {sorted(str(k)[:30] for k in unknown)[:3]} in model.yaml that format 2 does not have; "
                        "it is crafted or from another version, save the model again")
    if not isinstance(desc.get("trains_otherwise", False), bool):
        raise bad(path, "has a trains_otherwise that is not true or false; the file is corrupted, save the model again")
    gm = _build_graph_module(path, desc)
    frozen = _frozen(path, desc, gm)
    _check_meta(path, gm.graph, tasks)
    outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    if list(outputs) != names:
        raise bad(path, f"has graph outputs that are not its tasks {names}; the file is corrupted, save the model again")
    _check_sharing(path, gm.graph, tasks, policy)
    check_statistics(gm, f"model file {path!r}")
    dtype = DTYPES[desc["dtype"]]
    expected = _expected_tensors(gm, desc, dtype)
    _check_weights_header(path, weights, expected)
    gm.to(dtype)  # modules are built in float32 on meta: the dry run must see the file's floating dtype
    _dry_run(path, gm, desc, tasks, dtype)
    meta_twin = copy.deepcopy(gm)  # still all on meta: checks later input shapes for free
    state = _read_weights(path, weights)
    # what safetensors' own parser read, checked again: the header check above read the JSON with Python's parser
    got = {k: (t.dtype, tuple(t.shape)) for k, t in state.items()}
    if got != expected:
        key = next(k for k in sorted(set(got) | set(expected)) if got.get(k) != expected.get(k))
        raise bad(path, f"has a weights.safetensors that safetensors reads otherwise than its header says (tensor "
                        f"{key[:80]!r}); the file is crafted or corrupted, save the model again")
    gm.load_state_dict(state, strict=True, assign=True)
    for name in frozen:
        gm.get_parameter(name).requires_grad_(False)
    return gm, meta_twin, tasks, policy


def _frozen(path: str, desc: dict, gm: fx.GraphModule) -> list:
    """The parameters the saved model did not train (``requires_grad`` False: a frozen stem, a fixed filter), checked
    to name parameters of the file's own modules: a loaded model fine-tunes what the saved one did."""
    frozen = desc.get("frozen", [])
    params = dict(gm.named_parameters())
    if not isinstance(frozen, list) or len(frozen) > len(params) or not all(isinstance(n, str) for n in frozen):
        raise bad(path, "has a frozen entry that is not a list of its parameters' names; the file is corrupted, "
                        "save the model again")
    unknown = [n for n in frozen if n not in params]
    if unknown:
        raise bad(path, f"lists {unknown[0][:80]!r} as a frozen parameter, which the model does not have; the file is "
                        "corrupted, save the model again")
    return frozen
