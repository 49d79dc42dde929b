"""The ``.pt2`` file: the compact model from ``torch.export``, and a loader that refuses code in it.

``torch.export.load`` trusts its archive: it unpickles entries marked as pickled (weights,
constants, custom objects) and the sample inputs (falling back to ``weights_only=False``),
``exec``s the guard code it finds, hands expression strings to sympy, which evaluates them,
allocates ``torch.zeros(sizes)`` for an empty weight entry whatever sizes its config declares, and
builds a graph of whatever operators the program names (``aten.from_file`` reads and, shared,
writes a file the archive chooses). So a ``.pt2`` from an untrusted source must not go to it
directly. :func:`load_pt2` checks, in this order:

1. the zip directory, before any entry is decompressed: one root folder, only the entry names a
   plain export has (graph JSON, raw tensor bytes, their JSON configs, version markers, an empty
   sample inputs entry), each under its size cap, all together under the file limit;
2. the graph JSON and the weight/constant configs (read under their caps): no guard code, no
   custom objects, no expression strings but plain arithmetic on shape symbols, no pickled entry,
   arguments and node metadata of the kinds that stay data (:data:`_ARGUMENT_KINDS`, :data:`_NODE_METADATA`:
   no ``as_operator`` or ``source_fn_stack``, which torch resolves as attribute paths, no subgraph),
   and every operator on a closed list: :data:`ALLOWED_ATEN_OPERATORS` (reviewed ``aten``
   overload packets, never an in-place or ``out=`` overload) and a few Python ``operator``
   functions for shape arithmetic; every weight and constant is described with non-negative
   integer sizes, and its raw entry declares exactly the bytes those sizes and its dtype need;
3. the entries' data under the zip bounds of :func:`automtl.fileio.read_zip_entries`;

and only then hands the checked bytes (not the path) to ``torch.export.load``.

:func:`export` writes archives that pass it: the sample inputs entry, a pickle torch always
writes, is left empty.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import sys
import warnings
import zipfile
import zlib
from typing import Any, Optional

import torch

from ..compact import CompactModel
from ..errors import AutomtlError, ConfigError, FileFormatError, first_line
from ..fileio import atomic_path, check_zip_directory, read_regular_file, read_zip_entries
from ._export_common import EvalMode, example_input_for, failing_op

__all__ = ["export", "load_pt2", "check_pt2", "MAX_PT2_BYTES", "ALLOWED_ATEN_OPERATORS"]

MAX_PT2_BYTES = 2 * 2**30
_MAX_ENTRIES = 100_000
_MAX_JSON = 256 * 2**20
_MAX_RATIO = 200
_MAX_MARKER = 256  # bytes of a version marker ("pt2", "1", "little", a 40-character id)
_MAX_DIMS = 16  # dimensions of a weight or constant
_MAX_DIM = 2**40  # one size, stride or offset
_MARKERS = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}
_NAME = r"[A-Za-z0-9_]{1,100}"
_ROOT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}\Z")
# every entry name a plain export has, relative to the root folder (torch/export/pt2_archive/constants.py)
_LAYOUT = re.compile(rf"^(?:archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
                     rf"|models/{_NAME}\.json|data/sample_inputs/{_NAME}\.pt"
                     rf"|data/weights/{_NAME}_weights_config\.json|data/constants/{_NAME}_constants_config\.json"
                     rf"|data/weights/weight_[0-9]{{1,9}}|data/constants/tensor_[0-9]{{1,9}})\Z")

# The aten operators a loaded program may call, by overload packet; any overload of a listed packet
# but an in-place or out= one (checked on its schema: no argument it writes to; and by name).
# Derived by exporting what automtl exports: automtl.export(compact(supermodel, policy)) under the
# all-share policy and Policy.random(seed=1), for every builtin backbone (tiny, resnet18/34/50,
# deeplab_resnet34, mobilenet_v2, mnasnet1_0, vgg16_bn; segmentation, depth and classification
# heads), the 13 patterns of tests/zoo.py and torchvision resnet18, mobilenet_v3_small and timm
# efficientnet_b0, convnext_atto (torch 2.13), collecting every node target of the graph JSON:
# the 27 packets marked "seen". To them were added, by review, pure tensor siblings a CNN export can
# emit: other activations, pooling and interpolation variants, elementwise math, reductions,
# reshapes and indexing, norms, eval-mode dropout, their decomposed (core ATen) forms and the
# shape-assert operators of dynamic shapes. Nothing that opens, maps, prints or saves files,
# touches or resizes storage (from_file, set_, resize_, _print, save, as_strided), reads
# uninitialised memory (empty*) or indexes without bounds checks (_unsafe_index*), no random
# sampling but dropout, nothing data-dependent (item, nonzero).
ALLOWED_ATEN_OPERATORS = frozenset({
    # convolution and linear algebra
    "conv2d",  # seen
    "conv_transpose2d",  # seen
    "linear",  # seen
    "conv1d", "conv3d", "conv_transpose1d", "conv_transpose3d", "convolution",
    "addmm", "mm", "bmm", "matmul", "t",
    # normalisation
    "batch_norm",  # seen
    "layer_norm",  # seen
    "_native_batch_norm_legit_no_training", "native_layer_norm", "group_norm",
    "native_group_norm", "instance_norm", "rms_norm",
    # activations
    "relu",  # seen
    "gelu",  # seen
    "silu",  # seen
    "sigmoid",  # seen
    "hardsigmoid",  # seen
    "hardswish",  # seen
    "hardtanh",  # seen
    "softmax",  # seen
    "relu6", "leaky_relu", "elu", "selu", "celu", "mish", "softplus", "tanh", "prelu", "_prelu_kernel", "glu",
    "threshold", "clamp", "clamp_min", "clamp_max", "log_softmax", "_softmax", "_log_softmax",
    "log_sigmoid", "hardshrink", "softshrink",  # nn.LogSigmoid, nn.Hardshrink, nn.Softshrink
    # dropout (identity in eval mode; functional, not in place, in train mode)
    "dropout",  # seen
    "native_dropout", "feature_dropout",
    # pooling
    "adaptive_avg_pool2d",  # seen
    "max_pool2d",  # seen
    "_adaptive_avg_pool2d", "adaptive_avg_pool1d", "adaptive_avg_pool3d", "adaptive_max_pool2d",
    "max_pool1d", "max_pool3d", "max_pool2d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    # interpolation
    "upsample_bilinear2d",  # seen
    "upsample_nearest2d",  # seen
    "upsample_nearest1d", "upsample_nearest3d", "_upsample_nearest_exact1d", "_upsample_nearest_exact2d",
    "_upsample_nearest_exact3d", "upsample_linear1d", "upsample_bicubic2d", "upsample_trilinear3d",
    "_upsample_bilinear2d_aa", "pixel_shuffle", "pixel_unshuffle",
    # elementwise
    "add",  # seen
    "mul",  # seen
    "sub", "rsub", "div", "neg", "abs", "exp", "log", "sqrt", "rsqrt", "pow", "reciprocal", "maximum", "minimum",
    "where", "floor", "ceil", "round", "erf", "sign", "eq", "ne", "lt", "le", "gt", "ge", "logical_not",
    "cos", "sin", "masked_fill",  # seen in torchvision swin_t, timm edgenext (positional encodings, attention masks)
    "linspace", "vdot", "_weight_norm",  # coordinate maps, spectral/weight norm (sized on meta by the dry run)
    # reductions
    "mean",  # seen
    "sum", "amax", "amin", "max", "min", "var", "std", "var_mean", "linalg_vector_norm", "argmax", "argmin",
    "logsumexp",
    # shapes, copies and indexing
    "view",  # seen
    "reshape",  # seen
    "permute",  # seen
    "transpose",  # seen
    "flatten",  # seen
    "unflatten", "squeeze", "unsqueeze", "expand", "expand_as", "reshape_as", "view_as", "contiguous", "clone", "alias", "detach",
    "lift_fresh_copy", "_to_copy", "to", "type_as", "cat", "stack", "split", "split_with_sizes", "chunk",
    "unbind", "slice", "select", "narrow", "index", "index_select", "gather", "flip", "roll", "repeat",
    "constant_pad_nd", "pad",
    "zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "new_zeros", "new_ones", "new_full",
    "arange", "scalar_tensor",
    # shape symbols and their asserts (dynamic batch)
    "sym_size",  # seen
    "sym_numel", "sym_stride", "_assert_scalar", "_assert_tensor_metadata", "sym_constrain_range",
    "sym_constrain_range_for_size",
})
#: The argument kinds (``as_*`` keys of torch's serialized ``Argument`` and its symbolic unions) a loaded program
#: may hold: plain values, tensors and shape symbols. Left out: ``as_operator`` (torch resolves it by walking any
#: attribute path from ``torch``, ``math`` or ``_operator``), ``as_graph`` (a subgraph), ``as_custom_obj`` and the
#: kinds no listed operator takes (``as_complex``, ``as_nested_tensors``, ``as_string_to_argument``).
_ARGUMENT_KINDS = frozenset({
    "as_none", "as_tensor", "as_tensors", "as_optional_tensor", "as_optional_tensors", "as_int", "as_ints",
    "as_int_lists", "as_float", "as_floats", "as_float_lists", "as_bool", "as_bools", "as_string", "as_strings",
    "as_sym_int", "as_sym_ints", "as_sym_float", "as_sym_floats", "as_sym_bool", "as_sym_bools", "as_expr", "as_name",
    "as_scalar_type", "as_memory_format", "as_layout", "as_device"})
#: The node metadata a loaded program may carry: strings torch keeps as strings or parses as JSON (``custom``,
#: ``from_node``). ``source_fn_stack`` is left out (torch resolves each of its entries as an attribute path, like
#: ``as_operator``), as is anything else.
_NODE_METADATA = frozenset({"stack_trace", "nn_module_stack", "torch_fn", "from_node", "custom"})
_ATEN = re.compile(r"^torch\.ops\.aten\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)\Z")
_PYTHON_OPERATORS = {f"_operator.{n}" for n in ("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg",
                                                 "eq", "ne", "lt", "le", "gt", "ge")}
_SYMBOLIC = re.compile(r"^[A-Za-z0-9_ +\-*/(),.%<>='\"]*\Z")
_SYMBOLIC_NAMES = re.compile(r"^([su][0-9]+|Add|Mul|Mod|PythonMod|FloorDiv|CleanDiv|CeilDiv|CeilToInt|FloorToInt|Max|Min|"
                             r"floor|ceiling|oo|True|False|Eq|Ne|Lt|Le|Gt|Ge|And|Or|Not|Integer|Symbol|positive|negative|nonnegative|"
                             r"integer|real|finite)\Z")


def export(compact: CompactModel, path: str | os.PathLike, example_input: Optional[torch.Tensor] = None) -> None:
    """Write all tasks of ``compact`` as a ``.pt2`` (torch.export, dynamic batch, eval mode), atomically.

    ``automtl.load_pt2(path).module()(x)`` returns ``{task: output}`` for any batch size; where
    automtl is not installed, ``torch.export.load`` reads the same file (for files you trust:
    it unpickles). The example input (default: the model's input shape at batch 2) fixes every
    dimension but the batch. The archive holds no pickle: its sample inputs entry is empty. A model on a GPU is
    exported from a CPU copy (the program's weights are the CPU's, which load_pt2 requires), and stays where it is.

    Raises:
        ConfigError: ``path`` is not named ``.pt2``.
        AutomtlError: naming the operation torch.export cannot trace.

    Warns:
        UserWarning: the written program holds what :func:`load_pt2` refuses (an operator off
            :data:`ALLOWED_ATEN_OPERATORS`, e.g. of a custom head, an index computed from the input, more compute
            than its bounds): only ``torch.export.load`` reads it.

    Example:
        >>> automtl.export(model, "model.pt2")
        >>> automtl.load_pt2("model.pt2").module()(torch.randn(4, 3, 64, 64))
    """
    if not isinstance(compact, CompactModel):
        raise AutomtlError(f"export() needs an automtl CompactModel (from automtl.compact), got {type(compact).__name__}")
    if os.path.splitext(os.fspath(path))[1].lower() != ".pt2":
        raise ConfigError(f"export() writes a torch.export archive, so {os.fspath(path)!r} would hold another format "
                          "than its name says; name it .pt2, or write .automtl with automtl.save")
    compact, example_input = _on_the_cpu(compact, example_input)
    x = example_input_for(compact, example_input)
    gm = compact.graph_module
    noise = io.StringIO()  # on failure torch prints the whole traced graph to stderr; our one sentence replaces it
    with EvalMode(gm):
        try:
            with contextlib.redirect_stderr(noise):
                program = torch.export.export(gm, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), strict=False)
            sys.stderr.write(noise.getvalue())
        except Exception as exc:  # torch.export raises many types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise AutomtlError(
                f"torch.export cannot export the compact model at {failing_op(exc, gm)}: {first}; make that "
                "operation traceable (no data-dependent Python control flow) or save an .automtl bundle instead"
            ) from exc
    buf = io.BytesIO()
    torch.export.save(program, buf)
    data = _without_sample_inputs(buf.getvalue())
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
        try:  # say now, not at load time, when load_pt2 will not read what was written
            check_pt2(tmp, max_bytes=max(MAX_PT2_BYTES, len(data)), repack=False)
            _bounded_dry_run(str(tmp), program)  # what load_pt2 runs on the program it reads back
            _check_index_values(str(tmp), program)
        except FileFormatError as exc:
            what = str(exc).split("; load only")[0].replace(f"program file {str(tmp)!r}", f"{os.fspath(path)!r}")
            warnings.warn(f"{what}, so automtl.load_pt2 will refuse it; load it with torch.export.load only where "
                          f"you trust the file{_bundle_advice(compact)}", UserWarning, stacklevel=2)


def _on_the_cpu(compact: CompactModel, example_input: Optional[torch.Tensor]):
    """A copy of a model with tensors off the CPU (trained on a GPU), and its example input, on the CPU: the program
    holds its weights, and one holding a GPU's tensors runs only where that GPU is (load_pt2 refuses it). A CPU model
    is exported as it is, uncopied."""
    import copy

    tensors = [*compact.parameters(), *compact.buffers()]
    if all(t.device.type == "cpu" for t in tensors):
        return compact, example_input
    moved = copy.deepcopy(compact).cpu()
    return moved, (example_input.cpu() if isinstance(example_input, torch.Tensor) else example_input)


def _bundle_advice(compact: CompactModel) -> str:
    """Whether an .automtl bundle is the way out for a model whose .pt2 load_pt2 refuses (so that neither format's
    message sends the user to the other when both refuse it)."""
    from .bundle import describe

    try:
        describe(compact)
    except FileFormatError:
        return " (an .automtl bundle cannot describe this model either: keep the code that builds it, with its weights)"
    return ", or save an .automtl bundle, which describes this model"


def _without_sample_inputs(data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            _, _, rel = info.filename.partition("/")
            dst.writestr(info, b"" if rel.startswith("data/sample_inputs/") else src.read(info))
    return out.getvalue()


# ---------------------------------------------------------------------------------------
# checking an archive
# ---------------------------------------------------------------------------------------
def _bad(path: str, what: str) -> FileFormatError:
    return FileFormatError(f"program file {path!r} {what}; load only .pt2 files written by automtl.export "
                           "without a warning, or use torch.export.load on files you trust completely")


def _entries(path: str, data: bytes, max_bytes: int) -> dict:
    """The entries of the archive, read under :func:`read_zip_entries`'s bounds."""
    return read_zip_entries(data, f"program file {path!r}", FileFormatError, "export the model again",
                            max_entries=_MAX_ENTRIES, max_total=max_bytes, max_ratio=_MAX_RATIO)


def _json(path: str, name: str, raw: bytes) -> Any:
    if len(raw) > _MAX_JSON:
        raise _bad(path, f"has a {name} larger than automtl reads")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _bad(path, f"has an unreadable {name}") from None


def _walk(value: Any, visit) -> None:
    stack = [(None, value)]
    while stack:
        key, v = stack.pop()
        visit(key, v)
        if isinstance(v, dict):
            stack.extend(v.items())
        elif isinstance(v, list):
            stack.extend((None, x) for x in v)


def _symbolic_ok(text: Any) -> bool:
    """Plain arithmetic on shape symbols: listed names only, no powers (sympy evaluates 9**9**9 eagerly),
    no number longer than 12 digits."""
    return (isinstance(text, str) and len(text) <= 1000 and bool(_SYMBOLIC.match(text)) and "__" not in text
            and "**" not in text and not re.search(r"[0-9]{13}", text)
            and all(_SYMBOLIC_NAMES.match(w) for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text)))


@functools.lru_cache(maxsize=4096)
def _mutable_overload(packet: str, overload: str) -> Optional[bool]:
    """Whether ``aten.<packet>.<overload>`` writes to an argument (in place or ``out=``); None when torch
    has no such overload."""
    packet_op = getattr(torch.ops.aten, packet, None)
    if packet_op is None or overload not in packet_op.overloads():
        return None
    return bool(getattr(packet_op, overload)._schema.is_mutable)


def _check_operator(path: str, name: str, target: str) -> None:
    """``target`` is a listed Python operator, or an overload of a listed aten packet that writes to none
    of its arguments."""
    if target in _PYTHON_OPERATORS:
        return
    shown = target[:80]
    m = _ATEN.match(target)
    if m is None or m.group(1) not in ALLOWED_ATEN_OPERATORS:
        raise _bad(path, f"calls {shown} in {name}, which is not among the aten operators automtl loads")
    packet, overload = m.groups()
    in_place = packet.endswith("_") or overload.endswith("_") or overload == "out" or overload.endswith("_out")
    mutable = _mutable_overload(packet, overload)
    if mutable is None:
        raise _bad(path, f"calls {shown} in {name}, which is not among the aten operators automtl loads")
    if in_place or mutable:
        raise _bad(path, f"calls {shown} in {name}, an in-place or out= overload, which automtl does not load")


def _check_program(path: str, name: str, program: Any) -> None:
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise _bad(path, f"has a {name} that is not an exported program")
    if program.get("guards_code"):
        raise _bad(path, f"has guard code in {name}, which torch.export.load runs as Python")
    _check_signature(path, name, program["graph_module"].get("signature"))
    for key in program.get("range_constraints") or {}:
        if not _symbolic_ok(key):
            raise _bad(path, f"has a shape constraint {str(key)[:60]!r} in {name} that is not plain arithmetic")

    def visit(key, v):
        if key == "target" and isinstance(v, str):  # a node's operator (torch fails on a target that is no string)
            _check_operator(path, name, v)
        elif key == "expr_str" and not _symbolic_ok(v):
            raise _bad(path, f"has a symbolic expression {str(v)[:60]!r} in {name} that is not plain arithmetic")
        elif key == "custom_obj_values" and v:
            raise _bad(path, f"has custom objects in {name}, which torch loads by unpickling")
        if isinstance(v, dict) and len(v) == 1 and str(next(iter(v))).startswith("as_") and next(iter(v)) not in _ARGUMENT_KINDS:
            raise _bad(path, f"has an argument of kind {str(next(iter(v)))[:40]!r} in {name}, which automtl does not "
                             "load (torch resolves operators and objects from it)")  # a union: one "as_*" key
        if key == "nodes" and isinstance(v, list):
            for node in v:
                meta = node.get("metadata") if isinstance(node, dict) else None
                extra = sorted(set(meta) - _NODE_METADATA) if isinstance(meta, dict) else ["not a mapping"] if meta else []
                if extra:
                    raise _bad(path, f"has node metadata {str(extra[0])[:40]!r} in {name}, which automtl does not "
                                     "load (torch resolves objects from some of it)")

    _walk(program, visit)


#: What a loaded program's inputs may be (torch's serialized ``InputSpec`` kinds): the images, and its weights and
#: tensor constants. Left out: custom objects (unpickled), effect tokens (ordered side effects) and non-tensor
#: constant inputs (the dry run sizes tensors only).
_INPUT_KINDS = frozenset({"user_input", "parameter", "buffer", "tensor_constant"})
#: What its outputs may be: the tasks' outputs only. Left out: every mutation (of a buffer or parameter: a model that
#: changes between calls; of a user input: one that overwrites the caller's images), gradients, losses and tokens:
#: :func:`export` writes an eval-mode program, which has none.
_OUTPUT_KINDS = frozenset({"user_output"})


def _check_signature(path: str, name: str, signature: Any) -> None:
    """Refuse a program whose signature declares inputs or outputs other than :data:`_INPUT_KINDS` and
    :data:`_OUTPUT_KINDS` (each spec is a union: a mapping of one kind to its fields)."""
    if not isinstance(signature, dict):
        raise _bad(path, f"has no signature in {name}")
    for part, allowed in (("input_specs", _INPUT_KINDS), ("output_specs", _OUTPUT_KINDS)):
        specs = signature.get(part)
        if not isinstance(specs, list):
            raise _bad(path, f"has no {part} in the signature of {name}")
        for spec in specs:
            kind = next(iter(spec)) if isinstance(spec, dict) and len(spec) == 1 else None
            if kind not in allowed and part == "output_specs":
                raise _bad(path, f"declares an output of kind {str(kind)[:40]!r} in {name} (a write to its buffers or "
                                 "to the caller's input, a gradient, a loss or a token): a loaded program returns its "
                                 "tasks' outputs only and changes nothing")
            if kind not in allowed:
                raise _bad(path, f"declares an input of kind {str(kind)[:40]!r} in {name} (an object, a token or a "
                                 "constant that is not a tensor): a loaded program takes images, weights, buffers and "
                                 "tensor constants only")


@functools.lru_cache(maxsize=None)
def _element_sizes() -> dict:
    """Bytes per element of each dtype code a tensor_meta may name (torch's own serde table)."""
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    sizes = {}
    for code, dtype in _SERIALIZE_TO_TORCH_DTYPE.items():
        try:
            sizes[int(code)] = torch._utils._element_size(dtype)
        except Exception:  # a dtype without a whole-byte element (none today): not loaded
            pass
    return sizes


def _ints(value: Any, limit: int) -> Optional[list]:
    """``[{"as_int": n}, ...]`` of at most ``limit`` non-negative ints below ``_MAX_DIM``, as ints; else None."""
    if not isinstance(value, list) or len(value) > limit:
        return None
    out = []
    for item in value:
        n = item.get("as_int") if isinstance(item, dict) and len(item) == 1 else None
        if type(n) is not int or not 0 <= n < _MAX_DIM:
            return None
        out.append(n)
    return out


def _tensor_bytes(path: str, name: str, fqn: str, meta: dict) -> tuple:
    """(dtype code, bytes of storage the tensor spans) from a config entry's tensor_meta."""
    tm = meta.get("tensor_meta")
    if not isinstance(tm, dict):
        raise _bad(path, f"describes {fqn!r} in {name} without a tensor_meta")
    dtype = tm.get("dtype")
    element = _element_sizes().get(dtype) if type(dtype) is int else None
    sizes, strides = _ints(tm.get("sizes"), _MAX_DIMS), _ints(tm.get("strides"), _MAX_DIMS)
    offset = _ints([tm.get("storage_offset")], 1)
    if element is None or sizes is None or strides is None or offset is None or len(strides) != len(sizes):
        raise _bad(path, f"describes {fqn!r} in {name} with a dtype, sizes, strides or offset that are not "
                         f"{_MAX_DIMS} or fewer non-negative integers of a known dtype")
    numel = 1
    for n in sizes:
        numel *= n
    span = 0 if numel == 0 else offset[0] + sum((n - 1) * st for n, st in zip(sizes, strides)) + 1
    return dtype, numel * element, span * element


def _check_config(path: str, name: str, config: Any, prefix: str) -> tuple:
    """``({file: (dtype, bytes)}, total)`` of a weights or constants config: each raw entry it names,
    with the bytes of storage its tensors span (the entry must hold exactly that many), and the sum
    of all its tensors' bytes."""
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise _bad(path, f"has a malformed {name}")
    files: dict = {}
    total = 0
    for fqn, meta in entries.items():
        fqn = str(fqn)[:60]
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
            raise _bad(path, f"marks {fqn!r} in {name} as pickled, and unpickling can run code")
        file = meta.get("path_name")
        if not isinstance(file, str) or not re.match(rf"^{prefix}[0-9]{{1,9}}\Z", file):
            raise _bad(path, f"stores {fqn!r} in {name} as {str(file)[:60]!r}, not as raw tensor bytes")
        dtype, nbytes, span = _tensor_bytes(path, name, fqn, meta)
        total += nbytes
        before = files.get(file)
        if before is not None and before[0] != dtype:
            raise _bad(path, f"reads {file!r} in {name} as two dtypes")
        files[file] = (dtype, max(span, before[1] if before else 0))
    return files, total


def _directory(path: str, data: bytes) -> list:
    """The zip directory of ``data`` (no entry decompressed), at most ``_MAX_ENTRIES`` entries, no name twice."""
    where = f"program file {path!r}"
    check_zip_directory(data, _MAX_ENTRIES, where, FileFormatError)
    try:
        infos = zipfile.ZipFile(io.BytesIO(data)).infolist()
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError, OSError) as exc:
        raise FileFormatError(f"{where} is not a complete zip archive ({exc}); export the model again") from None
    names = [i.filename for i in infos]
    if len(names) != len(set(names)):
        raise _bad(path, "holds an entry twice")
    return infos


def _check_layout(path: str, infos: list, max_bytes: int) -> dict:
    """{name relative to the root folder: ZipInfo}, when the directory has a plain export's layout:
    one root folder, only the entry names a plain export writes, each declaring at most its cap."""
    roots = {i.filename.split("/", 1)[0] for i in infos}
    if len(roots) != 1 or any("/" not in i.filename for i in infos) or not _ROOT.match(next(iter(roots))):
        raise _bad(path, "does not have the layout of a torch.export archive (one root folder)")
    root = roots.pop() + "/"
    rel = {i.filename[len(root):]: i for i in infos}
    extra = sorted(r for r in rel if not _LAYOUT.match(r))
    if extra:
        raise _bad(path, f"holds entries a plain export does not have ({', '.join(repr(e[:60]) for e in extra[:3])})")
    total = 0
    for r, info in rel.items():
        total += info.file_size
        if r.startswith("data/sample_inputs/") and info.file_size:
            raise _bad(path, f"holds pickled sample inputs ({r})")
        cap = _MAX_MARKER if r in _MARKERS else _MAX_JSON if r.endswith(".json") else max_bytes
        if info.file_size > cap:
            raise _bad(path, f"declares {info.file_size} bytes for {r[:60]!r}, beyond automtl's bounds for that entry")
        if total > max_bytes:
            raise _bad(path, f"declares more than the {max_bytes} bytes in all that automtl reads")
    return rel


def _read_small(path: str, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """One entry, already capped by :func:`_check_layout`, read under the zip bounds of :func:`read_zip_entries`."""
    name = info.filename[:80]
    if info.flag_bits & 0x1 or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) \
            or info.file_size > _MAX_RATIO * info.compress_size + 65536:
        raise _bad(path, f"stores {name!r} encrypted, compressed other than by deflate, or as a zip bomb")
    try:
        with zf.open(info) as f:
            raw = f.read(info.file_size + 1)
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError) as exc:
        raise FileFormatError(f"program file {path!r} has a damaged entry {name!r} ({exc}); "
                              "export the model again") from None
    if len(raw) != info.file_size:
        raise _bad(path, f"has an entry {name!r} whose size differs from the size it declares")
    return raw


def check_pt2(path: str | os.PathLike, max_bytes: int = MAX_PT2_BYTES, repack: bool = True) -> Optional[bytes]:
    """Read and check a ``.pt2`` archive; return its checked entries re-packed as a new archive, safe to hand to
    ``torch.export.load`` (``repack=False``: only check, return None; what ``export`` does with what it wrote).

    The zip directory is checked before any entry is decompressed, and the graph and configs
    before any tensor entry is.

    Raises:
        FileFormatError: the file is not a regular file under ``max_bytes``, not a complete zip,
            or holds anything beyond a plain export's entries: a pickled weight, constant or
            custom object, non-empty sample inputs, guard code, an operator outside
            :data:`ALLOWED_ATEN_OPERATORS` or an in-place/``out=`` one, a weight or constant whose
            entry does not hold exactly the bytes its sizes and dtype need, a legacy ``.pt``
            weights file, AOTInductor binaries or unknown entries.
    """
    path = os.fspath(path)
    data = read_regular_file(path, "program file", max_bytes, FileFormatError)
    rel = _check_layout(path, _directory(path, data), max_bytes)
    if "archive_format" not in rel:
        raise _bad(path, "is not a torch.export archive (no archive_format pt2)")
    zf = zipfile.ZipFile(io.BytesIO(data))
    if _read_small(path, zf, rel["archive_format"]).strip() != b"pt2":
        raise _bad(path, "is not a torch.export archive (no archive_format pt2)")
    models = [r[len("models/"):-len(".json")] for r in rel if r.startswith("models/")]
    if not models:
        raise _bad(path, "holds no exported program")
    allowed = set(_MARKERS)
    expected: dict = {}  # raw entry -> bytes its tensors need
    declared = 0
    for model in models:
        program_entry = f"models/{model}.json"
        _check_program(path, program_entry, _json(path, program_entry, _read_small(path, zf, rel[program_entry])))
        allowed |= {program_entry, f"data/sample_inputs/{model}.pt"}
        for kind, prefix in (("weights", "weight_"), ("constants", "tensor_")):
            config_entry = f"data/{kind}/{model}_{kind}_config.json"
            if config_entry in rel:
                config = _json(path, config_entry, _read_small(path, zf, rel[config_entry]))
                files, total = _check_config(path, config_entry, config, prefix)
                declared += total
                allowed.add(config_entry)
                for f, (_, nbytes) in files.items():
                    expected[f"data/{kind}/{f}"] = max(nbytes, expected.get(f"data/{kind}/{f}", 0))
    if declared > max_bytes:
        raise _bad(path, f"declares {declared} bytes of weights and constants, more than the {max_bytes} automtl loads")
    extra = sorted(set(rel) - allowed - set(expected))
    if extra:
        raise _bad(path, f"holds entries a plain export does not have ({', '.join(repr(e[:60]) for e in extra[:3])})")
    for entry, nbytes in sorted(expected.items()):
        info = rel.get(entry)
        if info is None:
            raise _bad(path, f"lacks the entry {entry[:60]!r} its config names")
        if info.file_size != nbytes:
            raise _bad(path, f"holds {info.file_size} bytes in {entry[:60]!r} where the sizes and dtype its config "
                             f"declares need {nbytes}")
    entries = _entries(path, data, max_bytes)  # only now is every entry read (under the zip bounds): a damaged one is refused
    del zf, data  # the file's bytes: the entries are all that is needed now (a 2 GiB file is not held three times)
    return _repacked(entries) if repack else None


def _repacked(entries: dict) -> bytes:
    """A new archive of exactly the entries as checked (stored, in their order): torch's zip reader is another
    program than the one that read them for the checks, so it is given only bytes Python wrote."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as dst:
        for name in list(entries):  # each entry let go once written: its bytes are held once, not twice
            dst.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), entries.pop(name))
    return out.getvalue()


@contextlib.contextmanager
def _quiet_torch_logs():
    import logging

    loggers = [logging.getLogger(n) for n in ("torch._export", "torch.export", "torch._export.serde.serialize")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def load_pt2(path: str | os.PathLike, max_bytes: int = MAX_PT2_BYTES):
    """Load a ``.pt2`` as a ``torch.export.ExportedProgram`` after :func:`check_pt2` refused any code in it.

    ``load_pt2(path).module()(x)`` returns ``{task: output}`` for any batch size at the height and width the file
    was exported at (torch refuses another; export again at that size: ``automtl export --input-size H,W``, or
    ``automtl.export(model, path, example_input=x)``). The checked bytes, not the path, go to
    ``torch.export.load``, so the file cannot change in between.

    Raises:
        FileFormatError: see :func:`check_pt2`; also when torch cannot read the checked archive.

    Example:
        >>> program = automtl.load_pt2("runs/quickstart/model.pt2")
        >>> program.module()(torch.randn(2, 3, 64, 64))["depth"].shape
        torch.Size([2, 1, 64, 64])
    """
    data = check_pt2(path, max_bytes)
    try:
        with _quiet_torch_logs():  # torch logs a traceback before raising on a damaged archive: our sentence replaces it
            program = torch.export.load(io.BytesIO(data))
    except Exception as exc:  # torch raises many types on a malformed program
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise FileFormatError(f"program file {os.fspath(path)!r} cannot be read by torch.export ({first}); export the model again") from None
    _bounded_dry_run(os.fspath(path), program)
    _check_index_values(os.fspath(path), program)
    return program


def _packet(node) -> str:
    """The ``aten`` packet a loaded program's node calls (``"gather"`` for ``aten.gather.default``), else ""."""
    return getattr(getattr(node.target, "_schema", None), "name", "").removeprefix("aten::")


#: The listed operators that read a tensor at positions another tensor holds, by ``aten`` packet: where their index
#: tensors are among the arguments, and which dimension each indexes (``index``: its list, from dimension 0).
_INDEXING = {"index_select": 2, "gather": 2, "index": 1}
#: Operators that only lay out or repeat a tensor's values, whatever sizes they are given: an index tensor reshaped or
#: expanded to the batch (sizes read from the input) holds the values it held before.
_SHAPE_ONLY = frozenset({"view", "reshape", "_unsafe_view", "expand", "repeat", "broadcast_to", "expand_as"})


#: The bytes the load-time check of index positions (:func:`_check_index_values`) may read and write in all to
#: compute them from a program's constants (1 GiB: about a second). Positions an automtl export indexes at are
#: buffers, viewed or sliced: a few elements.
MAX_CONSTANT_BYTES = 2**30
#: A computed value no later node reads (not None, which marks a value that depends on the input).
_FREED = object()


def _bytes(value) -> int:
    """The bytes of the tensors in ``value`` (its logical elements: a stride-0 view is read element by element)."""
    return sum(t.numel() * t.element_size() for t in torch.utils._pytree.tree_leaves(value) if isinstance(t, torch.Tensor))


def _on_meta(target, args, kwargs):
    """What ``target(*args, **kwargs)`` returns, made on the meta device (no memory, no compute), factories too."""
    meta = lambda v: torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta") if isinstance(v, torch.Tensor) else v
    args, kwargs = torch.utils._pytree.tree_map(meta, (args, kwargs))
    with torch.device("meta"):  # factories without a device; those naming one are given the meta device
        return target(*args, **({**kwargs, "device": torch.device("meta")} if "device" in kwargs else kwargs))


def _check_index_values(path: str, program) -> None:
    """Every index tensor of ``index``, ``index_select`` and ``gather`` is computed from the program's constants
    (weights, buffers), and its values, computed here, lie within the dimension they index; or it is the position an
    argmax/argmin picked over a dimension no larger than that one (:func:`_argmax_bound`). The meta-device dry run
    sees shapes, not values: an index buffer holding 10**9 loaded, and the first call failed inside torch; any other
    index computed from the input (only the data decides whether it is in range) is refused.

    The values are computed in the graph's order, each freed after its last use, so no more is alive at
    once than the dry run allowed; only with :data:`CONSTANT_OPERATORS`, each sized on the meta device first, reading
    and writing at most :data:`MAX_CONSTANT_BYTES` in all (a 16 KB file whose chain of 2^27-element constants was
    kept whole took 6.5 GB here, one 8192^2 product 15 s, chained logsumexps of a stride-0 buffer most of an hour)."""
    gm = program.graph_module
    constants = {**program.state_dict, **program.constants}
    known: dict = {}
    for spec in program.graph_signature.input_specs:
        if spec.kind.name in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR") and spec.target in constants:
            known[spec.arg.name] = constants[spec.target]
    sites = []  # (node, indexed tensor's meta value, dimension, index node)
    for node in gm.graph.nodes:
        packet = _packet(node)
        if node.op != "call_function" or packet not in _INDEXING:
            continue
        source = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
        at = node.args[_INDEXING[packet]] if len(node.args) > _INDEXING[packet] else None
        sites += [(node, source, d, i) for d, i in (_index_dims(at) if packet == "index" else [(node.args[1], at)])]
    depends = set()  # nodes whose values depend on the input (found without computing anything)
    for node in gm.graph.nodes:
        if (node.op == "placeholder" and node.name not in known) or (
                "sym_size" not in str(node.target) and any(i in depends for i in node.all_input_nodes)):
            depends.add(node)
    needed, stack = set(), [i for *_, i in sites if isinstance(i, torch.fx.Node)]
    while stack:  # what the index tensors are computed from, as far as it is computed from constants
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            if n not in depends:  # an input-dependent value is not computed: neither is what feeds it
                stack.extend(n.all_input_nodes)
    last_use = {}  # node -> the last needed node that reads it (index nodes are kept to the end)
    for node in gm.graph.nodes:
        if node in needed:
            for i in node.all_input_nodes:
                last_use[i] = node
    kept = {i for *_, i in sites}
    values: dict = {}  # node -> its real value, computed from constants only; None where it depends on the input
    sizes = set()  # nodes whose value is a size computed from the batch (at the dry runs' batch 2 here)
    budget = {"bytes": 0}
    for node in gm.graph.nodes:
        if node in needed:
            values[node] = None if node in depends else _constant_value(path, node, values, known, sizes, budget)
            for i in node.all_input_nodes:  # read by no later node: freed, so no more is alive than the dry run allowed
                if last_use.get(i) is node and i not in kept:
                    values[i] = _FREED
    for node, source, dim, index_node in sites:
        index = values.get(index_node) if isinstance(index_node, torch.fx.Node) else None
        size = source.shape[dim] if isinstance(source, torch.Tensor) and isinstance(dim, int) else None
        if index is None and isinstance(index_node, torch.fx.Node) and isinstance(size, int):
            bound = _argmax_bound(index_node)  # positions the data picks, within a dimension of a known size
            if bound is not None and bound <= size:
                continue
        if not isinstance(index, torch.Tensor) or size is None:
            raise _bad(path, f"indexes at node {node.name[:60]!r} with positions computed from its input, which "
                             "automtl cannot check before the program runs (only the values decide whether they "
                             "are in range, except for an argmax or argmin over a dimension no larger than the one "
                             "indexed)")
        if index.dtype == torch.bool or index.numel() == 0:
            continue  # a mask: its shape, checked by the dry run, is all that matters
        if not isinstance(size, int):
            raise _bad(path, f"indexes the batch dimension at node {node.name[:60]!r} with fixed positions")
        low, high = int(index.min()), int(index.max())
        if low < (-size if _packet(node) == "index" else 0) or high >= size:  # index_select and gather: none below 0
            raise _bad(path, f"indexes at node {node.name[:60]!r} positions {low} to {high} of a dimension of "
                             f"size {size}")


def _constant_value(path: str, node, values: dict, known: dict, sizes: set, budget: dict):
    """The real value of ``node`` computed from the values of its inputs (None where it depends on the input; a size
    computed from the batch at the dry runs' batch 2, recorded in ``sizes``), sized on the meta device and counted
    against ``budget`` (bytes read and written) before it is computed.

    Raises:
        FileFormatError: an operator off :data:`CONSTANT_OPERATORS`, the budget exceeded, the operation refusing its
            values, or a value that is not of values on the CPU.
    """
    inputs = node.all_input_nodes
    if node.op == "placeholder":
        return known.get(node.name)
    if node.op == "call_function" and "sym_size" in str(node.target):  # a size of the input, not its values
        val = node.meta.get("val")
        if not isinstance(val, int):
            sizes.add(node)
        return val if isinstance(val, int) else 2
    if node.op != "call_function" or any(values.get(i) is None for i in inputs):
        return None
    from_batch = [i for i in inputs if i in sizes]
    if from_batch and not isinstance(node.meta.get("val"), torch.Tensor):
        sizes.add(node)  # size arithmetic (bounded by _check_size_arithmetic)
    elif from_batch and (_packet(node) not in _SHAPE_ONLY or node.args[0] in from_batch):
        return None  # values that depend on the batch size (arange(batch))
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: values[n])
    packet = _packet(node)
    if packet not in CONSTANT_OPERATORS and getattr(node.target, "__module__", None) != "_operator":
        raise _bad(path, f"computes the positions it indexes at with {str(node.target)[:60]} at node "
                         f"{node.name[:60]!r}, which automtl does not run at load (it checks positions computed with "
                         "layout, conversions, arithmetic, comparisons, reductions and indexing of constants)")
    try:
        with torch.no_grad():
            budget["bytes"] += _bytes((args, kwargs)) + _bytes(_on_meta(node.target, args, kwargs))
            if budget["bytes"] > MAX_CONSTANT_BYTES:
                raise _bad(path, f"reads and writes {budget['bytes']} bytes, up to node {node.name[:60]!r}, to compute "
                                 f"the positions it indexes at from its constants, more than the {MAX_CONSTANT_BYTES} "
                                 "automtl computes to check them")
            value = node.target(*args, **kwargs)  # on the device the file names: one not the CPU is refused below
    except FileFormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - any op refusing its values
        raise _bad(path, f"cannot compute node {node.name[:60]!r} from its constants ({first_line(exc)[:120]})") from None
    if any(isinstance(t, torch.Tensor) and (t.device.type != "cpu" or t.layout != torch.strided)
           for t in torch.utils._pytree.tree_leaves(value)):
        raise _bad(path, f"makes at node {node.name[:60]!r} positions that are not values on the CPU (a tensor on "
                         "another device, or of another layout), which indexing the CPU's tensors fails on")
    return value


#: Operators whose output holds only values of their first argument (laid out, repeated or selected otherwise).
_SAME_VALUES = _SHAPE_ONLY | {"unsqueeze", "squeeze", "clone", "contiguous", "permute", "transpose", "alias", "detach",
                              "slice", "select", "flatten", "unflatten", "lift_fresh_copy", "flip", "roll"}
#: The operators (``aten`` packets) that check may run on values computed from constants only, whose cost is the
#: bytes they read and write: layout (:data:`_SAME_VALUES`), conversions, factories, elementwise arithmetic and
#: functions, comparisons, reductions and indexing. Not a product, a convolution (whose CPU kernels unfold their
#: input) or logsumexp (hidden copies). Values that depend on the input are never computed, nor what only they read.
CONSTANT_OPERATORS = frozenset(_SAME_VALUES | {
    "t", "cat", "stack", "_to_copy", "to", "type_as", "arange", "full", "zeros", "ones", "empty", "scalar_tensor",
    "zeros_like", "ones_like", "full_like", "empty_like", "add", "sub", "rsub", "mul", "div", "floor_divide",
    "remainder", "fmod", "neg", "abs", "sign", "clamp", "clamp_min", "clamp_max", "minimum", "maximum", "floor",
    "ceil", "round", "trunc", "where", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or",
    "logical_not", "bitwise_and", "bitwise_or", "bitwise_not", "sum", "cumsum", "argmax", "argmin", "max", "min",
    "amax", "amin", "index", "index_select", "gather", "narrow", "split", "split_with_sizes", "chunk", "unbind",
    "tensor_split", "view_as", "reshape_as", "numpy_T", "movedim", "new_zeros", "new_ones", "new_full",
    "new_empty", "constant_pad_nd", "repeat_interleave", "masked_fill", "exp", "log", "sqrt", "rsqrt", "sigmoid",
    "tanh", "relu", "pow"})


def _argmax_bound(node) -> Optional[int]:
    """An exclusive bound of the values of ``node`` where it is the position an ``argmax``/``argmin`` (or ``max``/
    ``min`` over a dimension) picked, passed on through :data:`_SAME_VALUES`: the size of the dimension it reduced
    (every element when it reduced them all); None otherwise or where that size is not fixed."""
    import operator

    while isinstance(node, torch.fx.Node) and node.op == "call_function":
        packet = _packet(node)
        if node.target is operator.getitem and node.args[1:] == (1,) and isinstance(node.args[0], torch.fx.Node):
            reduced = node.args[0]  # (values, indices) of max.dim / min.dim
            packet = _packet(reduced)
            if packet not in ("max", "min") or len(reduced.args) < 2:
                return None
            node = reduced
        elif packet in _SAME_VALUES and node.args:
            node = node.args[0]
            continue
        elif packet not in ("argmax", "argmin"):
            return None
        source = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if not isinstance(source, torch.Tensor):
            return None
        extent = source.numel() if dim is None else source.shape[dim] if isinstance(dim, int) else None
        return extent if isinstance(extent, int) else None
    return None


def _index_dims(indices) -> list:
    """``[(dimension, index node)]`` of ``aten.index``'s list: each entry indexes the next dimension (None: skips
    one), a boolean mask as many as it has (so the entries after it index later dimensions)."""
    out, dim = [], 0
    for entry in indices if isinstance(indices, (list, tuple)) else []:
        if entry is not None:
            out.append((dim, entry))
        val = entry.meta.get("val") if isinstance(entry, torch.fx.Node) else None
        dim += val.dim() if isinstance(val, torch.Tensor) and val.dtype in (torch.bool, torch.uint8) else 1
    return out


def _check_batch_scaling(path: str, gm) -> None:
    """Every tensor the program makes grows with the batch at most in proportion: at most one dimension depends
    on it, as a whole multiple of it (``s0``, ``16*s0``), so the dry run at one batch size bounds every other
    (a size such as ``(s0 - 2) * 2**30`` is 2 elements at batch 2 and 4 GiB at batch 3)."""
    batch = set()
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and isinstance(val, torch.Tensor):
            batch |= {d.node.expr for d in val.shape if not isinstance(d, int)}
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        for t in (val if isinstance(val, (list, tuple)) else [val]):
            if not isinstance(t, torch.Tensor):
                continue
            dims = [d.node.expr for d in t.shape if not isinstance(d, int)]
            ok = len(dims) <= 1 and all(any((e / b).is_Integer and (e / b) > 0 for b in batch) for e in dims)
            if not ok:
                raise _bad(path, f"has node {node.name[:60]!r} whose shape {[str(d) for d in t.shape]} does not grow "
                                 "in proportion to the batch, so a check at one batch size bounds no other")


#: The batch sizes of the dry runs of a loaded program (its batch dimension is dynamic): shapes proportional to the
#: batch that agree with what the operations compute at two sizes (2 and 3) agree at every size, as long as the sizes
#: the program computes from the batch are proportional to it too (:func:`_check_size_arithmetic`); except at 1, where
#: an operation may treat the batch axis as a unit one (``squeeze(0)`` drops it), so batch 1 is run as well.
DRY_RUN_BATCHES = (1, 2, 3)


def _check_size_arithmetic(path: str, gm) -> None:
    """Sizes computed from the batch (``sym_size`` and what is computed from it) may only be multiplied by sizes
    that are not, and indexed: a sum, difference, division, remainder or comparison of them could make a size that
    agrees with a proportional one at the dry runs' batch sizes and not at others (``(b - 2) * (b - 3) * 2**30``)."""
    from_batch: set = set()
    for node in gm.graph.nodes:
        target = str(node.target)
        if node.op == "call_function" and ("sym_size" in target or "sym_numel" in target or "sym_stride" in target):
            from_batch.add(node)
            continue
        inputs = [i for i in node.all_input_nodes if i in from_batch]
        if not inputs or node.op != "call_function" or not target.startswith("<built-in function"):
            continue
        name = getattr(node.target, "__name__", target)
        if name == "getitem" or (name == "mul" and len(inputs) == 1):
            from_batch.add(node)
            continue
        raise _bad(path, f"computes a size from the batch at node {node.name[:60]!r} with {name}, which automtl "
                         "does not load (only multiples of the batch are bounded by a dry run)")


def _bounded_dry_run(path: str, program) -> None:
    """Run the program once on the meta device under the bundle loader's bounds (:func:`automtl.formats.rebuild.
    bounded_run`: each activation, the activations alive at once, element operations, FLOPs), at its example
    input's shape at the batch sizes :data:`DRY_RUN_BATCHES`: a program of listed operators can still ask for 64 GiB
    (``full`` of a huge size) or hours of compute. Nothing is computed and no memory is taken.

    Raises:
        FileFormatError: a bound is exceeded, an operation refuses its shapes, or the program's inputs are not
            described by shapes and dtypes.
    """
    from .rebuild import bounded_run

    gm = program.graph_module
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node in placeholders:
        if not isinstance(node.meta.get("val"), torch.Tensor):
            raise _bad(path, f"has an input {node.name[:60]!r} that is not a tensor of known shape")
    _check_batch_scaling(path, gm)
    _check_size_arithmetic(path, gm)
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    values = outputs[0].args[0] if outputs and isinstance(outputs[0].args[0], (tuple, list)) else ()
    num_tasks = max(len({v for v in values if isinstance(v, torch.fx.Node)}), 1)  # the same value twice: one budget
    for batch in DRY_RUN_BATCHES:  # the shapes the file declares must be what its operations compute, at two sizes
        inputs = [torch.empty([d if isinstance(d, int) else batch for d in n.meta["val"].shape],
                              dtype=n.meta["val"].dtype, device="meta") for n in placeholders]
        computed: dict = {}
        try:
            bounded_run(gm, inputs, batch, num_tasks, shapes=computed)
        except FileFormatError as exc:
            raise _bad(path, str(exc).split("; the file is")[0]) from None
        for node, made in computed.items():
            val = node.meta.get("val")
            declared = [tuple(d if isinstance(d, int) else int(d.node.expr.subs({s: batch for s in d.node.expr.free_symbols}))
                              for d in t.shape) for t in (val if isinstance(val, (list, tuple)) else [val])
                        if isinstance(t, torch.Tensor)]
            if declared and declared != made:
                raise _bad(path, f"declares for node {node.name[:60]!r} the shapes {declared} at batch {batch} but its "
                                 f"operations make {made}")
