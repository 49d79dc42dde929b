"""Capture: fx trace, shape propagation, the cut at the feature node, and its errors."""
import dataclasses
import itertools

import warnings

import pytest
import torch
from torch import nn

from automtl.backbones import build_backbone, count_convs, list_backbones
from automtl.capture import capture
from automtl.errors import BackboneError, TraceError

BUILTINS = [s.name for s in list_backbones()]


@pytest.mark.parametrize("name", BUILTINS)
def test_traced_equals_eager_and_convs_are_found(name):
    backbone = build_backbone(name).eval()
    x = torch.randn(1, 3, 64, 64)
    cap = capture(backbone, x)
    cap.graph_module.eval()
    with torch.no_grad():
        assert torch.equal(cap.graph_module(x), backbone(x))
    assert len(cap.conv_nodes) == count_convs(backbone)
    assert cap.feature_shape == tuple(backbone(x).shape)


class WithClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        f = torch.relu(self.conv2(torch.relu(self.conv(x))))
        return self.fc(f.mean((2, 3)))


def test_default_cut_is_the_last_4d_node_and_drops_the_classifier():
    cap = capture(WithClassifier(), torch.randn(2, 3, 16, 16))
    assert cap.feature_shape == (2, 8, 8, 8)
    assert not hasattr(cap.graph_module, "fc")
    assert cap.graph_module(torch.randn(3, 3, 16, 16)).shape == (3, 8, 8, 8)


def test_named_feature_node_by_node_or_module_name():
    cap = capture(WithClassifier(), torch.randn(1, 3, 16, 16), feature_node="conv")
    assert cap.feature_shape == (1, 8, 16, 16)
    assert len(cap.conv_nodes) == 1


def test_capture_does_not_change_the_users_backbone():
    net = WithClassifier()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    capture(net, torch.randn(1, 3, 16, 16))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


class Untraceable(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x * 2
        return -x


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.inner = Untraceable()

    def forward(self, x):
        return self.inner(self.conv(x))


def test_untraceable_backbone_names_module_and_line():
    with pytest.raises(BackboneError) as err:
        capture(Wrapper(), torch.randn(1, 3, 8, 8))
    msg = str(err.value)
    assert "inner (test_capture.Untraceable)" in msg  # the class with its module: leaf_modules takes the class
    assert "test_capture.py" in msg and "x.sum() > 0" in msg
    assert "leaf_modules" in msg and "concrete_args" in msg


class _ControlFlowAtTheTop(nn.Module):
    """A detector's way: the top module's forward loops over its input in Python."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())

    def forward(self, x):
        return [self.backbone(img[None]) for img in x]


def test_untraceable_top_module_is_not_advised_to_become_a_leaf():
    with pytest.raises(BackboneError, match="in module <root> .*fix its Python control flow with concrete_args, or "
                                            "convert the part of the model that is a CNN \\(such as its .backbone"):
        capture(_ControlFlowAtTheTop(), torch.randn(1, 3, 8, 8))
    assert capture(_ControlFlowAtTheTop().backbone, torch.randn(1, 3, 8, 8)).feature_shape == (1, 4, 6, 6)


class _SizeCheckingHead(nn.Module):
    """timm's VGG head (``ConvMlp``): pools a map smaller than its kernel first, a branch on the input's size."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Conv2d(4, 16, 8)

    def forward(self, x):
        if x.shape[-1] < 8:
            x = torch.nn.functional.adaptive_avg_pool2d(x, 8)
        return self.fc(x)


class _UntraceableHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.pre_logits = _SizeCheckingHead()

    def forward(self, x):
        return self.pre_logits(self.features(x))


def test_a_module_that_does_not_trace_is_run_as_one_call_where_the_cut_leaves_it_out():
    net = _UntraceableHead()
    with pytest.warns(UserWarning, match="module 'pre_logits' does not trace with torch.fx .*x.shape\\[-1\\] < 8.*; "
                                         "the features are cut before it"):
        cap = capture(net, torch.randn(1, 3, 16, 16))
    assert cap.feature_shape == (1, 4, 8, 8)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(cap.graph_module(x), net.features(x))
    with pytest.raises(BackboneError, match="cannot trace the backbone in module pre_logits .*mark that module as a "
                                            "leaf") as refused:  # named as the features: kept, so refused as its trace was
        capture(net, torch.randn(1, 3, 16, 16), feature_node="pre_logits")
    # a public type (it was capture._NotTraceable) with where and why
    assert type(refused.value) is TraceError and refused.value.path == "pre_logits" and refused.value.reason
    for inside in ("pre_logits.fc", "pre_logits_fc"):  # a name inside it: as its trace was, not "no node named"
        with pytest.raises(BackboneError, match="cannot trace the backbone in module pre_logits"):
            capture(net, torch.randn(1, 3, 16, 16), feature_node=inside)


def test_leaf_module_makes_it_traceable():
    cap = capture(Wrapper(), torch.randn(1, 3, 8, 8), leaf_modules=[Untraceable])
    assert cap.feature_shape == (1, 4, 6, 6)


def test_no_convolution():
    net = nn.Sequential(nn.AvgPool2d(2), nn.ReLU())
    with pytest.raises(BackboneError, match="no Conv2d"):
        capture(net, torch.randn(1, 3, 8, 8))


def test_unknown_feature_node_suggests_names():
    with pytest.raises(BackboneError, match="no node named 'conv3'.*did you mean"):
        capture(WithClassifier(), torch.randn(1, 3, 16, 16), feature_node="conv3")


def test_feature_node_that_is_not_4d():
    with pytest.raises(BackboneError, match="not a 4-D feature map"):
        capture(WithClassifier(), torch.randn(1, 3, 16, 16), feature_node="fc")


@pytest.mark.parametrize("shape", [(3, 16, 16), (1, 1, 3, 16, 16)])
def test_example_input_of_wrong_rank(shape):
    with pytest.raises(BackboneError, match="4-D input"):
        capture(WithClassifier(), torch.randn(*shape))


def test_example_input_with_wrong_channels():
    with pytest.raises(BackboneError, match="example_input"):
        capture(WithClassifier(), torch.randn(1, 4, 16, 16))


def test_not_a_module():
    with pytest.raises(BackboneError, match="torch.nn.Module"):
        capture(lambda x: x, torch.randn(1, 3, 8, 8))


class _Sign(torch.autograd.Function):
    """A straight-through estimator: sign forward, identity backward."""

    @staticmethod
    def forward(ctx, x):
        return torch.sign(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _Binarize(nn.Module):
    def forward(self, x):
        return _Sign.apply(x)


class _TwoConvs(nn.Module):
    def __init__(self, middle=None):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.mid = middle if middle is not None else nn.ReLU()

    def forward(self, x):
        return self.c2(self.mid(self.c1(x)))


def _hooked(where, kind):
    net = _TwoConvs(nn.Sequential(nn.ReLU()))
    module = {"root": net, "leaf": net.c2, "traced": net.mid}[where]
    if kind == "forward":
        module.register_forward_hook(lambda m, args, out: out * 2)
    elif kind == "pre":
        module.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    else:
        module.register_full_backward_hook(lambda m, gin, gout: tuple(g * 0.1 if g is not None else g for g in gin))
    return net


@pytest.mark.parametrize("where, kind, match", [
    ("root", "forward", "the backbone _TwoConvs itself has a forward hook"),
    ("root", "pre", "the backbone _TwoConvs itself has a forward hook"),
    ("leaf", "forward", "module 'c2' .Conv2d. has a forward hook"),
    ("leaf", "pre", "module 'c2' .Conv2d. has a forward hook"),
    ("traced", "backward", "module 'mid' .Sequential. has a backward hook"),
    ("leaf", "backward", "module 'c2' .Conv2d. has a backward hook"),
])
def test_hooks_the_converted_model_would_not_run_are_refused(where, kind, match):
    """torch.fx calls the root's forward directly and keeps no autograd hook; a leaf's hook would be copied into task
    copies with what it reads and lost by save. (A forward hook on a module traced through is recorded: it stays.)"""
    with pytest.raises(BackboneError, match=match):
        capture(_hooked(where, kind), torch.randn(1, 3, 16, 16))


def test_a_forward_hook_on_a_module_traced_through_is_kept():
    net = _hooked("traced", "forward")
    cap = capture(net, torch.randn(1, 3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(cap.graph_module(x), net(x))


def test_global_module_hooks_are_refused():
    handle = nn.modules.module.register_module_forward_hook(lambda m, args, out: out)
    try:
        with pytest.raises(BackboneError, match="global module hooks"):
            capture(_TwoConvs(), torch.randn(1, 3, 16, 16))
    finally:
        handle.remove()


def test_a_custom_autograd_function_is_refused_unless_its_module_is_a_leaf():
    """torch.fx records the function's forward and loses its backward: the straight-through gradient became 0."""
    with pytest.raises(BackboneError, match="custom autograd function _Sign.*leaf_modules"):
        capture(_TwoConvs(_Binarize()), torch.randn(1, 3, 16, 16))
    net = _TwoConvs(_Binarize())
    cap = capture(net, torch.randn(1, 3, 16, 16), leaf_modules=[_Binarize])
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    cap.graph_module(x).sum().backward()
    assert x.grad.abs().sum() > 0  # the straight-through backward, not sign's zero gradient


def test_activation_checkpointing_is_traced_through():
    import torch.utils.checkpoint as cp

    class Checkpointed(_TwoConvs):
        def forward(self, x):
            return self.c2(cp.checkpoint(lambda y: self.mid(self.c1(y)), x, use_reentrant=True))

    net = Checkpointed()
    cap = capture(net, torch.randn(1, 3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(cap.graph_module(x), net(x))


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_submodules_are_refused(how):
    net = _TwoConvs()
    net.c2 = torch.jit.script(net.c2) if how == "script" else torch.jit.trace(net.c2, torch.randn(1, 8, 16, 16))
    with pytest.raises(BackboneError, match="module 'c2' is a TorchScript module"):
        capture(net, torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("wrap, match", [
    (lambda m: nn.DataParallel(m), r"the backbone is wrapped by nn.DataParallel; pass the model it wraps \(backbone.module\)"),
    (lambda m: nn.Sequential(nn.DataParallel(m)), r"module '0' is wrapped by nn.DataParallel; pass the model it wraps \(backbone.0.module\)"),
    (lambda m: torch.compile(m), r"wrapped by torch.compile; pass the model it wraps \(backbone._orig_mod\)"),
])
def test_wrapped_models_are_refused_with_the_model_to_pass(wrap, match):
    with pytest.raises(BackboneError, match=match):
        capture(wrap(_TwoConvs()), torch.randn(1, 3, 16, 16))


def test_lazy_layers_not_yet_built_are_refused_with_the_remedy():
    net = _TwoConvs(nn.Sequential(nn.LazyBatchNorm2d(), nn.ReLU()))
    with pytest.raises(BackboneError, match="module 'mid.0' .LazyBatchNorm2d. has lazy parameters not yet built; run the backbone once"):
        capture(net, torch.randn(1, 3, 16, 16))
    net(torch.randn(2, 3, 16, 16))
    capture(net, torch.randn(1, 3, 16, 16))  # built: converts


def test_a_parametrization_that_keeps_state_is_refused():
    """spectral_norm's power iteration runs at every train-mode call: the compact model calls a shared conv once per
    group of tasks, the supermodel once (its u vector drifted 29% apart). Stateless ones (weight_norm) convert."""
    from torch.nn.utils import parametrizations

    net = _TwoConvs()
    parametrizations.spectral_norm(net.c2)
    with pytest.raises(BackboneError, match="module 'c2' .ParametrizedConv2d. has a parametrization whose state changes "
                                            "each time it computes 'weight' in training ._SpectralNorm's _u, _v"):
        capture(net, torch.randn(1, 3, 16, 16))
    net = _TwoConvs()
    parametrizations.weight_norm(net.c2)
    capture(net, torch.randn(1, 3, 16, 16))


class _TokensInBetween(nn.Module):
    """A feature map turned to tokens (attention over them) and back, then more convolutions: a 4-D output."""

    def __init__(self, fixed_size: bool = False):
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.c2, self.c3 = nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1)
        self.fixed_size = fixed_size

    def forward(self, x):
        y = self.c1(x)
        b, c, h, w = y.shape
        t = y.flatten(2).transpose(1, 2)
        t = self.attn(t, t, t, need_weights=False)[0]
        if self.fixed_size:  # the tokens folded back at 16 x 16 whatever the input: runs at other sizes fail
            h = w = 16
        return self.c3(torch.relu(self.c2(t.transpose(1, 2).reshape(b, c, h, w))))


def test_maps_that_tokens_lead_back_to_are_the_trunk():
    """PVT's stages end in (N, C, H, W) after attention over tokens: the default cut goes on to the last map."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cap = capture(_TokensInBetween(), torch.randn(1, 3, 16, 16))
    assert cap.feature_shape == (1, 32, 16, 16)


def test_a_default_cut_before_a_feature_map_output_names_the_convolutions_it_leaves_out():
    """Where the runs at other sizes cannot tell the maps after the tokens apart (the backbone takes one size
    only), the trunk ends at the tokens, and the warning names what the cut leaves out and how to keep it."""
    with pytest.warns(UserWarning, match=r"though its output 'c3' \(1, 32, 16, 16\) is a feature map too; this leaves "
                                         r"out 2 convolution\(s\) after the cut \(c2, c3\): pass feature_node='c3'"):
        cap = capture(_TokensInBetween(fixed_size=True), torch.randn(1, 3, 16, 16))
    assert cap.feature_shape == (1, 16, 16, 16)
    cap = capture(_TokensInBetween(fixed_size=True), torch.randn(1, 3, 16, 16), feature_node="c3")  # the advice works
    assert cap.feature_shape == (1, 32, 16, 16)


class _ChannelsLast(nn.Module):
    """A ConvNeXt-style block at the end: permuted to (N, H, W, C) for LayerNorm and Linear, never permuted back."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.norm(self.stem(x).permute(0, 2, 3, 1)))


def test_a_channels_last_map_is_the_features_moved_to_channels_first():
    """(N, H, W, C) is a map too: the default cut takes the deepest, named or not, and permutes it to (N, C, H, W)."""
    net, x = _ChannelsLast(), torch.randn(2, 3, 16, 16)
    cap = capture(net, torch.randn(1, 3, 16, 16))
    assert cap.feature_shape == (1, 8, 8, 8) and cap.feature_node == "fc_channels_first"
    assert torch.allclose(cap.graph_module(x), net(x).permute(0, 3, 1, 2))
    cap = capture(net, torch.randn(1, 3, 16, 16), feature_node="norm")
    assert torch.allclose(cap.graph_module(x), net.norm(net.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


class _ChannelsLastOneSize(nn.Module):
    """VOLO's pattern at the one size it takes (a position embedding of fixed size): blocks on (N, H, W, C) with a
    residual, so the runs at other sizes cannot tell the layout; the graph does (the permute)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.pos = nn.Parameter(torch.zeros(1, 8, 8, 8))
        self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x):
        x = (self.stem(x) + self.pos).permute(0, 2, 3, 1)
        x = x + self.fc(self.norm(x))
        return x.transpose(1, 2) * 2  # (N, W, H, C): still not (N, C, H, W)


def test_the_axes_of_a_backbone_of_one_size_are_followed_through_the_graph():
    net, x = _ChannelsLastOneSize(), torch.randn(2, 3, 16, 16)
    cap = capture(net, torch.randn(1, 3, 16, 16))
    assert cap.feature_node == "add_1_channels_first"  # the block's output, (N, H, W, C), moved to (N, C, H, W)
    assert torch.allclose(cap.graph_module(x), (net(x) / 2).transpose(1, 2).permute(0, 3, 1, 2))
    assert capture(net, torch.randn(1, 3, 16, 16), feature_node="add").feature_shape == (1, 8, 8, 8)  # stem + pos
    with pytest.raises(BackboneError, match="feature node 'mul' has output .* whose axes do not follow"):
        capture(net, torch.randn(1, 3, 16, 16), feature_node="mul")  # (N, W, H, C)


class _PixelPatches(nn.Module):
    """TNT's pattern at the one size it takes: the image unfolded into patches first, a convolution over each patch
    (axes made by a reshape), then tokens and attention heads (N, tokens, heads, dim)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 3, padding=1)
        self.pos = nn.Parameter(torch.zeros(1, 8, 4, 4))

    def forward(self, x):
        torch._assert(x.shape[2] == 16, "the model takes 16 x 16 images")
        n = x.shape[0]
        patches = torch.nn.functional.unfold(x, 4, stride=4).transpose(1, 2).reshape(n * 16, 3, 4, 4)
        tokens = (self.proj(patches) + self.pos).reshape(n, 16, 128)
        return tokens.reshape(n, 16, 2, 64).softmax(-1)


def test_a_backbone_whose_4d_tensors_are_all_reshaped_tokens_is_refused_unless_named():
    with pytest.raises(BackboneError, match="no 4-D tensor on the way to the backbone's output is known to be a "
                                            "feature map .* vision transformer; name a node or module"):
        capture(_PixelPatches(), torch.randn(1, 3, 16, 16))
    assert capture(_PixelPatches(), torch.randn(1, 3, 16, 16), feature_node="proj").feature_shape == (16, 8, 4, 4)


class _ConvHead(nn.Module):
    """VGG's head as timm builds it: a convolution whose kernel covers the whole map, a (N, C, 1, 1) "map" (a
    fully connected layer); the map pooled to 3 x 3 first (a small input), or not (the input VGG was built for:
    at a larger input that convolution's output grows)."""

    def __init__(self, pooled: bool):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1))
        self.pre_logits = nn.Sequential(nn.AdaptiveAvgPool2d(3), nn.Conv2d(8, 32, 3), nn.ReLU()) if pooled else \
            nn.Sequential(nn.Conv2d(8, 32, 8), nn.ReLU())

    def forward(self, x):
        return self.pre_logits(self.features(x))


@pytest.mark.parametrize("pooled", [True, False], ids=["pooled to the kernel", "the kernel covers the map"])
def test_a_fully_connected_head_in_convolutions_is_not_the_default_features(pooled):
    cap = capture(_ConvHead(pooled), torch.randn(1, 3, 16, 16))
    assert cap.feature_shape == (1, 8, 8, 8)
    cap = capture(_ConvHead(pooled), torch.randn(1, 3, 16, 16), feature_node="pre_logits")  # named: the user's choice
    assert cap.feature_shape == (1, 32, 1, 1)


def test_a_downsampling_step_to_a_1x1_map_stays_in_the_trunk():
    """Inception's last stages at a small input: a stride-2 convolution without padding takes 3 x 3 to 1 x 1."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                        nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU())
    cap = capture(net, torch.randn(1, 3, 12, 12))
    assert cap.feature_shape == (1, 16, 1, 1) and len(cap.conv_nodes) == 3


class _ResizedFirst(nn.Module):
    """The input normalised, then resized to 16 x 16 whatever its size: every map after it is of a fixed size."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)  # a counter written in the forward, as some backbones keep one
        x = torch.nn.functional.interpolate((x - 0.5) / 0.25, size=(16, 16))
        return self.c2(torch.relu(self.c1(x)))


def test_a_backbone_that_resizes_its_input_first_is_cut_after_its_convolutions():
    net = _ResizedFirst()
    cap = capture(net, torch.randn(1, 3, 24, 24))
    assert cap.feature_shape == (1, 8, 8, 8)
    assert float(net.calls) == 0 and float(cap.graph_module.calls) <= 2  # the layout runs put the counter back


@pytest.mark.parametrize("hook", ["register_hook", "register_post_accumulate_grad_hook"])
def test_gradient_hooks_on_tensors_are_refused(hook):
    """Tensors are copied without their hooks: the converted model trained with a gradient the backbone's hook zeroed."""
    net = _TwoConvs()
    getattr(net.c1.weight, hook)(lambda g: g * 0 if hook == "register_hook" else None)
    with pytest.raises(BackboneError, match="tensor 'c1.weight' has a gradient hook"):
        capture(net, torch.randn(1, 3, 16, 16))


def test_a_forward_set_on_the_instance_is_refused():
    import types

    net = _TwoConvs()
    net.forward = types.MethodType(lambda self, x: _TwoConvs.forward(self, x * 2 - 1), net)  # torch.fx calls the class's
    with pytest.raises(BackboneError, match="the backbone _TwoConvs itself has a forward set on the instance"):
        capture(net, torch.randn(1, 3, 16, 16))


def test_a_torchscript_backbone_is_refused_in_a_sentence_that_reads():
    with pytest.raises(BackboneError, match="^the backbone is a TorchScript module"):
        capture(torch.jit.script(_TwoConvs()), torch.randn(1, 3, 16, 16))


round_sign = _Sign.apply  # the common alias, bound when the module is imported


class _BinarizeByAlias(nn.Module):
    def forward(self, x):
        return round_sign(x)


def test_a_custom_autograd_function_applied_through_an_alias_is_refused():
    with pytest.raises(BackboneError, match="custom autograd function _Sign"):
        capture(_TwoConvs(_BinarizeByAlias()), torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("method", ["__call__", "_call_impl"])
def test_a_backbone_overriding_call_is_refused(method):
    class Scaled(_TwoConvs):
        pass

    setattr(Scaled, method, lambda self, x: nn.Module.__call__(self, x * 0.5))
    with pytest.raises(BackboneError, match="overrides __call__ or _call_impl"):
        capture(Scaled(), torch.randn(1, 3, 16, 16))


class _Counter(nn.Module):
    """A parametrization that keeps its state in a frozen parameter, not a buffer."""

    def __init__(self):
        super().__init__()
        self.calls = nn.Parameter(torch.zeros(()), requires_grad=False)

    def forward(self, w):
        if self.training:
            self.calls.data += 1
        return w * (1 + 0 * self.calls)


def test_a_parametrization_keeping_state_in_a_frozen_parameter_is_refused():
    from torch.nn.utils import parametrize

    net = _TwoConvs()
    parametrize.register_parametrization(net.c2, "weight", _Counter())
    with pytest.raises(BackboneError, match=r"has a parametrization whose state changes .*\(_Counter's calls"):
        capture(net, torch.randn(1, 3, 16, 16))


# ---- the trace computes the backbone (automtl.tracecheck): outputs and gradients, whatever the route ----------


class _BinarizeAroundApply(nn.Module):
    """The straight-through function applied through its base class's ``apply``: ``Function.apply``'s body (where
    the named refusal looks) never runs, and the trace keeps sign's zero gradient."""

    def forward(self, x):
        return super(torch.autograd.Function, _Sign).apply(x)


class _PythonRandom(nn.Module):
    def forward(self, x):
        import random

        return x * (1 + random.random())


class _CallCounter(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * self.calls


class _NoGradScale(nn.Module):
    """A scale computed under no_grad: eager trains nothing through it, the trace (which does not record the block)
    would train through it."""

    def forward(self, x):
        with torch.no_grad():
            s = x.pow(2).mean((1, 2, 3), keepdim=True).add(1).sqrt()
        return x / s


class _AutocastBlock(nn.Module):
    """Part of the forward in bfloat16: the trace, which does not record the block, computes it in float32."""

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = torch.nn.functional.conv2d(x, torch.ones(8, 8, 3, 3) / 72, padding=1)
        return y.float()


class _TensorHook(nn.Module):
    def forward(self, x):
        y = x * 1
        if not isinstance(y, torch.fx.Proxy) and y.requires_grad:
            y.register_hook(lambda g: -g)  # a gradient reversal the trace does not see
        return y


@pytest.mark.parametrize("middle, match", [
    (_BinarizeAroundApply, "other gradients than its forward in eval mode .the gradient of"),
    (_PythonRandom, "draws from Python's random module while traced"),
    (_CallCounter, "other outputs than its forward .*in a second call"),
    (_NoGradScale, r"other gradients .* torch.no_grad\(\) or torch.autocast block: use .detach"),
    (_TensorHook, "other gradients"),
    (_AutocastBlock, r"other outputs .* what it does not record \(a torch.autocast block: autocast around the whole model"),
], ids=["function around apply", "python random", "call counter", "no_grad block", "hook only when not traced",
        "autocast block"])
def test_a_trace_that_computes_other_values_or_gradients_is_refused(middle, match):
    """Whatever the route, a trace that differs from the eager forward is found by running both."""
    with pytest.raises(BackboneError, match=match):
        capture(_TwoConvs(middle()), torch.randn(1, 3, 16, 16))
    if middle is not _CallCounter:  # as a leaf it runs as one call (a counter differs in every call, leaf or not)
        capture(_TwoConvs(middle()), torch.randn(1, 3, 16, 16), leaf_modules=[middle])


class _TrainOnlyReversal(nn.Module):
    def forward(self, x):
        if self.training:
            return super(torch.autograd.Function, _Sign).apply(x)
        return x


def test_the_train_mode_trace_is_checked_too():
    with pytest.raises(BackboneError, match="other gradients than its forward in train mode"):
        capture(_TwoConvs(_TrainOnlyReversal()), torch.randn(1, 3, 16, 16))


def test_the_trace_check_changes_nothing():
    """Buffers (running statistics), each module's train flag, gradients and the random state are as before."""
    from automtl.tracecheck import check_trace

    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Dropout(0.5), nn.Conv2d(8, 4, 3))
    net[1].eval()  # a mixed mode, kept
    state = {k: v.clone() for k, v in net.state_dict().items()}
    gm, x = torch.fx.symbolic_trace(net), torch.randn(1, 3, 40, 40)
    rng = torch.random.get_rng_state()
    check_trace(net, {"eval": gm, "train": gm}, x)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
    assert [m.training for m in net] == [True, False, True, True]
    assert all(p.grad is None for p in net.parameters())


class _TrainOnlyNoGrad(nn.Module):
    """The same operations in both modes (the two graphs are twins), a no_grad block in train mode only."""

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                s = x.pow(2).mean((1, 2, 3), keepdim=True).add(1).sqrt()
        else:
            s = x.pow(2).mean((1, 2, 3), keepdim=True).add(1).sqrt()
        return x / s


class _FrozenForward(_TwoConvs):
    @torch.no_grad()
    def forward(self, x):  # every eager gradient is zero: compared without dividing by it
        return super().forward(x)


class _BatchStatisticsHead(nn.Module):
    """Cannot run one image in eval mode (BatchNorm1d without running statistics), so the check takes two."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.bn = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.BatchNorm1d(8, track_running_stats=False)

    def forward(self, x):
        y = self.c2(torch.relu(self.c1(x)))
        with torch.no_grad():
            s = y.abs().mean((1, 2, 3), keepdim=True) + 1
        return self.bn((y / s).mean((2, 3)))


@dataclasses.dataclass
class _Out:
    features: torch.Tensor
    logits: torch.Tensor


class _DataclassOut(_TwoConvs):
    def forward(self, x):
        f = super().forward(x)
        with torch.no_grad():
            s = f.abs().mean() + 1
        return _Out(f / s, f.mean((2, 3)))


_TICKS = itertools.count(1)


def _tick() -> float:
    """A Python value that changes with every call and that no module holds (a clock, a global schedule): the
    trace freezes the one it read."""
    return 0.1 * next(_TICKS)


class _BoxesAndScores(nn.Module):
    """A detector-style output: pixel coordinates beside [0, 1] scores in one tensor, the scores' offset frozen."""

    def __init__(self):
        super().__init__()
        self.c, self.box, self.cls = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 1), nn.Conv2d(16, 3, 1)

    def forward(self, x):
        f = torch.relu(self.c(x))
        boxes = torch.sigmoid(self.box(f)) * 512
        return torch.cat([boxes, torch.sigmoid(self.cls(f)) - 0.05 * _tick()], 1)


@pytest.mark.parametrize("net, match", [
    (lambda: _TwoConvs(_TrainOnlyNoGrad()), "other gradients than its forward in train mode"),
    (_FrozenForward, "other gradients .*off by more than 1000%"),
    (_BatchStatisticsHead, "other gradients"),
    (_DataclassOut, "other gradients"),
    (_BoxesAndScores, "other outputs"),
], ids=["train-only no_grad, twin graphs", "no_grad forward", "needs two images", "dataclass output",
        "scores beside pixels"])
def test_the_trace_check_reaches_every_case(net, match):
    with pytest.raises(BackboneError, match=match):
        capture(net(), torch.randn(4, 3, 24, 24))


class _StepCounter(nn.Module):
    """Python state a leaf keeps (a warm-up ramp): the same in both of the check's runs."""

    def __init__(self):
        super().__init__()
        self.steps = 0

    def forward(self, x):
        self.steps += 1
        return x * min(1.0, 0.5 + self.steps / 10)


class _OwnGenerator(nn.Module):
    def __init__(self):
        super().__init__()
        self.g = torch.Generator().manual_seed(123)

    def forward(self, x):
        return x + 0.1 * torch.randn(x.shape, generator=self.g)


class _NumpyJitter(nn.Module):
    def forward(self, x):
        import numpy as np

        return x * float(1 + 0.1 * np.random.rand())


class _LazyGrid(nn.Module):
    """A cache filled on the first call from the input's size (never run before conversion)."""

    def __init__(self):
        super().__init__()
        self.grid = None

    def forward(self, x):
        if self.grid is None:
            self.grid = torch.arange(x.shape[-1], dtype=x.dtype).view(1, 1, 1, -1) / x.shape[-1]
        return x + self.grid


class _LeafRandomness(nn.Module):
    """A numpy Generator, a random.Random and a step count in a plain tensor, each advanced by every call."""

    def __init__(self):
        import random

        import numpy as np

        super().__init__()
        self.np_gen, self.py_gen, self.steps = np.random.default_rng(0), random.Random(0), torch.zeros(())

    def forward(self, x):
        self.steps += 1
        return x * float(1 + self.np_gen.random() + self.py_gen.random()) * (1 + self.steps)


class _NestedLazyCache(nn.Module):
    """An attribute made on the first call, holding its cache deep in containers."""

    def forward(self, x):
        if not hasattr(self, "cache"):
            self.cache = {"grid": {"w": (torch.arange(x.shape[-1], dtype=x.dtype) / x.shape[-1],)}}
        return x + self.cache["grid"]["w"][0]


@pytest.mark.parametrize("middle, leaf", [(_StepCounter, True), (_OwnGenerator, True), (_NumpyJitter, True),
                                          (_LeafRandomness, True), (_LazyGrid, False), (_NestedLazyCache, False)],
                         ids=["counter", "generator", "numpy", "numpy generator, random.Random, tensor counter",
                              "lazy cache", "nested lazy cache"])
def test_python_state_is_the_same_in_both_runs_and_restored(middle, leaf):
    """Leaves run as one call in the converted model: their counters, generators and numpy draws start from the same
    state in both of the check's runs, and the check leaves them as they were."""
    import numpy as np

    net = _TwoConvs(middle())
    numpy_state = np.random.get_state()[1].copy()
    cap = capture(net, torch.randn(1, 3, 16, 16), leaf_modules=[middle] if leaf else ())
    mid = cap.graph_module.get_submodule("mid") if leaf else None
    assert np.array_equal(np.random.get_state()[1], numpy_state)
    if middle is _StepCounter:
        assert mid.steps == 0
    if middle is _OwnGenerator:
        assert torch.equal(mid.g.get_state(), torch.Generator().manual_seed(123).get_state())
    if middle is _LazyGrid:  # the graph computes the grid in every call (the trace's cache of traced values undone)
        x = torch.randn(2, 3, 16, 16)
        assert torch.allclose(cap.graph_module(x), net.c2(net.c1(x) + torch.arange(16.0) / 16))


def test_converting_under_inference_mode_is_refused():
    with torch.inference_mode(), pytest.raises(BackboneError, match="outside inference_mode"):
        capture(_TwoConvs(), torch.randn(1, 3, 16, 16))


class _FrozenDrawInPlace(nn.Module):
    """Writes into its input in place (the check gives each program a copy) around a frozen Python value."""

    def forward(self, x):
        x.sub_(0.5)
        return x * (1 + _tick())


def test_a_forward_writing_into_its_input_is_still_checked():
    with pytest.raises(BackboneError, match="other outputs"):
        capture(_FrozenDrawInPlace(), torch.randn(1, 3, 16, 16))  # not a conv: the check refuses first


def test_relative_gap_sees_infinities_and_dtype_rounding():
    from automtl.tracecheck import relative_gap, tolerance

    inf = float("inf")
    assert relative_gap(torch.tensor([inf, 1.0]), torch.tensor([5.0, 1.0])) == inf
    assert relative_gap(torch.tensor([-inf, 1.0]), torch.tensor([inf, 1.0])) == inf
    assert relative_gap(torch.tensor([inf, 1.0]), torch.tensor([inf, 1.0])) == 0.0
    assert relative_gap(torch.tensor([0.0, 1.001]), torch.tensor([0.0, 1.0])) == pytest.approx(1e-3 / 1.01, rel=1e-3)
    assert tolerance(torch.bfloat16) > tolerance(torch.float32) == 1e-3
    from automtl.tracecheck import _worst

    bf16 = torch.ones(2, dtype=torch.bfloat16)  # the gap reported is the gap, not its ratio to the dtype's tolerance
    assert _worst([("a", bf16, 0.06), ("b", torch.ones(2), 5e-4)]) == ("a", 0.06)
    assert _worst([("a", bf16, 0.02)]) is None


def test_capture_leaves_every_random_state_as_it_was():
    """The forward's draws while it is traced, checked and propagated come from and go back to the caller's state."""
    import random

    import numpy as np

    class Jitter(nn.Module):  # a leaf: it draws when it runs, in the checks, not while traced
        def forward(self, x):
            return x * (1 + 0.01 * random.random() + 0.01 * np.random.rand()) if self.training else x

    class Draws(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.jitter = nn.Conv2d(3, 8, 3), Jitter()

        def forward(self, x):
            return self.c(torch.nn.functional.dropout(self.jitter(x), 0.1, self.training))

    net, x = Draws(), torch.randn(1, 3, 16, 16)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.random.get_rng_state()
    capture(net, x, leaf_modules=[Jitter])
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.random.get_rng_state(), states[2])


class _TrainOnlyState(nn.Module):
    """A module called, or a buffer read, in train mode only: state the eval graph would not carry."""

    def __init__(self, what):
        super().__init__()
        self.what = what
        self.extra = nn.Conv2d(8, 8, 1)
        self.register_buffer("shift", torch.ones(1, 8, 1, 1))

    def forward(self, x):
        if not self.training:
            return x
        return self.extra(x) if self.what == "module" else x + self.shift


@pytest.mark.parametrize("what, name", [("module", "mid.extra"), ("buffer", "mid.shift")])
def test_a_module_or_buffer_used_in_train_mode_only_is_refused(what, name):
    """Train-only constants made by the trace are carried (tests/zoo.py: train_only_constant, own_generator); a
    module or a buffer of the backbone is state one set of modules must share between the modes."""
    with pytest.raises(BackboneError, match=f"uses '{name}' in train mode only"):
        capture(_TwoConvs(_TrainOnlyState(what)).train(), torch.randn(1, 3, 16, 16))


class _OtherValuesWithoutGradients(nn.Module):
    """Branches on ``requires_grad`` and computes other values in the two branches."""

    def forward(self, x):
        return x if x.requires_grad else x * 2


def test_a_branch_on_requires_grad_is_kept_only_where_both_branches_compute_the_same():
    """The trace takes ``if x.requires_grad`` as True (tests/zoo.py: checkpoint_when_training converts, with every
    property test); where the other branch, which runs without gradients, computes other values, that line is
    named."""
    with pytest.raises(BackboneError, match=r"branches on `.requires_grad` at .*test_capture.py:\d+"):
        capture(_TwoConvs(_OtherValuesWithoutGradients()).eval(), torch.randn(1, 3, 16, 16))


class _DetachUnlessInputTrains(nn.Module):
    """``if not x.requires_grad: y = y.detach()`` on the input: an ordinary training step (an input that does not
    require gradients) leaves the stem untrained, and so must the trace."""

    def __init__(self):
        super().__init__()
        self.stem, self.body = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = self.stem(x)
        if not x.requires_grad:
            y = y.detach()
        return self.body(y)


def test_requires_grad_is_decided_as_in_a_training_step():
    """The input does not require gradients and a frozen parameter does not either: the trace takes the branches
    an ordinary training step takes, so the supermodel trains exactly what the backbone trains."""
    import copy

    from automtl import Policy, Task, supermodel

    torch.manual_seed(0)
    backbone = _DetachUnlessInputTrains()
    sm = supermodel(copy.deepcopy(backbone), [Task("depth", "depth")], torch.randn(1, 3, 16, 16))
    sm.hard(Policy.uniform(sm.layer_names, sm.task_names, "share")).train()
    x = torch.rand(2, 3, 16, 16)
    sm.features(x)["depth"].sum().backward()
    backbone(x).sum().backward()
    grads = {n: p.grad for n, p in sm.named_parameters() if ".shared." in n and n.endswith("conv.weight")}
    assert backbone.stem.weight.grad is None and backbone.body.weight.grad is not None
    assert [g is None for g in grads.values()] == [True, False], grads.keys()


class _TwoPathsToOneTest(nn.Module):
    """The value tested reaches a parameter by two paths, one through ``.detach()``: it requires gradients."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        h = self.c1(x)
        q = torch.relu(h) + h.detach()
        return self.c2(q) if q.requires_grad else self.c2(q) * 2


def test_requires_grad_follows_every_path_to_a_parameter():
    """Decided over the whole graph in creation order (a walk that met ``h`` first through ``.detach()`` had
    decided ``relu(h)`` before ``h``, so ``q`` as not requiring gradients)."""
    import sys

    tracer = sys.modules["automtl.capture"]._Tracer()
    graph = tracer.trace(_TwoPathsToOneTest())
    assert len(tracer.requires_grad_tests) == 1
    assert not any(n.op == "call_function" and "mul" in str(n.target) for n in graph.nodes)  # the True branch


class _RareFlip(nn.Module):
    """A random decision made in Python (p = 0.2): the trace freezes the one outcome it drew."""

    def forward(self, x):
        return x.flip(3) if torch.rand(1).item() < 0.2 else x


class _FixedNoise(nn.Module):
    """Noise drawn on no traced value: the trace keeps one draw as a constant."""

    def forward(self, x):
        return x + 0.1 * torch.randn(1, 8, 1, 1) if self.training else x


class _OwnFixedNoise(nn.Module):
    """Noise from a generator the module owns, drawn on no traced value: frozen too."""

    def __init__(self):
        super().__init__()
        self.g = torch.Generator().manual_seed(0)

    def forward(self, x):
        return x + 0.1 * torch.randn(1, 8, 1, 1, generator=self.g) if self.training else x


class _NumpyCoin(nn.Module):
    def forward(self, x):
        import numpy as np

        return x * 2 if np.random.rand() < 0.5 else x


@pytest.mark.parametrize("middle, generator", [
    (_RareFlip, r"a torch generator \(with rand at .*test_capture.py"), (_FixedNoise, r"a torch generator \(with randn"),
    (_NumpyCoin, "numpy's global generator"), (_OwnFixedNoise, r"a torch generator \(with randn")],
    ids=["rare flip", "train-mode noise", "numpy", "module's own generator"])
@pytest.mark.parametrize("seed", range(3))
def test_a_draw_the_trace_would_freeze_is_refused_whatever_the_seed(middle, generator, seed):
    """A draw while traced is on no traced value (traced random operations draw only when run): refused before
    any comparison, so a frozen outcome that a seeded check run happens to repeat (p = 0.2 passes most) is found
    too, torch's at the operation, whatever generator it draws from; as a leaf, the module draws when it runs."""
    torch.manual_seed(seed)
    with pytest.raises(BackboneError, match=f"draws from {generator}.*while traced"):
        capture(_TwoConvs(middle()).train(), torch.randn(1, 3, 16, 16))
    if middle is not _RareFlip:  # random in eval mode: refused for that (MC dropout) by the supermodel, not here
        capture(_TwoConvs(middle()).train(), torch.randn(1, 3, 16, 16), leaf_modules=[middle])


class _Augment:
    """A plain helper object (not a module) holding a torch generator."""

    def __init__(self):
        self.rng = torch.Generator().manual_seed(0)


class _HelperDraw(nn.Module):
    def __init__(self):
        super().__init__()
        self.aug = _Augment()

    def forward(self, x):
        return x.flip(3) if torch.rand(1, generator=self.aug.rng).item() < 0.05 else x


class _ForkedDraw(nn.Module):
    def forward(self, x):
        with torch.random.fork_rng():  # the global state is put back: only the operation tells
            flip = torch.rand(1).item() < 0.05
        return x.flip(3) if flip else x


@pytest.mark.parametrize("middle", [_HelperDraw, _ForkedDraw], ids=["helper object's generator", "forked state"])
def test_a_torch_draw_is_refused_wherever_its_generator_lives(middle):
    """Random operations are caught as they run during the trace: no generator's state needs to be found."""
    with pytest.raises(BackboneError, match=r"a torch generator \(with rand at .*test_capture.py.*while traced"):
        capture(_TwoConvs(middle()), torch.randn(1, 3, 16, 16))


class _ExtraArguments(_TwoConvs):
    """A forward with arguments after the image: optional ones (timm's ViT takes ``attn_mask=None``), ``*args`` and
    ``**kwargs``."""

    def forward(self, x, scale=None, double=False, *args, **kwargs):
        y = self.c2(torch.relu(self.c1(x)))
        y = y if scale is None else y * scale
        return y * 2 if double else y


class _RequiredArgument(_TwoConvs):
    def forward(self, x, mask):
        return self.c2(torch.relu(self.c1(x))) * mask


def test_arguments_after_the_image_are_traced_at_their_defaults_or_as_given():
    x = torch.randn(2, 3, 16, 16)
    net = _ExtraArguments()
    cap = capture(net, torch.randn(1, 3, 16, 16))
    assert [n.target for n in cap.graph_module.graph.nodes if n.op == "placeholder"] == ["x"]
    assert torch.allclose(cap.graph_module(x), net(x))
    cap = capture(net, torch.randn(1, 3, 16, 16), concrete_args={"double": True})  # given: that value
    assert torch.allclose(cap.graph_module(x), net(x, double=True))
    with pytest.raises(BackboneError, match=r"forward takes 2 inputs \(x, mask\) but automtl needs exactly one image "
                                            r"tensor; give the others fixed values with concrete_args=\{'mask': ...\}"):
        capture(_RequiredArgument(), torch.randn(1, 3, 16, 16))
    req = _RequiredArgument()
    cap = capture(req, torch.randn(1, 3, 16, 16), concrete_args={"mask": 3.0})
    assert torch.allclose(cap.graph_module(x), req(x, 3.0))


class _TupleDefault(_TwoConvs):
    def forward(self, x, scales=(2.0, 3.0), options={"shift": 1.0}):
        return self.c2(torch.relu(self.c1(x))) * scales[1] + options["shift"]


class _PositionalOnly(_TwoConvs):
    def forward(self, x, s=2.0, /):
        return self.c2(torch.relu(self.c1(x))) * s


@pytest.mark.parametrize("net, given, call", [
    (_TupleDefault, None, lambda net, x: net(x)),  # torch.fx flattens tuple and dict arguments
    (_TupleDefault, {"scales": (1.0, 5.0)}, lambda net, x: net(x, scales=(1.0, 5.0))),
    (_RequiredArgument, {"mask": torch.full((1, 8, 1, 1), 3.0)}, lambda net, x: net(x, torch.full((1, 8, 1, 1), 3.0))),
    (_PositionalOnly, {"s": 5.0}, lambda net, x: net(x, 5.0)),
], ids=["tuple and dict defaults", "a tuple given", "a tensor given", "positional-only given"])
def test_fixed_arguments_of_every_kind_leave_the_image_as_the_one_input(net, given, call):
    net, x = net(), torch.randn(2, 3, 16, 16)
    cap = capture(net, torch.randn(1, 3, 16, 16), concrete_args=given)
    assert [n.target for n in cap.graph_module.graph.nodes if n.op == "placeholder"] == ["x"]
    assert torch.allclose(cap.graph_module(x), call(net, x))


class _StandardisedConv(nn.Module):
    """A 5x5 convolution written with F.conv2d: its (weight) input is 4-D and larger than 4x4, but no map."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 16, 5, 5) * 0.1)

    def forward(self, x):
        return torch.nn.functional.conv2d(x, self.weight - self.weight.mean((1, 2, 3), keepdim=True), padding=2)


def _standardised_at_1x1():
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU(), _StandardisedConv(), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, 1, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


class _ChannelsLastTo1x1(nn.Module):
    """Channels-last stages down to 1 x 1 at a small input, then back to (N, C, H, W) for a 1x1 conv head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, 2, 1))
        self.down = nn.Conv2d(16, 32, 3, 2, 1)
        self.norm1, self.fc1 = nn.LayerNorm(16), nn.Linear(16, 16)
        self.norm2, self.fc2 = nn.LayerNorm(32), nn.Linear(32, 32)
        self.conv_head = nn.Conv2d(32, 64, 1)

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)
        x = x + self.fc1(self.norm1(x))
        x = self.down(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + self.fc2(self.norm2(x))
        return torch.relu(self.conv_head(x.permute(0, 3, 1, 2))).mean((2, 3))


@pytest.mark.parametrize("net, size, convs, node", [
    (_standardised_at_1x1, 8, 4, "_9"),
    (_ChannelsLastTo1x1, 16, 5, "relu"),
], ids=["a weight larger than 4x4", "a channels-last 1x1 map permuted"])
def test_only_maps_of_the_trunk_larger_than_4x4_make_a_1x1_output_a_collapse(net, size, convs, node):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cap = capture(net(), torch.randn(1, 3, size, size))
    assert (cap.feature_node, len(cap.conv_nodes), cap.feature_shape[2:]) == (node, convs, (1, 1))


class _ReshapedBranchOneSize(_ChannelsLastOneSize):
    """A residual branch made by reshapes (window attention), joined on either side of the add."""

    def __init__(self, branch_first: bool):
        super().__init__()
        self.branch_first = branch_first

    def forward(self, x):
        x = (self.stem(x) + self.pos).permute(0, 2, 3, 1)
        y = self.fc(self.norm(x)).flatten(1, 2).reshape(x.shape)
        x = y + x if self.branch_first else x + y
        return x.transpose(1, 2) * 2


@pytest.mark.parametrize("branch_first", [False, True], ids=["x + branch", "branch + x"])
def test_a_residual_add_keeps_the_known_axes_whichever_side_the_branch_joins(branch_first):
    net, x = _ReshapedBranchOneSize(branch_first), torch.randn(2, 3, 16, 16)
    cap = capture(net, torch.randn(1, 3, 16, 16))
    assert cap.feature_node == "add_1_channels_first"
    assert torch.allclose(cap.graph_module(x), (net(x) / 2).transpose(1, 2).permute(0, 3, 1, 2))


class _TrainOnlyShift(nn.Module):
    """Train mode adds an operation of the same kind before the feature node (``+ 1.0`` before the residual add),
    so the train graph's node named like the eval feature node is another one."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dw, self.pw = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x)
        if self.training:
            y = y * 0.5 + 1.0
        return (x + self.pw(y)).mean((2, 3))


def test_the_train_graph_is_cut_at_the_same_call_as_the_eval_graph():
    net, x = _TrainOnlyShift(), torch.randn(2, 3, 16, 16)
    cap = capture(net, torch.randn(1, 3, 16, 16), feature_node="add")
    train = torch.fx.GraphModule(cap.graph_module, cap.train_graph)
    with torch.no_grad():
        y = net.dw(net.stem(x)) * 0.5 + 1.0
        assert torch.allclose(train(x), net.stem(x) + net.pw(y))


def test_the_axes_of_reshapes_follow_the_image_through_tokens_windows_and_patch_merging():
    """automtl.axes on a map's labels: (N, H, W, C) to tokens and back is a map again; cut into windows it is not;
    2 x 2 pixels merged into the channels is a map of half the size."""
    from automtl.axes import NCHW, NHWC, classify, fresh, reshaped

    nhwc = fresh((1, 8, 8, 6), NHWC)
    tokens = reshaped(nhwc, (1, 64, 6))
    assert [len(label) for label in tokens] == [1, 2, 1]  # N, (H, W), C
    assert classify(reshaped(tokens, (1, 8, 8, 6))) == NHWC
    assert classify(reshaped(tokens, (1, 4, 16, 6))) != NHWC  # another grid is not the image's
    split = reshaped(nhwc, (1, 2, 4, 2, 4, 6))
    windows = reshaped([split[i] for i in (0, 1, 3, 2, 4, 5)], (4, 4, 4, 6))
    assert classify(windows) == ("?", "?", "?", "C")
    back = reshaped(windows, (1, 2, 2, 4, 4, 6))
    assert classify(reshaped([back[i] for i in (0, 1, 3, 2, 4, 5)], (1, 8, 8, 6))) == NHWC
    merged = reshaped(nhwc, (1, 4, 2, 4, 2, 6))
    assert classify(reshaped([merged[i] for i in (0, 1, 3, 4, 2, 5)], (1, 4, 4, 24))) == NHWC
    assert classify(reshaped(fresh((1, 8, 4, 4), NCHW), (1, 2, 4, 4, 4))[:1] + fresh((1, 8, 4, 4), NCHW)[1:]) == NCHW
    assert reshaped(nhwc, (1, 7, 55)) is None  # not on the atoms' factors


class _GatheredTokens(nn.Module):
    """Tokens reordered by an index before they are folded back into a map at the one size the model takes: which
    position goes where is known only when it runs, so the map after it is not followed."""

    def __init__(self):
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.pos = nn.Parameter(torch.zeros(1, 8, 8, 8))
        self.register_buffer("order", torch.randperm(64))

    def forward(self, x):
        x = (self.stem(x) + self.pos).permute(0, 2, 3, 1)
        t = x.reshape(x.shape[0], 64, 8)[:, self.order]
        return self.conv(t.reshape(x.shape[0], 8, 8, 8).permute(0, 3, 1, 2))


def test_tokens_indexed_by_a_tensor_are_not_taken_for_the_map():
    with pytest.warns(UserWarning, match=r"leaves out 1 convolution\(s\) after the cut \(conv\)"):
        cap = capture(_GatheredTokens(), torch.randn(1, 3, 16, 16))
    assert cap.feature_node == "permute_channels_first"  # the last map the graph tells: (stem + pos) permuted


class _LoopedBlock(nn.Module):
    """One conv + BN block called three times in a loop (weights reused)."""

    def __init__(self):
        super().__init__()
        self.stem, self.c, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.stem(x)
        for _ in range(3):
            x = torch.relu(self.bn(self.c(x))) + x
        return x


def test_a_module_called_several_times_is_named_by_its_call():
    """Naming such a module cut at its first call, silently (0.92 off the third call's output a forward hook sees)."""
    net, x = _LoopedBlock().eval(), torch.randn(2, 3, 8, 8)
    with pytest.raises(BackboneError, match=r"module 'bn' runs 3 times in the forward, so its output is not one "
                                            r"place; name one call: 'bn@0', 'bn@1', 'bn@2' \(nodes 'bn', 'bn_1', "
                                            r"'bn_2'\)"):
        capture(net, torch.randn(1, 3, 8, 8), feature_node="bn")
    seen, y = [], net.stem(x)
    with torch.no_grad():
        for _ in range(3):
            seen.append(net.bn(net.c(y)))
            y = torch.relu(seen[-1]) + y
        for k in range(3):
            cap = capture(net, torch.randn(1, 3, 8, 8), feature_node=f"bn@{k}")
            assert torch.allclose(cap.graph_module(x), seen[k])
    assert capture(net, torch.randn(1, 3, 8, 8), feature_node="stem").feature_node == "stem"  # called once: as before
    with pytest.raises(BackboneError, match=r"module 'bn' runs 3 time\(s\) in the forward, so it has no call 'bn@3'; "
                                            r"name one of 'bn@0', 'bn@1', 'bn@2'"):
        capture(net, torch.randn(1, 3, 8, 8), feature_node="bn@3")


class _AliasedInPlaceAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = torch.relu(self.a(x))
        shortcut = x
        x += torch.relu(self.b(x))  # in place: shortcut is the new value too, in eager mode only
        return self.c(x + shortcut)


def test_an_augmented_assignment_to_an_aliased_tensor_is_named_in_the_refusal():
    """torch.fx records ``x += y`` as ``x = x + y``: the refusal blamed Python state and random draws only."""
    import inspect as _inspect

    line = _inspect.getsourcelines(_AliasedInPlaceAdd.forward)[1] + 3
    with pytest.raises(BackboneError, match=rf"an augmented assignment \(`x \+= y` at .*test_capture.py:{line}\) to a "
                                            r"tensor another name still holds"):
        capture(_AliasedInPlaceAdd(), torch.randn(1, 3, 16, 16))


class _TokenTail(nn.Module):
    """EfficientFormer's end: convolutional stages, then a last block on tokens (``flatten(2).transpose(1, 2)``,
    a norm and an MLP) whose output is the backbone's, (N, tokens, C), and a classifier after a pooling."""

    def __init__(self):
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.norm, self.mlp = nn.LayerNorm(8), nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        t = self.conv(torch.relu(self.stem(x))).flatten(2).transpose(1, 2)
        t = t + self.mlp(self.norm(t))
        return self.fc(t.mean(1))


def test_a_default_cut_that_leaves_out_blocks_before_the_head_says_so():
    """twins, xcit and EfficientFormer end in tokens: the cut at the last map left their last blocks out silently
    (a warning came only past 8 modules holding most of the parameters); the classifier after the pooling is no
    such block."""
    with pytest.warns(UserWarning, match=r"cut at 'conv' \(1, 8, 8, 8\), the deepest map automtl can tell, which "
                                         r"leaves out 3 parameterised module\(s\) computing the backbone's output after "
                                         r"it before any pooling or classifier \(norm, mlp.0, mlp.2; "):
        cap = capture(_TokenTail(), torch.randn(1, 3, 16, 16))
    assert cap.feature_node == "conv"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        capture(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)),
                torch.randn(1, 3, 16, 16))  # a head after a pooling: no warning


def test_the_axes_of_empty_scalar_and_indexed_tensors_are_not_guessed():
    """(Review) an empty slice reshaped (a division by its zero size), a transpose of a 0-d tensor (modulo its rank
    0) crashed the capture of any backbone; an index with an int and a None at other places labelled (N, 1, H, W) of
    one channel as (N, H, W, C) by position, and the cut permuted it the wrong way."""
    from automtl.axes import NHWC, fresh, reshaped

    assert reshaped(fresh((1, 8, 8, 6), NHWC), (1, 64, 0)) is None

    class _Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.c2 = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Conv2d(1, 8, 3, padding=1)
            self.pos = nn.Parameter(torch.zeros(1, 8, 8, 8))

        def forward(self, x):
            t = self.stem(x).permute(0, 2, 3, 1) + self.pos
            empty = t[:, :0].reshape(t.shape[0], 64, 0).sum() + t.mean().view(()).transpose(0, -1)
            return self.c2(t[:, None, ..., 0] + empty)

    net, x = _Odd(), torch.randn(2, 3, 16, 16)
    with pytest.warns(UserWarning, match=r"leaves out 1 convolution\(s\) after the cut \(c2\)"):
        cap = capture(net, torch.randn(1, 3, 16, 16))
    assert cap.feature_node == "add_channels_first"  # stem + pos, the last map the graph tells
    assert torch.allclose(cap.graph_module(x), net.stem(x) + net.pos.permute(0, 3, 1, 2))


class _TokensBackToChannelsFirst(nn.Module):
    """PVT's way at the one size it takes: tokens folded back with ``transpose(1, 2).reshape(N, C, H, W)``."""

    def __init__(self):
        super().__init__()
        self.stem, self.c2 = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.pos = nn.Parameter(torch.zeros(1, 64, 8))
        self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x):
        y = self.stem(x)
        n, c, h, w = y.shape
        t = y.flatten(2).transpose(1, 2) + self.pos
        t = t + self.fc(self.norm(t))
        return self.c2(t.transpose(1, 2).reshape(n, c, h, w))


def test_tokens_folded_back_channels_first_are_the_trunk_at_one_size():
    """(Review) the graph labelled that map (N, C, H, W), but the cut took only channels-last ones for maps after
    tokens: it fell back to the stem, the blocks left out."""
    net, x = _TokensBackToChannelsFirst(), torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cap = capture(net, torch.randn(1, 3, 16, 16))
    assert cap.feature_node == "c2" and torch.allclose(cap.graph_module(x), net(x))


def test_an_auxiliary_head_beside_the_output_is_not_named_as_left_out():
    class _Aux(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, stride=2, padding=1)
            self.aux = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = torch.relu(self.c1(x))
            return torch.relu(self.c2(y)), self.aux(y)

    with pytest.warns(UserWarning) as seen:
        capture(_Aux(), torch.randn(1, 3, 16, 16))
    assert not [w for w in seen if "leaves out" in str(w.message)]


class _Typo(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.conv2(x)  # no such attribute: a bug, not something torch.fx cannot follow


class _MissingImport(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        import a_module_that_is_not_installed  # noqa: F401
        return self.conv(x)


@pytest.mark.parametrize("cls, error", [(_Typo, "'_Typo' object has no attribute 'conv2'"),
                                        (_MissingImport, "No module named 'a_module_that_is_not_installed'")])
def test_a_forward_that_fails_without_automtl_is_named_as_such(cls, error):
    """A typo or a missing import in the forward was reported as a torch.fx limit, with concrete_args as the remedy."""
    with pytest.raises(BackboneError, match=f"the backbone's own forward fails on the example input of shape "
                                            f"\\(1, 3, 16, 16\\) at .*test_capture.py:\\d+ .*: {error}; it fails "
                                            "without automtl too"):
        capture(cls(), torch.randn(1, 3, 16, 16))


class _HookedActivation(nn.Module):
    """A gradient hook on an intermediate tensor: the forward runs as written, only under torch.no_grad() it fails."""

    def __init__(self, only_when_it_requires_grad: bool):
        super().__init__()
        self.c1, self.c2, self.guarded = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), only_when_it_requires_grad

    def forward(self, x):
        y = self.c1(x)
        if not self.guarded or y.requires_grad:
            y.register_hook(lambda g: g * 2)
        return self.c2(y)


@pytest.mark.parametrize("guarded, error", [
    (False, "the backbone's forward needs autograd while it runs at .*test_capture.py:\\d+ \\(y.register_hook"),
    (True, "torch.fx cannot trace the backbone in module .*_HookedActivation.* at .*test_capture.py:\\d+ "
           "\\(y.register_hook.*passes a Python function to a tensor operation there \\(a gradient hook")])
def test_a_gradient_hook_on_an_activation_is_named_with_its_remedy(guarded, error):
    """It was reported as a forward that "fails without automtl too" (it runs; the check ran it under no_grad), or,
    guarded by requires_grad, as Python control flow to fix with concrete_args."""
    net = _HookedActivation(guarded)
    assert net(torch.randn(1, 3, 16, 16)).requires_grad  # the backbone itself runs
    with pytest.raises(BackboneError, match=error) as info:
        capture(net, torch.randn(1, 3, 16, 16))
    assert "fails without automtl too" not in str(info.value) and "concrete_args" not in str(info.value)


class _ZeroPaddedShortcut(nn.Module):
    """PyramidNet's shortcut: zero channels made at the input's size."""

    def __init__(self, sizes_as_one_tuple: bool):
        super().__init__()
        self.c1, self.c2, self.one_tuple = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1), sizes_as_one_tuple

    def forward(self, x):
        y = self.c1(x)
        n, c, h, w = y.shape
        zeros = torch.zeros((n, 8, h, w)) if self.one_tuple else torch.zeros(n, 8, h, w)
        return self.c2(torch.cat([y, zeros], 1))


def test_a_factory_given_traced_sizes_one_by_one_is_named_with_the_tuple_that_traces():
    """torch.zeros(n, c, h, w) with sizes from x.shape was "Python control flow to fix with concrete_args"."""
    with pytest.raises(BackboneError, match=r"zeros\(\) takes 1 positional argument but 4 were given; torch.fx passes "
                                            r"sizes it reads from the input to torch.zeros only as one tuple") as info:
        capture(_ZeroPaddedShortcut(False), torch.randn(1, 3, 16, 16))
    assert "concrete_args" not in str(info.value)
    net = _ZeroPaddedShortcut(True).eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(capture(net, x[:1]).graph_module(x), net(x))  # the remedy works


def test_a_leaf_that_writes_its_own_buffers_in_eval_mode_is_refused():
    """A quantization-aware conv's observers move at every call, eval mode included: the backbone itself is a new
    function after each call, and a shared module runs once per class of tasks (the all-share supermodel drifted
    0.002 from the backbone). Refused, naming the buffer; with its observers frozen, it converts exactly."""
    import torch.ao.nn.intrinsic.qat as nniqat
    import torch.ao.quantization as quantization

    from automtl.policy import Policy
    from automtl.supermodel import supermodel
    from automtl.tasks import Task

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nniqat.ConvBnReLU2d(3, 8, 3, padding=1, qconfig=quantization.get_default_qat_qconfig("fbgemm"))
            self.b = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return self.b(self.a(x))

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net(torch.randn(4, 3, 16, 16))  # the observers see data once
    tasks = [Task("a", "depth"), Task("b", "depth")]
    with pytest.raises(BackboneError, match=r"module 'a' \(ConvBnReLU2d\) changes its buffer 'a\..*' in an eval-mode"):
        supermodel(net.eval(), tasks, torch.randn(1, 3, 16, 16))
    net.apply(quantization.disable_observer)
    sm = supermodel(net, tasks, torch.randn(1, 3, 16, 16)).eval()
    sm.hard(Policy.uniform(sm.layer_names, sm.task_names, "share"))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(sm.features(x)["a"], net(x))
