"""``fold``: an inference-mode batch norm folded into the convolution or linear
layer before it.

In inference a batch norm is the per-channel affine map
``y = (z - running_mean) * s + bn_bias`` with ``s = bn_weight / sqrt(running_var + eps)``;
when ``z = conv(x) + conv_bias`` it folds into the layer's parameters:
``weight' = weight * s`` (along the output channels) and
``bias' = (conv_bias - running_mean) * s + bn_bias``.  The arithmetic is done
in float64 and each result rounded once to its dtype, so float16 weights lose
nothing to the fold beyond that one rounding.
"""

import math
import sys
from typing import NamedTuple

import numpy as np

from . import dtypes
from .api import _axis, _positive_int, _scalar


class FoldResult(NamedTuple):
    """What ``fold`` returns: the folded layer's parameters."""

    weight: np.ndarray
    bias: np.ndarray


def host_array(a, name):
    """``a`` as a NumPy array: arrays and array-likes as they are (``np.asarray``),
    PyTorch tensors through ``a.detach().cpu()`` (torch is never imported here:
    a tensor exists only where the caller's program has imported torch)."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(a, torch.Tensor):
        return np.asarray(a)
    t = a.detach().cpu()
    if t.dtype is torch.bfloat16:  # NumPy has no bfloat16 of its own: ml_dtypes' one
        bf16 = dtypes.bfloat16()
        if bf16 is None:
            raise TypeError(f"{name} is a bfloat16 tensor: import ml_dtypes (NumPy's "
                            "bfloat16) or pass a float32 tensor")
        return t.view(torch.int16).numpy().view(bf16)
    return t.numpy()


def _floats(a, name):
    a = host_array(a, name)
    dtypes.check_data(a.dtype, name)
    return a


def _per_channel(a, name, C):
    """An optional per-channel float array of shape ``(C,)`` (``None`` stays ``None``)."""
    if a is None:
        return None
    a = _floats(a, name)
    if a.shape != (C,):
        raise ValueError(f"{name} must have shape ({C},) (one value per output channel), "
                         f"got {a.shape}")
    return a


def _out_channels(shape, axis, groups):
    """The layer's output channels, ``C``, for a weight of ``shape`` whose
    output-channel axis is ``axis``."""
    if axis == 0:  # Conv (Cout, Cin/g, k...), Linear (Cout, Cin)
        if shape[0] % groups:
            raise ValueError(f"a weight of shape {shape} with output channels on axis 0 "
                             f"has {shape[0]} of them, not divisible by groups={groups}")
        return shape[0]
    if groups == 1:  # ConvTranspose with groups=1, or kernels stored (..., Cout)
        return shape[axis]
    if axis != 1:
        raise ValueError(f"groups={groups} needs axis 0 (Conv, Linear) or 1 "
                         f"(ConvTranspose), got axis {axis}")
    if shape[0] % groups:  # ConvTranspose (Cin, Cout/g, k...)
        raise ValueError(f"a transposed-convolution weight of shape {shape} has "
                         f"{shape[0]} input channels, not divisible by groups={groups}")
    return groups * shape[1]


def fold(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps=1e-5,
         *, axis=0, groups=1):
    """The weight and bias of a convolution or linear layer followed by an
    inference-mode batch norm, as one layer.

    Parameters
    ----------
    conv_weight : array, ``ndim >= 2``
        The layer's weight: ``(Cout, Cin/groups, k...)`` for a convolution and
        ``(Cout, Cin)`` for a linear layer (``axis=0``); ``(Cin, Cout/groups, k...)``
        for a transposed convolution (``axis=1``).  float16, bfloat16
        (``ml_dtypes``), float32 or float64; NumPy arrays, array-likes or
        PyTorch tensors (read through ``detach().cpu()``).
    conv_bias : array of shape ``(Cout,)``, optional
        The layer's bias; ``None`` means 0.
    bn_weight, bn_bias : array of shape ``(Cout,)``, optional
        The batch norm's affine parameters; ``None`` means scale 1 and shift 0.
    running_mean, running_var : array of shape ``(Cout,)``
        The batch norm's running statistics.
    eps : float > 0
        The batch norm's ``eps``.
    axis : int
        The weight's output-channel axis: 0 for Conv and Linear, 1 for
        ConvTranspose; negative values count from the end (-1 for kernels
        stored ``(..., Cout)``, as Keras does).
    groups : int
        The layer's groups.  With ``axis=1`` it is ConvTranspose's: the weight's
        first axis is split into ``groups`` blocks and block ``g`` holds output
        channels ``g * (Cout/groups) + j`` at ``weight[g*(Cin/groups):(g+1)*(Cin/groups), j]``.
        With ``axis=0`` the output channels are in order whatever the groups,
        which are only checked to divide ``Cout``.

    Returns
    -------
    FoldResult
        ``(weight, bias)``: new arrays, ``weight`` of ``conv_weight``'s shape and
        dtype, ``bias`` of shape ``(Cout,)`` and ``conv_bias``'s dtype
        (``conv_weight``'s when ``conv_bias`` is ``None``).  Computed in
        float64 and rounded once to those dtypes.

    Raises
    ------
    TypeError
        A non-floating or unsupported dtype, a non-integer ``axis`` or ``groups``.
    ValueError
        Shapes that do not match ``Cout``, ``groups`` that does not divide the
        channels, ``eps`` out of range, a negative ``running_var``.
    """
    w = _floats(conv_weight, "conv_weight")
    if w.ndim < 2:
        raise ValueError(f"conv_weight must have at least 2 dimensions, got shape {w.shape}")
    ax = _axis(axis, w.ndim)
    g = _positive_int(groups, "groups")
    C = _out_channels(w.shape, ax, g)
    eps = _scalar(eps, "eps", 0.0, math.inf, low_open=True)
    cb = _per_channel(conv_bias, "conv_bias", C)
    bw = _per_channel(bn_weight, "bn_weight", C)
    bb = _per_channel(bn_bias, "bn_bias", C)
    if running_mean is None or running_var is None:
        raise ValueError("fold needs the batch norm's running_mean and running_var")
    rm = _per_channel(running_mean, "running_mean", C).astype(np.float64)
    rv = _per_channel(running_var, "running_var", C).astype(np.float64)
    if np.any(rv < 0):
        raise ValueError("running_var must not be negative")

    scale = 1.0 / np.sqrt(rv + eps)
    if bw is not None:
        scale *= bw
    shift = -rm * scale if cb is None else (cb.astype(np.float64) - rm) * scale
    if bb is not None:
        shift += bb
    w64 = w.astype(np.float64)
    if ax == 1 and g > 1:  # (Cin, Cout/g, k...) as (g, Cin/g, Cout/g, k...)
        blocks = w64.reshape((g, w.shape[0] // g) + w.shape[1:])
        s = scale.reshape((g, 1, w.shape[1]) + (1,) * (w.ndim - 2))
        folded = (blocks * s).reshape(w.shape)
    else:
        s = scale.reshape(tuple(-1 if i == ax else 1 for i in range(w.ndim)))
        folded = w64 * s
    return FoldResult(folded.astype(w.dtype),
                      shift.astype(w.dtype if cb is None else cb.dtype))
