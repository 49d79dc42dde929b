import os

import pytest
import torch

from automtl.tasks import Task

# Tests use small tensors: one thread is as fast, and immune to oversubscription when
# other jobs share the cores (two spinning OpenMP pools on two cores can be 100x slower).
torch.set_num_threads(1)
torch.manual_seed(0)


def pytest_addoption(parser):
    parser.addoption("--gpu", action="store_true",
                     help="let the tests see CUDA GPUs: tests/test_cuda.py runs, and device 'auto' means the GPU. "
                          "Without it the suite runs on the CPU on any machine, as in CI")


def pytest_configure(config):
    # before anything asks CUDA: hidden, device "auto" is the CPU in every test and in the processes they start
    if not config.getoption("--gpu"):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread in every test, restored after it: tiny ops gain nothing from two, and a busy
    machine punishes spinning thread pools."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _CrashAfter(torch.utils.data.Dataset):
    """The same samples until the ``n``-th read, which raises: a run that dies mid-way."""

    def __init__(self, data, n):
        self.data, self.n, self.reads = data, n, 0

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads > self.n:
            raise RuntimeError("the machine went away")
        return self.data[i]


@pytest.fixture
def crash_after():
    """``crash_after(dataset, n)``: ``dataset`` whose ``n``-th read raises RuntimeError("the machine went away")."""
    return _CrashAfter


@pytest.fixture
def dense_tasks():
    """The three dense tasks of the synthetic scenes."""
    return [Task("segment", "segmentation", classes=4), Task("depth", "depth"), Task("normal", "normal")]



def _import_torchvision():
    """Import torchvision, or None. A torchvision wheel built for another torch (here: a CUDA build beside
    the CPU torch) cannot load its compiled ops, and its import stops at their missing schemas; defining the
    schemas lets its pure-Python models run. Tests only: automtl itself reports such a build as an error."""
    import sys

    try:
        import torchvision
        return torchvision
    except ImportError:
        return None
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    global _TORCHVISION_SCHEMAS
    _TORCHVISION_SCHEMAS = torch.library.Library("torchvision", "DEF")
    _TORCHVISION_SCHEMAS.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_SCHEMAS.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision
    return torchvision


@pytest.fixture(scope="session")
def torchvision_module():
    """torchvision, made importable with the CPU torch (see _import_torchvision), or the test is skipped."""
    tv = _import_torchvision()
    if tv is None:
        pytest.skip("torchvision is not installed (pip install 'automtl[torchvision]')")
    return tv


@pytest.fixture(scope="session")
def timm_module():
    """timm (which imports torchvision when it is installed), or the test is skipped."""
    _import_torchvision()
    return pytest.importorskip("timm", reason="timm is not installed (pip install 'automtl[timm]')")


def two_directories(data: bytes, edit=None) -> bytes:
    """The zip ``data`` with a second central directory (``edit(bytearray)`` changes it in place) between the first
    and the end record, which still points at the first: Python's zipfile reads the second (as one behind prepended
    bytes), torch's reader (miniz) the first, so a checker and a loader see two archives."""
    import struct

    eocd = len(data) - 22
    assert data[eocd - 20:eocd - 16] != b"PK\x06\x07", "a zip Python wrote (no zip64 records) is expected"
    size, offset = struct.unpack("<II", data[eocd + 12:eocd + 20])
    end = data[eocd:]
    second = bytearray(data[offset:offset + size])
    if edit is not None:
        edit(second)
    assert len(second) == size
    return data[:offset + size] + bytes(second) + end


def deflated_as_stored(directory: bytearray) -> None:
    """``two_directories``' edit: every entry of the directory copy stored, its size its stored size (a deflated
    entry's bytes, which torch would inflate)."""
    import struct

    at = 0
    while at < len(directory):
        names, extra, comment = struct.unpack("<HHH", directory[at + 28:at + 34])
        struct.pack_into("<H", directory, at + 10, 0)
        struct.pack_into("<I", directory, at + 24, struct.unpack("<I", directory[at + 20:at + 24])[0])
        at += 46 + names + extra + comment


def deflate(path) -> None:
    """Rewrite the torch.save zip at ``path`` with every entry deflated: torch's reader inflates them, so a small file
    can stand for many times its size in tensors (a zip bomb automtl's tensor readers refuse)."""
    import zipfile

    with zipfile.ZipFile(path) as src:
        entries = [(info.filename, src.read(info)) for info in src.infolist()]
    with zipfile.ZipFile(path, "w") as dst:
        for name, data in entries:
            dst.writestr(zipfile.ZipInfo(name), data, compress_type=zipfile.ZIP_DEFLATED)
