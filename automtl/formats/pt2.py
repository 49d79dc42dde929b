"""The ``.pt2`` file: the compact model from ``torch.export``, and a loader that refuses code in it.

``torch.export.load`` trusts its archive: it unpickles entries marked as pickled (weights,
constants, custom objects) and the sample inputs (falling back to ``weights_only=False``),
``exec``s the guard code it finds and hands expression strings to sympy, which evaluates them.
So a ``.pt2`` from an untrusted source must not go to it directly. :func:`load_pt2` reads the
archive under size bounds, accepts only the entries a plain export has (graph JSON, raw tensor
bytes, their JSON configs, version markers), refuses every pickled entry, guard code, custom
objects, operators outside ``aten`` and expression strings that are not plain arithmetic on
shape symbols, and only then hands the checked bytes (not the path) to ``torch.export.load``.

:func:`export` writes archives that pass it: the sample inputs entry, a pickle torch always
writes, is left empty.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import zipfile
from typing import Any, Optional

import torch

from ..compact import CompactModel
from ..errors import AutomtlError, FileFormatError
from ..fileio import atomic_path, read_regular_file, read_zip_entries
from ._export_common import EvalMode, example_input_for, failing_op

__all__ = ["export", "load_pt2", "check_pt2", "MAX_PT2_BYTES"]

MAX_PT2_BYTES = 2 * 2**30
_MAX_ENTRIES = 100_000
_MAX_JSON = 256 * 2**20
_MAX_RATIO = 200
_RAW_PREFIXES = ("data/weights/weight_", "data/constants/tensor_")
_MARKERS = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}
_PYTHON_OPERATORS = {f"_operator.{n}" for n in ("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg",
                                                 "eq", "ne", "lt", "le", "gt", "ge")}
_SYMBOLIC = re.compile(r"^[A-Za-z0-9_ +\-*/(),.%<>='\"]*$")
_SYMBOLIC_NAMES = re.compile(r"^([su][0-9]+|Mod|PythonMod|FloorDiv|CleanDiv|CeilDiv|CeilToInt|FloorToInt|Max|Min|"
                             r"floor|ceiling|oo|True|False|Eq|Ne|Lt|Le|Gt|Ge|And|Or|Not|Integer|Symbol|positive|negative|nonnegative|"
                             r"integer|real|finite)$")


def export(compact: CompactModel, path: str | os.PathLike, example_input: Optional[torch.Tensor] = None) -> None:
    """Write all tasks of ``compact`` as a ``.pt2`` (torch.export, dynamic batch, eval mode), atomically.

    ``automtl.load_pt2(path).module()(x)`` returns ``{task: output}`` for any batch size; where
    automtl is not installed, ``torch.export.load`` reads the same file (for files you trust:
    it unpickles). The example input (default: the model's input shape at batch 2) fixes every
    dimension but the batch. The archive holds no pickle: its sample inputs entry is empty.

    Raises:
        AutomtlError: naming the operation torch.export cannot trace.

    Example:
        >>> automtl.export(model, "model.pt2")
        >>> automtl.load_pt2("model.pt2").module()(torch.randn(4, 3, 64, 64))
    """
    if not isinstance(compact, CompactModel):
        raise AutomtlError(f"export() needs an automtl CompactModel (from automtl.compact), got {type(compact).__name__}")
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
    return FileFormatError(f"program file {path!r} {what}; load only .pt2 files written by automtl.export, or "
                           "use torch.export.load on files you trust completely")


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


def _check_program(path: str, name: str, program: Any) -> None:
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise _bad(path, f"has a {name} that is not an exported program")
    if program.get("guards_code"):
        raise _bad(path, f"has guard code in {name}, which torch.export.load runs as Python")
    for key in program.get("range_constraints") or {}:
        if not _symbolic_ok(key):
            raise _bad(path, f"has a shape constraint {str(key)[:60]!r} in {name} that is not plain arithmetic")

    def visit(key, v):
        if key == "target" and isinstance(v, str):
            if not (v.startswith("torch.ops.aten.") and re.match(r"^torch\.ops\.aten\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+$", v)) \
                    and v not in _PYTHON_OPERATORS:
                raise _bad(path, f"calls {v[:80]!r} in {name}; automtl loads programs of aten operators only")
        elif key == "expr_str" and not _symbolic_ok(v):
            raise _bad(path, f"has a symbolic expression {str(v)[:60]!r} in {name} that is not plain arithmetic")
        elif key == "custom_obj_values" and v:
            raise _bad(path, f"has custom objects in {name}, which torch loads by unpickling")

    _walk(program, visit)


def _check_config(path: str, name: str, config: Any, prefix: str) -> set:
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise _bad(path, f"has a malformed {name}")
    files = set()
    for fqn, meta in entries.items():
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
            raise _bad(path, f"marks {str(fqn)[:60]!r} in {name} as pickled, and unpickling can run code")
        file = meta.get("path_name")
        if not isinstance(file, str) or not re.match(rf"^{prefix}[0-9]+$", file):
            raise _bad(path, f"stores {str(fqn)[:60]!r} in {name} as {str(file)[:60]!r}, not as raw tensor bytes")
        files.add(file)
    return files


def check_pt2(path: str | os.PathLike, max_bytes: int = MAX_PT2_BYTES) -> bytes:
    """Read and check a ``.pt2`` archive; return its bytes, safe to hand to ``torch.export.load``.

    Raises:
        FileFormatError: the file is not a regular file under ``max_bytes``, not a complete zip,
            or holds anything beyond a plain export's entries: a pickled weight, constant or
            custom object, non-empty sample inputs, guard code, a non-aten operator, a legacy
            ``.pt`` weights file, AOTInductor binaries or unknown entries.
    """
    path = os.fspath(path)
    data = read_regular_file(path, "program file", max_bytes, FileFormatError)
    entries = _entries(path, data, max_bytes)
    roots = {n.split("/", 1)[0] for n in entries}
    if len(roots) != 1 or any("/" not in n for n in entries):
        raise _bad(path, "does not have the layout of a torch.export archive (one root folder)")
    root = roots.pop() + "/"
    rel = {n[len(root):]: raw for n, raw in entries.items()}
    if rel.get("archive_format", b"").strip() != b"pt2":
        raise _bad(path, "is not a torch.export archive (no archive_format pt2)")
    models = [r[len("models/"):-len(".json")] for r in rel if re.match(r"^models/[A-Za-z0-9_]+\.json$", r)]
    if not models:
        raise _bad(path, "holds no exported program")
    allowed = set(_MARKERS)
    for model in models:
        program_entry = f"models/{model}.json"
        _check_program(path, program_entry, _json(path, program_entry, rel[program_entry]))
        sample = f"data/sample_inputs/{model}.pt"
        if rel.get(sample):
            raise _bad(path, f"holds pickled sample inputs ({sample})")
        allowed |= {program_entry, sample}
        for kind, prefix in (("weights", "weight_"), ("constants", "tensor_")):
            config_entry = f"data/{kind}/{model}_{kind}_config.json"
            if config_entry in rel:
                files = _check_config(path, config_entry, _json(path, config_entry, rel[config_entry]), prefix)
                allowed |= {config_entry} | {f"data/{kind}/{f}" for f in files}
    extra = sorted(set(rel) - allowed)
    if extra:
        raise _bad(path, f"holds entries a plain export does not have ({', '.join(e[:60] for e in extra[:3])})")
    return data


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

    ``load_pt2(path).module()(x)`` returns ``{task: output}``. The checked bytes, not the path,
    go to ``torch.export.load``, so the file cannot change in between.

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
            return torch.export.load(io.BytesIO(data))
    except Exception as exc:  # torch raises many types on a malformed program
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise FileFormatError(f"program file {os.fspath(path)!r} cannot be read by torch.export ({first}); export the model again") from None
