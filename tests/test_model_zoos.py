"""Real torchvision and timm models (no weights) through supermodel -> compact -> .automtl, where they import.

The models are built as their zoos build them (classifier and all, in train mode), not through automtl's
``timm:``/``torchvision:`` names, so the default feature cut and the train/eval handling are exercised on
the zoo's own modules. The torchvision import shim is conftest's ``torchvision_module`` fixture.
"""
import copy
import warnings

import pytest
import torch

import automtl
from automtl import Task
from automtl.compact import compact
from automtl.policy import Policy


TASKS = [Task("seg", "segmentation", classes=3), Task("depth", "depth")]
FAST = ["torchvision:resnet18", "torchvision:mobilenet_v3_small", "timm:efficientnet_b0", "timm:convnext_atto"]
SLOW = ["torchvision:efficientnet_b0", "torchvision:convnext_tiny", "torchvision:regnet_x_400mf",
        "torchvision:shufflenet_v2_x0_5", "timm:resnet18d", "timm:mobilenetv3_small_100"]


def build(name, request):
    source, _, model = name.partition(":")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if source == "timm":
            return request.getfixturevalue("timm_module").create_model(model, pretrained=False)
        return getattr(request.getfixturevalue("torchvision_module").models, model)()


@pytest.mark.parametrize("name", FAST + [pytest.param(n, marks=pytest.mark.slow) for n in SLOW])
def test_public_model_converts_with_right_numbers(name, tmp_path, request):
    torch.manual_seed(0)
    backbone = build(name, request).train()  # as built: train mode, so train-only behaviour must not leak into eval
    sm = automtl.supermodel(backbone, TASKS, torch.randn(1, 3, 64, 64)).eval()
    x = torch.randn(2, 3, 64, 64)
    policy = Policy.random(sm.layer_names, sm.task_names, sm.skip_legal, seed=0)
    hard = copy.deepcopy(sm).hard(policy).eval()
    model = compact(copy.deepcopy(sm).hard(policy)).eval()
    with torch.no_grad():
        first, second, reference = model(x), model(x), hard(x)
    for t in first:
        assert torch.equal(first[t], second[t]), f"{name}: two eval calls differ"
        torch.testing.assert_close(first[t], reference[t], rtol=1e-5, atol=1e-5, msg=f"{name}: compact != supermodel")
    automtl.save(model, tmp_path / "m.automtl")
    loaded = automtl.load(tmp_path / "m.automtl")
    with torch.no_grad():
        assert all(torch.equal(loaded(x)[t], first[t]) for t in first), f"{name}: loaded != saved"


@pytest.mark.slow
def test_memory_efficient_densenet_converts_layer_by_layer(request):
    """torchvision's DenseNet checkpoints each dense layer when ``any(t.requires_grad ...)``: the trace takes that
    branch (tests/zoo.py: checkpoint_when_training is the fast test of the kind), every convolution inside stays a
    policy layer, and the all-share supermodel computes the model's features."""
    models = request.getfixturevalue("torchvision_module").models
    torch.manual_seed(0)
    backbone = models.densenet121(memory_efficient=True).train()
    sm = automtl.supermodel(backbone, TASKS, torch.randn(1, 3, 64, 64)).eval()
    assert len(sm.layer_names) == 120
    sm.hard(Policy.uniform(sm.layer_names, sm.task_names, "share"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = torch.relu(backbone.eval().features(x))
        assert all(torch.allclose(f, expected, atol=1e-5, rtol=1e-5) for f in sm.features(x).values())
