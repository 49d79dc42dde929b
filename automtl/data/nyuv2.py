"""NYUv2 (13 classes, depth, surface normals) in the preprocessed .npy layout of MTAN
(Liu et al., github.com/lorenmt/mtan), which AutoMTL and most MTL code bases reuse::

    root/{train,val}/image/{i}.npy    (H, W, 3) float in [0, 1] (or uint8 0-255, divided by 255)
    root/{train,val}/label/{i}.npy    (H, W)    class id, -1 for void
    root/{train,val}/depth/{i}.npy    (H, W, 1) float, 0 where unknown
    root/{train,val}/normal/{i}.npy   (H, W, 3) float, 0 where unknown

The folder checks happen once, up front, so a broken download fails with a clear message
instead of deep inside a training epoch.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from ..fileio import not_a_folder, open_regular
from ..tasks import Task

VOID = 255

NYU_CLASS_NAMES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window",
    "bookshelf", "picture", "counter", "blinds",
)  # fmt: skip

_SPLITS = {"train": "train", "val": "val", "test": "val"}


def _split_dir(name: str, root, split: str) -> Path:
    if root is None:
        raise DataError(f"{name} needs root= the folder that holds train/ and val/ (the MTAN .npy layout)")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{name} root {root} {not_a_folder(root)}; pass the folder that holds train/ and val/")
    if split not in _SPLITS:
        raise DataError(f"{name} split {split!r} is unknown; use 'train' or 'val' ('test' reads val/)")
    path = root / _SPLITS[split]
    if not path.is_dir():
        raise DataError(f"{name} split folder {path} {not_a_folder(path)}; the root must hold train/ and val/ folders")
    return path


def _count(folder: Path, name: str) -> int:
    if not folder.is_dir():
        raise DataError(f"{name} folder {folder} {not_a_folder(folder)}; the layout needs it for the tasks asked for")
    files = [f for f in os.listdir(folder) if f.endswith(".npy")]
    expected = {f"{i}.npy" for i in range(len(files))}
    if set(files) != expected:
        odd = sorted(set(files) - expected)[:3]
        raise DataError(
            f"{name} folder {folder} should hold 0.npy ... {len(files) - 1}.npy but has {', '.join(odd)}; "
            "rename the files to consecutive indices"
        )
    return len(files)


#: The largest .npy sample automtl reads (a 1024x1024 float32 normal map is 12 MiB).
MAX_NPY_BYTES = 2**30
#: The most values one .npy sample may hold. Samples are converted to float32 (4 bytes a value) and labels pass
#: through float64 (8), whatever the file's own type, so a 1 GiB file of bools would cost 8 GiB: the count is bounded
#: on its own. A full-resolution CityScapes image (2048x1024x3) holds 6.3 million values; 2^25 (33.5 million) allows
#: 4096x2048x3 and keeps one converted array at 128 MiB (float32) or 256 MiB (float64).
MAX_NPY_VALUES = 2**25
#: numpy dtype kinds a sample may hold: bool, signed and unsigned integers, floats (all of non-zero size).
_NUMERIC_KINDS = "biuf"


def _load(path: Path, name: str) -> np.ndarray:
    """One sample's array. The header's dtype must be numeric (bool, int, uint or float: no pickled objects, and no
    strings, records or zero-size types, which the float32 conversion cannot take or for which no bytes back the shape),
    its shape must need exactly the bytes the file holds after it (numpy would allocate what the header declares before
    finding the file short), and hold between 1 and :data:`MAX_NPY_VALUES` values."""
    try:
        with open_regular(path, f"{name} file", MAX_NPY_BYTES, DataError) as (f, size):  # no pipe or device
            version = np.lib.format.read_magic(f)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = header(f, max_header_size=10_000)
            if dtype.hasobject:
                raise DataError(f"{name} file {path} holds Python objects, which are read by unpickling; save numbers "
                                "(a numeric dtype) instead")
            if dtype.kind not in _NUMERIC_KINDS or dtype.itemsize == 0:
                raise DataError(f"{name} file {path} holds values of type {dtype.str!r}; save numbers (bool, int, uint or "
                                "float) instead")
            body = size - f.tell()
            count = int(np.prod(shape, dtype=object))
            need = count * dtype.itemsize
            if need != body:
                raise DataError(f"{name} file {path} declares {shape} values of {dtype} ({need} bytes) but holds {body}; "
                                "regenerate it")
            if count == 0:
                raise DataError(f"{name} file {path} holds {shape}, no values; regenerate it from the sample")
            if count > MAX_NPY_VALUES:
                raise DataError(f"{name} file {path} holds {shape}, {count} values, more than the {MAX_NPY_VALUES} "
                                "automtl reads per sample; save smaller samples (downscale them)")
            f.seek(0)
            return np.load(f, allow_pickle=False)  # the file whose header was checked
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user problem
        raise DataError(f"{name} file {path} cannot be read as .npy ({type(e).__name__}); regenerate it") from None


#: How far a float image's values may lie outside [0, 1], as a fraction of the range: what resampling overshoots by
#: when it is not clipped (bicubic upsampling of a 0/1 edge: -0.11 to 1.11), far below images stored as 0-255.
IMAGE_SLACK = 0.25

#: No class count reaches this id (automtl.tasks.MAX_CLASSES is far below): a label at or beyond it is no class id.
_MAX_LABEL = 2**31


def labels_to_long(label: np.ndarray, where: str = "label file") -> torch.Tensor:
    """Class ids as int64, void (-1 or any negative id, NaN) mapped to 255. Other ids are kept as stored: one
    beyond the task's class count is refused by the batch checks, naming it (the data holds more classes than the
    task says), not read as void. A fractional id, +inf or an id no class count reaches (1e20, which the cast would
    wrap to a negative number) is refused here.

    Raises:
        DataError: a non-negative id that is not a whole number below 2^31.
    """
    lab = np.asarray(label, dtype=np.float64)
    void = np.isnan(lab) | (lab < 0)
    wrong = ~void & ((lab != np.round(lab)) | (lab >= _MAX_LABEL))  # +inf included
    if wrong.any():
        raise DataError(f"{where} holds label {lab[wrong].flat[0]:g}, which is not a class id; class ids are whole "
                        "numbers from 0 to the class count - 1 (-1 or NaN for void)")
    out = np.where(void, VOID, lab).astype(np.int64)
    return torch.from_numpy(out)


class NpyScenes(Dataset):
    """A dense data set stored as one .npy per sample and per target, in parallel folders."""

    name = "npy"
    classes = 0
    #: task name -> (folder, kind)
    layout: Mapping[str, tuple[str, str]] = {}

    def __init__(self, root, split: str, tasks: Sequence[str]):
        tasks = tuple(tasks)
        unknown = [t for t in tasks if t not in self.layout]
        if unknown or not tasks:
            raise DataError(
                f"{self.name} has no task {', '.join(map(repr, unknown)) or '(none given)'}; "
                f"choose from {', '.join(self.layout)}"
            )
        self.root = root
        self.split = split
        self.task_names = tasks
        self.path = _split_dir(self.name, root, split)
        n = _count(self.path / "image", self.name)
        for t in tasks:
            folder = self.layout[t][0]
            m = _count(self.path / folder, self.name)
            if m != n:
                raise DataError(
                    f"{self.name} {split} has {n} images but {m} files in {folder}/; every folder needs one file per image"
                )
        if n == 0:
            raise DataError(f"{self.name} folder {self.path / 'image'} holds no .npy files; check the root")
        self.n = n

    def __len__(self) -> int:
        return self.n

    @property
    def tasks(self) -> list[Task]:
        """Task specs for the targets this data set yields."""
        out = []
        for t in self.task_names:
            kind = self.layout[t][1]
            out.append(Task(t, kind=kind, classes=self.classes if kind == "segmentation" else None))
        return out

    def _file(self, folder: str, index: int) -> np.ndarray:
        return _load(self.path / folder / f"{index}.npy", self.name)

    def __getitem__(self, index: int):
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} samples")
        index = index % self.n
        img = self._file("image", index)
        if img.ndim != 3 or img.shape[-1] != 3:
            raise DataError(f"{self.name} image {index}.npy has shape {img.shape}; expected (H, W, 3)")
        x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(img, -1, 0), dtype=np.float32))
        if img.dtype == np.uint8:  # 0-255, as image files hold them: the [0, 1] of float images
            x = x / 255
        elif img.dtype.kind != "f":  # uint16, int32, bool: no scale a reader can assume
            raise DataError(f"{self.name} image {self.path / 'image' / f'{index}.npy'} holds {img.dtype} values; store "
                            "images as floats in [0, 1] or as uint8 0-255")
        else:  # floats of 0-255 trained on inputs 255 times too large without a word, NaN on NaN losses
            low, high = (float(x.min()), float(x.max())) if torch.isfinite(x).all() else (float("nan"),) * 2
            if not -IMAGE_SLACK <= low <= high <= 1 + IMAGE_SLACK:
                shown = "values that are not finite" if low != low else f"values from {low:g} to {high:g}"
                raise DataError(f"{self.name} image {self.path / 'image' / f'{index}.npy'} holds {shown}; store "
                                "images as floats in [0, 1] (divide 0-255 values by 255) or as uint8 0-255")
        hw = img.shape[:2]
        targets = {}
        for t in self.task_names:
            folder, kind = self.layout[t]
            a = self._file(folder, index)
            if kind == "segmentation":
                a = a.reshape(a.shape[:2]) if a.ndim == 3 and a.shape[-1] == 1 else a
                y = labels_to_long(a, f"{self.name} {folder}/{index}.npy")
            elif kind == "depth":
                a = a[..., None] if a.ndim == 2 else a
                y = torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 0), dtype=np.float32))
            else:  # normal
                y = torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 0), dtype=np.float32))
            expected = {"segmentation": hw, "depth": (1, *hw), "normal": (3, *hw)}[kind]
            if tuple(y.shape) != tuple(expected):
                raise DataError(
                    f"{self.name} {self.path / folder / f'{index}.npy'} has shape {a.shape}, which does not fit its "
                    f"image of size {hw} (expected {(*hw, *expected[:-2])}); regenerate it so that "
                    f"sample {index}'s files belong together"
                )
            targets[t] = y
        return x, targets

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, tasks={self.task_names}, n={self.n})"


class NYUv2(NpyScenes):
    """NYUv2 with 13 semantic classes (MTAN's labels; ``classes=40`` or another count for a relabelled copy),
    depth and normals (void labels become 255).

    Raises:
        DataError: ``classes`` is not a positive whole number, or the folders do not hold the layout.
    """

    name = "nyuv2"
    layout = {"segmentation": ("label", "segmentation"), "depth": ("depth", "depth"), "normal": ("normal", "normal")}

    def __init__(self, root: Union[str, os.PathLike], split: str = "train",
                 tasks: Sequence[str] = ("segmentation", "depth", "normal"), classes: int = 13):
        if not isinstance(classes, int) or isinstance(classes, bool) or classes < 1:
            raise DataError(f"nyuv2 classes must be a positive whole number (13 for MTAN's labels), got {classes!r}")
        self.classes = classes
        self.class_names = NYU_CLASS_NAMES if classes == 13 else None
        super().__init__(root, split, tasks)
