"""Hostile .pt2 archives: operators off the reviewed aten list, in-place/out= overloads, weights whose
entries do not hold the bytes their config declares, and layouts refused before any data is read.

Each hostile archive is a small edit of a file ``automtl.export`` wrote; none makes a large
allocation: the checks refuse it before ``torch.export.load`` (patched here to fail the test) runs.
"""
import io
import pathlib
import sys
import time
import zipfile

import pytest
import torch
from torch import nn

import automtl
from automtl.compact import compact
from automtl.errors import FileFormatError
from automtl.formats import load_pt2
from automtl.formats import pt2 as pt2_module
from automtl.policy import Policy
from automtl.supermodel import supermodel
from automtl.tasks import Task

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from zoo import ZOO  # noqa: E402

SIZE = 16
TASKS = [Task("segment", "segmentation", classes=3), Task("depth", "depth")]


def _model(backbone, policy="random", tasks=TASKS, size=SIZE):
    torch.manual_seed(0)
    sm = supermodel(backbone, tasks, torch.randn(1, 3, size, size)).eval()
    pol = Policy.random(sm.layer_names, sm.task_names, sm.skip_legal, seed=1) if policy == "random" else \
        Policy.uniform(sm.layer_names, sm.task_names, policy)
    return compact(sm, pol).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> bytes of a tiny model's .pt2, as automtl.export writes it."""
    path = tmp_path_factory.mktemp("pt2") / "model.pt2"
    automtl.export(_model("tiny"), path)
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


@pytest.fixture
def parts(exported):
    return dict(exported)


@pytest.fixture
def no_torch_load(monkeypatch):
    """torch.export.load fails the test: every hostile archive here must be refused before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.export.load was reached")

    monkeypatch.setattr(torch.export, "load", refuse)


@pytest.fixture
def opened(monkeypatch):
    """The names of the zip entries opened (decompressed) while the test runs."""
    names = []
    original = zipfile.ZipFile.open

    def spy(self, name, mode="r", *args, **kwargs):
        if mode == "r":  # writing a test archive opens its entries for writing
            names.append(name.filename if isinstance(name, zipfile.ZipInfo) else name)
        return original(self, name, mode, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    return names


def _write(path, parts, compress=None):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in parts.items():
            if compress and compress(name):
                zf.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
            else:
                zf.writestr(name, data)
    return path


from test_hostile_files import _json_edit as _edit_json, _rel as _name  # noqa: E402  (the .automtl cases' helpers)


def _nodes(program):
    return program["graph_module"]["graph"]["nodes"]


def _retarget(parts, old_prefix, new_target, inputs=None):
    def change(program):
        node = next(n for n in _nodes(program) if n["target"].startswith(old_prefix))
        node["target"] = new_target
        if inputs is not None:
            node["inputs"] = inputs
    _edit_json(parts, "models/model.json", change)


def _refused(path, match):
    start = time.monotonic()
    with pytest.raises(FileFormatError, match=match) as info:
        load_pt2(path)
    assert time.monotonic() - start < 10, "refusal took long: did it decompress or allocate?"
    message = str(info.value)
    assert message.startswith(f"program file {str(path)!r}") and message.count(";") == 1, message
    return message


# ---------------------------------------------------------------------------------------
# operators: a closed list of aten packets, no in-place or out= overloads
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("shared", [False, True], ids=["read", "map-shared"])
def test_aten_from_file_is_refused_and_the_file_untouched(parts, tmp_path, no_torch_load, shared):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"the secret of 17b")
    _retarget(parts, "torch.ops.aten.relu.", "torch.ops.aten.from_file.default", [
        {"name": "filename", "arg": {"as_string": str(secret)}, "kind": 1},
        {"name": "shared", "arg": {"as_bool": shared}, "kind": 1},
        {"name": "size", "arg": {"as_int": 1 << 20 if shared else 17}, "kind": 1},
        {"name": "dtype", "arg": {"as_scalar_type": 1}, "kind": 2}])
    message = _refused(_write(tmp_path / "evil.pt2", parts), r"torch\.ops\.aten\.from_file\.default")
    assert "not among the aten operators automtl loads" in message
    assert secret.read_bytes() == b"the secret of 17b"


@pytest.mark.parametrize("target", [
    "torch.ops.aten._print.default",
    "torch.ops.aten.save.default",
    "torch.ops.aten.as_strided.default",
    "torch.ops.aten.empty.memory_format",
    "torch.ops.aten._unsafe_index.Tensor",
    "torch.ops.aten._local_scalar_dense.default",
    "torch.ops.aten.relu.no_such_overload",
    "torch.ops.aten.no_such_op.default",
    "torch.ops.aten.relu",
    "torch.ops.aten.relu.default.extra",
    "torch.ops.evil.run.default",
    "builtins.eval",
    # storage and in-place operators
    "torch.ops.aten.set_.source_Storage",
    "torch.ops.aten.resize_.default",
    "torch.ops.aten.relu_.default",
    "torch.ops.aten.add_.Tensor",
])
def test_operators_off_the_list_are_refused(parts, tmp_path, no_torch_load, target):
    _retarget(parts, "torch.ops.aten.relu.", target)
    message = _refused(_write(tmp_path / "evil.pt2", parts), "is not among the aten operators automtl loads")
    assert target[:80] in message


@pytest.mark.parametrize("target", [
    "torch.ops.aten.relu.out",
    "torch.ops.aten.add.out",
    "torch.ops.aten.add.Scalar_out",
    "torch.ops.aten.upsample_bilinear2d.vec_out",
    "torch.ops.aten.max.dim_max",  # an out= overload by its schema, not by its name
])
def test_out_overloads_of_listed_packets_are_refused(parts, tmp_path, no_torch_load, target):
    _retarget(parts, "torch.ops.aten.relu.", target)
    _refused(_write(tmp_path / "evil.pt2", parts), r"an in-place or out= overload")


@pytest.mark.parametrize("arg", [
    {"as_operator": "torch.os.system"},  # torch walks the attribute path from torch, math or _operator
    {"as_operator": "torch.sys.modules"},
    {"as_graph": {"graph": {}, "signature": {}}},
    {"as_custom_obj": {"name": "x", "class_fqn": "os.system"}},
    {"as_string_to_argument": {"a": {"as_operator": "math.pi"}}},
])
def test_arguments_that_torch_resolves_to_objects_are_refused(parts, tmp_path, no_torch_load, arg):
    def change(program):
        conv = next(n for n in _nodes(program) if n["target"].startswith("torch.ops.aten.conv2d."))
        next(i for i in conv["inputs"] if i["name"] == "bias")["arg"] = arg
    _edit_json(parts, "models/model.json", change)
    message = _refused(_write(tmp_path / "evil.pt2", parts), "has an argument of kind")
    assert next(iter(arg)) in message


@pytest.mark.parametrize("metadata", [
    {"source_fn_stack": "a,torch.os.system"},  # resolved like as_operator
    {"stack_trace": "", "unknown": "x"},
    ["stack_trace"],
])
def test_node_metadata_off_the_list_is_refused(parts, tmp_path, no_torch_load, metadata):
    def change(program):
        _nodes(program)[0]["metadata"] = metadata
    _edit_json(parts, "models/model.json", change)
    _refused(_write(tmp_path / "evil.pt2", parts), "has node metadata")


def test_the_list_is_reviewed_aten_packets_without_file_or_storage_access():
    allowed = pt2_module.ALLOWED_ATEN_OPERATORS
    assert isinstance(allowed, frozenset) and 100 < len(allowed) < 250
    for packet in allowed:
        op = getattr(torch.ops.aten, packet, None)
        assert op is not None, packet
        assert not packet.endswith("_"), packet
        assert any(not getattr(op, o)._schema.is_mutable for o in op.overloads()), packet
    for forbidden in ("from_file", "set_", "resize_", "_print", "save", "load", "as_strided", "empty", "empty_like",
                      "empty_strided", "new_empty", "_unsafe_index", "_unsafe_index_put", "item", "_local_scalar_dense",
                      "nonzero", "copy_", "index_put_", "_native_batch_norm_legit", "native_batch_norm"):
        assert forbidden not in allowed, forbidden


# ---------------------------------------------------------------------------------------
# weights and constants: each entry holds exactly the bytes its sizes and dtype need
# ---------------------------------------------------------------------------------------
def _edit_first_weight(parts, change_meta, data=None):
    def change(cfg):
        fqn = next(iter(cfg["config"]))
        meta = cfg["config"][fqn]
        change_meta(meta["tensor_meta"])
        if data is not None:
            parts[_name(parts, "data/weights/" + meta["path_name"])] = data
    _edit_json(parts, "_weights_config.json", change)


def _sizes(*ns):
    return [{"as_int": n} for n in ns]


def test_empty_weight_entry_declaring_a_huge_tensor_is_refused_without_allocating(parts, tmp_path, no_torch_load):
    def huge(tm):
        tm["sizes"], tm["strides"] = _sizes(100000, 100000), _sizes(100000, 1)
    _edit_first_weight(parts, huge, data=b"")
    _refused(_write(tmp_path / "evil.pt2", parts), r"declares 4000[0-9]{7} bytes of weights and constants, more than")


def test_empty_weight_entry_of_a_plausible_tensor_is_refused(parts, tmp_path, no_torch_load):
    _edit_first_weight(parts, lambda tm: None, data=b"")  # torch would load zeros in its place
    _refused(_write(tmp_path / "evil.pt2", parts), r"holds 0 bytes in .*weight_0.* need 1728")


def test_weight_whose_sizes_do_not_match_its_bytes_is_refused(parts, tmp_path, no_torch_load):
    _edit_first_weight(parts, lambda tm: tm["sizes"][0].__setitem__("as_int", 32))  # 16 -> 32 output channels
    _refused(_write(tmp_path / "evil.pt2", parts), r"holds 1728 bytes in .*weight_0.* need 3456")


def test_weight_of_another_dtype_is_refused(parts, tmp_path, no_torch_load):
    _edit_first_weight(parts, lambda tm: tm.__setitem__("dtype", 8))  # float64: 3456 bytes needed
    _refused(_write(tmp_path / "evil.pt2", parts), r"holds 1728 bytes .* need 3456")


@pytest.mark.parametrize("change", [
    lambda tm: tm.__setitem__("sizes", _sizes(-16, 3, 3, 3)),
    lambda tm: tm.__setitem__("sizes", [{"as_int": True}, {"as_int": 3}, {"as_int": 3}, {"as_int": 3}]),
    lambda tm: tm.__setitem__("sizes", [{"as_expr": {"expr_str": "s0"}}] + _sizes(3, 3, 3)),
    lambda tm: tm.__setitem__("sizes", [{"as_int": 16.0}] + _sizes(3, 3, 3)),
    lambda tm: tm.__setitem__("sizes", _sizes(*[1] * 40)),
    lambda tm: tm.__setitem__("strides", _sizes(27, 9, 3)),
    lambda tm: tm.__setitem__("strides", _sizes(27, 9, 3, -1)),
    lambda tm: tm.__setitem__("storage_offset", {"as_int": -5}),
    lambda tm: tm.__setitem__("sizes", _sizes(2**50, 1, 1, 1)),
    lambda tm: tm.__setitem__("dtype", 0),
    lambda tm: tm.__setitem__("dtype", 999),
    lambda tm: tm.__setitem__("dtype", "float32"),
    lambda tm: tm.clear(),
], ids=["negative", "bool", "symbolic", "float", "too-many-dims", "stride-count", "negative-stride", "negative-offset",
        "beyond-bound", "unknown-dtype", "no-such-dtype", "dtype-string", "no-meta"])
def test_malformed_tensor_meta_is_refused(parts, tmp_path, no_torch_load, change):
    _edit_first_weight(parts, change)
    _refused(_write(tmp_path / "evil.pt2", parts), r"describes .* (with a dtype|without a tensor_meta)")


def test_config_naming_a_missing_entry_is_refused(parts, tmp_path, no_torch_load):
    del parts[_name(parts, "data/weights/weight_0")]
    _refused(_write(tmp_path / "evil.pt2", parts), r"lacks the entry 'data/weights/weight_0'")


# ---------------------------------------------------------------------------------------
# layout: checked on the zip directory, before any entry is decompressed
# ---------------------------------------------------------------------------------------
def _root(parts):
    return _name(parts, "archive_format")[:-len("archive_format")]


def test_extra_entry_is_refused_before_any_entry_is_read(parts, tmp_path, no_torch_load, opened):
    parts[_root(parts) + "extra/bomb"] = bytes(64 * 2**20)  # 64 MiB of zeros, about 64 KiB deflated
    path = _write(tmp_path / "evil.pt2", parts, compress=lambda n: n.endswith("bomb"))
    assert path.stat().st_size < 2**20
    _refused(path, r"holds entries a plain export does not have \('extra/bomb'\)")
    assert opened == []


def test_many_small_bombs_are_refused_before_any_entry_is_read(parts, tmp_path, no_torch_load, opened):
    for k in range(3000):  # the file stays small; decompressed they would be 3000 x 64 KiB
        parts[_root(parts) + f"p{k}"] = bytes(65536)
    _refused(_write(tmp_path / "evil.pt2", parts, compress=lambda n: "/p" in n), "holds entries a plain export does not have")
    assert opened == []


def test_unreferenced_weight_entries_are_refused_before_any_tensor_entry_is_read(parts, tmp_path, no_torch_load, opened):
    for k in range(1000, 3000):  # names a plain export writes, but no config names them
        parts[_root(parts) + f"data/weights/weight_{k}"] = bytes(65536)
    _refused(_write(tmp_path / "evil.pt2", parts, compress=lambda n: "weight_" in n),
             r"holds entries a plain export does not have \('data/weights/weight_1000'")
    assert opened and all(n.endswith((".json", "archive_format")) for n in opened), opened


@pytest.mark.parametrize("where, match", [
    ("other_root/archive_format", "one root folder"),
    ("top_level_file", "one root folder"),
    ("{root}data/weights/model.pt", "a plain export does not have"),
    ("{root}data/aotinductor/model/model.so", "a plain export does not have"),
    ("{root}extra/readme.txt", "a plain export does not have"),
    ("{root}data/weights/../../../x", "a plain export does not have"),
    ("{root}models/", "a plain export does not have"),
])
def test_entries_outside_the_layout_are_refused_unread(parts, tmp_path, no_torch_load, opened, where, match):
    parts[where.format(root=_root(parts))] = b"\x7fELF" if where.endswith(".so") else b"x"
    _refused(_write(tmp_path / "evil.pt2", parts), match)
    assert opened == []


def test_pickled_sample_inputs_are_refused_unread(parts, tmp_path, no_torch_load, opened):
    parts[_name(parts, "sample_inputs/model.pt")] = b"\x80\x04 not read"
    _refused(_write(tmp_path / "evil.pt2", parts), r"holds pickled sample inputs")
    assert opened == []


def test_oversized_marker_is_refused_unread(parts, tmp_path, no_torch_load, opened):
    parts[_name(parts, "archive_version")] = b"1" * 100_000
    _refused(_write(tmp_path / "evil.pt2", parts), r"declares 100000 bytes for 'archive_version'")
    assert opened == []


def test_json_entry_over_its_cap_is_refused_unread(parts, tmp_path, no_torch_load, opened, monkeypatch):
    monkeypatch.setattr(pt2_module, "_MAX_JSON", 1000)
    _refused(_write(tmp_path / "evil.pt2", parts), r"declares \d+ bytes for '(models|data/weights)/\w+\.json'")
    assert opened == []


# ---------------------------------------------------------------------------------------
# what automtl.export writes still loads, and computes the same
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, policy", [
    ("tiny", "share"), ("tiny", "random"), ("resnet18", "random"), ("mobilenet_v2", "share"),
    ("zoo:shufflenet", "random"), ("zoo:pyramid", "random"), ("zoo:tied", "share"), ("zoo:convnext", "random"),
    ("zoo:batch_size", "random"),
])
def test_exports_still_load_and_compute_the_same(name, policy, tmp_path):
    backbone = ZOO[name[4:]]() if name.startswith("zoo:") else name
    model = _model(backbone, policy)
    path = tmp_path / "model.pt2"
    automtl.export(model, path)
    program = load_pt2(path)
    for batch in (1, 3):
        x = torch.randn(batch, 3, SIZE, SIZE)
        got = program.module()(x)
        with torch.no_grad():
            want = model(x)
        assert list(got) == list(want)
        for task in want:
            torch.testing.assert_close(got[task], want[task], rtol=1e-5, atol=1e-5, msg=f"{name}: {task}")


# ---------------------------------------------------------------------------------------
# what a program of listed operators asks for when it runs: a bounded dry run on the meta device
# ---------------------------------------------------------------------------------------
class _Allocates(nn.Module):
    def forward(self, x):
        big = torch.full((2**17, 2**17), 1.0)  # 64 GiB of float32 when it runs
        return {"depth": x + big[:1, :1].sum()}


class _Computes(nn.Module):
    def forward(self, x):
        m = x.sum().reshape(1, 1).expand(2**13, 2**13)  # no memory; each product 1e12 FLOPs
        for _ in range(8):
            m = torch.mm(m, m)[:2**13, :2**13]
        return {"depth": x + m[:1, :1].sum()}


@pytest.mark.parametrize("program, match", [(_Allocates, "are alive at once"),
                                            (_Computes, "FLOPs a sample")])
def test_a_program_asking_for_unbounded_memory_or_compute_is_refused_before_it_runs(tmp_path, program, match):
    from automtl.formats.pt2 import _without_sample_inputs

    exported = torch.export.export(program(), (torch.randn(2, 3, 8, 8),), strict=False)
    buf = io.BytesIO()
    torch.export.save(exported, buf)
    path = tmp_path / "bomb.pt2"
    path.write_bytes(_without_sample_inputs(buf.getvalue()))
    _refused(path, match)  # within seconds: the dry run's factories make meta tensors, whatever device they name


class _FourAlive(nn.Module):
    """Four activations of 3 * 2^26 elements alive at once (a, b, c and a + b): 3 GiB of float32, within the bound;
    6 GiB of float64, not."""

    def __init__(self, dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, x):
        a = x.sum().to(self.dtype).reshape(1).expand(3 * 2**26) + 1
        b, c = a * 2, a * 3
        return {"depth": x + (a + b + c)[:1].sum().float()}


def test_what_is_alive_at_once_is_bounded_in_bytes_not_elements(tmp_path):
    """helper-75: the bound counted elements, so float64 activations (and the input a float64 convolution unfolds,
    7.2 GB) had twice the memory of float32 ones; they count twice now."""
    from automtl.formats.pt2 import _without_sample_inputs

    for dtype, path in ((torch.float32, tmp_path / "f32.pt2"), (torch.float64, tmp_path / "f64.pt2")):
        exported = torch.export.export(_FourAlive(dtype), (torch.randn(2, 3, 8, 8),), strict=False)
        buf = io.BytesIO()
        torch.export.save(exported, buf)
        path.write_bytes(_without_sample_inputs(buf.getvalue()))
    automtl.load_pt2(tmp_path / "f32.pt2")  # checked on the meta device: nothing of its 3 GiB is made
    _refused(tmp_path / "f64.pt2", r"after which \d+ activation elements \(counted as float32 ones, a float64 one "
                                   r"twice, .*\) are alive at once, more than the 1073741824")


def _saved_program(module, path, decompose=False):
    from automtl.formats.pt2 import _without_sample_inputs

    exported = torch.export.export(module, (torch.randn(2, 3, 8, 8),), strict=False,
                                   dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    if decompose:
        exported = exported.run_decompositions({})
    buf = io.BytesIO()
    torch.export.save(exported, buf)
    path.write_bytes(_without_sample_inputs(buf.getvalue()))
    return path


class _InHalf(nn.Module):
    def forward(self, x):  # 1.9e12 FLOPs, under the bound in float32 FLOPs; two hours of one core in float16
        m = x.sum().reshape(1, 1).expand(2048, 2048).half()
        for _ in range(110):
            m = torch.mm(m, m)
        return {"depth": x + m[:1, :1].sum().float()}


def test_half_precision_products_count_for_what_they_cost_on_a_cpu(tmp_path):
    _refused(_saved_program(_InHalf(), tmp_path / "half.pt2"), "of them float16/bfloat16 FLOPs, counted 8 times")


class _Mutates(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros(1))

    def forward(self, x):
        x.mul_(0)  # the caller's images, zeroed
        self.count.add_(1)  # another output each call
        return {"depth": x.mean(1, keepdim=True) + self.count}


def test_a_program_that_writes_its_buffers_or_its_input_is_refused(tmp_path):
    """Listed operators, functionalised by torch.export, with the writes declared in the signature: loaded, each call
    zeroed the caller's tensor and gave another output for the same input."""
    _refused(_saved_program(_Mutates(), tmp_path / "mutates.pt2", decompose=True), "declares an output of kind")


class _Indexes(nn.Module):
    def __init__(self, positions=(0, 2, 1)):
        super().__init__()
        self.register_buffer("idx", torch.tensor(positions))
        self.table = nn.Parameter(torch.randn(5, 1))

    def forward(self, x):
        picked = torch.index_select(x, 1, self.idx) + self.table[self.idx.view(-1)].sum()
        return {"depth": torch.gather(picked, 1, self.idx[:1].view(1, 1, 1, 1).expand(x.shape[0], 1, 8, 8))}


class _IndexesByData(nn.Module):
    def __init__(self, shift=0):
        super().__init__()
        self.shift = shift

    def forward(self, x):
        picked = x.argmax(1, keepdim=True)  # in range by construction; shifted, only the data knows
        return {"depth": torch.gather(x, 1, (picked + self.shift) if self.shift else picked.flip(2))}


def test_index_tensors_are_checked_at_load_against_what_they_index(tmp_path):
    """The dry run sees shapes, not values: an index buffer pointing past its dimension loaded and failed inside torch
    at the first call. Indices computed from the weights and buffers are computed at load and checked; indices
    computed from the input are refused (only the data decides whether they are in range)."""
    good = _saved_program(_Indexes(), tmp_path / "good.pt2")
    x = torch.randn(3, 3, 8, 8)
    model = _Indexes()
    model.load_state_dict(dict(automtl.load_pt2(good).state_dict))
    torch.testing.assert_close(automtl.load_pt2(good).module()(x)["depth"], model(x)["depth"])
    bad = _Indexes()
    bad.idx[1] = 10**9  # as a crafted file would hold it
    _refused(_saved_program(bad, tmp_path / "bad.pt2"), r"positions 0 to 1000000000 of a dimension of size 3")
    _refused(_saved_program(_IndexesByData(shift=1), tmp_path / "data.pt2"), "with positions computed from its input")
    argmax = _saved_program(_IndexesByData(), tmp_path / "argmax.pt2")  # an argmax over the dimension it indexes
    torch.testing.assert_close(automtl.load_pt2(argmax).module()(x)["depth"], _IndexesByData()(x)["depth"])


class _ConstantChain(nn.Module):
    """Positions computed from a buffer through a chain of ``steps`` products of ``size`` elements each."""

    def __init__(self, steps, size, product=False):
        super().__init__()
        self.steps, self.size, self.product = steps, size, product
        self.register_buffer("idx", torch.zeros(1, dtype=torch.float32 if product else torch.long))

    def forward(self, x):
        if self.product:  # one square matrix product of a buffer expanded (a view: no memory)
            m = self.idx.reshape(1, 1).expand(self.size, self.size)
            return {"depth": torch.index_select(x, 1, torch.mm(m, m)[0, :1].long())}
        v = self.idx.expand(self.size)
        for _ in range(self.steps):
            v = v * 1
        return {"depth": torch.index_select(x, 1, v[:1])}


def test_positions_computed_from_constants_are_bounded_and_freed_after_their_last_use(tmp_path, monkeypatch):
    """The index check computes positions from the constants for real: it kept every value of a chain alive (a 16 KB
    file of twelve 2^27-element steps took 6.5 GB, which the dry run counted as two alive), and computed a product of
    any size the forward's FLOP budget allowed (one 8192^2 product: 15 s)."""
    import weakref

    from automtl.formats import pt2

    computed, most = [], 0
    real = pt2._constant_value

    def spy(*args):
        nonlocal most
        value = real(*args)
        if isinstance(value, torch.Tensor):
            computed.append(weakref.ref(value))
        most = max(most, sum(ref() is not None for ref in computed))
        return value

    monkeypatch.setattr(pt2, "_constant_value", spy)
    x = torch.randn(2, 3, 8, 8)
    path = _saved_program(_ConstantChain(12, 1000), tmp_path / "chain.pt2")
    torch.testing.assert_close(automtl.load_pt2(path).module()(x)["depth"], _ConstantChain(12, 1000)(x)["depth"])
    assert len(computed) >= 13 and most <= 3  # the buffer, the last value and the one being made: not all thirteen
    _refused(_saved_program(_ConstantChain(20, 2**24), tmp_path / "long.pt2"), r"reads and writes \d+ bytes, up to node "
             r"'mul_\d+', to compute the positions it indexes at from its constants, more than the 1073741824")
    _refused(_saved_program(_ConstantChain(1, 4096, product=True), tmp_path / "product.pt2"),
             r"computes the positions it indexes at with aten.mm.default at node 'mm', which automtl does not run")


class _ZerosIndex(nn.Module):
    def __init__(self, position=0):
        super().__init__()
        self.position = position

    def forward(self, x):
        at = torch.zeros(1, dtype=torch.long) + self.position
        return {"depth": torch.index_select(x, 1, at)}


def test_positions_are_values_on_the_cpu_at_or_above_zero_where_the_operator_needs(tmp_path):
    """helper-75: a factory edited to make its positions on the meta device raised a traceback from the check itself
    (Tensor.item() on a meta tensor); a position of -1 loaded (in range for aten.index, which reads it from the end)
    and index_select refused it at the first call; a stride-0 buffer cost 4 bytes on disk and its conversion
    to complex128 was counted as elements, not the 4 GiB it wrote."""
    path = _saved_program(_ZerosIndex(), tmp_path / "zeros.pt2")
    with zipfile.ZipFile(path) as zf:
        parts = {n: zf.read(n) for n in zf.namelist()}

    def on_meta(program):
        zeros = next(n for n in _nodes(program) if n["target"].startswith("torch.ops.aten.zeros."))
        for argument in zeros["inputs"]:
            if "as_device" in argument["arg"]:
                argument["arg"]["as_device"] = {"type": "meta", "index": None}
    _edit_json(parts, "models/model.json", on_meta)
    _refused(_write(tmp_path / "meta.pt2", parts), "makes at node 'zeros' positions that are not values on the CPU")
    _refused(_saved_program(_ZerosIndex(-1), tmp_path / "negative.pt2"),
             "indexes at node 'index_select' positions -1 to -1 of a dimension of size 3")

    class Stride0(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("zero", torch.zeros(1).expand(2**26))  # saved as one element

        def forward(self, x):
            at = self.zero.double()[:1].long()  # 2^26 elements read, 2^26 of 8 bytes written, then read
            return {"depth": torch.index_select(x, 1, at)}

    _refused(_saved_program(Stride0(), tmp_path / "stride0.pt2"), r"reads and writes \d+ bytes, up to node '")


class _ArgmaxOfScaled(nn.Module):
    """Positions an argmax picks from the input, scaled by exp of a parameter on the way (a constant-only branch of
    an input-dependent chain), and positions from a buffer narrowed, split or chunked."""

    def __init__(self, layout):
        super().__init__()
        self.layout = layout
        self.conv = nn.Conv2d(3, 3, 1)
        self.log_scale = nn.Parameter(torch.zeros(1))
        self.table = nn.Parameter(torch.randn(3, 1, 8, 8))
        self.register_buffer("idx", torch.tensor([2, 0, 1, 1]))

    def forward(self, x):
        at = (self.conv(x) * self.log_scale.exp()).mean((2, 3)).argmax(1)
        if self.layout == "narrow":
            idx = self.idx.narrow(0, 0, 2)
        else:
            idx = self.idx.split(2)[1] if self.layout == "split" else self.idx.chunk(2)[0]
        return {"depth": self.table[at] + torch.index_select(x, 1, idx).mean(1, keepdim=True)}


@pytest.mark.parametrize("layout", ["narrow", "split", "chunk"])
def test_positions_from_the_input_or_laid_out_constants_still_load(tmp_path, layout):
    """helper-77: the first bounded version computed every ancestor of an index, an input-dependent one's constant
    branches too (exp of a parameter refused a model whose argmax the check lets through), and left narrow, split
    and chunk out of the operators it runs (refused; slicing loaded)."""
    model = _ArgmaxOfScaled(layout)
    path = _saved_program(model, tmp_path / f"{layout}.pt2")
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(automtl.load_pt2(path).module()(x)["depth"], model(x)["depth"])


class _PlainConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.plain = torch.linspace(0.0, 1.0, 3).view(1, 3, 1, 1)  # neither a parameter nor a buffer: a lifted constant

    def forward(self, x):
        return {"depth": (x * self.plain).mean(1, keepdim=True)}


def test_a_program_with_a_lifted_tensor_constant_loads(tmp_path):
    """The signature check names torch's serialized kinds: a tensor constant ("tensor_constant") is an input a
    loaded program may have (it was refused under a wrong name)."""
    path = _saved_program(_PlainConstant(), tmp_path / "constant.pt2")
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(automtl.load_pt2(path).module()(x)["depth"], _PlainConstant()(x)["depth"])


def test_export_warns_of_an_index_the_loader_will_refuse(tmp_path):
    """A head gathering at positions computed from its output exported without a word and was then refused by
    load_pt2: export runs the loader's checks on what it wrote."""
    class ArgmaxHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(32, 2, 1)

        def forward(self, f):
            y = self.conv(f)
            return torch.gather(y, 1, (y.argmax(1, keepdim=True) - 1).abs())  # in range, which only the data shows

    task = Task("picked", head=ArgmaxHead(), loss=lambda p, t: p.mean(), metric=lambda: None)
    sm = supermodel("tiny", [task], torch.randn(1, 3, 32, 32))
    with pytest.warns(UserWarning, match="with positions computed from its input, .* so automtl.load_pt2 will refuse .*"
                                         r"\(an .automtl bundle cannot describe this model either"):  # not "save one"
        automtl.export(compact(sm.eval(), Policy.uniform(sm.layer_names, sm.task_names, "share")), tmp_path / "m.pt2")


def test_a_factory_that_leaves_its_device_out_is_sized_on_meta_not_allocated(tmp_path):
    """torch's loader gives a factory without its device input the CPU: the dry run must not allocate it (2 GiB)."""
    import resource

    from automtl.formats.pt2 import _without_sample_inputs

    exported = torch.export.export(_Allocates(), (torch.randn(2, 3, 8, 8),), strict=False)
    buf = io.BytesIO()
    torch.export.save(exported, buf)
    parts = {}
    with zipfile.ZipFile(io.BytesIO(_without_sample_inputs(buf.getvalue()))) as zf:
        parts = {n: zf.read(n) for n in zf.namelist()}

    def change(program):
        full = next(n for n in _nodes(program) if n["target"].startswith("torch.ops.aten.full."))
        full["inputs"] = [i for i in full["inputs"] if i["name"] not in ("device", "pin_memory")]
    _edit_json(parts, "models/model.json", change)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _refused(_write(tmp_path / "bomb.pt2", parts), "are alive at once|producing")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 2**20  # KiB: less than 1 GiB grew


class _SameOutputTwice(nn.Module):
    def forward(self, x):
        y = _Computes().forward(x)["depth"]
        return {f"t{i}": y for i in range(200)}


def test_one_value_returned_for_many_tasks_gets_one_tasks_budget(tmp_path):
    from automtl.formats.pt2 import _without_sample_inputs

    exported = torch.export.export(_SameOutputTwice(), (torch.randn(2, 3, 8, 8),), strict=False)
    buf = io.BytesIO()
    torch.export.save(exported, buf)
    path = tmp_path / "many.pt2"
    path.write_bytes(_without_sample_inputs(buf.getvalue()))
    _refused(path, "FLOPs a sample")


class _GrowsFasterThanTheBatch(nn.Module):
    def forward(self, x):
        z = torch.zeros((x.shape[0] - 2) * 2**30 + 2, device=x.device)  # 2 elements at batch 2, 4 GiB at batch 3
        return {"depth": x + z.sum()}


def test_a_size_that_does_not_grow_in_proportion_to_the_batch_is_refused(tmp_path):
    """The dry runs run at two batch sizes; they bound the others only when every size is a multiple of the batch
    (here a size computed from the batch by a subtraction)."""
    from automtl.formats.pt2 import _without_sample_inputs

    exported = torch.export.export(_GrowsFasterThanTheBatch(), (torch.randn(2, 3, 8, 8),),
                                   dynamic_shapes=({0: torch.export.Dim("batch", min=2)},), strict=False)
    buf = io.BytesIO()
    torch.export.save(exported, buf)
    path = tmp_path / "grows.pt2"
    path.write_bytes(_without_sample_inputs(buf.getvalue()))
    _refused(path, "does not grow in proportion to the batch|computes a size from the batch")


def test_the_budget_grows_with_the_tasks_only_so_far(tmp_path):
    """A program picks its number of outputs: 256 of them would have bought 256 tasks' compute."""
    from automtl.formats.pt2 import _without_sample_inputs
    from automtl.formats.rebuild import MAX_TASK_BUDGETS

    class Many(nn.Module):
        def forward(self, x):
            m = x.sum().reshape(1, 1).expand(2**13, 2**13)
            for _ in range(5 * MAX_TASK_BUDGETS):  # 1.1e12 FLOPs each, 2.7x the capped budget a sample at batch 2
                m = torch.mm(m, m)
            return {f"t{i}": x + m[:1, :1].sum() + i for i in range(64)}

    exported = torch.export.export(Many(), (torch.randn(2, 3, 8, 8),), strict=False)
    buf = io.BytesIO()
    torch.export.save(exported, buf)
    path = tmp_path / "many.pt2"
    path.write_bytes(_without_sample_inputs(buf.getvalue()))
    _refused(path, f"FLOPs a sample.*for {MAX_TASK_BUDGETS} task")


class _CoordWeightNorm(nn.Module):
    """A coordinate map from linspace and a weight-normed conv: export wrote what load_pt2 refused."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        torch.nn.utils.parametrizations.weight_norm(self.c2)

    def forward(self, x):
        h, w = x.shape[-2:]
        pos = torch.linspace(-1, 1, h).view(1, 1, h, 1) * torch.linspace(-1, 1, w).view(1, 1, 1, w)
        return self.c2(torch.relu(self.c1(x)) + pos)


def test_what_export_writes_for_coordinate_maps_and_weight_norm_loads(tmp_path):
    import warnings

    sm = automtl.supermodel(_CoordWeightNorm(), TASKS, torch.randn(1, 3, SIZE, SIZE))
    policy = automtl.Policy.random(sm.layer_names, sm.task_names, sm.skip_legal, seed=0)
    c = compact(sm.hard(policy), policy).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "load_pt2 will refuse it"
        automtl.export(c, tmp_path / "m.pt2")
    x = torch.randn(3, 3, SIZE, SIZE)
    out = load_pt2(tmp_path / "m.pt2").module()(x)
    assert all(torch.allclose(out[t], c(x)[t], atol=1e-5) for t in c.task_names)


def test_shapes_the_file_declares_must_be_what_its_operations_make(parts, tmp_path):
    """The proportional-growth rule reads the shapes a file declares: a file declaring a shape its operations do not
    make (a bomb declared as 2 * batch) is refused by the dry runs, which compare them at two batch sizes."""
    def change(program):
        values = program["graph_module"]["graph"]["tensor_values"]
        relu = next(n for n in _nodes(program) if n["target"].startswith("torch.ops.aten.relu."))
        name = relu["outputs"][0]["as_tensor"]["name"]
        values[name]["sizes"][1] = {"as_int": values[name]["sizes"][1]["as_int"] + 1}
    _edit_json(parts, "models/model.json", change)
    _refused(_write(tmp_path / "lies.pt2", parts), "declares for node .* but its operations make")


def test_a_program_that_changes_shape_at_batch_one_is_refused(parts, tmp_path):
    """The dry runs at batches 2 and 3 bound every batch's sizes but saw nothing of batch 1, where ``squeeze(0)``
    drops the batch axis: a program could declare one computation and run another for a single image."""
    def squeeze(program):
        node = next(n for n in _nodes(program) if n["target"].startswith("torch.ops.aten.relu."))
        node["target"] = "torch.ops.aten.squeeze.dim"
        node["inputs"] = [node["inputs"][0], {"name": "dim", "arg": {"as_int": 0}, "kind": 1}]
    _edit_json(parts, "models/model.json", squeeze)
    _refused(_write(tmp_path / "evil.pt2", parts), r"at batch 1|at input shape \[1, ")


class _NewAxes(nn.Module):
    def __init__(self, dim=None):
        super().__init__()
        self.dim = dim
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3))

    def forward(self, x):
        y = x * self.scale[:, None, None]  # unsqueeze at the input's rank, twice
        y = torch.stack([y, -y], dim=4).amax(4)  # stack at the input's rank
        if self.dim is not None:  # one past what unsqueeze may name: what only a crafted file holds
            y = y.unsqueeze(self.dim).squeeze(self.dim)
        return {"depth": y.mean(1, keepdim=True)}


def test_operations_that_insert_an_axis_may_name_it_in_torch_and_in_aten_spelling(tmp_path):
    """The dimension check widened the rank of ``torch.unsqueeze``/``torch.stack`` only: the aten spelling of an
    exported program (``aten.unsqueeze.default``) was refused as crafted, so ``x[:, None]`` or ``stack(dim=x.dim())``
    in a backbone made its .pt2 unloadable."""
    x = torch.randn(3, 3, 8, 8)
    path = _saved_program(_NewAxes(), tmp_path / "axes.pt2")
    torch.testing.assert_close(automtl.load_pt2(path).module()(x)["depth"], _NewAxes()(x)["depth"])
    crafted = _NewAxes()
    crafted.dim = 4
    path = _saved_program(crafted, tmp_path / "crafted.pt2")
    with zipfile.ZipFile(path) as zf:
        parts = {n: zf.read(n) for n in zf.namelist()}
    edited = []

    def one_past(program):  # the unsqueeze at 4 of a 4-D tensor (legal) becomes one at 5 (no such axis)
        for node in _nodes(program):
            if node["target"].startswith("torch.ops.aten.unsqueeze") and node["inputs"][1]["arg"].get("as_int") == 4:
                node["inputs"][1]["arg"]["as_int"] = 5
                edited.append(node["target"])
    _edit_json(parts, "models/model.json", one_past)
    assert len(edited) == 1
    _refused(_write(path, parts), "whose dim 5 names no dimension of its 4-dimensional input")
