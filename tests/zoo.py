"""Small backbones written in the patterns of torchvision and timm models, for tests/test_backbone_patterns.py.

Each is a few convs at 8-16 channels, so the whole zoo converts and runs in seconds on a CPU.
"""
import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn


def conv_bn(cin, cout, k=3, stride=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class DropoutNet(nn.Module):
    """Dropout written in the forward (issue 11, item 1)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = conv_bn(3, 8), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return F.dropout(self.c2(self.c1(x)), 0.5, self.training)


def stochastic_depth(x, p, training):
    """torchvision.ops.stochastic_depth, row mode; like torchvision's, kept as one call by torch.fx.wrap."""
    if not training or p == 0.0:
        return x
    survival = 1.0 - p
    noise = torch.empty([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(survival)
    return x * noise.div_(survival)


torch.fx.wrap("stochastic_depth")


class DropPath(nn.Module):
    """timm's DropPath."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's norm+activation module: a BatchNorm2d subclass that also applies its activation."""

    def __init__(self, c):
        super().__init__(c)
        self.act = nn.SiLU()

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")  # as timm's does
        return self.act(super().forward(x))


class MyBatchNorm(nn.Module):
    """A norm written by hand that branches on self.training (not a BatchNorm subclass)."""

    def __init__(self, c):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, 1e-5)


class SqueezeExcite(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class MBConv(nn.Module):
    """EfficientNet / MobileNetV3: expand, depthwise, squeeze-excite, project, stochastic depth, residual."""

    def __init__(self, c, drop):
        super().__init__()
        self.expand = nn.Conv2d(c, 2 * c, 1, bias=False)
        self.bn1 = BatchNormAct2d(2 * c)
        self.dw = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c, bias=False)
        self.bn2 = BatchNormAct2d(2 * c)
        self.se = SqueezeExcite(2 * c)
        self.project = nn.Conv2d(2 * c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.drop = drop

    def forward(self, x):
        y = self.bn3(self.project(self.se(self.bn2(self.dw(self.bn1(self.expand(x)))))))
        return x + stochastic_depth(y, self.drop, self.training)


class EfficientNetish(nn.Module):
    """Stem, two MBConv blocks with stochastic depth, a conv head, global pooling and a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, stride=2)
        self.blocks = nn.Sequential(MBConv(8, 0.5), MBConv(8, 0.5))
        self.conv_head = conv_bn(8, 16, 1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(16, 10))

    def forward(self, x):
        x = self.expected_features(x)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def expected_features(self, x):
        return self.conv_head(self.blocks(self.stem(x)))


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7, channels-last LayerNorm, MLP, layer scale, DropPath."""

    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw1, self.pw2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))
        self.drop_path = DropPath(0.5)

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(self.norm(y)))) * self.gamma
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class ConvNeXtish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)  # patchify: a skip is legal at no size
        self.stages = nn.Sequential(ConvNeXtBlock(8), ConvNeXtBlock(8))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.expected_features(x).mean((2, 3)))

    def expected_features(self, x):
        return self.stages(self.stem(x))


class ShuffleUnit(nn.Module):
    """ShuffleNet: grouped 1x1, channel shuffle, depthwise 3x3, grouped 1x1."""

    def __init__(self, c, g=2):
        super().__init__()
        self.g = g
        self.c1 = conv_bn(c, c, 1, groups=g)
        self.dw = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c))
        self.c2 = conv_bn(c, c, 1, groups=g)

    def forward(self, x):
        y = self.c1(x)
        n, c, h, w = y.shape
        y = y.view(n, self.g, c // self.g, h, w).transpose(1, 2).reshape(n, c, h, w)
        return F.relu(x + self.c2(self.dw(y)))


class ShuffleNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, stride=2)
        self.units = nn.Sequential(ShuffleUnit(8), ShuffleUnit(8))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.expected_features(x).mean((2, 3)))

    def expected_features(self, x):
        return self.units(self.stem(x))


class PreActNet(nn.Module):
    """Pre-activation order BN -> ReLU -> conv, and a norm written by hand (issue 11, items 1 and 3)."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1, self.conv1 = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)
        self.bn2, self.conv2 = MyBatchNorm(8), nn.Conv2d(8, 8, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.conv0(x)
        x = x + self.conv1(F.relu(self.bn1(x)))
        x = x + self.conv2(F.relu(self.bn2(x)))
        return F.relu(self.bn3(x))


class PyramidShared(nn.Module):
    """One conv module called at several places, each with its own BN (pyramid heads; issue 11, item 4)."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_a, self.bn_b = nn.BatchNorm2d(8), nn.BatchNorm2d(8)

    def forward(self, x):
        a = self.stem(x)
        b = self.down(a)
        pa = F.relu(self.bn_a(self.shared(a)))
        pb = F.relu(self.bn_b(self.shared(b)))
        return pa + F.interpolate(pb, size=pa.shape[-2:], mode="nearest")


class SegmentationNet(nn.Module):
    """torchvision segmentation style: a dict of outputs, logits from a classifier conv, upsampled."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(conv_bn(3, 8, stride=2), conv_bn(8, 16, stride=2))
        self.classifier = nn.Sequential(conv_bn(16, 8), nn.Conv2d(8, 5, 1))
        self.aux_classifier = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        f1 = self.backbone[0](x)
        f = self.backbone[1](f1)
        out = F.interpolate(self.classifier(f), size=x.shape[-2:], mode="bilinear", align_corners=False)
        aux = F.interpolate(self.aux_classifier(f1), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return {"out": out, "aux": aux}

    def expected_features(self, x):
        return self.backbone(x)


class SqueezeNetish(nn.Module):
    """A 1x1 classifier conv before the global pooling (SqueezeNet)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 8, stride=2), conv_bn(8, 16))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(16, 10, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)

    def expected_features(self, x):
        return self.features(x)


class InplaceNet(nn.Module):
    """An in-place op whose result is unused (issue 11, item 11)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = conv_bn(3, 8), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = self.c1(x)
        y.mul_(2)
        return self.c2(y) + y


class BatchSizeNet(nn.Module):
    """Sizes read from the input: n = x.shape[0] (issue 11, item 5)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = conv_bn(3, 8), conv_bn(8, 8)

    def forward(self, x):
        n = x.shape[0]
        f = self.c2(self.c1(x))
        g = f.reshape(n, 2, 4, -1).softmax(-1)
        return g.reshape(f.shape) * f


class TiedDecoder(nn.Module):
    """A conv's weight read directly: a tied transposed-conv decoder (issue 11, item 6)."""

    def __init__(self):
        super().__init__()
        self.c1 = conv_bn(3, 8)
        self.enc = nn.Conv2d(8, 16, 3, stride=2, padding=1)

    def forward(self, x):
        h = F.relu(self.enc(self.c1(x)))
        return F.conv_transpose2d(h, self.enc.weight, stride=2, padding=1, output_padding=1)


class ClassifierNet(nn.Module):
    """ResNet style: residual blocks, global pooling, a Linear classifier."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, stride=2)
        self.layer1 = nn.Sequential(conv_bn(8, 8), nn.Conv2d(8, 8, 3, padding=1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.expected_features(x)), 1))

    def expected_features(self, x):
        x = self.stem(x)
        return F.relu(x + self.layer1(x))


class TransformInputNet(nn.Module):
    """torchvision's GoogLeNet / Inception v3 with ``transform_input=True`` (their pretrained weights' setting):
    each input channel is taken apart (``x[:, c]``, a 3-D map), rescaled and concatenated back before the stem."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, stride=2)
        self.body = conv_bn(8, 12)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.expected_features(x)), 1))

    def expected_features(self, x):
        x = torch.cat([torch.unsqueeze(x[:, c], 1) * s + (m - 0.5) / 0.5
                       for c, (s, m) in enumerate([(0.458, 0.485), (0.448, 0.456), (0.45, 0.406)])], 1)
        return self.body(self.stem(x))


class AuxHeadNet(nn.Module):
    """Inception v3's auxiliary classifier: run in train mode only, on a pooling too large for small inputs (it
    fails there, after the feature cut); the forward returns (logits, aux logits) in train mode."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, stride=2)
        self.body = conv_bn(8, 8)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)
        self.aux = nn.Sequential(nn.AvgPool2d(12), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x):
        f = self.expected_features(x)
        out = self.fc(torch.flatten(self.avgpool(f), 1))
        if self.training:
            return out, self.aux(f)
        return out

    def expected_features(self, x):
        return self.body(self.stem(x))


def pruned_net():
    """A backbone with a torch.nn.utils.prune mask and an old-style weight norm (issue 11, item 8)."""
    net = ClassifierNet()
    torch.nn.utils.prune.l1_unstructured(net.layer1[1], "weight", amount=0.5)
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore")
        torch.nn.utils.weight_norm(net.stem[0])
    return net


class ConstantInForwardNet(nn.Module):
    """A tensor built from constants in the forward (torchvision's MaxViT builds its relative-position tables
    so): torch.fx stores it as a ``_tensor_constant`` attribute, one per trace (the eval and the train one)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = conv_bn(3, 8), conv_bn(8, 8)

    def forward(self, x):
        scale = torch.full((1, 8, 1, 1), 0.5) + torch.arange(8.0).reshape(1, 8, 1, 1) / 8
        return self.c2(self.c1(x) * scale)


class TrainOnlyConstantNet(nn.Module):
    """A tensor built from constants in train mode only (a training-time rescaling): the train trace's own
    ``_tensor_constant``, which the eval graph never reads."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = conv_bn(3, 8), conv_bn(8, 8)

    def forward(self, x):
        y = self.c1(x)
        if self.training:
            y = y * (torch.arange(8.0).reshape(1, 8, 1, 1) / 8 + 0.5)
        return self.c2(y)


class OwnGeneratorNet(nn.Module):
    """Noise injected in train mode from a ``torch.Generator`` the module owns (reproducible augmentation)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = conv_bn(3, 8), conv_bn(8, 8)
        self.g = torch.Generator().manual_seed(7)

    def forward(self, x):
        y = self.c1(x)
        if self.training:
            y = y + 0.1 * torch.randn(y.shape, generator=self.g)
        return self.c2(y)


class CheckpointWhenTrainingNet(nn.Module):
    """Activation checkpointing only when gradients flow, as torchvision's memory-efficient DenseNet decides it
    (``if any(t.requires_grad for t in inputs)``): the trace takes the training branch, which computes the same."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = conv_bn(3, 8), conv_bn(8, 8), conv_bn(8, 8)

    def forward(self, x):
        y = self.c1(x)
        if y.requires_grad:
            y = torch.utils.checkpoint.checkpoint(self.c2, y, use_reentrant=False)
        else:
            y = self.c2(y)
        return self.c3(y)


class PositionalConvNet(nn.Module):
    """A conv on a learned map, not on the input (conditional positional encodings): the same for every
    sample, added to the trunk by broadcasting."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = conv_bn(3, 8), conv_bn(8, 8)
        self.pos = nn.Parameter(torch.randn(1, 8, 1, 1))
        self.pos_conv = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.c2(self.c1(x) + self.pos_conv(self.pos))


class PatchesToBatchNet(nn.Module):
    """Windows or patches moved into the batch and back (Swin's window partition, MobileViT): the batch size
    is a multiple of the input's."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = conv_bn(3, 8), conv_bn(8, 8), conv_bn(8, 8)

    def forward(self, x):
        y = self.c1(x)
        b, c, h, w = y.shape
        p = y.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4).reshape(b * 4, c, h // 2, w // 2)
        p = self.c2(p)
        return self.c3(p.reshape(b, 2, 2, c, h // 2, w // 2).permute(0, 3, 4, 1, 5, 2).reshape(b, c, h, w))


class StdConv2d(nn.Conv2d):
    """timm's ScaledStdConv2d (NFNets): the weight standardised in the forward, ``reshape_as`` the weight."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = StdConv2d(3, 8, 3, padding=1), StdConv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.c2(F.relu(self.c1(x)))


class ScaledConv2d(nn.Conv2d):
    """A conv whose forward takes a second argument (a scale): a policy layer's one-input call would drop it."""

    def forward(self, x, scale=1.0):
        return super().forward(x) * scale


class CallArgumentsNet(nn.Module):
    """Convs called with more than one input, and with the input as a keyword (``conv(input=x)``)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = conv_bn(3, 8), ScaledConv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.c4 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = self.c2(self.c1(x), 0.25)
        return self.c4(F.relu(self.c3(input=y)))


class NormWeightAttention(nn.Module):
    """NAM attention: a BatchNorm after a conv whose weights the forward also reads, to weigh the channels."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.bn = conv_bn(3, 8), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.bn(self.c2(self.c1(x)))
        w = self.bn.weight.abs() / self.bn.weight.abs().sum()
        return torch.sigmoid(y * w.view(1, -1, 1, 1)) * y


class CoordMapNet(nn.Module):
    """Tensors made from the input's sizes without a batch dimension (CoordConv-style): a (1, 1, H, W) map and a
    per-channel vector, meeting the tasks' rows."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = conv_bn(3, 8), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        pos = torch.zeros_like(x[:1, :1]) + 0.5
        y = self.c1(x) + pos
        scale = torch.ones_like(x[0, :1, 0, :1]).reshape(1, 1, 1, 1) * 0.5
        return self.c2(y * scale)


class ChannelsLastStagesNet(nn.Module):
    """timm's MambaOut / Sequencer / Swin way: stages on (N, H, W, C), a convolution on the map permuted in and out
    within a gated block, a channels-last norm at the end of ``forward_features``, pooling over axes 1 and 2."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8))
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(8), nn.Linear(8, 16), nn.Linear(8, 8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.drop_path = DropPath(0.0)
        self.norm_out, self.head = nn.LayerNorm(8), nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.forward_features(x).mean((1, 2)))

    def forward_features(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)
        gate, y = self.fc1(self.norm(x)).chunk(2, dim=-1)
        y = self.dw(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.norm_out(x + self.drop_path(self.fc2(F.gelu(gate) * y)))

    def expected_features(self, x):
        return self.forward_features(x).permute(0, 3, 1, 2)


class WindowStagesNet(nn.Module):
    """timm's Swin at the one size it takes: a convolution's map permuted to (N, H, W, C), attention in 4 x 4 windows
    (the map cut into (N·windows, 16, C) and put back), an MLP on tokens (``reshape(N, -1, C)`` and back), a
    depthwise convolution on the map permuted in and out, a patch merging (2 x 2 pixels into the channels) and a
    channels-last norm at the end of ``forward_features``; larger sizes fail at the position embedding (made for
    images up to 32 x 32), so only the graph tells the maps."""

    def __init__(self, window: int = 4):
        super().__init__()
        self.window, self.scale = window, 8 ** -0.5
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.pos = nn.Parameter(torch.randn(1, 16, 16, 8) / 10)  # (1, H, W, C) for images up to 32 x 32
        self.norm1, self.qkv, self.proj = nn.LayerNorm(8), nn.Linear(8, 24), nn.Linear(8, 8)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(8), nn.Linear(8, 16), nn.Linear(16, 8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.merge_norm, self.reduction = nn.LayerNorm(32), nn.Linear(32, 16)
        self.norm_out, self.head = nn.LayerNorm(16), nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.forward_features(x).mean((1, 2)))

    def _attention(self, x):
        n, h, w, c = x.shape
        k = self.window
        windows = x.view(n, h // k, k, w // k, k, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, k * k, c)
        q, key, v = self.qkv(windows).chunk(3, dim=-1)
        out = self.proj(torch.softmax(q @ key.transpose(1, 2) * self.scale, dim=-1) @ v)
        return out.view(n, h // k, w // k, k, k, c).permute(0, 1, 3, 2, 4, 5).reshape(n, h, w, c)

    def forward_features(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)
        n, h, w, c = x.shape
        x = x + self.pos[:, :h, :w]
        x = x + self._attention(self.norm1(x))
        t = x.reshape(n, -1, c)
        x = (t + self.fc2(F.gelu(self.fc1(self.norm2(t))))).reshape(n, h, w, c)
        x = x + self.dw(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x.reshape(n, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.norm_out(self.reduction(self.merge_norm(x)))

    def expected_features(self, x):
        return self.forward_features(x).permute(0, 3, 1, 2)


class NamedLikeTheGraphNet(nn.Module):
    """Attributes named as automtl's own graph inputs (``mix``, the policy's mixing weights): a parameter scaling the
    channels (the compact model asked for a second input, ``mix_1``)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.mix = nn.Parameter(torch.linspace(0.5, 1.5, 8).view(1, 8, 1, 1))

    def forward(self, x):
        return self.b(torch.relu(self.bn(self.a(x))) * self.mix)


class BatchStatisticsNorm(nn.BatchNorm2d):
    """Test-time adaptation's BatchNorm (TENT): it normalises with its batch's statistics in eval mode too."""

    def forward(self, x):
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


class BatchCentredGroupNorm(nn.GroupNorm):
    """A GroupNorm subclass that also centres each channel on the batch's mean (it mixes the batch in both modes)."""

    def forward(self, x):
        y = super().forward(x)
        return y - y.mean((0, 2, 3), keepdim=True)


class TestTimeNormNet(nn.Module):
    """Convolutions each followed by a BatchNorm subclass that ignores the mode (fused with its conv like any norm),
    and after a residual add a GroupNorm subclass that uses its batch (not fused: normalised per task all the same)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BatchStatisticsNorm(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, stride=2, padding=1), BatchStatisticsNorm(8), nn.ReLU())
        self.last, self.norm, self.after = nn.Conv2d(8, 8, 3, padding=1), BatchStatisticsNorm(8), BatchCentredGroupNorm(2, 8)

    def forward(self, x):
        y = self.body(x)
        return self.after(self.norm(self.last(y)) + y)


ZOO = {
    "constant": ConstantInForwardNet, "positional_conv": PositionalConvNet, "patches_to_batch": PatchesToBatchNet,
    "std_conv": StdConvNet,
    "dropout": DropoutNet, "efficientnet": EfficientNetish, "convnext": ConvNeXtish, "shufflenet": ShuffleNetish,
    "preact": PreActNet, "pyramid": PyramidShared, "segmentation": SegmentationNet, "squeezenet": SqueezeNetish,
    "inplace": InplaceNet, "batch_size": BatchSizeNet, "tied": TiedDecoder, "classifier": ClassifierNet,
    "pruned": pruned_net, "transform_input": TransformInputNet, "call_arguments": CallArgumentsNet,
    "norm_weight_attention": NormWeightAttention, "coord_map": CoordMapNet,
    "train_only_constant": TrainOnlyConstantNet, "own_generator": OwnGeneratorNet,
    "checkpoint_when_training": CheckpointWhenTrainingNet, "channels_last_stages": ChannelsLastStagesNet,
    "window_stages": WindowStagesNet, "named_like_the_graph": NamedLikeTheGraphNet,
    "test_time_norm": TestTimeNormNet,
}
