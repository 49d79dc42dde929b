"""Data sets: synthetic scenes, MultiFashion (IDX), NYUv2 and CityScapes (.npy layout)."""
import gzip
import os
import re
import struct

import numpy as np
import pytest
import torch

from automtl.data import (
    DATASETS,
    CityScapes,
    MultiFashion,
    NYUv2,
    SyntheticScenes,
    check_targets,
    default_tasks,
    make_dataset,
    make_loader,
    read_idx,
)
from automtl.errors import ConfigError, DataError
from automtl.losses import loss_for
from automtl.tasks import Task

# ---------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_per_seed_split_index():
    a = SyntheticScenes(4, size=32, seed=1)
    torch.manual_seed(0)
    x1, t1 = a[2]
    torch.manual_seed(12345)  # the global RNG plays no part
    x2, t2 = SyntheticScenes(4, size=32, seed=1)[2]
    assert torch.equal(x1, x2)
    for k in t1:
        assert torch.equal(t1[k], t2[k])
    assert not torch.equal(x1, SyntheticScenes(4, size=32, seed=2)[2][0])
    assert not torch.equal(x1, SyntheticScenes(4, size=32, seed=1, split="val")[2][0])
    assert not torch.equal(x1, a[3][0])
    assert torch.equal(a[-1][0], a[3][0])


def test_synthetic_shapes_dtypes_ranges():
    ds = SyntheticScenes(8, size=48, classes=4)
    assert len(ds) == 8 and ds.class_names == ["background", "disc", "rectangle", "triangle"]
    assert [t.name for t in ds.tasks] == ["segmentation", "depth", "normal"]
    seen = set()
    for i in range(len(ds)):
        x, t = ds[i]
        assert x.shape == (3, 48, 48) and x.dtype == torch.float32
        assert 0.0 <= x.min() and x.max() <= 1.0
        seg, depth, normal = t["segmentation"], t["depth"], t["normal"]
        assert seg.shape == (48, 48) and seg.dtype == torch.int64
        assert 0 <= seg.min() and seg.max() < 4
        seen |= set(seg.unique().tolist())
        assert depth.shape == (1, 48, 48) and depth.dtype == torch.float32
        assert torch.isfinite(depth).all() and depth.min() > 0
        assert normal.shape == (3, 48, 48) and normal.dtype == torch.float32
        assert torch.allclose(normal.norm(dim=0), torch.ones(48, 48), atol=1e-5)
        assert (normal[2] > 0).all()  # every visible surface faces the camera
        # shapes are in front of the ground plane behind them
        if (seg > 0).any() and (seg == 0).any():
            assert depth[0][seg > 0].mean() < depth[0][seg == 0].mean()
    assert seen >= {0, 1, 2, 3}


def test_synthetic_geometry_is_consistent():
    """Flat shapes and the ground have one normal each; discs curve (normals vary)."""
    ds = SyntheticScenes(16, size=64)
    for i in range(len(ds)):
        _, t = ds[i]
        seg, normal = t["segmentation"], t["normal"]
        ground = normal[:, seg == 0]
        if ground.numel():
            assert (ground - ground[:, :1]).abs().max() < 1e-5
        disc = normal[:, seg == 1]
        if disc.shape[1] > 20:
            assert disc[:2].std(dim=1).max() > 0.05


def test_synthetic_missing_labels_and_bad_options():
    ds = SyntheticScenes(40, size=16, missing=0.5)
    blank = 0
    for i in range(len(ds)):
        _, t = ds[i]
        blank += int((t["segmentation"] == 255).all()) + int(torch.isnan(t["depth"]).all())
    assert blank > 0
    with pytest.raises(ConfigError):
        SyntheticScenes(0)
    with pytest.raises(ConfigError, match="classes"):
        SyntheticScenes(4, classes=9)


def test_synthetic_targets_feed_the_losses():
    ds = SyntheticScenes(4, size=16, missing=0.5)
    loader = make_loader(ds, batch_size=4, shuffle=False, seed=0)
    x, t = next(iter(loader))
    assert x.shape == (4, 3, 16, 16)
    for task in ds.tasks:
        pred = torch.randn(4, task.outputs, 16, 16, requires_grad=True)
        loss = loss_for(task)(pred, t[task.name])
        assert torch.isfinite(loss)


# ---------------------------------------------------------------- loader, registry


def test_make_loader_shuffle_is_seeded():
    ds = SyntheticScenes(16, size=8)

    def order(seed):
        torch.manual_seed(seed + 100)  # global RNG must not matter
        return [b[0].sum().item() for b in make_loader(ds, 4, shuffle=True, seed=seed)]

    assert order(0) == order(0)
    assert order(0) != order(1)
    with pytest.raises(ConfigError):
        make_loader(ds, 0)


def test_make_dataset_and_default_tasks(tmp_path):
    ds = make_dataset("synthetic", "train", n=3, size=16)
    assert isinstance(ds, SyntheticScenes) and len(ds) == 3
    assert len(make_dataset("synthetic", "val")) == 256
    assert set(DATASETS) == {"synthetic", "multifashion", "nyuv2", "cityscapes"}
    assert [(t.name, t.kind, t.classes) for t in default_tasks("synthetic")] == [
        ("segmentation", "segmentation", 4), ("depth", "depth", None), ("normal", "normal", None)
    ]
    assert [t.classes for t in default_tasks("multifashion")] == [10, 10]
    assert default_tasks("nyuv2:/x")[0].classes == 13
    assert [t.name for t in default_tasks("cityscapes")] == ["segmentation", "depth"]
    with pytest.raises(DataError, match="did you mean 'synthetic'"):
        make_dataset("synthetc", "train")
    with pytest.raises(DataError, match="needs a root"):
        make_dataset("nyuv2", "train")
    with pytest.raises(DataError, match="does not exist"):
        make_dataset(f"cityscapes:{tmp_path / 'nope'}", "train")
    with pytest.raises(ConfigError, match="does not take"):
        make_dataset("synthetic", "train", colour="red")


def test_check_targets():
    ds = SyntheticScenes(2, size=8)
    check_targets(ds, ds.tasks)
    with pytest.raises(DataError, match="no target for task 'edges'"):
        check_targets(ds, [Task("edges", kind="depth")])
    with pytest.raises(DataError, match="does not fit"):
        check_targets(ds, [Task("depth", kind="classification", classes=3)])
    listed = [(torch.zeros(3, 1, 2), {"seg": torch.tensor([[0, 3]]), "n": torch.zeros(2, 1, 2)})]
    with pytest.raises(DataError, match="label 3 outside 0..1"):
        check_targets(listed, [Task("seg", kind="segmentation", classes=2)])
    with pytest.raises(DataError, match=r"does not fit a normal task \(one sample's target is \(3, \*, \*\)\)"):
        check_targets(listed, [Task("n", kind="normal")])
    with pytest.raises(DataError, match="empty"):
        check_targets([], [Task("seg", kind="segmentation", classes=2)])


# ---------------------------------------------------------------- MultiFashion (IDX fixture)


def _write_idx(path, arr, gz=True, code=0x08):
    arr = np.asarray(arr)
    head = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = head + arr.astype(">u1" if code == 0x08 else arr.dtype).tobytes()
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(data)


def _fashion(root, n=6, split="train", gz=True):
    rng = np.random.default_rng(0)
    prefix = "train" if split == "train" else "t10k"
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    ext = ".gz" if gz else ""
    _write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", images, gz)
    _write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", labels, gz)
    return images, labels


def test_idx_reader_gzip_and_plain(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", a, gz=True)
    _write_idx(tmp_path / "b", a, gz=False)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), a)
    assert np.array_equal(read_idx(tmp_path / "b"), a)
    i32 = np.array([1, -2, 70000], dtype=">i4")
    (tmp_path / "c").write_bytes(bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 3) + i32.tobytes())
    assert read_idx(tmp_path / "c").tolist() == [1, -2, 70000]


def test_idx_reader_rejects_malformed(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x02ab")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(tmp_path / "bad")
    a = np.zeros((2, 3), dtype=np.uint8)
    _write_idx(tmp_path / "short", a, gz=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(DataError, match="data bytes"):
        read_idx(tmp_path / "short")
    (tmp_path / "trunc.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 40)[:-6])
    with pytest.raises(DataError):
        read_idx(tmp_path / "trunc.gz")
    with pytest.raises(DataError, match="does not exist"):
        read_idx(tmp_path / "missing")
    (tmp_path / "garbage.gz").write_bytes(b"\x1f\x8b" + b"\x00" * 40)
    with pytest.raises(DataError, match="is not a readable gzip file"):
        read_idx(tmp_path / "garbage.gz")


def test_data_files_that_are_pipes_are_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(DataError, match="not a regular file"):
        read_idx(tmp_path / "pipe")
    _npy_split(tmp_path, "train", 2, NYU_FOLDERS)
    _npy_split(tmp_path, "val", 2, NYU_FOLDERS)
    (tmp_path / "train" / "label" / "1.npy").unlink()
    os.mkfifo(tmp_path / "train" / "label" / "1.npy")
    with pytest.raises(DataError, match="not a regular file"):
        NYUv2(tmp_path, tasks=("segmentation",))[1]


def test_multifashion_on_fixture(tmp_path):
    images, labels = _fashion(tmp_path, n=6, split="train")
    _fashion(tmp_path, n=4, split="test", gz=False)
    ds = MultiFashion(root=tmp_path, split="train", seed=0)
    assert len(ds) == 6
    assert [t.name for t in ds.tasks] == ["left", "right"]
    x, t = ds[0]
    assert x.shape == (3, 36, 36) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    i, j = ds.pairs[0].tolist()
    assert i != j
    assert t["left"].dtype == torch.int64 and t["left"].item() == labels[i] and t["right"].item() == labels[j]
    canvas = np.zeros((36, 36), dtype=np.uint8)
    canvas[:28, :28] = images[i]
    canvas[8:, 8:] = np.maximum(canvas[8:, 8:], images[j])
    assert torch.allclose(x[0], torch.from_numpy(canvas).float() / 255)
    # deterministic pairing per seed; n keeps the first pairs
    assert torch.equal(MultiFashion(root=tmp_path, seed=0).pairs, ds.pairs)
    assert torch.equal(MultiFashion(root=tmp_path, seed=0, n=3).pairs, ds.pairs[:3])
    assert len(MultiFashion(root=tmp_path, split="test")) == 4  # plain (non-gzip) files
    assert isinstance(make_dataset(f"multifashion:{tmp_path}", "val"), MultiFashion)
    check_targets(ds, default_tasks("multifashion"))


def test_multifashion_errors(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        MultiFashion(root=tmp_path / "none")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        MultiFashion(root=tmp_path)  # folder exists, files do not
    (tmp_path / "train-images-idx3-ubyte.gz").mkdir()  # there, but no file: not "is not in ROOT"
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz is not a regular file"):
        MultiFashion(root=tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").rmdir()
    _fashion(tmp_path, n=6)
    with pytest.raises(ConfigError, match="between 1 and the 6"):
        MultiFashion(root=tmp_path, n=7)
    with pytest.raises(DataError, match="split"):
        MultiFashion(root=tmp_path, split="dev")
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(5, dtype=np.uint8))
    with pytest.raises(DataError, match="6 images but .* 5 labels"):
        MultiFashion(root=tmp_path)


# ---------------------------------------------------------------- NYUv2 / CityScapes (.npy fixtures)


def _npy_split(root, split, n, folders, h=4, w=6):
    rng = np.random.default_rng(1)
    for i in range(n):
        for folder, shape_fn in folders.items():
            d = root / split / folder
            d.mkdir(parents=True, exist_ok=True)
            np.save(d / f"{i}.npy", shape_fn(rng, h, w))


def _image(rng, h, w):
    return rng.random((h, w, 3)).astype(np.float32)


def _label(classes):
    def make(rng, h, w):
        lab = rng.integers(0, classes, size=(h, w)).astype(np.float32)
        lab[0, 0] = -1  # void
        return lab

    return make


def _depth(rng, h, w):
    d = (rng.random((h, w, 1)) + 0.5).astype(np.float32)
    d[0, 0, 0] = 0  # unknown
    return d


def _normal(rng, h, w):
    n = rng.normal(size=(h, w, 3))
    return (n / np.linalg.norm(n, axis=-1, keepdims=True)).astype(np.float32)


NYU_FOLDERS = {"image": _image, "label": _label(13), "depth": _depth, "normal": _normal}


def test_nyuv2_on_fixture(tmp_path):
    _npy_split(tmp_path, "train", 3, NYU_FOLDERS)
    _npy_split(tmp_path, "val", 2, NYU_FOLDERS)
    ds = NYUv2(tmp_path, split="train")
    assert len(ds) == 3 and len(NYUv2(tmp_path, split="val")) == 2
    x, t = ds[1]
    assert x.shape == (3, 4, 6) and x.dtype == torch.float32
    img = np.load(tmp_path / "train" / "image" / "1.npy")
    assert torch.allclose(x, torch.from_numpy(img).permute(2, 0, 1))
    assert set(t) == {"segmentation", "depth", "normal"}
    seg = t["segmentation"]
    assert seg.dtype == torch.int64 and seg.shape == (4, 6) and seg[0, 0] == 255
    assert seg[seg != 255].max() < 13
    assert t["depth"].shape == (1, 4, 6) and t["depth"][0, 0, 0] == 0
    assert t["normal"].shape == (3, 4, 6)
    check_targets(ds, default_tasks("nyuv2"))
    only = NYUv2(tmp_path, tasks=("depth",))
    assert set(only[0][1]) == {"depth"}
    assert isinstance(make_dataset(f"nyuv2:{tmp_path}", "val"), NYUv2)
    # losses on the real targets: void and unknown pixels stay out, nothing is NaN
    for task in default_tasks("nyuv2"):
        pred = torch.randn(1, task.outputs, 4, 6)
        assert torch.isfinite(loss_for(task)(pred, t[task.name][None]))


def test_samples_takes_the_first_ones_of_a_data_set_read_from_disk(tmp_path):
    """`--samples` was ignored for nyuv2 and cityscapes (every sample trained) while supermodel.yaml recorded it."""
    from automtl.convert import build_data, resolve_config

    _npy_split(tmp_path, "train", 3, NYU_FOLDERS)
    _npy_split(tmp_path, "val", 2, NYU_FOLDERS)
    cfg = resolve_config(backbone="tiny", data=f"nyuv2:{tmp_path}", train_samples=2, val_samples=1)
    train, val = build_data(cfg, cfg.task_objects())
    assert (len(train), len(val)) == (2, 1)
    assert torch.equal(train[1][0], NYUv2(tmp_path, split="train")[1][0])  # the first ones, in order
    cfg = resolve_config(backbone="tiny", data=f"nyuv2:{tmp_path}", train_samples=50)
    assert [len(d) for d in build_data(cfg, cfg.task_objects())] == [3, 2]  # at most what there is


def test_a_data_set_read_from_disk_is_used_whole_by_default(tmp_path):
    """NYUv2 and Cityscapes were cut to their first 512 / 128 samples by convert's defaults (the synthetic data's
    sizes), so report.json scored 128 of NYUv2's 654 test images while `automtl eval` scored them all."""
    from automtl.convert import build_data, resolve_config

    _npy_split(tmp_path, "train", 2, NYU_FOLDERS, h=2, w=2)
    _npy_split(tmp_path, "val", 130, NYU_FOLDERS, h=2, w=2)
    cfg = resolve_config(backbone="tiny", data=f"nyuv2:{tmp_path}")
    assert [len(d) for d in build_data(cfg, cfg.task_objects())] == [2, 130]
    cfg = resolve_config(backbone="tiny", input_size=16)  # a made data set keeps its default size
    assert [len(d) for d in build_data(cfg, cfg.task_objects())] == [512, 128]


def test_the_segmentation_task_sets_the_labels_a_data_set_reads(tmp_path):
    """A 19-class task on Cityscapes read label_7/ (a perfect 19-class model scored mIoU 0), and NYUv2 turned every id
    beyond 12 into void whatever the task's classes: the labels follow the task named segmentation, and an id beyond
    its classes is refused, naming it."""
    from automtl.convert import build_data, resolve_config
    from automtl.evaluation import evaluate_model
    from automtl.supermodel import supermodel

    def high(rng, h, w):  # ids 7..18: none of them a 7-class id
        return rng.integers(7, 19, size=(h, w)).astype(np.float32)

    folders = {"image": _image, "label_19": high, "depth": _depth}  # no label_7/: only the 19-class labels read
    _npy_split(tmp_path / "cs", "train", 2, folders)
    _npy_split(tmp_path / "cs", "val", 2, folders)
    cfg = resolve_config(backbone="tiny", data=f"cityscapes:{tmp_path / 'cs'}", input_size=16,
                         tasks=["segmentation:segmentation:19", "depth:depth"])
    train, val = build_data(cfg, cfg.task_objects())
    assert torch.equal(train[0][1]["segmentation"], torch.from_numpy(np.load(tmp_path / "cs/train/label_19/0.npy")).long())
    sm = supermodel("tiny", cfg.task_objects(), torch.randn(1, 3, 16, 16))  # `automtl eval` reads them too
    assert set(evaluate_model(sm, f"cityscapes:{tmp_path / 'cs'}", input_size=16)) == {"segmentation", "depth"}

    for split in ("train", "val"):
        _npy_split(tmp_path / "nyu", split, 2, {**NYU_FOLDERS, "label": high})
    for classes in (13, 40):
        tasks = [Task("segmentation", "segmentation", classes=classes), Task("depth", "depth")]
        cfg = resolve_config(backbone="tiny", data=f"nyuv2:{tmp_path / 'nyu'}", tasks=[t.describe() for t in tasks])
        if classes == 13:
            with pytest.raises(DataError, match="label 1[3-8] outside 0..12"):
                build_data(cfg, tasks)
        else:
            seg = make_dataset(f"nyuv2:{tmp_path / 'nyu'}", "train", for_tasks=tasks)[0][1]["segmentation"]
            assert seg.min() >= 7 and seg.max() <= 18  # kept, not void


def test_a_fractional_label_on_disk_is_refused_not_truncated(tmp_path):
    def fractional(rng, h, w):
        lab = _label(13)(rng, h, w)
        lab[1, 1] = 3.5
        return lab

    _npy_split(tmp_path, "train", 1, {**NYU_FOLDERS, "label": fractional})
    with pytest.raises(DataError, match="label 3.5, which is not a class id"):
        NYUv2(tmp_path)[0]


@pytest.mark.parametrize("value", [1e20, np.inf, 2.0**31])
def test_a_label_no_class_count_reaches_is_refused_as_stored(tmp_path, value):
    """1e20 was cast to int64 and reported as label -9223372036854775808; +inf was read as void."""
    def huge(rng, h, w):
        lab = _label(13)(rng, h, w)
        lab[1, 1] = value
        return lab

    _npy_split(tmp_path, "train", 1, {**NYU_FOLDERS, "label": huge})
    with pytest.raises(DataError, match=re.escape(f"label {value:g}, which is not a class id; class ids are whole numbers from 0")):
        NYUv2(tmp_path)[0]


def test_integer_images_are_scaled_or_refused(tmp_path):
    """A uint8 image (0-255, as image files hold them) was fed as 0-255 where the models expect [0, 1]: other numbers,
    silently. uint8 is divided by 255; other integer types have no scale to assume and are refused."""
    _npy_split(tmp_path, "train", 1, NYU_FOLDERS)
    img = np.load(tmp_path / "train" / "image" / "0.npy")
    as_bytes = np.round(img * 255).astype(np.uint8)
    np.save(tmp_path / "train" / "image" / "0.npy", as_bytes)
    x = NYUv2(tmp_path)[0][0]
    assert x.dtype == torch.float32 and torch.allclose(x, torch.from_numpy(as_bytes / 255).float().permute(2, 0, 1))
    for dtype in (np.uint16, np.int32, bool):
        np.save(tmp_path / "train" / "image" / "0.npy", as_bytes.astype(dtype))
        with pytest.raises(DataError, match=f"holds {np.dtype(dtype)} values; store images as floats in \\[0, 1\\] or as uint8"):
            NYUv2(tmp_path)[0]


@pytest.mark.parametrize("scale, says", [(255.0, r"values from [\d.]+ to 255; store images as floats in \[0, 1\] \(divide"),
                                         (np.nan, "values that are not finite; store images"),
                                         (1.2, None)])
def test_float_images_outside_zero_to_one_are_refused(tmp_path, scale, says):
    """A float image of 0-255 trained on inputs 255 times those the models expect, and a NaN image on NaN losses,
    without a word; what resampling overshoots [0, 1] by (bicubic: 11 %) is kept."""
    _npy_split(tmp_path, "train", 1, NYU_FOLDERS)
    img = np.load(tmp_path / "train" / "image" / "0.npy")
    img = img / img.max() * (255.0 if scale == 255.0 else 1.2)
    if scale != scale:
        img[0, 0, 0] = np.nan
    np.save(tmp_path / "train" / "image" / "0.npy", img.astype(np.float32))
    if says is None:
        assert float(NYUv2(tmp_path)[0][0].max()) == pytest.approx(1.2)
        return
    with pytest.raises(DataError, match=says):
        NYUv2(tmp_path)[0]


def test_a_task_reading_a_target_of_another_kind_is_refused(tmp_path):
    """`--task segmentation:depth` on NYUv2 trained depth regression on class ids (void 255) without a word; the
    builtin data sets say what their targets are. A kind of the same sort (a user's kind over class ids) may read them."""
    from automtl.kinds import Depth, Segmentation, register_kind

    _npy_split(tmp_path, "train", 2, NYU_FOLDERS)
    ds = NYUv2(tmp_path)
    with pytest.raises(DataError, match="target 'segmentation' of data set NYUv2 holds segmentation class ids, which a "
                                        r"depth task would read as measured values; give the task the kind 'segmentation'"):
        check_targets(ds, [Task("segmentation", "depth")])
    with pytest.raises(DataError, match="holds depth measured values, which a segmentation task would read as class ids"):
        check_targets(torch.utils.data.Subset(ds, [0]), [Task("depth", "segmentation", classes=13)])

    @register_kind("test_focal_segmentation")
    class Focal(Segmentation):
        pass

    @register_kind("test_edges")  # a user's kind deriving its targets from class ids (boundaries), measured values
    class Edges(Depth):
        pass
    try:
        check_targets(ds, [Task("segmentation", "test_focal_segmentation", classes=13)])
        check_targets(ds, [Task("segmentation", "test_edges")])
    finally:
        from automtl.kinds import KINDS
        KINDS.pop("test_focal_segmentation")
        KINDS.pop("test_edges")


def test_a_target_that_does_not_fit_its_image_says_which_file_and_what_to_do(tmp_path):
    _npy_split(tmp_path, "train", 2, NYU_FOLDERS)
    np.save(tmp_path / "train" / "depth" / "1.npy", np.zeros((3, 6, 1), np.float32))
    with pytest.raises(DataError, match=r"depth/1.npy has shape \(3, 6, 1\), which does not fit its image of size "
                                        r"\(4, 6\) \(expected \(4, 6, 1\)\); regenerate it"):
        NYUv2(tmp_path)[1]


def test_samples_of_different_sizes_in_one_batch_are_named(tmp_path):
    """Any data set automtl batches (a builtin's folder, or the user's own): two samples of different sizes are one
    DataError naming the part and both shapes, not torch's collate RuntimeError from inside the loader; a batch of
    one of them still loads (evaluation at batch size 1)."""
    from automtl.search import SearchConfig, search
    from automtl.supermodel import supermodel

    _npy_split(tmp_path, "val", 1, NYU_FOLDERS, h=4, w=6)
    big = tmp_path / "big"
    _npy_split(big, "val", 2, NYU_FOLDERS, h=8, w=6)
    for folder in NYU_FOLDERS:
        os.replace(big / "val" / folder / "1.npy", tmp_path / "val" / folder / "1.npy")
    ds = NYUv2(tmp_path, split="val")
    with pytest.raises(DataError, match=r"differ in size \(the image \(3, 4, 6\) and \(3, 8, 6\)\)"):
        next(iter(make_loader(ds, 2)))
    assert [x.shape[-2] for x, _ in make_loader(ds, 1)] == [4, 8]
    tasks = ds.tasks
    sm = supermodel("tiny", tasks, torch.randn(1, 3, 4, 6))
    with pytest.raises(DataError, match="differ in size"):  # a Dataset handed to the search: batched by automtl
        search(sm, ds, None, SearchConfig(warmup_steps=1, search_steps=0, finetune_steps=0, batch_size=2, quiet=True))


def test_nyuv2_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        NYUv2(tmp_path / "nope")
    with pytest.raises(DataError, match="train/ and val/"):
        NYUv2(tmp_path)
    _npy_split(tmp_path, "train", 3, NYU_FOLDERS)
    with pytest.raises(DataError, match="no task 'edges'"):
        NYUv2(tmp_path, tasks=("edges",))
    (tmp_path / "train" / "normal" / "2.npy").unlink()
    with pytest.raises(DataError, match="3 images but 2 files in normal/"):
        NYUv2(tmp_path)
    NYUv2(tmp_path, tasks=("segmentation", "depth"))  # normals not asked for: fine
    for f in (tmp_path / "train" / "depth").iterdir():
        f.unlink()
    (tmp_path / "train" / "depth").rmdir()
    with pytest.raises(DataError, match="depth does not exist|folder .*depth"):
        NYUv2(tmp_path, tasks=("depth",))
    (tmp_path / "train" / "image" / "7.npy").write_bytes(b"x")
    with pytest.raises(DataError, match="consecutive"):
        NYUv2(tmp_path, tasks=("segmentation",))
    (tmp_path / "train" / "image" / "7.npy").unlink()
    (tmp_path / "train" / "label" / "1.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match="cannot be read"):
        NYUv2(tmp_path, tasks=("segmentation",))[1]


def test_cityscapes_on_fixture(tmp_path):
    folders = {"image": _image, "label_7": _label(7), "label_19": _label(19), "depth": _depth}
    _npy_split(tmp_path, "train", 2, folders)
    ds = CityScapes(tmp_path, split="train")
    assert len(ds) == 2 and ds.classes == 7
    x, t = ds[0]
    assert set(t) == {"segmentation", "depth"}
    assert t["segmentation"][0, 0] == 255 and t["segmentation"][t["segmentation"] != 255].max() < 7
    ds19 = CityScapes(tmp_path, classes=19)
    assert ds19.tasks[0].classes == 19
    lab19 = np.load(tmp_path / "train" / "label_19" / "0.npy")
    assert ds19[0][1]["segmentation"][1, 1] == int(lab19[1, 1])
    check_targets(ds, default_tasks("cityscapes"))
    with pytest.raises(DataError, match=r"not 13; its segmentation task needs 7 or 19 classes \(--task segmentation:segmentation:19"):
        CityScapes(tmp_path, classes=13)
    with pytest.raises(DataError, match="split folder"):
        CityScapes(tmp_path, split="val")
    (tmp_path / "train" / "label_7" / "1.npy").unlink()
    with pytest.raises(DataError, match="2 images but 1 files in label_7/"):
        CityScapes(tmp_path)


@pytest.mark.skipif(
    not __import__("os").path.exists("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_multifashion_reads_the_debian_package():
    ds = make_dataset("multifashion", "test", n=8)
    assert len(ds) == 8
    x, t = ds[0]
    assert x.shape == (3, 36, 36) and 0 < x.max() <= 1.0
    assert 0 <= t["left"].item() < 10 and 0 <= t["right"].item() < 10


def test_idx_reader_reads_no_more_than_the_header_needs(tmp_path, monkeypatch):
    """A gzip bomb (a header of 2^31 values over a body of zeros) stops at the header's size + 1 byte, and a header
    beyond the bound is refused before any body is read."""
    import automtl.data.multifashion as mf

    header = bytes([0, 0, 0x08, 1]) + struct.pack(">I", 1000)
    (tmp_path / "long.gz").write_bytes(gzip.compress(header + b"\x00" * 10**6))  # 1 MB inflated from 1 KB
    reads = []
    opened = gzip.GzipFile  # what read_idx inflates with

    def counting(*args, **kwargs):
        f = opened(*args, **kwargs)
        read = f.read
        f.read = lambda n=-1: reads.append(n) or read(n)
        return f

    monkeypatch.setattr(mf.gzip, "GzipFile", counting)
    with pytest.raises(DataError, match="holds more data bytes but its header .1000,. needs 1000"):
        read_idx(tmp_path / "long.gz")
    assert reads and -1 not in reads and sum(reads) <= 4 + 4 + 1001
    (tmp_path / "huge").write_bytes(bytes([0, 0, 0x0E, 2]) + struct.pack(">II", 2**20, 2**20))
    with pytest.raises(DataError, match="more than the 4294967296 automtl reads"):
        read_idx(tmp_path / "huge")


def test_npy_samples_must_hold_what_their_header_declares(tmp_path):
    from automtl.data.nyuv2 import _load

    np.save(tmp_path / "ok.npy", np.zeros((2, 3), np.float32))
    assert _load(tmp_path / "ok.npy", "NYUv2").shape == (2, 3)
    raw = (tmp_path / "ok.npy").read_bytes()
    header_end = raw.index(b"\n") + 1
    lie = raw[:header_end].replace(b"(2, 3)", b"(200000, 300000)")  # 240 GB declared in a 100-byte file
    (tmp_path / "lie.npy").write_bytes(lie + raw[header_end:])
    with pytest.raises(DataError, match=r"declares \(200000, 300000\) values of float32 .* but holds [0-9]+; regenerate"):
        _load(tmp_path / "lie.npy", "NYUv2")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="holds Python objects"):
        _load(tmp_path / "obj.npy", "NYUv2")


def _idx_header(path, code, *dims, gz=False, body=b""):
    data = bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + body
    path.write_bytes(gzip.compress(data) if gz else data)


def test_idx_files_may_not_declare_a_dimension_of_zero(tmp_path):
    """Before, (N, 0, 0) images passed: 0 values need 0 bytes whatever N is, so N was backed by nothing."""
    _idx_header(tmp_path / "empty", 0x08, 2**27, 0, 0)
    with pytest.raises(DataError, match=r"declares dimensions \(134217728, 0, 0\), one of them 0, so .*download it again"):
        read_idx(tmp_path / "empty")


def test_multifashion_refuses_an_image_count_its_files_do_not_back(tmp_path):
    """Before, 0x0 images beside 2^20 zero labels (a 1 KB gzip) built a data set of 2^20 items, and at 2^27 items a
    130 KB download took 2.4 GB (int64 labels, randperm)."""
    n = 2**20
    _idx_header(tmp_path / "train-images-idx3-ubyte", 0x08, n, 0, 0)
    _idx_header(tmp_path / "train-labels-idx1-ubyte.gz", 0x08, n, gz=True, body=bytes(n))
    with pytest.raises(DataError):
        MultiFashion(root=tmp_path, n=4)


def test_multifashion_checks_the_headers_before_it_reads_the_images(tmp_path):
    """Counts and sizes are checked on the headers, so none of these files needs a body for its refusal (before,
    they failed only on the missing bytes, after reading the labels, or not at all for a 300-pixel-wide image)."""
    from automtl.data.multifashion import MAX_IMAGE_SIDE, MAX_ITEMS

    _fashion(tmp_path, n=6)
    images = tmp_path / "train-images-idx3-ubyte.gz"
    _idx_header(images, 0x08, 7, 28, 28, gz=True)
    with pytest.raises(DataError, match="7 images but .* 6 labels; use files of one release"):
        MultiFashion(root=tmp_path)
    _idx_header(images, 0x08, 6, 28, MAX_IMAGE_SIDE + 1, gz=True)
    with pytest.raises(DataError, match=rf"images of 28x{MAX_IMAGE_SIDE + 1} pixels.* at most {MAX_IMAGE_SIDE}"):
        MultiFashion(root=tmp_path)
    _idx_header(images, 0x0D, 6, 28, 28, gz=True)
    with pytest.raises(DataError, match="should hold uint8 pixels"):
        MultiFashion(root=tmp_path)
    _idx_header(tmp_path / "train-labels-idx1-ubyte.gz", 0x08, MAX_ITEMS + 1, gz=True)
    with pytest.raises(DataError, match=rf"declares {MAX_ITEMS + 1} labels, more than the {MAX_ITEMS}"):
        MultiFashion(root=tmp_path)
    _idx_header(tmp_path / "train-labels-idx1-ubyte.gz", 0x0D, 6, gz=True, body=np.zeros(6, ">f4").tobytes())
    with pytest.raises(DataError, match="should hold integer labels"):
        MultiFashion(root=tmp_path)


def test_idx_gzip_files_may_not_inflate_far_beyond_their_size(tmp_path):
    """Before, an 8 KB gzip of zeros was inflated to the 8 MiB its header declares (and up to 4 GiB from ~4 MB)."""
    from automtl.data.multifashion import MAX_GZIP_RATIO

    n = 2**23
    _idx_header(tmp_path / "zeros.gz", 0x08, n, gz=True, body=bytes(n))
    with pytest.raises(DataError, match=rf"more than {MAX_GZIP_RATIO} times .*; download it again"):
        read_idx(tmp_path / "zeros.gz")


def _npy_header_only(path, descr, shape):
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": shape})


def test_npy_samples_must_hold_numbers(tmp_path):
    """Before, a dtype of itemsize 0 ('|V0', '|S0', '<U0') needed 0 bytes for any shape, so (100000, 100000, 3) passed
    the size check and the float32 conversion asked for 112 GiB; strings and complex numbers loaded, then failed the
    conversion with a ValueError traceback or lost their imaginary part."""
    from automtl.data.nyuv2 import _load

    for descr in ("|V0", "|S0", "<U0"):
        _npy_header_only(tmp_path / "zero.npy", descr, (100000, 100000, 3))
        with pytest.raises(DataError, match=r"zero.npy holds values of type .*; save numbers \(bool, int, uint or"):
            _load(tmp_path / "zero.npy", "nyuv2")
    np.save(tmp_path / "s.npy", np.array([[b"ab", b"cd"]]))
    np.save(tmp_path / "c.npy", np.ones((2, 2), np.complex64))
    np.save(tmp_path / "r.npy", np.zeros(2, [("a", "<f4"), ("b", "<f4")]))
    for name in ("s.npy", "c.npy", "r.npy"):
        with pytest.raises(DataError, match="holds values of type"):
            _load(tmp_path / name, "nyuv2")
    np.save(tmp_path / "b.npy", np.ones((2, 2), bool))
    np.save(tmp_path / "f.npy", np.ones((2, 2), ">f8"))
    assert _load(tmp_path / "b.npy", "nyuv2").dtype == bool and _load(tmp_path / "f.npy", "nyuv2").sum() == 4
    _npy_split(tmp_path, "train", 1, NYU_FOLDERS)
    _npy_header_only(tmp_path / "train" / "image" / "0.npy", "|S0", (4, 6, 3))
    with pytest.raises(DataError, match="holds values of type"):
        NYUv2(tmp_path, tasks=("depth",))[0]


def test_npy_samples_hold_a_bounded_number_of_values(tmp_path, monkeypatch):
    """Before, the value count was bounded only through the 1 GiB file size (a 1 GiB bool file is 4 GiB as float32,
    8 GiB in the label pass), and an empty (0, 3) array passed."""
    import automtl.data.nyuv2 as nyu

    monkeypatch.setattr(nyu, "MAX_NPY_VALUES", 10)
    np.save(tmp_path / "big.npy", np.zeros((3, 4), np.uint8))
    with pytest.raises(DataError, match=r"big.npy holds \(3, 4\), 12 values, more than the 10 .*; save smaller"):
        nyu._load(tmp_path / "big.npy", "nyuv2")
    np.save(tmp_path / "empty.npy", np.zeros((0, 3), np.float32))
    with pytest.raises(DataError, match=r"empty.npy holds \(0, 3\), no values"):
        nyu._load(tmp_path / "empty.npy", "nyuv2")


def test_a_sample_that_leaves_out_a_task_is_named_not_a_raw_key_error():
    """Partial labels written by leaving the key out: torch's default_collate raised KeyError: 'depth' from inside the
    loader."""
    samples = [(torch.zeros(3, 4, 4), {"seg": torch.zeros(4, 4, dtype=torch.long), "depth": torch.zeros(1, 4, 4)}),
               (torch.zeros(3, 4, 4), {"seg": torch.zeros(4, 4, dtype=torch.long)})]
    for batch in (samples, samples[::-1]):
        with pytest.raises(DataError, match=r"hold different targets \('depth' in one, not in another\); give every "
                                            "sample every task's target, marking a missing label with NaN"):
            next(iter(make_loader(batch, 2)))
    assert next(iter(make_loader(samples[:1] * 2, 2)))[1]["depth"].shape == (2, 1, 4, 4)


def test_a_batch_on_the_meta_device_is_named():
    """A target (or image) on the meta device reached torch's "Tensor.item() cannot be called on meta tensors"."""
    from automtl.data.checks import BatchChecks

    checks = BatchChecks([Task("depth", "depth")], 3, "training data")
    x, y = torch.zeros(2, 3, 4, 4), torch.zeros(2, 1, 4, 4)
    checks(x, {"depth": y})
    with pytest.raises(DataError, match="target 'depth' .* is on the meta device, which holds shapes but no values"):
        checks(x, {"depth": y.to("meta")})
    with pytest.raises(DataError, match="yielded images on the meta device"):
        checks(x.to("meta"), {"depth": y})


def test_a_target_on_a_scale_its_metric_misreads_is_refused():
    """helper-79: a normal map stored as a 0-255 image trained and scored without a word (mean angle 73 degrees for
    normals 34 degrees off). A kind's ``target_range`` is checked on every batch, training and validation; unit
    normals, bilinearly resized ones, NaN and unknown (0) pixels pass."""
    import torch.nn.functional as F

    from automtl.data.checks import BatchChecks
    from automtl.kinds import TARGET_SLACK, KINDS

    assert KINDS["normal"].target_range == (-1.0, 1.0)
    unit = F.normalize(torch.randn(2, 3, 8, 8), dim=1)
    unit[0, :, 0, 0] = 0.0
    unit[1, :, 1, 1] = float("nan")
    checkerboard = torch.tensor([[1.0, -1.0] * 4, [-1.0, 1.0] * 4] * 4).expand(2, 3, 8, 8)  # bicubic's worst case
    resized = F.interpolate(torch.cat([unit.nan_to_num(), checkerboard]), size=(13, 13), mode="bicubic",
                            align_corners=False)
    x = torch.zeros(2, 3, 8, 8)
    for where in ("training data", "validation data"):
        checks = BatchChecks([Task("normal", "normal")], 3, where, require_labels=False)
        checks(x, {"normal": unit})
        checks(torch.zeros(4, 3, 13, 13), {"normal": resized})
        assert float(resized.abs().max()) <= 1 + 2 * TARGET_SLACK
        image = ((unit.nan_to_num() + 1) * 127.5).round()
        with pytest.raises(DataError, match=rf"target 'normal' \(normal\) of {where} holds values from \d+ to \d+, outside "
                                            r"the \[-1, 1\] of a normal target; for a normal map stored as a 0-255 "
                                            r"image, x / 127.5 - 1"):
            checks(x, {"normal": image})
        for dtype in (torch.uint8, torch.int64, torch.bool):  # not floats at all: uint8 passed, bool crashed (helper-80)
            with pytest.raises(DataError, match=rf"holds {str(dtype).split('.')[1]} values; a normal target is floats in "
                                                r"\[-1, 1\]; for a normal map stored as a 0-255 image"):
                checks(x, {"normal": image.to(dtype)})


def test_a_regression_target_is_as_wide_as_the_head_that_predicts_it():
    """helper-78: without classes=, a regression target of any width was accepted and crashed inside the loss
    ("shape '[16, 1]' is invalid for input of size 32"). The builtin head predicts one value then; a head of the
    task's own keeps any width."""
    from torch import nn

    from automtl.data.checks import BatchChecks

    x = torch.zeros(4, 3, 8, 8)
    checks = BatchChecks([Task("level", kind="regression")], 3)
    for ok in (torch.zeros(4), torch.zeros(4, 1)):
        checks(x, {"level": ok})
    with pytest.raises(DataError, match=r"has shape \(4, 2\) but a regression target is \(B, 1\) or \(B\)"):
        checks(x, {"level": torch.zeros(4, 2)})
    BatchChecks([Task("level", kind="regression", classes=2)], 3)(x, {"level": torch.zeros(4, 2)})
    own = Task("level", kind="regression", head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LazyLinear(2)))
    BatchChecks([own], 3)(x, {"level": torch.zeros(4, 2)})
    reads = Task("level", kind="regression", loss=lambda pred, y: (pred - y[:, :1]).abs().mean())  # a loss of its own
    BatchChecks([reads], 3)(x, {"level": torch.zeros(4, 2)})


def test_a_multilabel_target_outside_zero_one_is_refused_as_bce_would_misread_it():
    """helper-80: 0/255 multilabel targets trained at a BCE of -252.9 (BCE with logits is unbounded below for a label
    above 1 or below 0). Labels are 0/1 or soft in [0, 1], of any number type; NaN is missing. Never resampled, so
    no slack."""
    from automtl.data.checks import BatchChecks
    from automtl.losses import MultilabelLoss

    x = torch.zeros(4, 3, 8, 8)
    checks = BatchChecks([Task("tags", "multilabel", classes=3)], 3)
    ok = torch.tensor([[0.0, 1.0, float("nan")], [1.0, 0.0, 0.0], [0.2, 0.9, 1.0], [0.0, 0.0, 0.0]])
    checks(x, {"tags": ok})
    for dtype in (torch.uint8, torch.int64, torch.bool):
        checks(x, {"tags": ok.nan_to_num().round().to(dtype)})
    assert float(MultilabelLoss()(torch.full((4, 3), 30.0), ok.nan_to_num().round() * 255)) < 0  # what it trained on
    for bad in (ok.nan_to_num() * 255, ok.nan_to_num() * 2 - 1, ok + 0.01, (ok.nan_to_num() * 255).to(torch.uint8)):
        with pytest.raises(DataError, match=r"target 'tags' \(multilabel\) of training data holds values from -?[\d.]+ to "
                                            r"[\d.]+, outside the \[0, 1\] of a multilabel target; for 0/255 labels "
                                            r"divide by 255, for -1/1 labels take \(y \+ 1\) / 2"):
            checks(x, {"tags": bad})


def test_a_too_wide_regression_target_names_the_class_count_that_fits_it():
    from automtl.data.checks import BatchChecks

    with pytest.raises(DataError, match=r"a regression target is \(B, 1\) or \(B\); for 2 outputs a sample give the "
                                        r"task classes=2 \(--task level:regression:2\), else reshape it"):
        BatchChecks([Task("level", kind="regression")], 3)(torch.zeros(4, 3, 8, 8), {"level": torch.zeros(4, 2)})
