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
from typing import Optional, Union

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


def read_idx(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read an IDX file (plain or gzip, told apart by the magic bytes, not the name).

    Read as a stream under bounds: the body must be exactly what the header's sizes need, at most
    :data:`MAX_IDX_BYTES`, and no more than that is ever read or inflated (a gzip bomb stops there).

    Raises:
        DataError: missing or unreadable, not IDX, a header larger than the bound, or a body of another size.
    """
    path = Path(path)
    with open_regular(path, "IDX file", MAX_IDX_BYTES + (1 << 20), DataError) as (raw, _):
        gzipped = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        try:
            dims, dtype, body = _read_idx_body(path, gzip.GzipFile(fileobj=raw) if gzipped else raw)
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # before open_regular calls it a read error
            raise DataError(f"IDX file {path} is not a readable gzip file ({e}); download it again") from None
    arr = np.frombuffer(body, dtype=dtype).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=False) if dtype.itemsize > 1 else arr


def _read_idx_body(path: Path, f) -> tuple:
    """(dims, dtype, body) of the IDX stream ``f`` under :func:`read_idx`'s bounds."""
    data = f.read(4)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number); download it again")
    dtype, ndim = _IDX_TYPES[data[2]], data[3]
    header = f.read(4 * ndim)
    if len(header) < 4 * ndim:
        raise DataError(f"IDX file {path} is truncated in its header; download it again")
    dims = struct.unpack(f">{ndim}I", header)
    expected = int(np.prod(dims, dtype=object)) * dtype.itemsize
    if expected > MAX_IDX_BYTES:
        raise DataError(f"IDX file {path} declares {tuple(dims)} values, {expected} bytes, more than the "
                        f"{MAX_IDX_BYTES} automtl reads; check that this is the right file")
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
    raise DataError(
        f"Fashion-MNIST file {name}(.gz) is not in {root}; install it with `apt-get install dataset-fashion-mnist` "
        "or pass root= the folder that holds the IDX files"
    )


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
        images, labels = read_idx(img_path), read_idx(lab_path)
        if images.ndim != 3:
            raise DataError(f"{img_path} should hold images (N, H, W) but has shape {images.shape}; check the file")
        if labels.ndim != 1:
            raise DataError(f"{lab_path} should hold labels (N,) but has shape {labels.shape}; check the file")
        if len(images) != len(labels):
            raise DataError(
                f"{img_path} holds {len(images)} images but {lab_path} holds {len(labels)} labels; use files of one release"
            )
        if len(images) < 2:
            raise DataError(f"{img_path} holds {len(images)} image(s); MultiFashion needs at least 2")
        total = len(images)
        if n is None:
            n = total
        if not isinstance(n, int) or not 1 <= n <= total:
            raise ConfigError(f"MultiFashion n={n!r} must be between 1 and the {total} items of the {split} split")
        self.n = n
        if images.dtype != np.uint8:
            raise DataError(f"{img_path} should hold uint8 pixels but holds {images.dtype}; check the file")
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
