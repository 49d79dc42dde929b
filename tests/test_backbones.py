"""Builtin backbones: exact sizes, torchvision key layout, fx-traceability, and the registry's errors."""
from __future__ import annotations

import pickle
import re
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from automtl.backbones import (
    BACKBONES,
    TinyCNN,
    build_backbone,
    count_convs,
    count_parameters,
    list_backbones,
    load_weights,
)
from automtl.errors import AutomtlError, BackboneError

# name -> (params, Conv2d modules, output channels, output stride). Literal on purpose:
# these are torchvision's numbers minus the classifier, e.g. mnasnet1_0 has
# 4,383,312 params in torchvision, minus Linear(1280, 1000) = 1,281,000 -> 3,102,312.
EXPECTED = {
    "tiny": (28_944, 7, 32, 4),
    "resnet18": (11_176_512, 20, 512, 32),
    "resnet34": (21_284_672, 36, 512, 32),
    "resnet50": (23_508_032, 53, 2048, 32),
    "deeplab_resnet34": (21_284_672, 36, 512, 8),
    "mobilenet_v2": (2_223_872, 52, 1280, 32),
    "mnasnet1_0": (3_102_312, 52, 1280, 32),
    "vgg16_bn": (14_723_136, 13, 512, 32),
}

# Keys and shapes as they appear in torchvision's ImageNet checkpoints.
TORCHVISION_KEYS = {
    "resnet34": {"conv1.weight": (64, 3, 7, 7), "layer1.2.conv2.weight": (64, 64, 3, 3),
                 "layer2.0.downsample.0.weight": (128, 64, 1, 1), "layer4.0.downsample.1.running_var": (512,)},
    "resnet50": {"layer1.0.downsample.0.weight": (256, 64, 1, 1), "layer4.2.conv3.weight": (2048, 512, 1, 1)},
    "deeplab_resnet34": {"layer3.0.downsample.0.weight": (256, 128, 1, 1), "layer4.2.bn2.weight": (512,)},
    "mobilenet_v2": {"features.0.0.weight": (32, 3, 3, 3), "features.1.conv.0.0.weight": (32, 1, 3, 3),
                     "features.1.conv.1.weight": (16, 32, 1, 1), "features.2.conv.0.0.weight": (96, 16, 1, 1),
                     "features.17.conv.2.weight": (320, 960, 1, 1), "features.18.0.weight": (1280, 320, 1, 1)},
    "mnasnet1_0": {"layers.3.weight": (32, 1, 3, 3), "layers.8.0.layers.0.weight": (48, 16, 1, 1),
                   "layers.9.2.layers.3.weight": (120, 1, 5, 5), "layers.13.0.layers.6.weight": (320, 1152, 1, 1),
                   "layers.14.weight": (1280, 320, 1, 1), "layers.15.running_mean": (1280,)},
    "vgg16_bn": {"features.0.weight": (64, 3, 3, 3), "features.0.bias": (64,), "features.1.running_var": (64,),
                 "features.40.weight": (512, 512, 3, 3), "features.41.weight": (512,)},
}

_CACHE: dict = {}


def _model(name: str) -> nn.Module:
    """Build each builtin once per session: the big ones take ~0.5 s to initialise."""
    if name not in _CACHE:
        torch.manual_seed(0)
        _CACHE[name] = build_backbone(name).eval()
    return _CACHE[name]


def test_registry_lists_all_builtins_in_order():
    assert list(BACKBONES) == list(EXPECTED)
    specs = list_backbones()
    assert [s.name for s in specs] == list(EXPECTED)
    for s in specs:
        assert s.description and s.family and callable(s.factory)
        assert len(s.default_input) == 3 and s.default_input[0] == 3
    assert BACKBONES["tiny"].default_input == (3, 32, 32)
    assert BACKBONES["deeplab_resnet34"].family == "resnet"


def test_register_backbone_decorator_adds_and_refuses_a_taken_name():
    from automtl import register_backbone

    @register_backbone("test_only_net", description="a test net", default_input=(3, 16, 16))
    def test_only_net():
        return TinyCNN(width=2)

    try:
        spec = BACKBONES["test_only_net"]
        assert (spec.family, spec.default_input, spec.factory) == ("test_backbones", (3, 16, 16), test_only_net)
        assert isinstance(build_backbone("test_only_net"), TinyCNN)
        with pytest.raises(ValueError, match="taken"):
            register_backbone("test_only_net", description="another")(lambda: TinyCNN())
        with pytest.raises(ValueError, match="Python-style name"):
            register_backbone("no-dashes", description="x")
    finally:
        BACKBONES.pop("test_only_net", None)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_sizes_shape_and_fx_trace(name):
    params, convs, channels, stride = EXPECTED[name]
    m = _model(name)
    assert count_parameters(m) == params
    assert count_convs(m) == convs
    assert (m.out_channels, m.output_stride) == (channels, stride)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y = m(x)
        traced = torch.fx.symbolic_trace(m)
        yt = traced(x)
    assert y.shape == (1, channels, 64 // stride, 64 // stride)
    torch.testing.assert_close(yt, y, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(TORCHVISION_KEYS))
def test_torchvision_key_layout(name):
    sd = _model(name).state_dict()
    for key, shape in TORCHVISION_KEYS[name].items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith(("fc.", "classifier.", "avgpool")) for k in sd)


def test_deeplab_resnet34_takes_resnet34_weights_and_dilates():
    src, dst = _model("resnet34"), build_backbone("deeplab_resnet34")
    dst.load_state_dict(src.state_dict(), strict=True)
    assert (dst.layer3[0].conv1.stride, dst.layer3[0].conv1.dilation, dst.layer3[0].conv1.padding) == \
        ((1, 1), (2, 2), (2, 2))
    assert (dst.layer4[2].conv2.dilation, dst.layer4[2].conv2.padding) == ((4, 4), (4, 4))
    assert dst.layer4[0].downsample[0].stride == (1, 1)


def test_residual_only_where_shape_is_kept():
    mb = _model("mobilenet_v2")
    flags = [blk.use_res_connect for blk in list(mb.features)[1:-1]]
    assert flags == [False, False, True, False, True, True, False, True, True, True, False, True, True,
                     False, True, True, False]
    mn = _model("mnasnet1_0")
    assert [b.apply_residual for b in mn.layers[8]] == [False, True, True]


def test_tiny_width_argument():
    m = build_backbone("tiny", width=8)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 16, 8, 8)


def test_default_init_is_deterministic_and_torchvision_like():
    torch.manual_seed(1)
    a = build_backbone("tiny")
    torch.manual_seed(1)
    b = build_backbone("tiny")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert torch.all(a.stem[1].weight == 1) and torch.all(a.stem[1].bias == 0)


# ----------------------------------------------------------------------------- load_weights


def test_load_weights_round_trip_strips_prefix_and_ignores_classifier(tmp_path):
    src = build_backbone("tiny")
    sd = {"module." + k: v.clone() for k, v in src.state_dict().items()}
    sd["module.fc.weight"] = torch.zeros(10, 32)
    sd["module.fc.bias"] = torch.zeros(10)
    path = tmp_path / "w.pth"
    torch.save({"state_dict": sd, "epoch": 3}, path)
    dst = build_backbone("tiny")
    report = load_weights(dst, path)
    assert report["ignored"] == ["fc.weight", "fc.bias"]
    assert report["loaded"] == len(src.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_load_weights_model_key_and_missing_num_batches_tracked(tmp_path):
    """Old torchvision checkpoints have no num_batches_tracked and may be wrapped in 'model'."""
    src = build_backbone("tiny")
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    sd["classifier.1.weight"] = torch.zeros(3, 32)
    torch.save({"model": sd}, tmp_path / "w.pt")
    report = load_weights(build_backbone("tiny"), str(tmp_path / "w.pt"))
    assert report == {"loaded": len(sd) - 1, "ignored": ["classifier.1.weight"]}


def test_load_weights_errors(tmp_path):
    with pytest.raises(BackboneError, match="does not exist"):
        load_weights(build_backbone("tiny"), tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint")
    with pytest.raises(BackboneError, match="is not a torch.save file"):
        load_weights(build_backbone("tiny"), tmp_path / "junk.pth")
    torch.save({"w": torch.zeros(1), "obj": Path("x")}, tmp_path / "pickled.pth")  # not tensors only
    with pytest.raises(BackboneError) as info:
        load_weights(build_backbone("tiny"), tmp_path / "pickled.pth")
    assert "weights_only" not in str(info.value)  # torch's advice would be to unpickle it
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(BackboneError, match="not a state dict"):
        load_weights(build_backbone("tiny"), tmp_path / "list.pth")

    torch.save(build_backbone("tiny", width=8).state_dict(), tmp_path / "narrow.pth")
    with pytest.raises(BackboneError) as e:
        load_weights(build_backbone("tiny"), tmp_path / "narrow.pth")
    assert "shape mismatch" in str(e.value) and "stem.0.weight" in str(e.value)

    sd = build_backbone("tiny").state_dict()
    del sd["head.0.weight"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(BackboneError) as e:
        load_weights(build_backbone("tiny"), tmp_path / "partial.pth")
    assert "missing" in str(e.value) and "head.0.weight" in str(e.value)

    sd = build_backbone("tiny").state_dict()
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "extra.pth")
    with pytest.raises(BackboneError, match="unexpected key.*extra.weight"):
        load_weights(build_backbone("tiny"), tmp_path / "extra.pth")


# ----------------------------------------------------------------------------- build_backbone


def test_build_from_file_class_factory_and_instance(tmp_path):
    f = tmp_path / "my_net.py"
    f.write_text(textwrap.dedent("""
        from torch import nn

        class Net(nn.Module):
            def __init__(self, channels=4):
                super().__init__()
                self.conv = nn.Conv2d(3, channels, 3)

            def forward(self, x):
                return self.conv(x)

        def make(channels=2):
            return Net(channels)

        instance = Net(5)
        not_a_module = 42

        def returns_int():
            return 3
    """))
    assert build_backbone(f"{f}:Net").conv.out_channels == 4
    assert build_backbone(f"{f}:Net", channels=6).conv.out_channels == 6
    assert build_backbone(f"{f}:make").conv.out_channels == 2
    assert build_backbone(f"{f}:instance").conv.out_channels == 5

    with pytest.raises(BackboneError, match="not a torch.nn.Module"):
        build_backbone(f"{f}:returns_int")
    with pytest.raises(BackboneError, match="not a torch.nn.Module"):
        build_backbone(f"{f}:not_a_module")
    with pytest.raises(BackboneError) as e:
        build_backbone(f"{f}:Missing")
    assert "no attribute 'Missing'" in str(e.value) and "Net" in str(e.value) and "make" in str(e.value)
    with pytest.raises(BackboneError, match="does not accept"):
        build_backbone(f"{f}:Net", depth=3)
    with pytest.raises(BackboneError, match="instance"):
        build_backbone(f"{f}:instance", channels=3)


def test_build_from_module_path():
    m = build_backbone("automtl.backbones.tiny:TinyCNN", width=4)
    assert count_convs(m) == 7 and m.out_channels == 8
    assert count_parameters(build_backbone("automtl.backbones.resnet:resnet18")) == 11_176_512


def test_build_errors(tmp_path):
    with pytest.raises(BackboneError) as e:
        build_backbone("resnet35")
    assert "unknown backbone" in str(e.value) and "did you mean" in str(e.value) and "'resnet34'" in str(e.value)
    assert "mobilenet_v2" in str(e.value)  # the list of builtins
    with pytest.raises(BackboneError, match="did you mean 'deeplab_resnet34'\\?"):
        build_backbone("Deeplab-ResNet34")
    assert issubclass(BackboneError, AutomtlError)

    with pytest.raises(BackboneError, match="does not exist"):
        build_backbone(str(tmp_path / "missing.py") + ":Net")
    with pytest.raises(BackboneError, match="no class"):
        build_backbone(str(tmp_path / "net.py"))

    bad = tmp_path / "bad.py"
    bad.write_text("import no_such_package_xyz\n")
    with pytest.raises(BackboneError) as e:
        build_backbone(f"{bad}:Net")
    assert "failed to import" in str(e.value) and "no_such_package_xyz" in str(e.value)

    with pytest.raises(BackboneError) as e:
        build_backbone("no_such_package_xyz.nets:Net")
    assert "could not be imported" in str(e.value) and "ModuleNotFoundError" in str(e.value)

    with pytest.raises(BackboneError) as e:
        build_backbone("automtl.backbones.tiny:Nope")
    assert "no attribute 'Nope'" in str(e.value) and "TinyCNN" in str(e.value)

    with pytest.raises(BackboneError, match="does not accept"):
        build_backbone("resnet34", pretrained=True)
    with pytest.raises(BackboneError, match="building backbone"):
        build_backbone("tiny", width=-1)
    with pytest.raises(BackboneError, match="not a name"):
        build_backbone("")


def _with_pickle(path, pickle_bytes):
    """A torch.save archive whose pickle is ``pickle_bytes`` (its other entries as torch.save wrote them)."""
    import zipfile

    torch.save({}, path)
    with zipfile.ZipFile(path) as z:
        entries = {i.filename: z.read(i) for i in z.infolist()}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries.items():
            z.writestr(name, pickle_bytes if name.endswith("data.pkl") else data)
    return path


def test_a_pickle_that_shares_or_holds_itself_is_counted_from_its_opcodes(tmp_path):
    """torch's tensors-only unpickler hashes a dict key as it builds it: a tuple key shared 40 levels deep
    ((t, t), then ((t, t), (t, t)), ...) is 2^40 hashes inside torch.load, about 9 hours from 200 bytes (depth 28
    took 8 s). The opcodes are counted before torch reads them; a list holding itself is refused too."""
    from automtl.fileio import load_tensors, pickle_values

    def tuple_key(depth):
        ops = b"\x80\x02K\x01\x85q\x00" + b"h\x00h\x00\x86q\x00" * depth  # (1,), then (t, t) in memo 0
        return ops + b"}h\x00K\x01s."  # {t: 1}

    with pytest.raises(BackboneError, match="uses a container as a dict key"):  # refused as a key, whatever its size
        load_tensors(_with_pickle(tmp_path / "k.pt", tuple_key(40)), "weights file", BackboneError, "fix")
    shared = b"\x80\x02K\x01\x85q\x00" + b"h\x00h\x00\x86q\x00" * 3 + b"."  # (1,), then (t, t) three times
    assert pickle_values(shared) == 2 ** 4 - 1 + 2 ** 3  # the tuples, and the leaves of the innermost one
    loop = []
    loop.append(loop)
    torch.save({"w": loop}, tmp_path / "loop.pt")
    with pytest.raises(BackboneError, match="or a container holding itself"):
        load_tensors(tmp_path / "loop.pt", "weights file", BackboneError, "fix")
    assert pickle_values(b"\x80\x02cos\nsystem\n.") == 1 and pickle_values(b"\x80\x04\x95") is None
    chain = b"\x80\x02]q\x00" + b"]q\x01(h\x00h\x00eq\x00" * 3000 + b"h\x00."  # v = [v, v] 3000 times: counts capped
    assert pickle_values(chain, cap=100) == 100


@pytest.mark.parametrize("case, says", [
    ("bytearray", "calls builtins.bytearray"), ("legacy tensor", "calls torch.FloatTensor"),
    ("colliding keys", "an integer beyond int64 as a dict key"), ("tuple key", "a container as a dict key"),
    ("upper-case name", "more than 4194304 values"), ("device rebuild", "calls torch._utils._rebuild_device_tensor")])
def test_a_pickle_that_builds_more_than_the_file_holds_is_refused_before_torch_reads_it(tmp_path, case, says):
    """torch's tensors-only unpickler calls bytearray(n) and the legacy torch.FloatTensor(n) (an 890-byte file built
    1.25 GB), builds dicts whose keys all hash alike (integers 1 + k (2^61 - 1), tuples of -1 and -2: 40,000 took
    23 s, quadratically more), and reads an archive's pickle under any case of its name (``DATA.PKL`` skipped every
    check). Refused from the opcodes."""
    import struct
    import zipfile

    from automtl.fileio import load_tensors

    big = struct.pack("<i", 2**30)
    pickles = {"bytearray": b"\x80\x02cbuiltins\nbytearray\nJ" + big + b"\x85R.",
               "legacy tensor": b"\x80\x02ctorch\nFloatTensor\nJ" + big + b"\x85R.",
               "colliding keys": b"\x80\x02}(" + b"".join(
                   b"\x8a\x09" + (1 + k * (2**61 - 1)).to_bytes(9, "little") + b"K\x00" for k in range(8, 12)) + b"u.",
               "tuple key": b"\x80\x02}J\xff\xff\xff\xffJ\xfe\xff\xff\xff\x86K\x00s.",
               "upper-case name": b"\x80\x02]q\x00" + b"]q\x01(h\x00h\x00eq\x00" * 30 + b"h\x00.",
               # writes a stride-0 view of one byte out as 2^30 float64 inside torch.load (helper-74: 1.2 KB -> 8.4 GB)
               "device rebuild": b"\x80\x02ctorch._utils\n_rebuild_device_tensor_from_cpu_tensor\n)R."}
    path = _with_pickle(tmp_path / "w.pt", pickles[case])
    if case == "upper-case name":
        with zipfile.ZipFile(path) as z:
            entries = {i.filename: z.read(i) for i in z.infolist()}
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            for name, data in entries.items():
                z.writestr(name.replace("data.pkl", "DATA.PKL"), data)
    with pytest.raises(BackboneError, match=says):
        load_tensors(path, "weights file", BackboneError, "fix")


@pytest.mark.parametrize("layout", ["sparse", "nested"])
def test_a_sparse_or_nested_tensor_in_a_weights_file_is_one_sentence(tmp_path, layout):
    """They raised NotImplementedError / RuntimeError tracebacks past the checks (helper-74)."""
    from automtl.fileio import load_tensors

    value = torch.eye(3).to_sparse() if layout == "sparse" else torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    torch.save({"w": value}, tmp_path / "w.pt")
    with pytest.raises(BackboneError, match=f"calls torch._utils._rebuild_{layout}"):
        load_tensors(tmp_path / "w.pt", "weights file", BackboneError, "fix")


def test_weights_of_another_kind_of_number_are_refused_and_of_another_precision_cast(tmp_path):
    """load_state_dict casts what it copies: integer or bool tensors loaded into float weights without a word."""
    state = build_backbone("tiny").state_dict()
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, tmp_path / "half.pt")
    assert load_weights(build_backbone("tiny"), tmp_path / "half.pt")["loaded"] == len(state)
    name = next(k for k, v in state.items() if v.is_floating_point())
    for dtype in (torch.int64, torch.bool):
        torch.save({**state, name: state[name].to(dtype)}, tmp_path / "w.pt")
        with pytest.raises(BackboneError, match=rf"1 tensor\(s\) of another kind of number such as {re.escape(name)} "
                                                rf"{str(dtype)[6:]} vs float32 \(file vs model\); use weights saved"):
            load_weights(build_backbone("tiny"), tmp_path / "w.pt")


def test_a_meta_tensor_in_a_tensor_file_is_one_sentence(tmp_path):
    """torch.load leaves a meta tensor on the meta device: as Adam's exp_avg in a checkpoint it passed the shape and
    dtype checks and failed inside Optimizer.load_state_dict (helper-74); as a weight, inside load_state_dict."""
    from automtl.fileio import load_tensors

    torch.save({"w": torch.zeros(2), "state": {0: {"exp_avg": torch.empty(3, device="meta")}}}, tmp_path / "c.pt")
    with pytest.raises(BackboneError, match=r"holds a tensor on the meta device, without values on the CPU .*; fix$"):
        load_tensors(tmp_path / "c.pt", "checkpoint", BackboneError, "fix")


def test_weights_files_are_read_under_bounds(tmp_path):
    """Only the zip torch.save writes, every entry stored: a deflated one (16 MB of zeros in a 20 KB file here) is
    refused before torch inflates it, and so is a file over the size bound, before it is read, or a pickle over
    its own bound (unpickled objects cost several times their bytes)."""
    from automtl.fileio import load_tensors
    from conftest import deflate

    path = tmp_path / "w.pth"
    torch.save({"w": torch.zeros(2**22)}, path)
    deflate(path)
    assert path.stat().st_size < 2**16
    with pytest.raises(BackboneError, match="compressed or encrypted"):
        load_weights(build_backbone("tiny"), path)
    torch.save(build_backbone("tiny").state_dict(), path)
    with pytest.raises(BackboneError, match="more than the 1000 automtl reads"):
        load_tensors(path, "weights file", BackboneError, "fix", max_bytes=1000)
    assert load_weights(build_backbone("tiny"), path)["loaded"] > 0
    import automtl.fileio

    automtl.fileio.MAX_TENSOR_PICKLE_BYTES, bound = 100, automtl.fileio.MAX_TENSOR_PICKLE_BYTES
    try:
        with pytest.raises(BackboneError, match="byte pickle, more than the 100"):
            load_weights(build_backbone("tiny"), path)
    finally:
        automtl.fileio.MAX_TENSOR_PICKLE_BYTES = bound
    torch.save({"exp_avg": torch.zeros(1).expand(2**30)}, path)  # 2^30 elements over 4 stored bytes
    assert path.stat().st_size < 2**12
    with pytest.raises(BackboneError, match=r"a tensor of shape \(1073741824,\) over 4 stored bytes"):
        load_tensors(path, "weights file", BackboneError, "fix")
    torch.save({"w": torch.arange(10.0)[2:5]}, path)  # a slice: fewer elements than stored, fine
    assert load_tensors(path, "weights file", BackboneError, "fix")["w"].tolist() == [2.0, 3.0, 4.0]
    nested = torch.zeros(1)
    for _ in range(40):  # no state dict nests so deep; the readers' comparisons and copies recurse
        nested = [nested]
    torch.save({"w": nested}, path)
    with pytest.raises(BackboneError, match="nests containers deeper than 32 levels"):
        load_tensors(path, "weights file", BackboneError, "fix")
    shared = [torch.zeros(1)]
    for _ in range(30):  # pickle's memo: one list in two places, 30 times over, is 2^30 values in 1.7 KB
        shared = [shared, shared]
    torch.save({"w": shared}, path)
    assert path.stat().st_size < 2**12
    with pytest.raises(BackboneError, match="more than 4194304 values once the parts it shares are counted"):
        load_tensors(path, "weights file", BackboneError, "fix")  # was minutes walking it, before any other check
    torch.save({"w": shared[0][0][0][0][0][0][0][0][0][0][0][0][0][0]}, path)  # 2^16 copies of a tensor: within the bound
    w = load_tensors(path, "weights file", BackboneError, "fix")["w"]
    while isinstance(w, list):
        w = w[-1]
    assert w.shape == (1,)
    path.write_bytes(pickle.dumps({"w": 1}))  # not a zip: an older torch's format, or another program's
    with pytest.raises(BackboneError, match="an older torch's file or another program's"):
        load_tensors(path, "weights file", BackboneError, "fix")
