"""The supermodel: the fx pass, the batched task axis, modes, parameter groups and accounting."""
import functools

import pytest
import torch
from torch import nn

from automtl.backbones import build_backbone, count_convs, count_parameters, list_backbones
from automtl.capture import capture
from automtl.errors import AutomtlError, ConfigError, TooLargeError
from automtl.policy import SHARE, SKIP, Policy
from automtl.reference import run_task_by_task
from automtl.supermodel import PolicyLayer, least_elements, supermodel
from automtl.tasks import Task

BUILTINS = [s.name for s in list_backbones()]
TASKS = [Task("segment", "segmentation", classes=4), Task("depth", "depth"), Task("normal", "normal")]
SIZE = 32


@functools.lru_cache(maxsize=None)
def built(name):
    """One backbone and its supermodel per builtin, shared by the tests of this module."""
    torch.manual_seed(0)
    backbone = build_backbone(name).eval()
    sm = supermodel(backbone, TASKS, torch.randn(1, 3, SIZE, SIZE)).eval()
    return backbone, sm


def close(a, b, tol=1e-4):
    return all(torch.allclose(a[k], b[k], atol=tol, rtol=tol) for k in a)


@pytest.mark.parametrize("name", BUILTINS)
def test_one_policy_layer_per_convolution(name):
    backbone, sm = built(name)
    assert len(sm.layer_names) == count_convs(backbone)
    assert all(isinstance(layer, PolicyLayer) for layer in sm.policy_layers)
    assert not any(isinstance(m, nn.Conv2d) and "." not in n for n, m in sm.net.named_children())


@pytest.mark.parametrize("name", BUILTINS)
def test_all_share_and_all_specialize_equal_the_backbone(name):
    backbone, sm = built(name)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = backbone(x)
        for choice in ("share", "specialize"):
            sm.hard(Policy.uniform(sm.layer_names, sm.task_names, choice))
            for task, feat in sm.features(x).items():
                # Bitwise for the first task batch; the folded T*B batch may take another conv kernel.
                assert torch.allclose(feat, expected, atol=1e-5, rtol=1e-5), (choice, task)


@pytest.mark.parametrize("name", BUILTINS)
def test_batched_pass_equals_task_by_task(name):
    _, sm = built(name)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        sm.soft(tau=0.7)
        mix = sm.mixing_weights(torch.Generator().manual_seed(3))
        assert close(sm(x, mix=mix), run_task_by_task(sm, x, mix))
        sm.hard(Policy.random(sm.layer_names, sm.task_names, sm.skip_legal, seed=5))
        assert close(sm(x), run_task_by_task(sm, x))
        sm.warmup()
        assert close(sm(x), run_task_by_task(sm, x))


@pytest.mark.parametrize("name", ["tiny", "resnet18", "mobilenet_v2"])
def test_per_task_batches(name):
    _, sm = built(name)
    xs = {t: torch.randn(2, 3, SIZE, SIZE) for t in sm.task_names}
    with torch.no_grad():
        sm.soft(tau=1.0)
        mix = sm.mixing_weights(torch.Generator().manual_seed(1))
        assert close(sm(xs, mix=mix), run_task_by_task(sm, xs, mix))
        # The same batch for every task, given per task, equals the shared-input pass.
        same = {t: xs["depth"] for t in sm.task_names}
        assert close(sm(same, mix=mix), sm(xs["depth"], mix=mix))


@pytest.mark.parametrize("name", BUILTINS)
def test_parameter_accounting(name):
    backbone, sm = built(name)
    T = len(TASKS)
    heads = count_parameters(sm.heads)
    assert sm.backbone_parameters() == count_parameters(backbone)
    share = Policy.uniform(sm.layer_names, sm.task_names, "share")
    spec = Policy.uniform(sm.layer_names, sm.task_names, "specialize")
    assert sm.policy_parameter_count(share) == count_parameters(backbone) + heads
    # All-specialize is T backbones (every backbone parameter sits in a policy layer or is shared).
    units = sum(i.unit_params for i in sm.layer_info)
    assert sm.policy_parameter_count(spec) == count_parameters(backbone) + heads + (T - 1) * units
    # The supermodel holds the shared operator, T copies, the skip projections and the logits.
    skips = sum(i.skip_params for i in sm.layer_info)
    logits = len(sm.layer_names) * T * 3
    assert count_parameters(sm) == count_parameters(backbone) + heads + T * units + skips + logits
    # The expected count under a one-hot distribution is the count of that policy.
    pol = Policy.random(sm.layer_names, sm.task_names, sm.skip_legal, seed=2)
    onehot = torch.nn.functional.one_hot(torch.tensor(pol.choices), 3).float()
    assert sm.expected_parameter_count(onehot).item() == pytest.approx(sm.policy_parameter_count(pol), rel=1e-6)


@pytest.mark.parametrize("name", BUILTINS)
def test_the_size_bound_is_a_lower_bound_and_refuses_below_it(name):
    """``least_elements`` never exceeds what the supermodel holds (a run folder's weights are checked against it),
    and ``max_elements`` below it refuses with a TooLargeError (a ConfigError) carrying both numbers."""
    backbone, sm = built(name)
    held = sum(t.numel() for t in sm.state_dict().values())
    least = least_elements(capture(backbone, torch.randn(1, 3, SIZE, SIZE)), TASKS)
    assert 0 < least <= held
    with pytest.raises(TooLargeError) as refused:
        supermodel(backbone, TASKS, torch.randn(1, 3, SIZE, SIZE), max_elements=least - 1)
    assert isinstance(refused.value, ConfigError) and (refused.value.least, refused.value.limit) == (least, least - 1)
    assert f"at least {least} elements" in str(refused.value)
    import copy
    import pickle
    for again in (pickle.loads(pickle.dumps(refused.value)), copy.copy(refused.value)):  # helper-80: a TypeError
        assert (type(again), str(again), again.least, again.limit) == (TooLargeError, str(refused.value), least, least - 1)


def test_parameter_groups_are_disjoint_and_complete():
    _, sm = built("tiny")
    weights = {id(p) for p in sm.weight_parameters()}
    policy = {id(p) for p in sm.policy_parameters()}
    assert not weights & policy
    assert weights | policy == {id(p) for p in sm.parameters()}
    assert sm.policy_logits.shape == (len(sm.layer_names), 3, 3)


def test_skip_is_identity_or_projection_and_illegal_skips_are_masked():
    _, sm = built("tiny")
    kinds = {i.name: i.skip_kind for i in sm.layer_info}
    assert kinds["block1_conv1.0"] == "identity"
    assert kinds["block2_conv1.0"] == "projection"
    sm.soft(1.0)
    w = sm.mixing_weights(torch.Generator().manual_seed(0))
    assert torch.allclose(w.sum(-1), torch.ones(w.shape[:2]))

    class Valid(nn.Module):  # a padding-free 3x3 conv shrinks the map: no 1x1 projection can follow it
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x)

    sm2 = supermodel(Valid(), TASKS[:2], torch.randn(1, 3, 8, 8))
    assert not sm2.skip_legal[0]
    sm2.soft(1.0)
    assert (sm2.mixing_weights()[..., SKIP] == 0).all()
    assert (sm2.discretize(sample=True, seed=1).choices[0][0] != SKIP)
    with pytest.raises(ConfigError, match="cannot be skipped"):
        sm2.hard(Policy.uniform(sm2.layer_names, sm2.task_names, "skip"))


def test_outputs_of_every_kind_and_a_custom_head():
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 7))
    tasks = [
        Task("seg", "segmentation", classes=3), Task("d", "depth"), Task("n", "normal"),
        Task("c", "classification", classes=5), Task("m", "multilabel", classes=4),
        Task("r", "regression", classes=2), Task("mine", head=head, loss=nn.MSELoss(), metric=lambda: None),
    ]
    sm = supermodel("tiny", tasks, torch.randn(1, 3, 32, 32))
    out = sm(torch.randn(3, 3, 32, 40))
    shapes = {k: tuple(v.shape) for k, v in out.items()}
    assert shapes == {"seg": (3, 3, 32, 40), "d": (3, 1, 32, 40), "n": (3, 3, 32, 40), "c": (3, 5),
                      "m": (3, 4), "r": (3, 2), "mine": (3, 7)}
    assert torch.allclose(out["n"].norm(dim=1), torch.ones(3, 32, 40), atol=1e-4)


def test_gradients_reach_weights_and_policy_in_soft_mode():
    sm = supermodel("tiny", TASKS, torch.randn(1, 3, 32, 32)).soft(1.0)
    out = sm(torch.randn(2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    sum(o.float().mean() for o in out.values()).backward()
    assert sm.policy_logits.grad is not None and sm.policy_logits.grad.abs().sum() > 0
    layer = sm.policy_layers[1]
    assert layer.shared.conv.weight.grad is not None
    assert all(s.conv.weight.grad is not None for s in layer.specialized)


def test_hard_mode_trains_only_the_chosen_operators():
    sm = supermodel("tiny", TASKS, torch.randn(1, 3, 32, 32))
    sm.hard(Policy.uniform(sm.layer_names, sm.task_names, "share"))
    out = sm(torch.randn(2, 3, 32, 32))
    sum(o.mean() for o in out.values()).backward()
    layer = sm.policy_layers[0]
    assert layer.shared.conv.weight.grad is not None
    assert all(s.conv.weight.grad is None for s in layer.specialized)


def test_specialized_copies_start_from_the_backbone_weights_and_are_independent():
    _, sm = built("tiny")
    layer = sm.policy_layers[0]
    for s in layer.specialized:
        assert torch.equal(s.conv.weight, layer.shared.conv.weight)
        assert s.conv.weight.data_ptr() != layer.shared.conv.weight.data_ptr()


def test_discretize_argmax_and_seeded_sample():
    sm = supermodel("tiny", TASKS, torch.randn(1, 3, 32, 32))
    with torch.no_grad():
        sm.policy_logits[:, 0, 1] = 5.0  # task 0 prefers specialize everywhere
    pol = sm.discretize()
    assert pol.column("segment") == [1] * len(sm.layer_names)
    assert sm.discretize(sample=True, seed=3) == sm.discretize(sample=True, seed=3)


def test_bad_inputs_get_clear_errors():
    sm = supermodel("tiny", TASKS, torch.randn(1, 3, 32, 32))
    with pytest.raises(ConfigError, match="temperature"):
        sm.soft(0)
    with pytest.raises(AutomtlError, match="per-task inputs"):
        sm({"segment": torch.randn(1, 3, 32, 32)})
    with pytest.raises(AutomtlError, match="same shape"):
        sm({t: torch.randn(i + 1, 3, 32, 32) for i, t in enumerate(sm.task_names)})
    with pytest.raises(AutomtlError, match=r"\(N, C, H, W\)"):
        sm(torch.randn(3, 32, 32))
    with pytest.raises(ConfigError, match="tasks"):
        sm.hard(Policy.uniform(sm.layer_names, ["a", "b", "c"], "share"))
    with pytest.raises(ConfigError, match="layers do not match"):
        sm.hard(Policy.uniform(sm.layer_names[:-1], sm.task_names, "share"))
    with pytest.raises(ConfigError, match="unique"):
        supermodel("tiny", [Task("a", "depth"), Task("a", "depth")], torch.randn(1, 3, 32, 32))
    with pytest.raises(ConfigError, match="no tasks"):
        supermodel("tiny", [], torch.randn(1, 3, 32, 32))


def test_random_policy_never_skips_an_illegal_layer_even_when_asked_only_for_skips():
    _, sm = built("tiny")
    assert not all(sm.skip_legal)
    pol = Policy.random(sm.layer_names, sm.task_names, sm.skip_legal, seed=0, probs=(0, 0, 1))
    for legal, row in zip(sm.skip_legal, pol.choices):
        assert row == ([SKIP] * len(row) if legal else [SHARE] * len(row))
    pol.check(sm.layer_names, sm.task_names, sm.skip_legal)
    with pytest.raises(ConfigError, match="three non-negative weights"):
        Policy.random(sm.layer_names, sm.task_names, sm.skip_legal, probs=(0, 0, 0))


@pytest.mark.parametrize("tasks", [1, 2])
def test_a_custom_head_built_for_other_features_is_refused_at_conversion(tasks):
    """A head for 64 channels on features of 32 was, with one task, a RuntimeError traceback from the search's cost
    count, and with two, a refusal blaming the batch size."""
    from automtl.metrics import RegressionMetric

    head = nn.Conv2d(64, 1, 1)
    custom = Task("bright", head=head, loss=lambda p, y: ((p.mean((1, 2, 3)) - y) ** 2).mean(), metric=RegressionMetric)
    others = [Task("depth", "depth")] if tasks == 2 else []
    with pytest.raises(ConfigError, match=r"the head of task 'bright' fails on the backbone's features, of shape "
                                          r"\(N, 32, .*to have 64 channels.*build it for 32 input channels"):
        supermodel("tiny", [*others, custom], torch.randn(1, 3, 16, 16))
    head.train()
    sm = supermodel("tiny", [*others, Task("bright", head=nn.Conv2d(32, 1, 1).train(), loss=custom.loss,
                                           metric=RegressionMetric)], torch.randn(1, 3, 16, 16))
    assert sm.heads["bright"].training  # checked in eval mode, its mode put back


def test_arguments_of_the_wrong_kind_are_one_sentence():
    """A backbone handed to compact(), one Task or a dict of them as the tasks: a ConfigError saying what to pass,
    not an AttributeError from inside torch or "'Task' object is not iterable"."""
    from automtl.compact import compact

    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ConfigError, match="compiles an automtl SuperModel .* got a TinyCNN"):
        compact(build_backbone("tiny"))
    with pytest.raises(ConfigError, match="got the one task 'd'; pass \\[task\\]"):
        supermodel("tiny", Task("d", "depth"), x)
    with pytest.raises(ConfigError, match="got a mapping; pass list"):
        supermodel("tiny", {"d": Task("d", "depth")}, x)


def test_a_policy_over_a_supermodel_or_tasks_instead_of_their_names_is_one_sentence():
    """Policy.uniform(sm, ...) raised "'SuperModel' object is not iterable"; Policy.uniform(layers, sm.tasks, ...) kept
    "Task(name=...)" strings as task names, refused later by compact with a confusing message."""
    sm = supermodel("tiny", [Task("d", "depth")], torch.randn(1, 3, 32, 32))
    with pytest.raises(ConfigError, match="a policy's layers are a list of names .* got a SuperModel"):
        Policy.uniform(sm, sm.task_names, "share")
    with pytest.raises(ConfigError, match="a policy's tasks are names .* got a Task"):
        Policy.random(sm.layer_names, sm.tasks)
    assert Policy.uniform(sm.layer_names, sm.task_names, "share").tasks == ["d"]
