"""Reading and writing files safely: atomic writes (a file appears whole or not at all) and bounded
reads of untrusted files (regular files under a size cap, YAML without aliases, zip archives
without bombs)."""
from __future__ import annotations

import errno
import functools
import math
import os
import re
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Collection, Mapping, Optional


#: errno values that mean the write cannot happen here (not a bug): reported as a StorageError.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


def storage_error(path, exc: BaseException):
    """The StorageError for a failed write of ``path``, or None when ``exc`` is not about storage.

    torch.save reports a full disk as a RuntimeError from its zip writer, so that is recognised too.
    """
    from .errors import StorageError

    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        reason = exc.strerror or str(exc)
    elif isinstance(exc, RuntimeError) and any(sign in str(exc) for sign in (
            "write failed", "No space left", "unexpected pos")):  # the last: torch's zip writer after a short write
        reason = "the write failed; the disk is probably full"
    else:
        return None
    return StorageError(f"cannot write {os.fspath(path)!r} ({reason}); free space on that disk, fix its permissions "
                        "or choose another path")


def ensure_dir(folder: str | os.PathLike, target: str | os.PathLike | None = None) -> Path:
    """Make ``folder`` (and its parents) where it is missing, to write ``target`` (default: the folder) into; return it.

    Raises:
        StorageError: a part of the folder's path is a file, the name is too long, or the disk refuses, in one
            sentence naming ``target``.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    except OSError as exc:
        error = storage_error(target or folder, exc)
        if error is not None:
            raise error from None
        raise _path_error(target or folder, exc, folder) from None


def _path_error(path, exc: OSError, folder: Path):
    """The StorageError for a path that cannot be made: its name is too long, or a part of ``folder`` is a file."""
    from .errors import StorageError

    if exc.errno == errno.ENAMETOOLONG:
        reason = "the name is too long"
    else:
        blocking = next((p for p in (*reversed(folder.parents), folder) if _is_file(p)), None)
        reason = f"{os.fspath(blocking)!r} is a file, not a folder" if blocking else (exc.strerror or str(exc))
    return StorageError(f"cannot write {os.fspath(path)!r} ({reason}); choose another path")


def not_a_folder(path: str | os.PathLike) -> str:
    """Why ``path`` is no folder, for a message: "does not exist", or what is there instead."""
    path = Path(path)
    return "is a file, not a folder" if path.exists() or path.is_symlink() else "does not exist"


def _is_file(path: Path) -> bool:
    """Whether ``path`` exists and is not a folder (False where it cannot even be looked at)."""
    try:
        return path.exists() and not path.is_dir()
    except OSError:
        return False


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    Raises:
        StorageError: the disk is full or read-only, or permission is denied (nothing is left behind).
    """
    path = Path(path)
    ensure_dir(path.parent, path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise _path_error(path, exc, path.parent) from None
        raise (storage_error(path, exc) or exc) from None
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are meant to be shared like any file
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        error = storage_error(path, exc)
        if error is not None:
            raise error from exc
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: Bounds on every YAML file automtl reads (config, policy, run files and a bundle's model.yaml).
MAX_YAML_BYTES = 32 * 2**20
MAX_YAML_DEPTH = 32
#: Parser events (scalars, starts and ends of mappings and lists) in one YAML text: about 15 times those of
#: the largest builtin bundle's model.yaml (resnet50, three tasks, all specialized: 28k). Building Python
#: objects from YAML costs about 14 us and 0.4 KB an event, so this bounds a read at ~6 s and ~150 MB.
MAX_YAML_EVENTS = 400_000


@contextmanager
def open_regular(path: str | os.PathLike, what: str, max_bytes: int, error: type):
    """Open ``path`` for reading and yield ``(file, size)``, refused unless it is a regular file of at most
    ``max_bytes`` (see :func:`read_regular_file`); read errors (``OSError``) inside the block become ``error`` too.
    The file is binary, buffered and seekable."""
    where = f"{what} {os.fspath(path)!r}"
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise error(f"{where} does not exist; check the path") from None
    except IsADirectoryError:
        raise error(f"{where} is a directory, not a file; pass the file itself") from None
    except OSError as exc:
        raise error(f"{where} cannot be read ({exc.strerror or exc}); check the path and its permissions") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise error(f"{where} is a directory, not a file; pass the file itself")
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{where} is not a regular file (a pipe, device or socket); pass a file on disk")
        if st.st_size > max_bytes:
            raise error(f"{where} is {st.st_size} bytes, more than the {max_bytes} automtl reads; "
                        "check that this is the right file")
        f = os.fdopen(fd, "rb")  # buffered: its readinto loops (one read(2) stops at 2 GiB; torch does not retry)
    except BaseException:
        os.close(fd)
        raise
    with f:
        try:
            yield f, st.st_size
        except OSError as exc:
            raise error(f"{where} cannot be read ({exc.strerror or exc}); check the path and its permissions") from None


def read_regular_file(path: str | os.PathLike, what: str, max_bytes: int, error: type = None) -> bytes:
    """The bytes of ``path``, refused unless it is a regular file of at most ``max_bytes``.

    A FIFO, a device (``/dev/zero``), a socket or a directory is refused before anything is read
    (the file is opened non-blocking, so a FIFO cannot hang the reader), and the size is checked
    on the open descriptor, so what is read is what was checked.

    Raises:
        error (default :class:`ConfigError`): one sentence naming the file and what is wrong.
    """
    from .errors import ConfigError

    error = error or ConfigError
    with open_regular(path, what, max_bytes, error) as (f, _):
        data = read_at_most(f, max_bytes + 1)
    if len(data) > max_bytes:
        raise error(f"{what} {os.fspath(path)!r} grew past the {max_bytes} bytes automtl reads while it was read; "
                    "check the file")
    return data


#: The largest JSON file automtl reads back (a run's report.json or metrics.json, a sweep's records).
MAX_JSON_BYTES = 64 * 2**20
#: The largest JSON-lines log automtl reads back for a figure (a run's ``log.jsonl``, read as a stream: about
#: five minutes here) and its longest line. A resume, which only copies the lines it keeps, reads up to
#: ``MAX_RESUMED_LOG_BYTES``.
MAX_LOG_BYTES = 2**30
MAX_RESUMED_LOG_BYTES = 2**40
MAX_LOG_LINE_BYTES = 16 * 2**20


def json_depth(value) -> int:
    """How many levels of lists and dicts nest in ``value`` (0 for a scalar), found without recursion."""
    depth, level = 0, [value]
    while True:
        containers = [v for v in level if isinstance(v, (list, dict))]
        if not containers:
            return depth
        depth += 1
        level = [x for c in containers for x in (c.values() if isinstance(c, dict) else c)]


def parse_json(raw: bytes | str, where: str, error: type, fix: str):
    """``json.loads`` whose every failure (not UTF-8, not JSON, nested past Python's recursion limit or
    :data:`MAX_YAML_DEPTH` levels, which the code reading it recurses through, an integer of more digits than Python
    converts) is one ``error`` naming ``where`` and ``fix``."""
    import json

    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise error(f"{where} is not readable JSON; {fix}") from None
    if json_depth(value) > MAX_YAML_DEPTH:
        raise error(f"{where} nests more than {MAX_YAML_DEPTH} levels deep, which automtl never writes; {fix}")
    return value


def read_json(path: str | os.PathLike, what: str, error: type, fix: str, max_bytes: Optional[int] = None):
    """The value of the JSON file ``path``: a regular file of at most ``max_bytes`` (default
    :data:`MAX_JSON_BYTES`; :func:`read_regular_file`), parsed by :func:`parse_json`. Raises ``error``, one
    sentence."""
    raw = read_regular_file(path, what, MAX_JSON_BYTES if max_bytes is None else max_bytes, error)
    return parse_json(raw, f"{what} {os.fspath(path)!r}", error, fix)


def iter_json_lines(path: str | os.PathLike, what: str, error: type, max_bytes: Optional[int] = None,
                    max_line: Optional[int] = None):
    """Yield ``(line_number, raw_line, value)`` for each line of the JSON-lines file ``path``, read as a stream.

    ``value`` is None for a line that is not JSON (one a killed writer cut short) or longer than ``max_line``
    bytes (skipped without being held: ``raw_line`` is then empty). The file must be a regular file of at most
    ``max_bytes`` (:func:`read_regular_file`); nothing else bounds memory, so the caller keeps what it needs.
    The bounds default to :data:`MAX_LOG_BYTES` and :data:`MAX_LOG_LINE_BYTES`.
    """
    import json

    max_bytes = MAX_LOG_BYTES if max_bytes is None else max_bytes
    max_line = MAX_LOG_LINE_BYTES if max_line is None else max_line

    with open_regular(path, what, max_bytes, error) as (f, _):
        number, left = 0, max_bytes  # a file that grows while it is read stops at the bound too
        while left > 0:
            line = f.readline(min(max_line + 1, left))
            if not line:
                return
            number, left = number + 1, left - len(line)
            if len(line) > max_line and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n") and left > 0:  # the rest of the long line, in pieces
                    line = f.readline(min(max_line + 1, left))
                    left -= len(line)
                yield number, b"", None
                continue
            try:
                value = json.loads(line)
            except (UnicodeDecodeError, ValueError, RecursionError):
                value = None
            yield number, line, (value if json_depth(value) <= MAX_YAML_DEPTH else None)


def read_at_most(f, n: int) -> bytes:
    """Up to ``n`` bytes of the binary stream ``f`` (fewer at its end), read in 16 MiB pieces: nothing is allocated
    for bytes the stream does not have, and a decompressing stream inflates no more than ``n``."""
    chunks, left = [], n
    while left > 0:
        chunk = f.read(min(left, 1 << 24))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


#: The largest ``torch.save`` file automtl reads (weights, a run's supermodel.pt, a search checkpoint).
MAX_TENSOR_FILE_BYTES = 16 * 2**30
#: Entries (one a tensor, plus the pickle) in such a file: a checkpoint of a ResNet-50 supermodel of five tasks
#: with its Adam state holds about 20,000.
MAX_TENSOR_FILE_ENTRIES = 200_000


#: The pickle of such a file (names, shapes, optimizer settings; the tensors' bytes are entries of their own): about
#: 3 MB for that checkpoint. Unpickled objects cost several times their pickle, so it is bounded on its own.
MAX_TENSOR_PICKLE_BYTES = 64 * 2**20
#: How deeply containers may nest in such a file: a checkpoint nests 6 levels (a generator's state inside a
#: rank's random state).
MAX_TENSOR_NESTING = 32
#: Values such a file may hold with every shared part counted where it appears: pickle's memo lets a few bytes put
#: one container in many places (``v = [v, v]`` thirty times is 2^30 values to anything that walks or hashes it,
#: torch's unpickler hashing a key included), where that checkpoint holds about 200,000 (a run's, 5,000-10,000).
MAX_TENSOR_FILE_VALUES = 2**22


class PickleRefused(ValueError):
    """What :func:`pickle_values` found that no ``torch.save`` of a state dict or checkpoint writes (a phrase)."""


#: Callables torch's tensors-only unpickler accepts that allocate what their arguments ask for, not what the file
#: holds (``bytearray(2**30)``, ``torch.FloatTensor(2**28)``: an 890-byte file built 1.25 GB), and torch's rebuilds of
#: tensors a state dict never holds: a device rebuild converts a stride-0 view into a whole tensor (1.2 KB built
#: 8.4 GB), sparse and nested ones raise past the checks; torch.save never calls any of them for CPU or CUDA tensors.
_ALLOCATING_GLOBALS = re.compile(r"(builtins|__builtin__) bytearray|torch(\.cuda|\.sparse)? \w*(Tensor|Storage)"
                                 r"|torch\._utils _rebuild_(device_tensor_from_cpu_tensor|sparse\w*|nested_tensor)")


#: A leaf that is an integer beyond int64: a value may be one (a generator's uint64 seed), a dict key may not.
_BIG = "<an integer beyond int64>"


def pickle_values(data: bytes, cap: int = 2**62) -> Optional[int]:
    """How many values the pickle ``data`` builds with each shared part counted where it appears (a container that
    holds itself: infinitely many; counts stop at ``cap``), read from its opcodes without building anything; None
    for an opcode outside the protocol-2 subset ``torch.load(..., weights_only=True)`` accepts (its unpickler
    refuses those itself).

    A value is a leaf (a number, a string, a global) or a container (tuple, list, dict, set, and what ``REDUCE``,
    ``NEWOBJ`` or a persistent id builds), which counts 1 plus its items. Linear in the opcodes.

    Raises:
        PickleRefused: a dict key that is a container (tuples that collide in Python's hash make a dict quadratic to
            build) or an integer beyond int64 (integers ``1 + k (2^61 - 1)`` all hash alike), or a call of an
            allocating constructor (:data:`_ALLOCATING_GLOBALS`).
    """
    import pickletools

    stack, marks, memo, made = [], [], {}, []  # leaves: None, or a global's name; containers: their index in made

    def container(items):
        made.append(list(items))
        return len(made) - 1

    def keys(items):
        if any(isinstance(k, int) for k in items):
            raise PickleRefused("uses a container as a dict key")
        if _BIG in items:
            raise PickleRefused("uses an integer beyond int64 as a dict key")

    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name == "STOP":
                break
            if name == "PROTO":
                continue
            if name == "GLOBAL":
                stack.append(str(arg))
            elif name in ("NONE", "NEWFALSE", "NEWTRUE", "BININT", "BININT1", "BININT2", "BINFLOAT", "BINUNICODE",
                          "SHORT_BINSTRING", "LONG1"):
                stack.append(_BIG if name == "LONG1" and not -2**63 <= arg < 2**63 else None)  # a seed may be uint64
            elif name in ("EMPTY_TUPLE", "EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET"):
                stack.append(container(()))
            elif name in ("NEWOBJ", "REDUCE"):
                args, func = stack.pop(), stack.pop()
                if isinstance(func, str) and _ALLOCATING_GLOBALS.fullmatch(func):
                    raise PickleRefused(f"calls {func.replace(' ', '.')[:60]}, which allocates what its arguments ask for")
                stack.append(container((args,)))
            elif name == "BINPERSID":
                stack.append(container((stack.pop(),)))
            elif name in ("BUILD", "APPEND"):
                item = stack.pop()
                if isinstance(stack[-1], int):
                    made[stack[-1]].append(item)
            elif name == "SETITEM":
                value, key = stack.pop(), stack.pop()
                keys([key])
                if isinstance(stack[-1], int):
                    made[stack[-1]].extend((key, value))
            elif name == "MARK":
                marks.append(len(stack))
            elif name in ("APPENDS", "SETITEMS", "TUPLE"):
                start = marks.pop()
                items, stack[start:] = stack[start:], []
                if name == "SETITEMS":
                    keys(items[0::2])
                if name == "TUPLE":
                    stack.append(container(items))
                elif isinstance(stack[-1], int):
                    made[stack[-1]].extend(items)
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                items, stack[-n:] = stack[-n:], []
                stack.append(container(items))
            elif name in ("BINGET", "LONG_BINGET"):
                stack.append(memo[arg])
            elif name in ("BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1]
            else:
                return None
    except (ValueError, IndexError, KeyError) as exc:  # not a pickle, or one torch's unpickler fails on: its refusal
        if isinstance(exc, PickleRefused):
            raise
        return None
    # every container's count, children first (an explicit stack: a pickle may nest a million levels); counts stop
    # at ``cap``, so each stays a small integer (exact ones of a long chain of shared lists grow a bit a level)
    counts = [0] * len(made)
    state = [0] * len(made)  # 0 not seen, 1 being counted, 2 counted
    for root in range(len(made)):
        if state[root]:
            continue
        todo = [root]
        while todo:
            at = todo[-1]
            if state[at] == 0:
                state[at] = 1
                for child in made[at]:
                    if isinstance(child, int):
                        if state[child] == 1:
                            return math.inf
                        if state[child] == 0:
                            todo.append(child)
                continue
            todo.pop()
            if state[at] == 1:
                counts[at] = min(1 + sum(counts[c] if isinstance(c, int) else 1 for c in made[at]), cap)
                state[at] = 2
    return max(counts) if made else 1


class _FileSlices:
    """A read-only file seen as bytes for slicing (what :func:`check_zip_directory` reads: the tail, one record)."""

    def __init__(self, f, size: int):
        self.f, self.size = f, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: slice) -> bytes:
        start, stop, _ = index.indices(self.size)
        self.f.seek(start)
        return self.f.read(max(stop - start, 0))


def load_tensors(path: str | os.PathLike, what: str, error: type, fix: str,
                 max_bytes: int = MAX_TENSOR_FILE_BYTES):
    """``torch.load(path, map_location="cpu", weights_only=True)`` under bounds: what it builds fits in the file.

    The file must be a regular file of at most ``max_bytes`` and the zip archive ``torch.save`` writes (torch >=
    1.6) whose directory lists at most :data:`MAX_TENSOR_FILE_ENTRIES` entries, every one stored uncompressed and
    together no larger than the file, its pickle at most :data:`MAX_TENSOR_PICKLE_BYTES`: torch's reader inflates
    deflated entries, so a 200 KB file of deflated zeros is 200 MB of tensors (a run directory's supermodel.pt or
    checkpoint is data someone handed over). Checked on the one open file that is then loaded.

    After loading, every tensor must hold no more elements than its stored bytes (no view repeating them through a
    zero stride): with that, what the file builds fits in the file.

    Raises:
        error: one sentence, ``"{what} {path!r} ...; {fix}"``: not a file, too large, not a torch.save zip,
            a compressed or oversized entry, anything torch's tensors-only unpickler refuses, or a view beyond
            its storage.
    """
    import zipfile
    import zlib

    import torch

    where = f"{what} {os.fspath(path)!r}"
    with open_regular(path, what, max_bytes, error) as (f, size):
        if f.read(4) != b"PK\x03\x04":
            raise error(f"{where} is not a torch.save file (the zip archive torch >= 1.6 writes; this is an older "
                        f"torch's file or another program's); {fix}")
        check_zip_directory(_FileSlices(f, size), MAX_TENSOR_FILE_ENTRIES, where, error)
        try:
            archive = zipfile.ZipFile(f)
            infos = archive.infolist()
        except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError) as exc:
            raise error(f"{where} is not a torch.save file (a zip archive, as torch >= 1.6 writes; {exc}); {fix}") from None
        packed = next((i for i in infos if i.compress_type != zipfile.ZIP_STORED or i.flag_bits & 0x1), None)
        if packed is not None:
            raise error(f"{where} holds {packed.filename[:80]!r} compressed or encrypted, which torch.save never "
                        f"writes (a compressed entry can inflate far beyond the file); {fix}")
        pickle = next((i for i in infos if i.filename.lower().endswith("data.pkl") and i.file_size > MAX_TENSOR_PICKLE_BYTES),
                      None)
        if pickle is not None:
            raise error(f"{where} holds a {pickle.file_size}-byte pickle, more than the {MAX_TENSOR_PICKLE_BYTES} the "
                        f"names and layout of tensors take (its objects would cost many times that); {fix}")
        if sum(i.file_size for i in infos) > size:
            raise error(f"{where} declares more bytes in its entries than the file holds; it is damaged or crafted; {fix}")
        for info in (i for i in infos if i.filename.lower().endswith("data.pkl")):  # torch finds it in any case
            try:
                values = pickle_values(archive.read(info), cap=MAX_TENSOR_FILE_VALUES + 1)
            except PickleRefused as exc:
                raise error(f"{where} holds a pickle that {exc}, which no state dict or checkpoint does; {fix}") from None
            except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError) as exc:
                raise error(f"{where} is not a torch.save file (a zip archive, as torch >= 1.6 writes; {exc}); {fix}") from None
            if values is not None and values > MAX_TENSOR_FILE_VALUES:
                raise error(f"{where} holds a pickle that builds more than {MAX_TENSOR_FILE_VALUES} values once the parts "
                            "it shares are counted where they appear (or a container holding itself), which no state "
                            f"dict or checkpoint does; {fix}")
        f.seek(0)
        try:
            loaded = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch's text advises weights_only=False (unpickling): not repeated
            raise error(f"{where} is not a torch.save file of tensors only ({type(exc).__name__}); {fix}") from None
    _refuse_views_beyond_storage(loaded, where, error, fix)
    return loaded


def _refuse_views_beyond_storage(value, where: str, error: type, fix: str, depth: int = 0, seen=None) -> None:
    """Every tensor in what a pickle built (containers walked, at most :data:`MAX_TENSOR_NESTING` deep) is a strided
    tensor of values on the CPU (not a meta tensor, which passed every shape check and failed inside torch's
    loaders) and holds no more elements than its stored bytes: a view with a zero or overlapping stride declares
    2^40 elements over 4 bytes, and ``Optimizer.load_state_dict`` or ``.to()`` would allocate them all. Deeper
    containers are refused (no writer nests so deep, and the readers' comparisons and copies recurse). An object is looked at again only
    where it is reached deeper than before (so at most :data:`MAX_TENSOR_NESTING` times)."""
    import torch

    seen = {} if seen is None else seen  # id -> the deepest level it was looked at
    if seen.get(id(value), -1) >= depth:
        return
    seen[id(value)] = depth
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu" or value.layout != torch.strided:  # torch.load leaves meta tensors on meta
            kind = "a tensor" if value.layout == torch.strided else f"a {str(value.layout).removeprefix('torch.')} tensor"
            raise error(f"{where} holds {kind} on the {value.device.type} device, without values on the CPU "
                        f"(torch.save writes a state dict's tensors with their values, which automtl reads to the "
                        f"CPU); {fix}")
        if value.numel() * value.element_size() > value.untyped_storage().nbytes():
            raise error(f"{where} holds a tensor of shape {tuple(value.shape)} over {value.untyped_storage().nbytes()} "
                        f"stored bytes (a view repeating its elements, which torch.save never writes of a state "
                        f"dict); {fix}")
    elif isinstance(value, (Mapping, list, tuple)):
        if depth >= MAX_TENSOR_NESTING:
            raise error(f"{where} nests containers deeper than {MAX_TENSOR_NESTING} levels, which no state dict or "
                        f"checkpoint does; {fix}")
        for v in (value.values() if isinstance(value, Mapping) else value):
            _refuse_views_beyond_storage(v, where, error, fix, depth + 1, seen)


def number_kind(dtype) -> str:
    """``"bool"``, ``"complex"``, ``"float"`` or ``"integer"``: the kind of number a ``torch.dtype`` holds. A cast
    within a kind is a precision (float16 weights into float32 ones); across kinds, another file's values."""
    import torch

    return ("bool" if dtype == torch.bool else "complex" if dtype.is_complex else "float" if dtype.is_floating_point
            else "integer")


def state_misfits(state: Mapping, own: Mapping) -> dict:
    """How the tensors of a file's ``state`` miss a module's own state dict ``own``, as lists of messages' parts:
    ``missing`` (keys of ``own`` that ``state`` lacks), ``unexpected`` (keys ``own`` lacks), ``reshaped``
    (``"key (file shape) vs (model shape)"``) and ``other_kind`` (``"key file-dtype vs model-dtype"``, another kind of
    number, :func:`number_kind`). ``load_state_dict`` casts whatever it copies: float16 into float32 weights is a
    checkpoint's precision, an integer or bool tensor into a float weight is another file's values."""
    def dtype(t) -> str:
        return str(t.dtype).removeprefix("torch.")

    shared = [k for k in state if k in own]
    return {"missing": [k for k in own if k not in state],
            "unexpected": [k for k in state if k not in own],
            "reshaped": [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shared
                         if tuple(state[k].shape) != tuple(own[k].shape)],
            "other_kind": [f"{k} {dtype(state[k])} vs {dtype(own[k])}" for k in shared
                           if number_kind(state[k].dtype) != number_kind(own[k].dtype)]}


def state_dict_of(value, where: str, error: type, fix: str) -> dict:
    """``value`` (what :func:`load_tensors` read) as a state dict: a mapping of names to tensors, or ``error``."""
    import torch

    if not isinstance(value, Mapping):
        raise error(f"{where} holds a {type(value).__name__}, not a state dict (names to tensors); {fix}")
    bad = next((k for k, v in value.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise error(f"{where} is not a state dict of tensors (its entry {str(bad)[:80]!r} is not a name with a "
                    f"tensor); {fix}")
    return dict(value)


#: YAML 1.2's floats: PyYAML reads YAML 1.1, where ``1e-3`` (no dot) is a string, not a number.
_FLOAT_12 = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)


@functools.lru_cache(maxsize=None)
def _yaml_loader(exponent_floats: bool = False):
    """The safe loader (C when available); ``exponent_floats`` also reads ``1e-3`` as a number (config
    files, where users write learning rates that way; not policies, whose names must stay strings)."""
    import yaml

    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    def construct_mapping(self, node, deep=False):
        """A key given twice is a mistake in a hand-edited file (YAML's loaders keep the last silently)."""
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<": merged keys may be given again, that is its use
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base constructor says so
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"found the key {key!r} twice; keep one",
                                                        key_node.start_mark)
        return base.construct_mapping(self, node, deep=deep)

    loader = type("ConfigLoader" if exponent_floats else "AutomtlLoader", (base,), {"construct_mapping": construct_mapping})
    if not exponent_floats:
        return loader
    loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))
    return loader


def check_yaml_structure(text: str, where: str, error: type, max_depth: int = MAX_YAML_DEPTH,
                         max_events: int = MAX_YAML_EVENTS) -> None:
    """Refuse YAML anchors and aliases, nesting deeper than ``max_depth`` and more than ``max_events``
    values before anything is built.

    Aliases are how a few bytes of YAML become gigabytes (the "billion laughs") or a recursive
    structure; automtl never writes them, so none is accepted. Many small values cost far more to
    build than their bytes (32 MiB of them, gigabytes and minutes), so they are counted. The check
    walks the parser's events, so its memory is bounded by the text.
    """
    import yaml

    depth = 0
    for count, event in enumerate(yaml.parse(text, Loader=_yaml_loader())):
        if count >= max_events:
            raise error(f"{where} holds more than {max_events} YAML values, far more than automtl files have; "
                        "check the file")
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise error(f"{where} uses a YAML anchor or alias (& or *), which automtl files never need; "
                        "write the values out in full")
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > max_depth:
                raise error(f"{where} nests more than {max_depth} levels deep; automtl files are flat, check the file")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def parse_yaml(raw: bytes | str, where: str, error: type, max_bytes: int = MAX_YAML_BYTES,
               exponent_floats: bool = False):
    """Parse YAML text under automtl's bounds: size, no aliases, bounded nesting, safe tags only
    (``exponent_floats``: ``1e-3`` is a number, as in YAML 1.2)."""
    import yaml

    if len(raw) > max_bytes:
        raise error(f"{where} is larger than the {max_bytes} bytes automtl reads as YAML; check the file")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        check_yaml_structure(text, where, error)
        return yaml.load(text, Loader=_yaml_loader(exponent_floats))
    except UnicodeDecodeError:
        raise error(f"{where} is not UTF-8 text; it is not a YAML file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None)
        raise error(f"{where} is not valid YAML{line}" + (f" ({problem})" if problem else "") + "; fix the syntax there") from None
    except (ValueError, OverflowError, RecursionError) as exc:  # a value the YAML constructors cannot make
        first = str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__
        raise error(f"{where} holds a value automtl cannot read ({first}); fix that value") from None


def read_yaml(path: str | os.PathLike, what: str, error: type = None, exponent_floats: bool = False):
    """Parse a YAML file under automtl's bounds (:func:`read_regular_file`, :func:`parse_yaml`).

    A missing, unreadable, oversized, non-regular or malformed file, an alias or a deep nesting is
    ``error`` (default :class:`ConfigError`) naming the file and, for syntax errors, the line.
    """
    from .errors import ConfigError

    error = error or ConfigError
    raw = read_regular_file(path, what, MAX_YAML_BYTES, error)
    return parse_yaml(raw, f"{what} {os.fspath(path)!r}", error, exponent_floats=exponent_floats)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def check_zip_directory(data: bytes, max_entries: int, where: str, error: type) -> None:
    """Refuse a zip that two readers could read as two archives, or whose central directory lists more than
    ``max_entries`` entries, before parsing it.

    The archive must end as every writer of these files ends it: the end-of-central-directory record is the last 22
    bytes (no comment, one disk), a zip64 record (torch.save writes one always) sits right before its locator and
    agrees with the end record, and the central directory ends where those records begin. Python's ``zipfile`` reads
    a directory that ends elsewhere as one behind prepended bytes and shifts every offset by the gap, while torch's
    reader (miniz) takes the offsets as written, and the two disagree on which zip64 figures count: a file holding
    two directories showed each reader its own archive, so bytes checked by one were not the bytes the other loaded
    (pickled weights in a ``.pt2``, deflated entries in a ``torch.save`` file).

    ``zipfile`` builds an object per directory entry before anyone can count them, so a file made of millions of
    tiny directory records costs about ten times its size in memory; the end record's count is checked here first.

    Raises:
        error: one sentence naming what is wrong with the archive's end.
    """
    import struct

    def refuse(what: str):
        return error(f"{where} {what}; it is truncated, crafted or not a model file")

    n = len(data)
    end = n - 22
    if end < 0 or data[end:end + 4] != b"PK\x05\x06":
        raise refuse("is not a valid zip archive: it does not end with a zip end-of-central-directory record (it has "
                     "none, or bytes after it)")
    disk, cd_disk, here, count, size, offset, comment = struct.unpack("<HHHHIIH", data[end + 4:end + 22])
    if comment or disk or cd_disk or here != count:
        raise refuse("has a zip end record with a comment or of several disks, which no model file writer makes")
    directory_end = end
    loc = end - 20
    if loc >= 56 and data[loc:loc + 4] == b"PK\x06\x07":
        z_disk, record_at, disks = struct.unpack("<IQI", data[loc + 4:loc + 20])
        record = data[loc - 56:loc]
        if (z_disk or disks != 1 or record_at != loc - 56 or record[:4] != b"PK\x06\x06"
                or struct.unpack("<Q", record[4:12])[0] != 44):
            raise refuse("has a zip64 end record that is not where its locator points, or of another size")
        z_here, z_count, z_size, z_offset = struct.unpack("<QQQQ", record[24:56])
        if (struct.unpack("<II", record[16:24]) != (0, 0) or z_here != z_count
                or any(short not in (full, top) for short, full, top in
                       ((count, z_count, 0xFFFF), (size, z_size, 0xFFFFFFFF), (offset, z_offset, 0xFFFFFFFF)))):
            raise refuse("has zip64 and plain end records that disagree (readers differ on which counts)")
        count, size, offset, directory_end = z_count, z_size, z_offset, loc - 56
    elif size == 0xFFFFFFFF or offset == 0xFFFFFFFF:  # (a count of 0xFFFF may be just that: Python writes 65,535 so)
        raise refuse("has a damaged zip64 directory (no zip64 end record before its end record)")
    if offset + size != directory_end:
        raise refuse(f"has its central directory at bytes {offset}..{offset + size}, not right before its end records "
                     f"at {directory_end} (zip readers differ on where such a directory starts)")
    if count > max_entries or size > 4096 * max_entries:
        raise error(f"{where} lists {count} entries in a {size}-byte directory, more than the {max_entries} a model file "
                    "has; it is crafted or not a model file")


def read_zip_entries(data: bytes, where: str, error: type, fix: str, *, max_entries: int, max_total: int,
                     max_ratio: int, caps: Optional[Mapping[str, int]] = None, stored: Collection[str] = (),
                     check_names: Optional[Callable[[list], None]] = None) -> dict[str, bytes]:
    """The entries of the zip archive ``data`` (name -> bytes), each read under bounds.

    Before an entry is decompressed: the directory lists at most ``max_entries`` entries
    (:func:`check_zip_directory`), the archive parses, no name appears twice, ``check_names``
    (the caller's layout check) accepts the names, no entry is encrypted or compressed other than
    stored or deflated (the names in ``stored`` must be stored), and each entry declares at most
    its cap in ``caps`` (default ``max_total``) bytes, at most ``max_ratio`` times its compressed
    size (+ 64 KiB), and at most ``max_total`` bytes with the entries before it. Each entry is
    then read up to its declared size + 1 byte, so a lying header cannot make it read more.

    Raises:
        error: one sentence, ``"{where} ...; {fix}"``: not a complete zip, a repeated entry, a
            bound exceeded (zip bomb), a damaged entry or one whose size differs from its header.
    """
    import io
    import zipfile
    import zlib

    check_zip_directory(data, max_entries, where, error)
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError, OSError) as exc:
        raise error(f"{where} is not a complete zip archive ({exc}); {fix}") from None
    names = [i.filename for i in infos]
    if len(names) != len(set(names)):
        raise error(f"{where} holds an entry twice; a reader could pick either copy, so it is refused as crafted or "
                    f"corrupted; {fix}")
    if check_names is not None:
        check_names(names)
    caps = caps or {}
    out, total = {}, 0
    for info in infos:
        name = info.filename[:80]
        if info.flag_bits & 0x1:
            raise error(f"{where} has an encrypted entry {name!r}, which automtl never writes; {fix}")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or (
                info.filename in stored and info.compress_type != zipfile.ZIP_STORED):
            raise error(f"{where} stores {name!r} with a compression automtl never uses; {fix}")
        total += info.file_size
        if (info.file_size > caps.get(info.filename, max_total) or total > max_total
                or info.file_size > max_ratio * info.compress_size + 65536):
            raise error(f"{where} declares an entry {name!r} of {info.file_size} bytes from {info.compress_size} "
                        f"compressed bytes, beyond automtl's bounds (a zip bomb or a damaged file); {fix}")
        try:
            with zf.open(info) as f:
                out[info.filename] = f.read(info.file_size + 1)
        except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError) as exc:
            raise error(f"{where} has a damaged entry {name!r} ({exc}); {fix}") from None
        if len(out[info.filename]) != info.file_size:
            raise error(f"{where} has an entry {name!r} whose size differs from the size it declares; {fix}")
    return out
