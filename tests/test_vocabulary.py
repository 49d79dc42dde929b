"""The closed vocabulary of .automtl files, as reviewed. A change to it must change this file too.

Each entry here was reviewed as a pure tensor operation that takes data and returns data: it opens no
file, touches no storage or numpy array, calls nothing it is handed, and reaches no Python internals.
To add an operation: review it against that sentence, then add it both to automtl/formats and here.
"""
import torch
from torch import nn

from automtl.formats.modules import MODULES
from automtl.formats.vocabulary import ATTRIBUTES, FUNCTIONS, METHODS

REVIEWED_FUNCTIONS = {
    "builtins.getattr",  # restricted by check_graph to ATTRIBUTES of a tensor
    "operator.add", "operator.floordiv", "operator.getitem", "operator.matmul",
    "operator.mul", "operator.neg", "operator.sub", "operator.truediv",
    "operator.mod",  # reviewed: Python's % on numbers or tensors only (the arith rule refuses strings: no formatting)
    "operator.pow",  # reviewed: ** on numbers or tensors; an integer power is bounded before it is computed
    "torch.abs", "torch.add", "torch.amax", "torch.bmm", "torch.cat", "torch.channel_shuffle", "torch.chunk",
    "torch.clamp", "torch.clamp_max", "torch.clamp_min", "torch.concat", "torch.div", "torch.erf", "torch.exp",
    "torch.flatten", "torch.flip", "torch.matmul", "torch.maximum", "torch.mean", "torch.minimum", "torch.mul",
    "torch.narrow", "torch.ones_like", "torch.permute", "torch.relu", "torch.reshape", "torch.roll", "torch.rsqrt",
    "torch.sigmoid", "torch.softmax", "torch.split", "torch.sqrt", "torch.squeeze", "torch.stack", "torch.sub",
    "torch.sum", "torch.tanh", "torch.transpose", "torch.unbind", "torch.unsqueeze", "torch.where", "torch.zeros_like",
    "torch.conv2d", "torch.conv_transpose2d",
    "torch.square", "torch.var",  # reviewed: elementwise square, a variance reduction
    "torch.log_softmax",  # reviewed: as F.log_softmax
    *(f"torch.nn.functional.{n}" for n in (  # reviewed: elementwise activations (softmin: a softmax of -x)
        "prelu", "selu", "celu", "logsigmoid", "softsign", "tanhshrink", "hardshrink", "softshrink", "threshold",
        "softmin")),
    *(f"torch.nn.functional.{n}" for n in (
        "adaptive_avg_pool2d", "adaptive_max_pool2d", "avg_pool2d", "batch_norm", "conv2d", "conv_transpose2d", "dropout", "dropout2d",
        "elu", "gelu", "glu", "group_norm", "hardsigmoid", "hardswish", "hardtanh", "interpolate", "layer_norm",
        "leaky_relu", "linear", "log_softmax", "max_pool2d", "mish", "normalize", "pad", "pixel_shuffle",
        "pixel_unshuffle", "relu", "relu6", "sigmoid", "silu", "softmax", "softplus", "tanh")),
}
REVIEWED_METHODS = {
    "abs", "add", "amax", "bfloat16", "chunk", "clamp", "clamp_max", "clamp_min", "clone",
    "contiguous", "detach", "dim", "div", "exp", "expand", "expand_as", "flatten", "flip", "float", "half",
    "masked_fill", "matmul", "mean", "mul", "narrow", "neg", "permute", "pow", "relu",
    "repeat", "reshape", "reshape_as", "roll", "rsqrt", "sigmoid", "size", "softmax", "split", "sqrt",
    "squeeze", "sub", "sum", "tanh", "to", "transpose", "type_as", "unbind", "unsqueeze", "view", "view_as",
    "square", "var",  # reviewed: as torch.square / torch.var
    "log_softmax",  # reviewed: as torch.log_softmax
}
REVIEWED_ATTRIBUTES = {"shape", "ndim", "dtype", "device"}
REVIEWED_MODULES = {
    "AdaptiveAvgPool2d": {"output_size"}, "AdaptiveMaxPool2d": {"output_size", "return_indices"},
    "AvgPool2d": {"ceil_mode", "count_include_pad", "divisor_override", "kernel_size", "padding", "stride"},
    "BatchNorm1d": {"affine", "bias", "eps", "momentum", "num_features", "track_running_stats"},
    "BatchNorm2d": {"affine", "bias", "eps", "momentum", "num_features", "track_running_stats"},
    "InstanceNorm2d": {"affine", "bias", "eps", "momentum", "num_features", "track_running_stats"},
    "ChannelShuffle": {"groups"},
    "Conv2d": {"bias", "dilation", "groups", "in_channels", "kernel_size", "out_channels", "padding", "padding_mode", "stride"},
    "ConvTranspose2d": {"bias", "dilation", "groups", "in_channels", "kernel_size", "out_channels", "output_padding",
                        "padding", "padding_mode", "stride"},
    "Dropout": {"inplace", "p"}, "Dropout2d": {"inplace", "p"}, "ELU": {"alpha", "inplace"}, "Flatten": {"end_dim", "start_dim"},
    "GELU": {"approximate"}, "GLU": {"dim"}, "GroupNorm": {"affine", "bias", "eps", "num_channels", "num_groups"},
    "Hardsigmoid": {"inplace"}, "Hardswish": {"inplace"}, "Hardtanh": {"inplace", "max_val", "min_val"}, "Identity": set(),
    "LayerNorm": {"bias", "elementwise_affine", "eps", "normalized_shape"}, "LeakyReLU": {"inplace", "negative_slope"},
    "Linear": {"bias", "in_features", "out_features"},
    "MaxPool2d": {"ceil_mode", "dilation", "kernel_size", "padding", "return_indices", "stride"},
    "Mish": {"inplace"}, "PixelShuffle": {"upscale_factor"}, "PixelUnshuffle": {"downscale_factor"}, "ReLU": {"inplace"},
    "ReLU6": {"inplace"}, "SiLU": {"inplace"}, "Sigmoid": set(), "Softmax": {"dim"}, "Softplus": {"beta", "threshold"},
    "Tanh": set(), "Upsample": {"align_corners", "mode", "recompute_scale_factor", "scale_factor", "size"},
    "ZeroPad2d": {"padding"},
    "ConstantPad2d": {"padding", "value"},  # reviewed: F.pad with a constant; its output bounded as any activation
    "Conv1d": {"bias", "dilation", "groups", "in_channels", "kernel_size", "out_channels", "padding", "padding_mode",
               "stride"},  # reviewed: as Conv2d (ECA attention); its unfolding counted as Conv2d's
    # reviewed: elementwise activations, their constants floats (PReLU: its weight a parameter of the file)
    "PReLU": {"num_parameters"}, "SELU": {"inplace"}, "CELU": {"alpha", "inplace"},
    "Threshold": {"threshold", "value", "inplace"}, "Hardshrink": {"lambd"}, "Softshrink": {"lambd"}, "Softsign": set(),
    "Tanhshrink": set(), "LogSigmoid": set(), "LogSoftmax": {"dim"}, "Softmin": {"dim"}, "Softmax2d": set(),
    # reviewed: BatchNorm2d's arguments (no process group: the default, one process or DDP's own); a window of `size`
    # channels per element, counted as a pooling window in the element-operation bound
    "SyncBatchNorm": {"affine", "bias", "eps", "momentum", "num_features", "track_running_stats"},
    "LocalResponseNorm": {"size", "alpha", "beta", "k"},
}


def test_functions_are_the_reviewed_list():
    assert set(FUNCTIONS) == REVIEWED_FUNCTIONS


def test_methods_and_attributes_are_the_reviewed_list():
    assert set(METHODS) == REVIEWED_METHODS
    assert set(ATTRIBUTES) == REVIEWED_ATTRIBUTES


def test_modules_and_their_arguments_are_the_reviewed_list():
    assert {cls.__name__: set(args) for cls, args in MODULES.items()} == REVIEWED_MODULES
    assert all(getattr(nn, cls.__name__) is cls for cls in MODULES)  # torch.nn's own classes, not look-alikes


def test_every_entry_is_the_function_or_method_it_names():
    for name, (fn, _) in FUNCTIONS.items():
        module, _, attr = name.rpartition(".")
        namespace = {"torch": torch, "torch.nn.functional": torch.nn.functional, "operator": __import__("operator"),
                     "builtins": __import__("builtins")}[module]
        assert getattr(namespace, attr) is fn, name
    assert all(hasattr(torch.Tensor, m) for m in METHODS)


def test_nothing_that_reaches_files_storage_or_python_internals():
    for forbidden in ("torch.load", "torch.save", "torch.from_file", "torch.tensor", "torch.as_tensor", "torch.from_numpy",
                      "builtins.open", "builtins.eval", "builtins.exec", "builtins.__import__", "operator.attrgetter",
                      "operator.methodcaller", "torch.nn.functional.handle_torch_function"):
        assert forbidden not in FUNCTIONS
    for forbidden in ("numpy", "tolist", "tofile", "storage", "untyped_storage", "data_ptr", "item", "register_hook",
                      "apply_", "map_", "share_memory_", "pin_memory", "__reduce_ex__", "set_", "copy_"):
        assert forbidden not in METHODS
    assert not any(m.endswith("_") for m in METHODS), "in-place methods write into tensors the file did not create"
    assert not any(m.startswith("_") for m in METHODS) and not any(a.startswith("_") for a in ATTRIBUTES)
