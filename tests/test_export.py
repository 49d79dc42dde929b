"""Files: the .automtl bundle (data, not code), the .pt2 and ONNX exports, and the accounting report."""
import functools
import hashlib
import inspect
import os
import subprocess
import sys
import textwrap
import warnings
import zipfile

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from automtl.backbones import build_backbone
from automtl.compact import META_CHOICE, META_LAYER, META_TASKS, compact
from automtl.errors import AutomtlError, FileFormatError
from automtl.formats import export, export_onnx, load, save
from automtl.formats.modules import MODULES
from automtl.policy import Policy
from automtl.report import compare, count_macs, format_inspect, inspect_text, model_stats
from automtl.supermodel import supermodel
from automtl.tasks import Task

SIZE = 32
TASKS = [Task("segment", "segmentation", classes=4), Task("depth", "depth"), Task("label", "classification", classes=5)]


@functools.lru_cache(maxsize=None)
def built(name):
    torch.manual_seed(0)
    return supermodel(build_backbone(name), TASKS, torch.randn(1, 3, SIZE, SIZE)).eval()


def random_model(name="tiny", seed=1):
    sm = built(name)
    pol = Policy.random(sm.layer_names, sm.task_names, sm.skip_legal, seed=seed)
    return compact(sm, pol).eval()


def outputs(model, x):
    with torch.no_grad():
        return model(x)


def entries(path):
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def write_bundle(path, parts, fix_checksums=True):
    """Write a bundle from raw parts; with fix_checksums, as a forger who knows the format would."""
    parts = dict(parts)
    if fix_checksums:
        parts["checksums"] = "".join(
            f"{hashlib.sha256(parts[n]).hexdigest()}  {n}\n" for n in ("model.yaml", "weights.safetensors")).encode()
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in parts.items():
            zf.writestr(name, data)


# ---------------------------------------------------------------------------------------
# .automtl round trip
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny", "resnet18", "mobilenet_v2"])
def test_bundle_round_trip(name, tmp_path):
    model = random_model(name, seed=3)
    path = tmp_path / "model.automtl"
    save(model, path)
    loaded = load(path)
    x = torch.randn(2, 3, SIZE, SIZE)
    want, got = outputs(model, x), outputs(loaded, x)
    assert list(got) == list(want)
    for t in want:
        assert torch.allclose(got[t], want[t], atol=1e-6, rtol=0), t
    # tasks and policy survive
    assert [(t.name, t.kind, t.classes, t.ignore_index) for t in loaded.tasks] == \
        [(t.name, t.kind, t.classes, t.ignore_index) for t in model.tasks]
    assert loaded.policy == model.policy and loaded.input_shape == model.input_shape == (1, 3, SIZE, SIZE)
    assert loaded.num_parameters() == model.num_parameters()
    # only torch.nn classes in the loaded module tree (containers are plain nn.Module)
    for qualname, m in loaded.graph_module.named_modules():
        if qualname:
            assert type(m) is nn.Module or getattr(nn, type(m).__name__, None) is type(m), (qualname, type(m))
    # the sharing meta survives, so render can draw a loaded model
    def sharing(gm):
        return {(n.meta[META_LAYER], n.meta[META_CHOICE], n.meta[META_TASKS]) for n in gm.graph.nodes if META_LAYER in n.meta}

    assert sharing(loaded.graph_module) == sharing(model.graph_module)
    assert all(isinstance(n.meta[META_TASKS], tuple) for n in loaded.graph_module.graph.nodes if META_TASKS in n.meta)
    # a subset of tasks still runs only its part
    assert torch.equal(outputs(loaded, x)["depth"], loaded(x, tasks=["depth"])["depth"].detach())


_BATCHNORM_INIT = nn.BatchNorm2d.__init__


def _batchnorm_init_of_torch_2_11(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                                  device=None, dtype=None):
    """BatchNorm2d's constructor before torch 2.13 gave it the keyword-only ``bias``."""
    _BATCHNORM_INIT(self, num_features, eps, momentum, affine, track_running_stats, device, dtype)


def test_a_bundle_is_read_and_written_by_a_torch_whose_norms_take_no_bias(tmp_path, monkeypatch):
    """Files move between torch releases: an argument torch added keyword-only (BatchNorm's ``bias``, 2.13) is not
    written at its default, so torch 2.11 reads this torch's files and writes its own (on 2.11 every save failed,
    since its read-back refused ``bias``); a file that needs the argument is one sentence asking for a newer torch."""
    model = random_model("resnet18", seed=3)
    x = torch.randn(2, 3, SIZE, SIZE)
    save(model, tmp_path / "new.automtl")
    described = yaml.safe_load(entries(tmp_path / "new.automtl")["model.yaml"])
    norms = [m for m in described["modules"] if m["class"] == "BatchNorm2d"]
    assert norms and not any("bias" in m["args"] for m in norms)

    monkeypatch.setattr(nn.BatchNorm2d, "__init__", _batchnorm_init_of_torch_2_11)
    loaded = load(tmp_path / "new.automtl")
    assert all(torch.equal(a, b) for a, b in zip(outputs(loaded, x).values(), outputs(model, x).values()))
    save(loaded, tmp_path / "old.automtl")
    again = load(tmp_path / "old.automtl")
    assert all(torch.equal(a, b) for a, b in zip(outputs(again, x).values(), outputs(model, x).values()))
    monkeypatch.undo()

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, bias=False), nn.ReLU())
    sm = supermodel(net, TASKS, torch.randn(1, 3, SIZE, SIZE)).eval()
    save(compact(sm, Policy.uniform(sm.layer_names, sm.task_names, "share")).eval(), tmp_path / "nobias.automtl")
    monkeypatch.setattr(nn.BatchNorm2d, "__init__", _batchnorm_init_of_torch_2_11)
    with pytest.raises(FileFormatError, match=r"constructor argument 'bias', which the BatchNorm2d of the installed "
                                              r"torch .* does not take; .* upgrade torch to load it"):
        load(tmp_path / "nobias.automtl")


_REQUIRED = {"in_channels": 4, "out_channels": 4, "kernel_size": 3, "in_features": 4, "out_features": 4,
             "num_features": 4, "size": 3, "num_groups": 2, "num_channels": 4, "normalized_shape": [4],
             "threshold": 0.5, "value": 0.0, "output_size": 2, "upscale_factor": 2, "downscale_factor": 2,
             "groups": 2, "padding": 1}


def _has_keyword_only(cls) -> bool:
    return any(p.kind is p.KEYWORD_ONLY and k in MODULES[cls] for k, p in inspect.signature(cls.__init__).parameters.items())


@pytest.mark.parametrize("cls,keyword_only", [(c, "default") for c in MODULES] + [
    (c, "changed") for c in MODULES if _has_keyword_only(c)], ids=lambda v: getattr(v, "__name__", v))
def test_every_module_is_written_with_arguments_an_older_torch_takes(cls, keyword_only):
    """The whole kind of BatchNorm's ``bias``: for every module class a bundle may hold, what the writer records is
    arguments of the installed constructor, none keyword-only at its default (torch's way of adding an argument,
    which an older torch lacks), and building from them gives the same module; a keyword-only argument set away
    from its default is written, since leaving it out would change the model."""
    from automtl.formats.bundle import _constructor_args
    from automtl.formats.codec import decode
    from automtl.formats.modules import build_module

    params = inspect.signature(cls.__init__).parameters
    required = {k: _REQUIRED[k] for k, p in params.items()
                if k != "self" and p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    keyword = [k for k, p in params.items() if p.kind is p.KEYWORD_ONLY and k in MODULES[cls]]
    if keyword_only == "changed":
        required.update({k: not params[k].default for k in keyword})
        if "affine" in params:
            required["affine"] = True  # InstanceNorm's default False has no bias either way
    module = cls(**required)
    args = _constructor_args("m", module)
    assert set(args) <= set(params), args
    written_keyword = {k for k in args if params[k].kind is params[k].KEYWORD_ONLY}
    assert written_keyword == (set(keyword) if keyword_only == "changed" else set()), args
    rebuilt = build_module("m", cls.__name__, {k: decode(v, k) for k, v in args.items()}, "the test")
    assert repr(rebuilt) == repr(module)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in module.state_dict().items()}


def test_bundle_layout_and_checksums(tmp_path):
    path = tmp_path / "m.automtl"
    save(random_model(), path)
    parts = entries(path)
    assert set(parts) == {"model.yaml", "weights.safetensors", "checksums"}
    for line in parts["checksums"].decode().splitlines():
        digest, name = line.split()
        assert hashlib.sha256(parts[name]).hexdigest() == digest
    desc = yaml.safe_load(parts["model.yaml"])
    assert desc["automtl_bundle"] == 2 and [t["name"] for t in desc["tasks"]] == ["segment", "depth", "label"]
    assert all(m["class"] in ("Conv2d", "BatchNorm2d", "ReLU", "AdaptiveAvgPool2d", "Flatten", "Linear") for m in desc["modules"])
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary behind


class Quirky(nn.Module):
    """Graph patterns beyond convs: a parameter and a buffer read directly, slicing, cat, methods with dtypes."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.scale = nn.Parameter(torch.ones(1, 8, 1, 1) * 0.5)
        self.register_buffer("shift", torch.full((1, 8, 1, 1), 0.1))
        self.pool = nn.MaxPool2d(2, ceil_mode=True)

    def forward(self, x):
        y = F.relu(self.conv0(x))
        z = self.conv1(y) * self.scale + self.shift
        z = torch.cat([z[:, :4], F.normalize(y, dim=1)[:, 4:]], dim=1)  # normalize: traced with out=None
        z = z + z.mean(dim=(2, 3), keepdim=True).to(torch.float32)
        return self.pool(F.leaky_relu(z, negative_slope=0.1))


def test_bundle_round_trip_of_general_graph_patterns(tmp_path):
    sm = supermodel(Quirky(), [Task("a", "depth"), Task("b", "classification", classes=3)], torch.randn(1, 3, 9, 9)).eval()
    x = torch.randn(3, 3, 9, 9)
    for seed in range(3):
        model = compact(sm, Policy.random(sm.layer_names, sm.task_names, sm.skip_legal, seed=seed)).eval()
        save(model, tmp_path / "q.automtl")
        loaded = load(tmp_path / "q.automtl")
        want, got = outputs(model, x), outputs(loaded, x)
        assert all(torch.equal(got[t], want[t]) for t in want)
    assert isinstance(loaded.graph_module.get_parameter("net.scale"), nn.Parameter)


def test_frozen_parameters_stay_frozen_in_a_loaded_model(tmp_path):
    """A file did not say which parameters the model trains: a loaded model trained a frozen stem and a fixed scale
    again, so a fine-tune of it gave other numbers than one of the model that was saved."""
    backbone = Quirky()
    for p in [*backbone.conv0.parameters(), backbone.scale]:
        p.requires_grad_(False)
    sm = supermodel(backbone, [Task("a", "depth"), Task("b", "classification", classes=3)], torch.randn(1, 3, 9, 9))
    model = compact(sm, Policy.random(sm.layer_names, sm.task_names, sm.skip_legal, seed=1))
    save(model, tmp_path / "q.automtl")
    loaded = load(tmp_path / "q.automtl")
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen and sorted(n for n, p in loaded.named_parameters() if not p.requires_grad) == frozen
    x = torch.randn(4, 3, 9, 9)
    steps = [(m.train(), torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)) for m in (model, loaded)]
    for _ in range(2):  # both fine-tune the same parameters the same way
        for m, opt in steps:
            opt.zero_grad()
            sum(y.square().mean() for y in m(x).values()).backward()
            opt.step()
    want, got = outputs(model.eval(), x), outputs(loaded.eval(), x)
    assert all(torch.equal(got[t], want[t]) for t in want)
    path = tmp_path / "q.automtl"
    for entry, message in [(["net.nothing"], "lists 'net.nothing' as a frozen parameter, which the model does not have"),
                           ("all", "has a frozen entry that is not a list of its parameters' names")]:
        save(model, path)
        _edit(path, lambda d: d.update(frozen=entry))
        with pytest.raises(FileFormatError, match=message):
            load(path)


class MyHead(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.fc = nn.Linear(channels, 2)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


def _custom_task(head):
    return Task("custom", head=head, loss=lambda y, t: (y - t).pow(2).mean(), metric=lambda: None)


def test_custom_head_class_of_listed_parts_is_saved_as_data(tmp_path):
    sm = supermodel("tiny", [Task("depth", "depth"), _custom_task(MyHead(32))], torch.randn(1, 3, SIZE, SIZE)).eval()
    model = compact(sm, Policy.uniform(sm.layer_names, sm.task_names, "share")).eval()
    save(model, tmp_path / "m.automtl")  # traced into Linear + mean: both on the reviewed list
    x = torch.randn(3, 3, SIZE, SIZE)
    assert all(torch.equal(outputs(load(tmp_path / "m.automtl"), x)[t], outputs(model, x)[t]) for t in model.task_names)


class FFTHead(nn.Module):
    def forward(self, x):
        return torch.fft.rfft2(x).abs().mean((2, 3))


def test_custom_head_off_the_vocabulary_is_refused_with_a_way_out(tmp_path):
    sm = supermodel("tiny", [Task("depth", "depth"), _custom_task(FFTHead())], torch.randn(1, 3, SIZE, SIZE)).eval()
    model = compact(sm, Policy.uniform(sm.layer_names, sm.task_names, "share")).eval()
    with pytest.raises(FileFormatError, match=r"rfft2.*reviewed vocabulary.*export\(\)"):
        save(model, tmp_path / "m.automtl")
    assert not (tmp_path / "m.automtl").exists()
    with pytest.warns(UserWarning, match="rfft2.*load_pt2 will refuse it"):  # the .pt2 route works for any head
        export(model, tmp_path / "m.pt2", example_input=torch.randn(1, 3, SIZE, SIZE))
    x = torch.randn(3, 3, SIZE, SIZE)
    got = torch.export.load(tmp_path / "m.pt2").module()(x)
    assert all(torch.allclose(got[t], outputs(model, x)[t], atol=1e-5) for t in model.task_names)


def test_custom_task_built_from_torch_nn_comes_back_description_only(tmp_path):
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 2))
    sm = supermodel("tiny", [_custom_task(head), Task("depth", "depth")], torch.randn(1, 3, SIZE, SIZE)).eval()
    model = compact(sm, Policy.random(sm.layer_names, sm.task_names, sm.skip_legal, seed=0)).eval()
    save(model, tmp_path / "m.automtl")
    loaded = load(tmp_path / "m.automtl")
    custom = loaded.tasks[0]
    assert (custom.name, custom.kind, custom.head, custom.loss) == ("custom", "custom", None, None)
    x = torch.randn(2, 3, SIZE, SIZE)
    assert all(torch.equal(outputs(loaded, x)[t], outputs(model, x)[t]) for t in model.task_names)


# ---------------------------------------------------------------------------------------
# damaged, forged and hostile bundles
# ---------------------------------------------------------------------------------------
@pytest.fixture
def bundle(tmp_path):
    path = tmp_path / "m.automtl"
    save(random_model(seed=1), path)
    return path


def test_truncated_bundle(bundle):
    data = bundle.read_bytes()
    bundle.write_bytes(data[: len(data) // 2])
    with pytest.raises(FileFormatError, match="not a valid"):
        load(bundle)


def test_flipped_bytes_are_detected(bundle):
    parts = entries(bundle)
    w = bytearray(parts["weights.safetensors"])
    w[len(w) // 2] ^= 0xFF
    parts["weights.safetensors"] = bytes(w)
    write_bundle(bundle, parts, fix_checksums=False)
    with pytest.raises(FileFormatError, match="does not match its checksum"):
        load(bundle)


def test_edited_shape_names_the_tensor(bundle):
    parts = entries(bundle)
    desc = yaml.safe_load(parts["model.yaml"])
    conv = next(m for m in desc["modules"] if m["class"] == "Conv2d")
    conv["args"]["out_channels"] += 1
    parts["model.yaml"] = yaml.safe_dump(desc, sort_keys=False).encode()
    write_bundle(bundle, parts)
    with pytest.raises(FileFormatError, match=rf"{conv['name']}\.weight.*graph needs"):
        load(bundle)


def test_weights_from_another_model(bundle, tmp_path):
    other = tmp_path / "other.automtl"
    save(random_model(seed=2), other)
    parts = entries(bundle)
    parts["weights.safetensors"] = entries(other)["weights.safetensors"]
    write_bundle(bundle, parts, fix_checksums=False)
    with pytest.raises(FileFormatError, match="checksum"):
        load(bundle)
    write_bundle(bundle, parts)
    with pytest.raises(FileFormatError, match="do not belong to this graph"):
        load(bundle)


def test_not_a_zip_missing_file_and_missing_entry(tmp_path, bundle):
    junk = tmp_path / "junk.automtl"
    junk.write_text("this is not a model\n")
    with pytest.raises(FileFormatError, match="not a valid"):
        load(junk)
    with pytest.raises(FileFormatError, match="does not exist"):
        load(tmp_path / "nope.automtl")
    with pytest.raises(FileFormatError, match="directory"):
        load(tmp_path)
    for suffix, what in ((".pt2", "torch.export archive"), (".ONNX", "ONNX model")):
        exported = tmp_path / f"model{suffix}"
        exported.write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip: no bundle, whatever its name says
        with pytest.raises(FileFormatError, match=f"is an? {what}.*not an .automtl model"):
            load(exported)
    renamed = tmp_path / "renamed.pt2"  # a bundle named like an export is still a bundle
    renamed.write_bytes(bundle.read_bytes())
    assert load(renamed).task_names
    parts = entries(bundle)
    del parts["weights.safetensors"]
    write_bundle(bundle, parts, fix_checksums=False)
    with pytest.raises(FileFormatError, match="does not hold exactly the entries"):
        load(bundle)


def _edit(bundle, change):
    parts = entries(bundle)
    desc = yaml.safe_load(parts["model.yaml"])
    change(desc)
    parts["model.yaml"] = yaml.safe_dump(desc, sort_keys=False).encode()
    write_bundle(bundle, parts)


def _first(desc, op):
    return next(n for n in desc["nodes"] if n["op"] == op)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(automtl_bundle=99), "newer than this automtl reads"),
    (lambda d: _first(d, "call_function").update(target="os.system"), "reviewed vocabulary"),
    (lambda d: _first(d, "call_function").update(target="torch.load"), "reviewed vocabulary"),
    (lambda d: _first(d, "call_function").update(target="builtins.eval"), "reviewed vocabulary"),
    (lambda d: d["modules"][0].update({"class": "Evil"}), "reviewed list of torch.nn modules"),
    (lambda d: _first(d, "call_method").update(target="__reduce__"), "reviewed list of tensor methods"),
    (lambda d: _first(d, "placeholder").update(target="x=__import__('os').system('true')"), "invalid input"),
    (lambda d: _first(d, "call_module").update(args=[{"$node": "later"}]), "before it is defined"),
    (lambda d: _first(d, "call_function").setdefault("kwargs", {}).update(out={"$node": _first(d, "placeholder")["name"]}),
     "writes its result into an existing tensor"),
], ids=["newer-format", "os.system", "torch.load", "builtins.eval", "class-not-in-torch.nn", "private-method",
        "code-in-input-name", "forward-reference", "out-into-the-input"])
def test_hostile_or_edited_descriptions_are_refused(bundle, change, message):
    _edit(bundle, change)
    with pytest.raises(FileFormatError, match=message):
        load(bundle)


# ---------------------------------------------------------------------------------------
# .pt2 and ONNX
# ---------------------------------------------------------------------------------------
_PLAIN_TORCH = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    try:
        import automtl
    except ImportError:
        pass
    else:
        raise SystemExit("automtl must not be importable here")
    import torch
    program = torch.export.load(sys.argv[2])
    inputs = torch.load(sys.argv[3], weights_only=True)
    out = {}
    for key, x in inputs.items():
        for task, y in program.module()(x).items():
            out[f"{key}/{task}"] = y
    torch.save(out, sys.argv[4])
""")


def test_pt2_runs_with_plain_torch_any_batch(tmp_path):
    model = random_model(seed=4)
    export(model, tmp_path / "model.pt2")
    xs = {f"b{b}": torch.randn(b, 3, SIZE, SIZE) for b in (1, 2, 5)}
    torch.save(xs, tmp_path / "inputs.pt")
    torch_parent = os.path.dirname(os.path.dirname(torch.__file__))
    script = tmp_path / "run.py"
    script.write_text(_PLAIN_TORCH)
    # -I -S: no user site, no .pth files (so no editable automtl finder), no cwd on sys.path
    proc = subprocess.run([sys.executable, "-I", "-S", str(script), torch_parent, str(tmp_path / "model.pt2"),
                           str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    for key, x in xs.items():
        want = outputs(model, x)
        for task in model.task_names:
            assert torch.allclose(got[f"{key}/{task}"], want[task], atol=1e-5, rtol=1e-5), (key, task)
    assert model.training is False  # export put it in eval and left it there


class DataDependentHead(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.fc = nn.Linear(channels, 2)

    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a value: torch.export cannot trace it
            x = x * 2
        return self.fc(x.mean((2, 3)))


def test_export_failure_names_the_op(tmp_path):
    sm = supermodel("tiny", [_custom_task(DataDependentHead(32))], torch.randn(1, 3, SIZE, SIZE)).eval()
    model = compact(sm, Policy.uniform(sm.layer_names, sm.task_names, "share"))
    model.train()
    with pytest.raises(AutomtlError, match=r"torch.export cannot export .*heads.custom"):
        export(model, tmp_path / "m.pt2")
    assert not (tmp_path / "m.pt2").exists()
    assert model.training and model.graph_module.training  # its mode is restored


def test_export_warns_when_load_pt2_would_refuse_what_it_wrote(tmp_path, monkeypatch):
    """A program the checked loader refuses (here: conv2d taken off its list) is said at export, naming the
    operator: the file is for torch.export.load only."""
    import automtl.formats.pt2 as pt2

    model = random_model()
    monkeypatch.setattr(pt2, "ALLOWED_ATEN_OPERATORS", pt2.ALLOWED_ATEN_OPERATORS - {"conv2d"})
    with pytest.warns(UserWarning, match=r"m\.pt2' calls torch\.ops\.aten\.conv2d.*so automtl\.load_pt2 will refuse it.*"
                                         r"or save an \.automtl bundle, which describes this model"):
        export(model, tmp_path / "m.pt2")
    with pytest.raises(FileFormatError, match="conv2d"):
        pt2.load_pt2(tmp_path / "m.pt2")
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export(model, tmp_path / "m.pt2")  # within the list: no warning
    pt2.load_pt2(tmp_path / "m.pt2")


def test_onnx_matches_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = random_model(seed=5)
    export_onnx(model, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == model.task_names
    for b in (1, 3):
        x = torch.randn(b, 3, SIZE, SIZE)
        got = session.run(None, {"input": x.numpy()})
        want = outputs(model, x)
        for y, task in zip(got, model.task_names):
            assert torch.allclose(torch.from_numpy(y), want[task], atol=1e-4, rtol=1e-4), (b, task)


def test_onnx_without_the_extra_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(AutomtlError, match=r"pip install 'automtl\[onnx\]'"):
        export_onnx(random_model(), tmp_path / "model.onnx")


# ---------------------------------------------------------------------------------------
# accounting
# ---------------------------------------------------------------------------------------
def _hand_macs_of_tiny_backbone(size):
    """MACs per sample of TinyCNN(16) from its layer list, by hand (no hooks, no automtl)."""
    s2, s4 = size // 2, size // 4
    return (s2 * s2 * 16 * 3 * 9            # stem 3->16, stride 2
            + 2 * s2 * s2 * 16 * 16 * 9     # block1: two 16->16 3x3
            + s4 * s4 * 32 * 16 * 9         # block2_conv1 16->32, stride 2
            + s4 * s4 * 32 * 32 * 9         # block2_conv2
            + s4 * s4 * 32 * 16 * 1         # block2_down 1x1
            + s4 * s4 * 32 * 32 * 9)        # head conv


def _hooked_macs(module, x):
    """An independent count: forward hooks on the original backbone's convs."""
    total = [0]

    def hook(m, inp, out):
        total[0] += out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    hs = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        module.eval()(x)
    for h in hs:
        h.remove()
    return total[0]


def test_all_share_macs_are_backbone_plus_heads():
    sm = built("tiny")
    share = compact(sm, Policy.uniform(sm.layer_names, sm.task_names, "share"))
    backbone = _hand_macs_of_tiny_backbone(SIZE)
    assert backbone == _hooked_macs(build_backbone("tiny"), torch.randn(1, 3, SIZE, SIZE))
    f = SIZE // 4
    dense_head = lambda classes: f * f * (32 * 32 + 32 * 32 * 9 + classes * 32)  # noqa: E731
    heads = dense_head(4) + dense_head(1) + 32 * 5
    stats = model_stats(share, (2, 3, SIZE, SIZE), repeats=1)
    assert stats["macs"] == backbone + heads
    assert stats["parameters"] == share.num_parameters()
    assert stats["latency_s"] > 0 and stats["tasks"] == sm.task_names
    # one task: the backbone and that head
    assert model_stats(share, (1, 3, SIZE, SIZE), tasks=["label"], repeats=1)["macs"] == backbone + 32 * 5
    # the supermodel's own estimate agrees
    assert sm.policy_mac_count(share.policy) == stats["macs"]
    # MACs are per sample
    assert count_macs(share, torch.randn(4, 3, SIZE, SIZE)) == stats["macs"]


def test_compare_ratios_are_sane():
    sm = built("tiny")
    T = len(sm.task_names)
    spec = compact(sm, Policy.uniform(sm.layer_names, sm.task_names, "specialize"))
    share = compact(sm, Policy.uniform(sm.layer_names, sm.task_names, "share"))
    mode_before, rng_before = sm.mode, torch.get_rng_state()
    c = compare(sm, spec, (2, 3, SIZE, SIZE), repeats=1)
    assert sm.mode == mode_before and torch.equal(torch.get_rng_state(), rng_before)
    # all-specialize is exactly T single-task models, parameters and MACs
    assert c["compact"]["parameters"] == c["separate"]["parameters"]
    assert c["compact"]["macs"] == c["separate"]["macs"]
    assert 0.75 * T < c["compact"]["parameters"] / c["backbone"]["parameters"] <= T
    assert c["supermodel"]["parameters"] > c["compact"]["parameters"]
    assert c["supermodel"]["macs"] > c["compact"]["macs"]
    assert c["flop_bound_s"] > 0 and all(v > 0 for v in c["ratios"].values())
    c = compare(sm, share, (2, 3, SIZE, SIZE), repeats=1)
    assert 1 <= c["ratios"]["macs_vs_backbone"] < 2
    assert c["ratios"]["parameters_vs_separate"] < 0.5
    text = format_inspect(c, share.policy)
    assert "3 single-task models" in text and "FLOP bound" in text


def test_format_inspect_and_inspect_text(bundle):
    model = load(bundle)
    stats = model_stats(model, (1, 3, SIZE, SIZE), repeats=1)
    text = format_inspect(stats, model.policy)
    for layer in model.policy.layers:
        assert layer in text
    for task in model.task_names:
        assert task in text
    assert "S = share" in text and "P = specialize" in text and "- = skip" in text
    row = next(line for line in text.splitlines() if line.startswith(model.policy.layers[0]))
    letters = row.split()[1:]
    assert letters == [{"share": "S", "specialize": "P", "skip": "-"}[c] for c in model.policy.to_dict()["layers"][model.policy.layers[0]].values()]
    full = inspect_text(bundle, repeats=1)
    assert "segment: segmentation, 4 classes" in full and "S = share" in full and "parameters" in full


class HyphenNames(nn.Module):
    """torchvision's RegNet registers blocks as ``block1-0``: names a Python attribute cannot spell."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        blocks = nn.Sequential()
        blocks.add_module("block1-0", nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()))
        blocks.add_module("block1-1", nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()))
        self.trunk_output = blocks

    def forward(self, x):
        return self.trunk_output(self.stem(x))


def test_whatever_save_writes_load_reads_module_names_with_hyphens(tmp_path):
    sm = supermodel(HyphenNames(), [Task("a", "depth"), Task("b", "segmentation", classes=3)], torch.randn(1, 3, 8, 8)).eval()
    x = torch.randn(2, 3, 8, 8)
    for seed in range(3):
        model = compact(sm, Policy.random(sm.layer_names, sm.task_names, sm.skip_legal, seed=seed)).eval()
        save(model, tmp_path / "h.automtl")
        loaded = load(tmp_path / "h.automtl")
        assert all(torch.equal(outputs(loaded, x)[t], outputs(model, x)[t]) for t in model.task_names)
        # the names too: a loaded model's state dict has the saved one's keys (block1-0 came back as block1_0)
        assert sorted(loaded.state_dict()) == sorted(model.state_dict())
        loaded.load_state_dict(model.state_dict())


class _PadEcaNorms(nn.Module):
    """What common timm models hold that a file could not describe: a constant-padded stem (resnetv2 BiT), ECA
    channel attention (a Conv1d over the channels), EvoNorm's variance and FilterResponseNorm's square, and padding
    to a multiple of 8 computed with ``%`` (then cropped back)."""

    def __init__(self):
        super().__init__()
        self.pad, self.zero = nn.ConstantPad2d((1, 2, 0, 1), 0.5), nn.ZeroPad2d(1)
        self.conv = nn.Conv2d(3, 8, 3)
        self.eca = nn.Conv1d(1, 1, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        h, w = x.shape[-2:]
        x = F.pad(x, (0, (8 - w % 8) % 8, 0, (8 - h % 8) % 8))
        x = self.conv(self.zero(self.pad(x)))
        attention = self.eca(x.mean((2, 3)).unsqueeze(1)).transpose(1, 2).unsqueeze(-1).sigmoid()
        x = x * attention
        x = x / (x.var(dim=(1, 2, 3), unbiased=False, keepdim=True) + 1e-5).sqrt()
        x = x * x.square().mean((2, 3), keepdim=True).rsqrt()
        return self.conv2(x)[..., :h, :w]


def test_padding_modules_eca_variance_and_remainders_are_saved_as_data(tmp_path):
    """ZeroPad2d (its stored 4-tuple was refused, so no model with one could be saved), ConstantPad2d, Conv1d,
    ``var``, ``square`` and ``%``: on the list now, and a file of them computes what the model computes, at the
    recorded size and another."""
    from automtl.tasks import Task

    torch.manual_seed(0)
    sm = supermodel(_PadEcaNorms(), [Task("a", "depth"), Task("b", "segmentation", classes=3)],
                    torch.randn(1, 3, 30, 30)).eval()
    for seed in (0, 1):
        _saved_computes_the_same(compact(sm, Policy.random(sm.layer_names, sm.task_names, sm.skip_legal, seed=seed)),
                                 tmp_path / "m.automtl", (30, 33))


def _saved_computes_the_same(model, path, sizes):
    """Save ``model`` (eval mode) and load it back: the same outputs at each input size; the loaded model."""
    save(model.eval(), path)
    loaded = load(path)
    for size in sizes:
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            want, got = model(x), loaded(x)
        assert all(torch.equal(got[t], want[t]) for t in want), size
    return loaded


class _MoreActivationsAndNorms(nn.Module):
    """What models people use hold beyond the first list: PReLU and its kin, SyncBatchNorm (segmentation code converts
    every BatchNorm to it), LocalResponseNorm (AlexNet, GoogLeNet), ``x ** 2`` and a scale ``d ** -0.5`` computed from
    the input's size."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.SyncBatchNorm(8)
        self.acts = nn.Sequential(nn.PReLU(8), nn.SELU(), nn.CELU(0.5), nn.Threshold(0.1, -1.0), nn.Softsign(),
                                  nn.Hardshrink(0.05), nn.Softshrink(0.01), nn.Tanhshrink())
        self.lrn = nn.LocalResponseNorm(3)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.prelu = nn.PReLU()

    def forward(self, x):
        x = self.acts(self.norm(self.conv1(x)))
        x = self.lrn(x) + F.logsigmoid(x) + torch.log_softmax(x, 1) + F.softmin(x, 1)
        scale = (x.shape[2] * x.shape[3]) ** -0.5  # a Python number from the input's size
        return self.prelu(self.conv2(x ** 2 * scale))


def test_more_activations_norms_and_powers_are_saved_as_data(tmp_path):
    """Each was refused by save ("not one of the torch.nn modules on automtl's reviewed list", "_operator.pow"), so
    such a model had only its .pt2."""
    from automtl.tasks import Task

    torch.manual_seed(0)
    sm = supermodel(_MoreActivationsAndNorms(), [Task("a", "depth"), Task("b", "segmentation", classes=3)],
                    torch.randn(1, 3, 12, 12))
    for seed in (0, 1):
        model = compact(sm, Policy.random(sm.layer_names, sm.task_names, sm.skip_legal, seed=seed))
        loaded = _saved_computes_the_same(model, tmp_path / "m.automtl", (12, 15))
        x = torch.randn(3, 3, 12, 12)
        for m in (model, loaded):  # train mode: the SyncBatchNorm normalises with the batch's statistics, on one process
            m.train()
        want, got = model(x), loaded(x)
        assert all(torch.equal(got[t], want[t]) for t in want), seed
        assert all(torch.equal(a, b) for a, b in zip(model.buffers(), loaded.buffers()))


class _SizeArithmetic(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x) + x.shape[2] ** 2 * 0  # an integer computed from the input's size


@pytest.mark.parametrize("exponent, chain", [(2**30, 0), (2, 40)], ids=["one-power", "squarings"])
def test_integers_a_file_computes_are_bounded_before_they_are_computed(tmp_path, exponent, chain):
    """Python integers in a graph are exact: ``h ** 2**30`` (or forty squarings) would take the machine's memory
    while the loader computes it; the power is checked before it runs, a product after (it at most doubles)."""
    import time

    from automtl.tasks import Task

    sm = supermodel(_SizeArithmetic(), [Task("d", "depth")], torch.randn(1, 3, 8, 8)).eval()
    path = tmp_path / "m.automtl"
    save(compact(sm, Policy.uniform(sm.layer_names, sm.task_names, "share")).eval(), path)

    def bomb(desc):
        nodes = desc["nodes"]
        power = next(n for n in nodes if n["target"] == "operator.pow")
        power["args"][1] = exponent
        at, last = nodes.index(power), power["name"]
        for i in range(chain):
            nodes.insert(at + 1 + i, {"name": f"square_{i}", "op": "call_function", "target": "operator.mul",
                                      "args": [{"$node": last}, {"$node": last}]})
            last = f"square_{i}"
        for n in nodes[at + 1 + chain:]:
            n["args"] = [{"$node": last} if a == {"$node": power["name"]} else a for a in n.get("args", [])]
    _edit(path, bomb)
    start = time.monotonic()
    with pytest.raises(FileFormatError, match="computing an integer beyond 1099511627776, which no size or index"):
        load(path)
    assert time.monotonic() - start < 10


class _Lrn(nn.Module):
    def __init__(self, size=3):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3, padding=1)
        self.lrn = nn.LocalResponseNorm(size)

    def forward(self, x):
        return self.lrn(self.conv(x))


def test_a_local_response_norm_window_is_bounded_and_its_copies_counted(tmp_path):
    """LocalResponseNorm pads a squared copy of its input by size - 1 channels: a crafted size of 2^31 loaded and took
    8 GiB a sample for a one-element map. Its size is at most 1024, and the copies count as live elements."""
    from automtl.tasks import Task

    sm = supermodel(_Lrn(1024), [Task("d", "depth")], torch.randn(1, 3, 8, 8)).eval()
    path = tmp_path / "m.automtl"
    save(compact(sm, Policy.uniform(sm.layer_names, sm.task_names, "share")).eval(), path)
    loaded = load(path)
    with pytest.raises(FileFormatError, match="activation elements .* are alive at once"):
        loaded(torch.zeros(1, 3, 1024, 1024))  # (1 + 1023) channels of 1024x1024, twice: checked before it runs
    _edit(path, lambda d: next(m for m in d["modules"] if m["class"] == "LocalResponseNorm")["args"].update(size=2**31))
    with pytest.raises(FileFormatError, match="constructor argument 'size' = '2147483648', which is not an argument"):
        load(path)


def test_a_module_dim_beyond_its_input_is_refused_at_load(tmp_path):
    """A module's own dim (Softmin(dim=7) on a 4-D map) loaded: the meta dry run does not check it, the first call
    failed inside torch."""
    from automtl.tasks import Task

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.soft = nn.Conv2d(3, 4, 3, padding=1), nn.Softmin(1)

        def forward(self, x):
            return self.soft(self.conv(x))

    sm = supermodel(M(), [Task("d", "depth")], torch.randn(1, 3, 8, 8)).eval()
    path = tmp_path / "m.automtl"
    save(compact(sm, Policy.uniform(sm.layer_names, sm.task_names, "share")).eval(), path)
    load(path)
    _edit(path, lambda d: next(m for m in d["modules"] if m["class"] == "Softmin")["args"].update(dim=7))
    with pytest.raises(FileFormatError, match="whose module's dim 7 names no dimension of its 4-dimensional input"):
        load(path)
