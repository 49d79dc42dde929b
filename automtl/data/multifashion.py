"""MultiFashion: two overlapping Fashion-MNIST items, one classification task per item.

The construction follows MultiMNIST as used by Sener & Koltun (NeurIPS 2018): a left item
shifted up-left and a right item shifted down-right on a 36x36 canvas, overlapping in the
middle, so both tasks must look at shared, entangled pixels. Fashion-MNIST is read from the
standard IDX files; Debian's ``dataset-fashion-mnist`` package installs them in
:data:`DEFAULT_ROOT`.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from ..fileio import not_a_folder, open_regular, read_at_most
from ..tasks import Task
from .synthetic import sample_seed

#: Where Debian's dataset-fashion-mnist package puts the IDX files.
DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"

CLASS_NAMES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")

#: Pixels each item is shifted from the centre: left item up-left, right item down-right.
SHIFT = 4

_IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


#: The largest IDX body automtl reads (Fashion-MNIST's training images are 47 MB).
MAX_IDX_BYTES = 2**32

#: How many times its own size a gzip IDX file may inflate to. Fashion-MNIST's files inflate 1.8 to 2 times, MNIST's
#: up to 4.8 (its images are mostly black); 64 leaves room for sparser data and still stops a file of zeros, which
#: deflate packs about 1000 times, from turning a 4 MB download into the 4 GiB of :data:`MAX_IDX_BYTES`.
MAX_GZIP_RATIO = 64
#: Bodies up to this size are read at any ratio: in small files gzip's own overhead makes the ratio meaningless.
GZIP_RATIO_FLOOR = 2**20

#: Items (images, labels) MultiFashion reads from one split. Fashion-MNIST has 60,000 training and 10,000 test
#: items; the largest IDX release of this kind, EMNIST ByClass, has 697,932 training items. Every item costs more
#: than its bytes (an int64 label, a place in the pairing permutation: 24 bytes), so the count is bounded on its own.
MAX_ITEMS = 1_000_000
#: The largest image side MultiFashion reads (Fashion-MNIST's images are 28x28): one sample is a float32 canvas of
#: 3 x (side + 8)^2, 0.8 MB at 256.
MAX_IMAGE_SIDE = 256


def read_idx(path: Union[str, os.PathLike], check: Optional[Callable[[tuple, np.dtype], None]] = None) -> np.ndarray:
    """Read an IDX file (plain or gzip, told apart by the magic bytes, not the name).

    Read as a stream under bounds: no dimension may be 0 (the others would be backed by no bytes), the body must be
    exactly what the header's sizes need, at most :data:`MAX_IDX_BYTES` and, for a gzip file, at most
    :data:`MAX_GZIP_RATIO` times the file's size (or :data:`GZIP_RATIO_FLOOR`), and no more than that is ever read or
    inflated (a gzip bomb stops there). ``check(dims, dtype)``, when given, runs on the header before any of the body
    is read; it raises :class:`DataError` to refuse the file.

    Raises:
        DataError: missing or unreadable, not IDX, a header larger than the bounds, or a body of another size.
    """
    path = Path(path)
    with open_regular(path, "IDX file", MAX_IDX_BYTES + (1 << 20), DataError) as (raw, size):
        gzipped = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        try:
            f = gzip.GzipFile(fileobj=raw) if gzipped else raw
            dims, dtype, body = _read_idx_body(path, f, size if gzipped else None, check)
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # before open_regular calls it a read error
            raise DataError(f"IDX file {path} is not a readable gzip file ({e}); download it again") from None
    arr = np.frombuffer(body, dtype=dtype).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=False) if dtype.itemsize > 1 else arr


def _read_idx_body(path: Path, f, packed: Optional[int], check) -> tuple:
    """(dims, dtype, body) of the IDX stream ``f`` under :func:`read_idx`'s bounds; ``packed`` is the size of the
    gzip file ``f`` inflates, None for a plain file."""
    data = f.read(4)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number); download it again")
    dtype, ndim = _IDX_TYPES[data[2]], data[3]
    header = f.read(4 * ndim)
    if len(header) < 4 * ndim:
        raise DataError(f"IDX file {path} is truncated in its header; download it again")
    dims = struct.unpack(f">{ndim}I", header)
    if 0 in dims:
        raise DataError(f"IDX file {path} declares dimensions {tuple(dims)}, one of them 0, so it holds no values; "
                        "download it again")
    if check is not None:
        check(tuple(dims), dtype)
    expected = int(np.prod(dims, dtype=object)) * dtype.itemsize
    if expected > MAX_IDX_BYTES:
        raise DataError(f"IDX file {path} declares {tuple(dims)} values, {expected} bytes, more than the "
                        f"{MAX_IDX_BYTES} automtl reads; check that this is the right file")
    if packed is not None and expected > max(GZIP_RATIO_FLOOR, MAX_GZIP_RATIO * packed):
        raise DataError(f"IDX file {path} is a gzip file of {packed} bytes whose header declares {expected} data "
                        f"bytes, more than {MAX_GZIP_RATIO} times its size, which real data does not compress to; "
                        "download it again")
    body = read_at_most(f, expected + 1)  # one byte more: a longer body is found without reading it all
    if len(body) != expected:
        more = "more" if len(body) > expected else f"{len(body)}"
        raise DataError(
            f"IDX file {path} holds {more} data bytes but its header {tuple(dims)} needs {expected}; download it again"
        )
    return dims, dtype, body


def _find(root: Path, name: str) -> Path:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    for candidate in (root / name, root / f"{name}.gz"):
        if os.path.lexists(candidate):  # a folder, a device, a broken link: there, but no file to read
            raise DataError(f"Fashion-MNIST file {candidate} is not a regular file (a folder, a device or a broken "
                            "link); put the IDX file itself there")
    raise DataError(
        f"Fashion-MNIST file {name}(.gz) is not in {root}; install it with `apt-get install dataset-fashion-mnist` "
        "or pass root= the folder that holds the IDX files"
    )


def _check_labels(path: Path, dims: tuple, dtype: np.dtype) -> None:
    """Refuse a Fashion-MNIST label header that is not (N,) integers with N <= :data:`MAX_ITEMS`."""
    if len(dims) != 1:
        raise DataError(f"{path} should hold labels (N,) but has shape {dims}; check the file")
    if dtype.kind not in "iu":
        raise DataError(f"{path} should hold integer labels but holds {dtype}; check the file")
    if dims[0] > MAX_ITEMS:
        raise DataError(f"{path} declares {dims[0]} labels, more than the {MAX_ITEMS} automtl reads for one split "
                        "(Fashion-MNIST has 60,000); check that this is the right file")


def _check_images(path: Path, dims: tuple, dtype: np.dtype, lab_path: Path, labels: int) -> None:
    """Refuse a Fashion-MNIST image header that is not (N, H, W) uint8 with N the label count and small sides."""
    if len(dims) != 3:
        raise DataError(f"{path} should hold images (N, H, W) but has shape {dims}; check the file")
    if dims[0] != labels:
        raise DataError(f"{path} holds {dims[0]} images but {lab_path} holds {labels} labels; use files of one release")
    if dims[0] < 2:
        raise DataError(f"{path} holds {dims[0]} image(s); MultiFashion needs at least 2")
    if dtype != np.uint8:
        raise DataError(f"{path} should hold uint8 pixels but holds {dtype}; check the file")
    if max(dims[1:]) > MAX_IMAGE_SIDE:
        raise DataError(f"{path} holds images of {dims[1]}x{dims[2]} pixels; MultiFashion reads images of at most "
                        f"{MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} (Fashion-MNIST's are 28x28); check the file")


class MultiFashion(Dataset):
    """Pairs of Fashion-MNIST items on one canvas; targets ``left`` and ``right`` (int64, 10 classes).

    ``split`` is ``train`` (the 60k training files) or ``test``/``val`` (the 10k t10k files,
    the usual MTL stand-in for a validation set). Sample i puts item i on the left and item
    perm[i] on the right, where perm is a permutation drawn from ``seed``; ``n`` keeps the first n
    pairs. x is the canvas repeated to 3 channels, float32 in [0, 1].
    """

    def __init__(self, root: Optional[Union[str, os.PathLike]] = None, split: str = "train", n: Optional[int] = None, seed: int = 0):
        if split not in ("train", "val", "test"):
            raise DataError(f"MultiFashion split {split!r} is unknown; use 'train', 'val' or 'test'")
        self.root = Path(root if root is not None else DEFAULT_ROOT).expanduser()
        if not self.root.is_dir():
            raise DataError(
                f"Fashion-MNIST folder {self.root} {not_a_folder(self.root)}; install it with "
                "`apt-get install dataset-fashion-mnist` or pass root= the folder that holds the IDX files"
            )
        self.split = split
        self.seed = seed
        prefix = "train" if split == "train" else "t10k"
        img_path = _find(self.root, f"{prefix}-images-idx3-ubyte")
        lab_path = _find(self.root, f"{prefix}-labels-idx1-ubyte")
        # Labels first (at most MAX_ITEMS bytes of them), then the images, whose header must agree with them before
        # their body is read: every count and size is checked on a header, before anything is allocated for it.
        labels = read_idx(lab_path, check=lambda dims, dtype: _check_labels(lab_path, dims, dtype))
        images = read_idx(img_path, check=lambda dims, dtype: _check_images(img_path, dims, dtype, lab_path, len(labels)))
        total = len(images)
        if n is None:
            n = total
        if not isinstance(n, int) or not 1 <= n <= total:
            raise ConfigError(f"MultiFashion n={n!r} must be between 1 and the {total} items of the {split} split")
        self.n = n
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise DataError(f"{lab_path} holds labels outside 0..9; it is not a Fashion-MNIST label file")
        self.images = torch.from_numpy(np.array(images))  # uint8 (N, h, w), writable copy
        self.labels = torch.from_numpy(labels.astype(np.int64))
        g = torch.Generator().manual_seed(sample_seed("multifashion", seed, split))
        perm = torch.randperm(total, generator=g)[:n]
        left = torch.arange(n)
        perm = torch.where(perm == left, (perm + 1) % total, perm)  # never pair an item with itself
        self.pairs = torch.stack([left, perm], 1)
        h, w = self.images.shape[1:]
        self.canvas = (h + 2 * SHIFT, w + 2 * SHIFT)

    @property
    def tasks(self) -> list[Task]:
        return [Task("left", kind="classification", classes=10), Task("right", kind="classification", classes=10)]

    class_names = CLASS_NAMES

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        i, j = self.pairs[index].tolist()
        h, w = self.images.shape[1:]
        canvas = torch.zeros(self.canvas, dtype=torch.uint8)
        canvas[:h, :w] = self.images[i]
        canvas[2 * SHIFT :, 2 * SHIFT :] = torch.maximum(canvas[2 * SHIFT :, 2 * SHIFT :], self.images[j])
        x = (canvas.float() / 255.0).expand(3, -1, -1).contiguous()
        return x, {"left": self.labels[i].clone(), "right": self.labels[j].clone()}

    def __repr__(self) -> str:
        return f"MultiFashion(root={str(self.root)!r}, split={self.split!r}, n={self.n}, seed={self.seed})"
