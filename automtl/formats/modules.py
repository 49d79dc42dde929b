"""The torch.nn module classes an ``.automtl`` file may build, each with typed constructor arguments.

A module in a bundle is a class name and its constructor arguments. Only the classes below can
be named, and each argument must have the type listed for it (an int, a bool, one of a few option
strings, ...): a file cannot hand a constructor a callable, a process group or a path. Modules
with tensors are built on the ``meta`` device, so a constructor allocates nothing: the weights
entry, whose size the reader bounds, fills them.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn

from ..errors import FileFormatError, finite_number

_MAX = 2**31


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _MAX


def _pos(v: Any) -> bool:
    return _int(v) and v >= 1


def _ints(v: Any) -> bool:
    return _int(v) or (isinstance(v, (tuple, list)) and 1 <= len(v) <= 3 and all(_int(x) for x in v))


def _pad_sides(v: Any) -> bool:  # ZeroPad2d / ConstantPad2d: one int, or (left, right, top, bottom) as they store it
    return _int(v) or (isinstance(v, (tuple, list)) and len(v) == 4 and all(_int(x) for x in v))


def _opt_ints(v: Any) -> bool:  # adaptive pooling sizes may keep a dimension with None
    return v is None or _int(v) or (isinstance(v, (tuple, list)) and 1 <= len(v) <= 3
                                    and all(x is None or _int(x) for x in v))


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _float(v: Any) -> bool:
    return finite_number(v)  # a 400-digit integer too is refused: no float holds it


def _opt_float(v: Any) -> bool:
    return v is None or _float(v)


def _dim(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -8 <= v <= 8


def _opt_dim(v: Any) -> bool:
    return v is None or _dim(v)


def _choice(*options) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        return isinstance(v, str) and v in options
    check.options = options
    return check


def _false(v: Any) -> bool:
    return v is False


def _conv_padding(v: Any) -> bool:
    return _ints(v) or _choice("same", "valid")(v)


_PADDING_MODE = _choice("zeros", "reflect", "replicate", "circular")
_NORM = {"num_features": _pos, "eps": _float, "momentum": _opt_float, "affine": _bool,
         "track_running_stats": _bool, "bias": _bool}
_INPLACE = {"inplace": _false}  # a bundle never writes into its input: save stores inplace=False
_UPSAMPLE_MODE = _choice("nearest", "linear", "bilinear", "bicubic", "trilinear", "area", "nearest-exact")

#: Each buildable class with a type check per constructor argument it may receive.
MODULES: dict[type, dict[str, Callable[[Any], bool]]] = {
    nn.Conv2d: {"in_channels": _pos, "out_channels": _pos, "kernel_size": _ints, "stride": _ints,
                "padding": _conv_padding, "dilation": _ints, "groups": _pos, "bias": _bool, "padding_mode": _PADDING_MODE},
    nn.Conv1d: {"in_channels": _pos, "out_channels": _pos, "kernel_size": _ints, "stride": _ints,
                "padding": _conv_padding, "dilation": _ints, "groups": _pos, "bias": _bool, "padding_mode": _PADDING_MODE},
    nn.ConvTranspose2d: {"in_channels": _pos, "out_channels": _pos, "kernel_size": _ints, "stride": _ints,
                         "padding": _ints, "output_padding": _ints, "groups": _pos, "bias": _bool, "dilation": _ints,
                         "padding_mode": _choice("zeros")},
    nn.Linear: {"in_features": _pos, "out_features": _pos, "bias": _bool},
    nn.BatchNorm1d: _NORM, nn.BatchNorm2d: _NORM, nn.InstanceNorm2d: _NORM,
    # SyncBatchNorm: BatchNorm on one process; under DDP a loaded model synchronises its statistics as the saved one did
    nn.SyncBatchNorm: _NORM,
    # its window counts as pooling, its padded copies as live elements; AlexNet and GoogLeNet use 5
    nn.LocalResponseNorm: {"size": lambda v: _pos(v) and v <= 1024, "alpha": _float, "beta": _float, "k": _float},
    nn.GroupNorm: {"num_groups": _pos, "num_channels": _pos, "eps": _float, "affine": _bool, "bias": _bool},
    nn.LayerNorm: {"normalized_shape": _ints, "eps": _float, "elementwise_affine": _bool, "bias": _bool},
    nn.ReLU: _INPLACE, nn.ReLU6: _INPLACE, nn.SiLU: _INPLACE, nn.Hardswish: _INPLACE, nn.Hardsigmoid: _INPLACE,
    nn.Mish: _INPLACE, nn.Sigmoid: {}, nn.Tanh: {}, nn.Identity: {},
    nn.GELU: {"approximate": _choice("none", "tanh")},
    nn.LeakyReLU: {"negative_slope": _float, **_INPLACE}, nn.ELU: {"alpha": _float, **_INPLACE},
    nn.Softplus: {"beta": _float, "threshold": _float},
    nn.PReLU: {"num_parameters": _pos}, nn.SELU: _INPLACE, nn.CELU: {"alpha": _float, **_INPLACE},
    nn.Threshold: {"threshold": _float, "value": _float, **_INPLACE},
    nn.Hardshrink: {"lambd": _float}, nn.Softshrink: {"lambd": _float}, nn.Softsign: {}, nn.Tanhshrink: {},
    nn.LogSigmoid: {}, nn.LogSoftmax: {"dim": _opt_dim}, nn.Softmin: {"dim": _opt_dim}, nn.Softmax2d: {},
    nn.Hardtanh: {"min_val": _float, "max_val": _float, **_INPLACE},
    nn.Dropout: {"p": _float, **_INPLACE}, nn.Dropout2d: {"p": _float, **_INPLACE},
    nn.MaxPool2d: {"kernel_size": _ints, "stride": _ints, "padding": _ints, "dilation": _ints,
                   "return_indices": _false, "ceil_mode": _bool},
    nn.AvgPool2d: {"kernel_size": _ints, "stride": _ints, "padding": _ints, "ceil_mode": _bool,
                   "count_include_pad": _bool, "divisor_override": lambda v: v is None or _pos(v)},
    nn.AdaptiveAvgPool2d: {"output_size": _opt_ints},
    nn.AdaptiveMaxPool2d: {"output_size": _opt_ints, "return_indices": _false},
    nn.Flatten: {"start_dim": _dim, "end_dim": _dim},
    nn.Upsample: {"size": _opt_ints, "scale_factor": lambda v: v is None or _float(v) or (
        isinstance(v, (tuple, list)) and all(_float(x) for x in v)), "mode": _UPSAMPLE_MODE,
        "align_corners": lambda v: v is None or _bool(v), "recompute_scale_factor": lambda v: v is None or _bool(v)},
    nn.PixelShuffle: {"upscale_factor": _pos}, nn.PixelUnshuffle: {"downscale_factor": _pos},
    nn.Softmax: {"dim": _opt_dim}, nn.GLU: {"dim": _dim}, nn.ChannelShuffle: {"groups": _pos},
    nn.ZeroPad2d: {"padding": _pad_sides}, nn.ConstantPad2d: {"padding": _pad_sides, "value": _float},
}
_BY_NAME = {cls.__name__: cls for cls in MODULES}


def buildable(mod: nn.Module) -> bool:
    """True when ``mod``'s exact class is on the list (a user's subclass is not)."""
    return type(mod) in MODULES


def build_module(name: str, cls_name: Any, args: Any, where: str) -> nn.Module:
    """Build ``cls_name(**args)`` on the meta device after checking the class and every argument's type.

    Raises:
        FileFormatError: the class is not on the list, an argument is unknown or of the wrong
            type, or the constructor refuses the combination.
    """
    cls = _BY_NAME.get(cls_name) if isinstance(cls_name, str) else None
    if cls is None:
        raise FileFormatError(
            f"module {name!r} of {where} has class {str(cls_name)[:60]!r}, which is not on automtl's reviewed list "
            "of torch.nn modules; the file was not written by automtl.save or was crafted, re-save the model")
    if not isinstance(args, dict):
        raise FileFormatError(f"module {name!r} of {where} has malformed constructor arguments; the file is corrupted, re-save the model")
    spec = MODULES[cls]
    for key, value in args.items():
        check = spec.get(key)
        if check is None or not check(value):
            raise FileFormatError(
                f"module {name!r} ({cls_name}) of {where} has constructor argument {str(key)[:40]!r} = {str(value)[:40]!r}, "
                "which is not an argument of the type automtl accepts there; the file is corrupted or crafted, re-save the model")
    kwargs = dict(args)
    params = inspect.signature(cls.__init__).parameters
    missing = [key for key in kwargs if key not in params]
    if missing:  # on the list, but not in this torch's constructor: a file of a newer torch
        raise FileFormatError(
            f"module {name!r} ({cls_name}) of {where} has constructor argument {missing[0]!r}, which the "
            f"{cls_name} of the installed torch {torch.__version__} does not take; the file was written with a newer "
            "torch: upgrade torch to load it")
    if "device" in params:
        kwargs["device"] = "meta"  # no memory, no random init: the weights fill it
    try:
        return cls(**kwargs)
    except Exception as exc:  # a constructor refusing a combination of valid-looking values
        raise FileFormatError(
            f"module {name!r} ({cls_name}) of {where} cannot be built from its stored arguments ({str(exc)[:120]}); "
            "the file is corrupted or edited, re-save the model") from None
