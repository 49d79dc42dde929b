"""timm:NAME and torchvision:NAME backbones: built headless, cut at the right map, clear errors.

Tests that need timm or torchvision skip with the reason where the package does not import; the
feature-cut patterns they exercise (channel shuffle, VGG's pooling) are also tested in pure torch.
"""
import json
import urllib.error

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import automtl
from automtl.backbones import build_backbone, external, load_weights
from automtl.capture import capture
from automtl.cli import main
from automtl.errors import BackboneError

X = torch.randn(1, 3, 64, 64)


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def offline(monkeypatch):
    """Downloads fail at once, as on a machine without a network (and never reach one where there is)."""
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    try:
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    except ImportError:
        pass


# ---- the cut, in pure torch ---------------------------------------------------------------
class _Shuffle(nn.Module):
    """ShuffleNet's unit: chunk, then a channel shuffle through a 5-D view."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.branch = nn.Conv2d(4, 4, 3, padding=1)
        self.last = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        a, b = x.chunk(2, dim=1)
        x = torch.cat([a, self.branch(b)], 1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.fc(self.last(x).mean([2, 3]))


class _VGGLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4))
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Linear(8 * 49, 10)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def test_cut_follows_the_trunk_through_chunk_and_channel_shuffle():
    assert capture(_Shuffle(), X).feature_shape == (1, 16, 32, 32)


def test_cut_drops_the_classifiers_fixed_size_pooling():
    cap = capture(_VGGLike(), X)
    assert cap.feature_shape == (1, 8, 16, 16)  # the trunk's own map, not resized to 7x7 for the classifier


# ---- errors that need neither package ----------------------------------------------------
@pytest.mark.parametrize("source", ["timm", "torchvision"])
def test_missing_package_is_one_sentence_naming_the_extra(monkeypatch, source):
    real = external.importlib.util.find_spec
    monkeypatch.setattr(external.importlib.util, "find_spec", lambda name, *a: None if name == source else real(name, *a))
    with pytest.raises(BackboneError, match=rf"needs the {source} package.*pip install 'automtl\[{source}\]'") as err:
        build_backbone(f"{source}:resnet18")
    assert "\n" not in str(err.value)
    result = _cli("backbones", "--source", source)
    assert result.exit_code == 2 and f"automtl[{source}]" in result.output


def test_pretrained_only_for_timm_and_torchvision(tmp_path):
    result = _cli("supermodel", "tiny", "--pretrained", "--input-size", "32")
    assert result.exit_code == 2
    assert "timm:NAME and torchvision:NAME backbones only" in result.output and "--weights" in result.output


# ---- timm ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "cspdarknet53"])
def test_timm_backbone_is_headless_and_cut_at_its_features(timm_module, name):
    model = build_backbone(f"timm:{name}")
    assert not any(isinstance(m, nn.Linear) for m in model.modules())  # no classifier
    with torch.no_grad():
        expected = timm_module.create_model(name, num_classes=0).eval().forward_features(X).shape
    cap = capture(model, X)
    assert cap.feature_shape == tuple(expected)
    assert cap.feature_shape[1] == model.num_features and cap.feature_shape[2:] == (2, 2)  # stride 32


def test_timm_supermodel_from_the_python_api(timm_module, dense_tasks):
    sm = automtl.supermodel("timm:resnet18", dense_tasks, example_input=torch.randn(1, 3, 32, 32))
    out = sm(torch.randn(2, 3, 32, 32))
    assert set(out) == {t.name for t in dense_tasks} and out["depth"].shape[-2:] == (32, 32)


def test_timm_unknown_name_suggests_the_close_ones(timm_module):
    with pytest.raises(BackboneError, match=r"timm has no model named 'resnet_18'; did you mean 'timm:resnet18'"):
        build_backbone("timm:resnet_18")


def test_timm_pretrained_offline_is_one_sentence_naming_weights(timm_module, offline):
    with pytest.raises(BackboneError, match=r"pretrained weights of 'timm:resnet18' could not be downloaded.*--weights") as err:
        build_backbone("timm:resnet18", pretrained=True)
    assert "\n" not in str(err.value)


def test_timm_default_downloads_nothing(timm_module, offline):
    assert isinstance(build_backbone("timm:resnet18"), nn.Module)


def test_timm_state_dict_with_its_classifier_loads_through_weights(timm_module, tmp_path):
    full = timm_module.create_model("convnext_atto")  # classifier at head.fc, beside head.norm
    torch.save(full.state_dict(), tmp_path / "w.pt")
    model = build_backbone("timm:convnext_atto")
    info = load_weights(model, tmp_path / "w.pt")
    assert sorted(info["ignored"]) == ["head.fc.bias", "head.fc.weight"]
    assert torch.equal(model.stem[0].weight, full.stem[0].weight)


def test_cli_lists_timm_models(timm_module):
    result = _cli("backbones", "--source", "timm", "--filter", "resnet1*", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert {"name": "timm:resnet18", "pretrained": True} in rows
    assert all(r["name"].startswith("timm:resnet1") for r in rows)


def test_cli_supermodel_with_timm(timm_module):
    result = _cli("supermodel", "timm:resnet18", "--input-size", "32", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["policy_layers"] == 20


def test_cli_convert_timm_end_to_end(timm_module, tmp_path):
    result = _cli("convert", "timm:resnet18", "--steps", "2,2,2", "--samples", "16,8", "--input-size", "32",
                  "--out", tmp_path, "--quiet")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "model.automtl").exists() and (tmp_path / "model.pt2").exists()
    model = automtl.load(tmp_path / "model.automtl")
    assert set(model(torch.randn(1, 3, 32, 32))) == {"segmentation", "depth", "normal"}


def test_cli_search_timm_rebuilds_without_downloading(timm_module, offline, tmp_path):
    result = _cli("search", "timm:resnet18", "--steps", "1,1,1", "--samples", "8,4", "--input-size", "32",
                  "--out", tmp_path, "--quiet")
    assert result.exit_code == 0, result.output
    result = _cli("compact", tmp_path, "--out", tmp_path / "m.automtl", "--quiet")
    assert result.exit_code == 0, result.output


# ---- torchvision --------------------------------------------------------------------------
@pytest.mark.parametrize("name,shape", [("resnet18", (512, 2, 2)), ("vgg11", (512, 2, 2)),
                                        ("shufflenet_v2_x0_5", (1024, 2, 2)), ("mobilenet_v3_small", (576, 2, 2))])
def test_torchvision_backbone_is_headless_and_cut_at_its_last_map(torchvision_module, name, shape):
    model = build_backbone(f"torchvision:{name}")
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert capture(model, X).feature_shape == (1, *shape)


def test_torchvision_unknown_name_suggests_the_close_ones(torchvision_module):
    with pytest.raises(BackboneError, match=r"did you mean 'torchvision:resnet18'"):
        build_backbone("torchvision:resnet-18")


def test_torchvision_pretrained_offline_is_one_sentence(torchvision_module, offline):
    with pytest.raises(BackboneError, match=r"'torchvision:resnet18' could not be downloaded \(URLError\).*--weights"):
        build_backbone("torchvision:resnet18", pretrained=True)


def test_torchvision_state_dict_loads_through_weights(torchvision_module, tmp_path):
    full = torchvision_module.models.resnet18()
    torch.save(full.state_dict(), tmp_path / "w.pt")
    info = load_weights(build_backbone("torchvision:resnet18"), tmp_path / "w.pt")
    assert sorted(info["ignored"]) == ["fc.bias", "fc.weight"]


def test_cli_lists_torchvision_classifiers_only(torchvision_module):
    result = _cli("backbones", "--source", "torchvision", "--json")
    names = {r["name"] for r in json.loads(result.output)}
    assert "torchvision:resnet18" in names and "torchvision:vgg16_bn" in names
    assert not any("rcnn" in n or "quantized" in n or "deeplab" in n for n in names)


def test_cli_convert_torchvision_end_to_end(torchvision_module, tmp_path):
    result = _cli("convert", "torchvision:mobilenet_v3_small", "--steps", "2,2,2", "--samples", "16,8",
                  "--input-size", "32", "--out", tmp_path, "--quiet")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "model.automtl").exists() and (tmp_path / "sharing.svg").exists()


def test_an_import_that_fails_in_another_package_names_that_package(tmp_path, monkeypatch):
    """timm imports torchvision: where torchvision's build does not fit torch, the message names torchvision."""
    from automtl.backbones.external import _import

    site = tmp_path / "site-packages"
    (site / "fakezoo").mkdir(parents=True)
    (site / "fakezoo" / "__init__.py").write_text("import fakeops\n")
    (site / "fakeops").mkdir()
    (site / "fakeops" / "__init__.py").write_text("raise RuntimeError('operator fakeops::nms does not exist')\n")
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(BackboneError, match=r"^the fakezoo package is installed but fails to import because fakeops does "
                                            r"\(RuntimeError: operator fakeops::nms does not exist\); install the fakeops "
                                            r"release built for your torch"):
        _import("fakezoo", "fakezoo:net")


# ---- pretrained weights: their input statistics ------------------------------------------
@pytest.fixture
def weights_at_hand(monkeypatch):
    """``pretrained=True`` builds without downloading (the weights themselves do not matter here): timm's and
    torchvision's builders are called with the download switched off."""
    import sys

    timm, torchvision = sys.modules.get("timm"), sys.modules.get("torchvision")
    if timm is not None:
        create = timm.create_model
        monkeypatch.setattr(timm, "create_model", lambda name, pretrained=False, **kw: create(name, **kw))
    if torchvision is not None:
        get = torchvision.models.get_model
        monkeypatch.setattr(torchvision.models, "get_model", lambda name, weights=None, **kw: get(name, **kw))


@pytest.mark.parametrize("spec", ["timm:resnet18", "torchvision:resnet18"])
def test_a_pretrained_backbone_standardises_its_input_as_its_weights_were_trained(spec, timm_module,
                                                                                   torchvision_module,
                                                                                   weights_at_hand, tmp_path):
    """Pretrained weights were trained on images standardised with ImageNet's statistics, automtl's data sets give
    [0, 1]: fed as they were, the weights saw other inputs than in their training. The backbone now standardises
    first (module paths and state dict keys unchanged), and so do the supermodel, the compact model and its file."""
    from automtl.compact import compact
    from automtl.policy import Policy
    from automtl.tasks import Task

    plain = build_backbone(spec).eval()
    pretrained = build_backbone(spec, pretrained=True).eval()
    pretrained.load_state_dict(plain.state_dict())
    assert list(pretrained.state_dict()) == list(plain.state_dict())
    x = torch.rand(2, 3, 64, 64)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(pretrained(x), plain((x - mean) / std), atol=1e-6)
    tasks = [Task("a", "depth"), Task("b", "depth")]
    sm = automtl.supermodel(pretrained, tasks, torch.rand(1, 3, 64, 64)).eval()
    reference = automtl.supermodel(plain, tasks, torch.rand(1, 3, 64, 64)).eval()
    reference.load_state_dict({k: v for k, v in sm.state_dict().items() if "automtl_input" not in k})
    policy = Policy.uniform(sm.layer_names, sm.task_names, "share")
    assert sm.layer_names == reference.layer_names
    model = compact(sm, policy).eval()
    automtl.save(model, tmp_path / "m.automtl")
    with torch.no_grad():
        want = compact(reference, policy).eval()((x - mean) / std)
        for got in (model(x), automtl.load(tmp_path / "m.automtl")(x)):
            assert all(torch.allclose(got[t], want[t], atol=1e-5) for t in want)


def test_a_pretrained_run_is_rebuilt_with_its_input_statistics(timm_module, weights_at_hand, offline, tmp_path):
    """`automtl compact RUN_DIR` rebuilds the run's backbone for the weights it saved, without downloading: with
    the input statistics, or the compiled model would compute another function than the one trained."""
    from automtl.runs import load_run

    result = _cli("search", "timm:resnet18", "--pretrained", "--steps", "1,1,1", "--samples", "8,4",
                  "--input-size", "32", "--out", tmp_path, "--quiet")
    assert result.exit_code == 0, result.output
    sm, cfg, _ = load_run(tmp_path)
    assert cfg.pretrained and any(name.endswith("automtl_input_mean") for name, _ in sm.named_buffers())
    state = torch.load(tmp_path / "supermodel.pt", weights_only=True)  # a run of an automtl before the statistics
    torch.save({k: v for k, v in state.items() if "automtl_input" not in k}, tmp_path / "supermodel.pt")
    sm, cfg, _ = load_run(tmp_path)
    assert not any(name.endswith("automtl_input_mean") for name, _ in sm.named_buffers())
    checkpoint = torch.load(tmp_path / "checkpoints" / "checkpoint.pt", weights_only=True)
    checkpoint["model"] = {k: v for k, v in checkpoint["model"].items() if "automtl_input" not in k}
    torch.save(checkpoint, tmp_path / "checkpoints" / "checkpoint.pt")
    result = _cli("search", "timm:resnet18", "--pretrained", "--steps", "1,1,2", "--samples", "8,4",
                  "--input-size", "32", "--out", tmp_path, "--quiet", "--resume")
    assert result.exit_code == 2 and "unstandardised images" in result.output, result.output


def test_pretrained_statistics_for_other_channels_are_left_out_with_a_warning(timm_module, weights_at_hand):
    """timm adapts a pretrained first layer to in_chans=1 but its statistics stay three channels: standardising a
    grey image with them broadcast it to three and the first convolution failed."""
    with pytest.warns(UserWarning, match="statistics are for 3 channels and the backbone takes 1"):
        backbone = build_backbone("timm:resnet18", pretrained=True, in_chans=1).eval()
    with torch.no_grad():
        assert backbone(torch.rand(2, 1, 32, 32)).shape[:2] == (2, 512)
