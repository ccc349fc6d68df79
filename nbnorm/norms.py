"""Group, layer, instance and RMS normalization: batch norm's engine over other axes.

Each is "statistics per unit" plus an affine map indexed by another axis than
the statistics.  Every call is validated here with ``api``'s rules, then handed
to the device's ``norms`` module (``nbnorm.cpu.norms``, ``nbnorm.cuda.norms``)
as one *group view* of ``x``, ``(N, S, G, K, R)`` in memory order: ``N``
samples, statistics per ``(sample, group)`` over ``S * K * R`` values, the
affine parameters per channel ``g * K + k``, constant over runs of ``R``:

=====================  ==============================  ==========================
normalization          x                               group view
=====================  ==============================  ==========================
group norm, axis=1     ``(N, C, *spatial)``            ``(N, 1, G, C // G, prod(spatial))``
group norm, axis=-1    ``(N, *spatial, C)``            ``(N, prod(spatial), G, C // G, 1)``
instance norm          as group norm                   ``G = C``
layer norm, RMS norm   ``(*lead, *normalized_shape)``  ``(prod(lead), 1, 1, D, 1)``
=====================  ==============================  ==========================

(``D = prod(normalized_shape)``; a channel axis that is not last in memory
makes ``R > 1``, one that is not second ``S > 1``: channels-last memory with
``axis=1`` is the second row.)  Validation follows ``nbnorm.forward``'s
rules, by ``api``'s own functions: everything is checked before anything is
written, outputs can be passed in, half precision data have float32
statistics, the fused epilogue ``act(norm(x) + residual)`` and its
gradient through the ReLU mask are the same options.
"""

import math
import operator
from typing import NamedTuple

import numpy as np

from . import dtypes, layout
from .api import (BackwardResult, ForwardResult, _activation, _axis, _backend, _channel_input,
                  _check_aliasing, _data, _empty_like, _flag, _forward_out, _input,
                  _kernel_input, _kernel_output, _like_x, _running, _scalar, _separate,
                  _writable)


class RMSNormResult(NamedTuple):
    """What ``rms_norm`` returns; each field is the caller's buffer where one was given."""

    out: object
    invrms: object


class RMSNormBackwardResult(NamedTuple):
    """What ``rms_norm_backward`` returns."""

    grad_input: object
    grad_weight: object


# --------------------------------------------------------------- the rules

def _device_module(be):
    if be.device:
        from .cuda import norms
    else:
        from .cpu import norms
    return norms


def _rows_data(x, dev):
    """``x`` of layer and RMS norm: a floating-point array of at least 1 dimension
    (``api._data`` asks 2, a batch and a channel axis)."""
    if type(x) is np.ndarray and x.ndim >= 1 and x.dtype.kind == "f" and x.itemsize <= 8 and (
            x.dtype.isnative and x.flags.aligned):
        return x  # the usual case
    x = _input(x, "x", dev)
    if x.ndim < 1:
        raise ValueError("x must have at least 1 dimension, got a 0-d array")
    dtypes.check_data(x.dtype, "x")
    return x


def _shaped_input(a, name, shape, dev, what):
    """An optional float input of exactly ``shape`` (a layer norm weight of
    ``normalized_shape``, statistics of shape ``(N, G)``), any float dtype, as a
    C-contiguous array (device arrays as they are)."""
    if a is None:
        return None
    if type(a) is np.ndarray and a.shape == shape and a.dtype.kind == "f" and a.dtype.isnative:
        if a.flags.c_contiguous and a.flags.aligned:  # the usual case
            return a
    a = _input(a, name, dev)
    if not dtypes.is_float(a.dtype):
        raise TypeError(f"{name} must be a floating-point array, got dtype {a.dtype}")
    if tuple(a.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} ({what}), got {tuple(a.shape)}")
    return a if dev else np.ascontiguousarray(a)


def _groups(num_groups, C):
    """``num_groups``: a positive integer that divides the ``C`` channels."""
    if isinstance(num_groups, (bool, np.bool_)):
        raise TypeError(f"num_groups must be an integer, got {num_groups!r}")
    try:
        G = operator.index(num_groups)
    except TypeError:
        raise TypeError(f"num_groups must be an integer, got {num_groups!r}") from None
    if G < 1 or C % G:
        raise ValueError(f"num_groups must be a positive divisor of the number of channels "
                         f"{C}, got {G}")
    return G


def _channel_axis(axis, x):
    """The channel axis of group and instance norm: any axis but the batch axis 0."""
    ax = _axis(axis, x.ndim)
    if ax == 0:
        raise ValueError("axis 0 is the batch axis; the channel axis must be another one "
                         "(1 for NCHW, -1 for channels-last)")
    if x.size == 0:
        raise ValueError(f"expected a non-empty input, got shape {tuple(x.shape)}")
    return ax


def _shape_tuple(normalized_shape):
    """``normalized_shape`` (an int or a sequence of ints) as a tuple of ints."""
    if isinstance(normalized_shape, (bool, np.bool_)):
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got "
                        f"{normalized_shape!r}")
    try:
        return (operator.index(normalized_shape),)
    except TypeError:
        try:
            return tuple(operator.index(d) for d in normalized_shape)
        except TypeError:
            raise TypeError(f"normalized_shape must be an int or a sequence of ints, got "
                            f"{normalized_shape!r}") from None


def _normalized_shape(normalized_shape, x):
    """``normalized_shape`` (an int or a sequence of ints): the trailing axes of ``x``."""
    shape = _shape_tuple(normalized_shape)
    k = len(shape)
    if k == 0 or k > x.ndim or tuple(x.shape[x.ndim - k:]) != shape:
        raise ValueError(f"normalized_shape {shape} must be the trailing axes of x's shape "
                         f"{tuple(x.shape)}")
    if x.size == 0:
        raise ValueError(f"expected a non-empty input, got shape {tuple(x.shape)}")
    return shape


def _stat_shape_of(mean, x, name):
    """The leading shape ``x.shape[:k]`` that backward's statistics ``mean`` have
    (layer and RMS norm); what it leaves of ``x`` is ``normalized_shape``."""
    shape = tuple(np.shape(mean)) if not hasattr(mean, "shape") else tuple(mean.shape)
    if len(shape) >= x.ndim or shape != tuple(x.shape[:len(shape)]):
        raise ValueError(f"{name} must have the shape of x's leading axes (x.shape[:-len("
                         f"normalized_shape)]), got {shape} for x of shape {tuple(x.shape)}")
    return shape


def _eps_of(eps, dt):
    """RMS norm's ``eps``: None is the machine epsilon of ``x``'s dtype
    (``torch.nn.functional.rms_norm``)."""
    if eps is None:
        return 2.0 ** -7 if dt.name == "bfloat16" else float(np.finfo(dt).eps)
    return _scalar(eps, "eps", 0.0, math.inf, low_open=True)


_FORWARD_ARRAYS = ("x", "weight", "bias", "running_mean", "running_var", "out", "mean",
                   "invstd", "residual")
_BACKWARD_ARRAYS = ("grad_out", "x", "mean", "invstd", "weight", "grad_input",
                    "grad_weight", "grad_bias", "forward_out", "grad_residual")
_FORWARD_MAY_BE = frozenset({("out", "x"), ("out", "residual")})
_BACKWARD_MAY_BE = frozenset({("grad_input", "grad_out"), ("grad_residual", "grad_out")})


def _no_aliasing(outputs, inputs, may_be, dev):
    if dev or not _separate([a for _, a in outputs + inputs]):
        _check_aliasing(outputs, inputs, may_be, dev)


# -------------------------------------------------------------- the views

def _group_layout(x, ax, G, be):
    """The ``layout.Layout`` whose ``kernel_shape`` is the group view of ``x`` with
    channel axis ``ax``: ``x``'s memory order when the batch axis comes first
    in it (C order, channels-last), else C order (host inputs are then copied
    once; device arrays are refused by ``input_view``)."""
    lay = be.views.plan(x, ax)
    if lay.order[0] != 0 and x.shape[0] > 1:
        order = tuple(range(x.ndim))
        C = x.shape[ax]
        lay = layout.make(order, math.prod(x.shape[:ax]), C, math.prod(x.shape[ax + 1:]))
    outer, C, inner = lay.shape
    N = x.shape[0]
    return layout.Layout(lay.order, lay.shape, (N, outer // N, G, C // G, inner), lay.identity)


def _rows_layout(x, k):
    """The group view of layer and RMS norm over the trailing ``k`` axes, in C order."""
    order = tuple(range(x.ndim))
    D = math.prod(x.shape[x.ndim - k:])
    R = math.prod(x.shape[:x.ndim - k])
    return layout.Layout(order, (R, D, 1), (R, 1, 1, D, 1), True)


class _Stat(NamedTuple):
    view: object   # what the kernels write, shape (N, G)
    finish: object


def _stat_output(a, shape2, be):
    """``(view, finish)`` of a statistics output: a ``(N, G)`` view of ``a``, or
    a temporary that ``finish`` copies into a strided host ``a``."""
    if a is None:
        return _Stat(None, _nothing)
    if be.device or a.flags.c_contiguous:
        return _Stat(a.reshape(shape2), _nothing)
    tmp = np.empty(shape2, a.dtype)
    return _Stat(tmp, lambda: np.copyto(a, tmp.reshape(a.shape)))


def _nothing():
    pass


def _flat(a):
    return None if a is None else a.reshape(-1)


# ------------------------------------------------------------- the calls

def _forward(be, x, lay, G, weight, bias, eps, rms, out, mean, invstd, residual, relu,
             stat_shape, given=None):
    """Allocate, run the device's ``norms.forward`` and return ``(out, mean,
    invstd, moments)``."""
    sdt = dtypes.stat_dtype(x.dtype)
    empty = be.ops.empty if be.device else np.empty
    out = _empty_like(x, lay, be) if out is None else out
    if mean is None and not rms:
        mean = empty(stat_shape, sdt)
    if invstd is None:
        invstd = empty(stat_shape, sdt)
    N = lay.kernel_shape[0]
    m2 = _stat_output(mean, (N, G), be)
    i2 = _stat_output(invstd, (N, G), be)
    x5 = _kernel_input(x, lay, be)
    out5, finish = _kernel_output(out, lay, be)
    res5 = _kernel_input(residual, lay, be)
    moments = _device_module(be).forward(x5, weight, bias, eps, rms, out5, m2.view, i2.view,
                                         res5, relu, given, **be.kw)
    finish()
    m2.finish()
    i2.finish()
    return out, mean, invstd, moments


def _backward(be, x, lay, G, grad_out, mean, invstd, weight, rms, training, grad_input,
              grad_weight, grad_bias, param_shape, forward_out, grad_residual):
    sdt = dtypes.stat_dtype(x.dtype)
    empty = be.ops.empty if be.device else np.empty
    grad_input = _empty_like(x, lay, be) if grad_input is None else grad_input
    if grad_weight is None:
        grad_weight = empty(param_shape, sdt)
    if grad_bias is None and not rms:
        grad_bias = empty(param_shape, sdt)
    x5 = _kernel_input(x, lay, be)
    dy5 = _kernel_input(grad_out, lay, be)
    fo5 = _kernel_input(forward_out, lay, be)
    dx5, finish = _kernel_output(grad_input, lay, be)
    gr5, finish_residual = _kernel_output(grad_residual, lay, be)
    N = lay.kernel_shape[0]
    _device_module(be).backward(dy5, x5, None if mean is None else mean.reshape(N, G),
                                invstd.reshape(N, G), _flat(weight), rms, training, dx5,
                                grad_weight, grad_bias, fo5, gr5, **be.kw)
    finish()
    finish_residual()
    return grad_input, grad_weight, grad_bias


def _forward_outputs(x, out, mean, invstd, stat_shape, dev, rms=False):
    sdt = dtypes.stat_dtype(x.dtype)
    if out is not None:
        out = _writable(out, "out", x.shape, x.dtype, dev)
    if mean is not None:
        if rms:
            raise TypeError("rms_norm has no mean output")
        mean = _writable(mean, "mean", stat_shape, sdt, dev)
    if invstd is not None:
        invstd = _writable(invstd, "invrms" if rms else "invstd", stat_shape, sdt, dev)
    return out, mean, invstd


def _backward_outputs(x, grad_input, grad_weight, grad_bias, grad_residual, param_shape, dev):
    sdt = dtypes.stat_dtype(x.dtype)
    if grad_input is not None:
        grad_input = _writable(grad_input, "grad_input", x.shape, x.dtype, dev)
    if grad_weight is not None:
        grad_weight = _writable(grad_weight, "grad_weight", param_shape, sdt, dev)
    if grad_bias is not None:
        grad_bias = _writable(grad_bias, "grad_bias", param_shape, sdt, dev)
    if grad_residual is not None:
        grad_residual = _writable(grad_residual, "grad_residual", x.shape, x.dtype, dev)
    return grad_input, grad_weight, grad_bias, grad_residual


# ----------------------------------------------------------------- public

def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, axis=1, out=None,
               mean=None, invstd=None, activation=None, residual=None, stream=None):
    """Group normalization: statistics per sample and group of channels.

    ``out = (x - mean) * invstd * weight + bias``, ``mean`` and ``invstd = 1 /
    sqrt(var_biased + eps)`` of each sample's ``num_groups`` groups of
    ``C // num_groups`` adjacent channels (``torch.nn.functional.group_norm``).

    Parameters
    ----------
    x : array, floating point, ``ndim >= 2``
        ``(N, C, *spatial)`` with ``axis=1``, ``(N, *spatial, C)`` with ``axis=-1``;
        float16, bfloat16 (``ml_dtypes``), float32 or float64, any memory order
        that is contiguous in some axis order (read without a copy when the
        batch axis is outermost).
    num_groups : int
        A divisor of the number of channels ``C = x.shape[axis]``.
    weight, bias : array of shape ``(C,)``, optional
        Per-channel affine parameters of any float dtype; None: 1 and 0.
    eps : float > 0
    axis : int
        The channel axis, any but 0 (the batch axis).
    out, mean, invstd : array, optional
        Preallocated outputs: ``out`` like ``x`` (``out=x`` and ``out=residual``
        compute in place), ``mean`` and ``invstd`` of shape ``(N, num_groups)``
        and ``x``'s dtype (float32 for half ``x``).
    activation : {None, "relu"}
    residual : array like ``x``, optional
        ``out = act(group_norm(x) + residual)``, in the same pass.
    stream : CUDA stream, optional
        Device arrays only, as for ``nbnorm.forward``.

    Returns
    -------
    ForwardResult
        ``(out, mean, invstd)``.

    Raises
    ------
    TypeError, ValueError
        As ``nbnorm.forward``, and a ``num_groups`` that does not divide ``C``;
        nothing has been written when it raises.
    """
    be = _backend(_FORWARD_ARRAYS, (x, weight, bias, None, None, out, mean, invstd, residual),
                  stream)
    dev = be.device
    x = _data(x, dev)
    ax = _channel_axis(axis, x)
    C = x.shape[ax]
    G = _groups(num_groups, C)
    return _grouped_forward(be, x, ax, G, weight, bias, eps, out, mean, invstd, activation,
                            residual)


def _grouped_forward(be, x, ax, G, weight, bias, eps, out, mean, invstd, activation, residual,
                     running=None, momentum=0.1, use_input_stats=True):
    """``group_norm`` and ``instance_norm`` after their own rules."""
    dev = be.device
    C = x.shape[ax]
    relu = _activation(activation)
    eps = _scalar(eps, "eps", 0.0, math.inf, low_open=True)
    weight = _channel_input(weight, "weight", C, dev)
    bias = _channel_input(bias, "bias", C, dev)
    running_mean, running_var = running or (None, None)
    residual = _like_x(residual, "residual", x, dev)
    stat_shape = (x.shape[0], G)
    out, mean, invstd = _forward_outputs(x, out, mean, invstd, stat_shape, dev)
    if use_input_stats:
        running_out, running_in = (("running_mean", running_mean),
                                   ("running_var", running_var)), ()
    else:
        running_out, running_in = (), (("running_mean", running_mean),
                                       ("running_var", running_var))
    _no_aliasing((("out", out), ("mean", mean), ("invstd", invstd), *running_out),
                 (("x", x), ("weight", weight), ("bias", bias), ("residual", residual),
                  *running_in), _FORWARD_MAY_BE, dev)
    lay = _group_layout(x, ax, G, be)
    given = None if use_input_stats else (running_mean, running_var)
    out, mean, invstd, moments = _forward(be, x, lay, G, weight, bias, eps, False, out, mean,
                                          invstd, residual, relu, stat_shape, given)
    if use_input_stats and running_mean is not None:
        _device_module(be).running_update(moments, x.size // (x.shape[0] * C), momentum,
                                          running_mean, running_var, **be.kw)
    return ForwardResult(out, mean, invstd)


def group_norm_backward(grad_out, x, mean, invstd, weight=None, *, axis=1, grad_input=None,
                        grad_weight=None, grad_bias=None, activation=None, forward_out=None,
                        grad_residual=None, stream=None):
    """Gradients of ``group_norm`` with respect to ``x``, ``weight`` and ``bias``.

    Parameters
    ----------
    grad_out : array like ``x``
    x : array
        What ``group_norm`` normalized.
    mean, invstd : array of shape ``(N, num_groups)``
        What ``group_norm`` returned; their shape gives ``num_groups``.
    weight : array of shape ``(C,)``, optional
    axis : int
    grad_input, grad_weight, grad_bias : array, optional
        Preallocated outputs (``grad_input=grad_out`` computes in place).
    activation, forward_out, grad_residual :
        The fused epilogue's gradient, as in ``nbnorm.backward``.
    stream : CUDA stream, optional

    Returns
    -------
    BackwardResult
        ``(grad_input, grad_weight, grad_bias)``, ``grad_weight = sum(grad_out *
        xhat)`` and ``grad_bias = sum(grad_out)`` over every axis but ``axis``.
    """
    be = _backend(_BACKWARD_ARRAYS, (grad_out, x, mean, invstd, weight, grad_input,
                                     grad_weight, grad_bias, forward_out, grad_residual),
                  stream)
    x = _data(x, be.device)
    ax = _channel_axis(axis, x)
    return _grouped_backward(be, grad_out, x, ax, mean, invstd, weight, True, grad_input,
                             grad_weight, grad_bias, activation, forward_out, grad_residual,
                             None)


def _grouped_backward(be, grad_out, x, ax, mean, invstd, weight, training, grad_input,
                      grad_weight, grad_bias, activation, forward_out, grad_residual, G):
    dev = be.device
    C = x.shape[ax]
    N = x.shape[0]
    if mean is None or invstd is None:
        raise ValueError("backward needs the mean and invstd that forward returned")
    if G is None:  # group norm: the statistics' shape tells the groups
        shape = tuple(getattr(mean, "shape", np.shape(mean)))
        if len(shape) != 2 or shape[0] != N:
            raise ValueError(f"mean must have shape (N, num_groups) = ({N}, G), got {shape}")
        G = _groups(shape[1], C)
    relu = _activation(activation)
    grad_out = _like_x(grad_out, "grad_out", x, dev, required=True)
    mean = _shaped_input(mean, "mean", (N, G), dev, "one value per sample and group")
    invstd = _shaped_input(invstd, "invstd", (N, G), dev, "one value per sample and group")
    weight = _channel_input(weight, "weight", C, dev)
    forward_out = _forward_out(forward_out, relu, x, dev)
    grad_input, grad_weight, grad_bias, grad_residual = _backward_outputs(
        x, grad_input, grad_weight, grad_bias, grad_residual, (C,), dev)
    _no_aliasing((("grad_input", grad_input), ("grad_weight", grad_weight),
                  ("grad_bias", grad_bias), ("grad_residual", grad_residual)),
                 (("grad_out", grad_out), ("x", x), ("mean", mean), ("invstd", invstd),
                  ("weight", weight), ("forward_out", forward_out)), _BACKWARD_MAY_BE, dev)
    lay = _group_layout(x, ax, G, be)
    return BackwardResult(*_backward(be, x, lay, G, grad_out, mean, invstd, weight, False,
                                     training, grad_input, grad_weight, grad_bias, (C,),
                                     forward_out, grad_residual))


def instance_norm(x, weight=None, bias=None, running_mean=None, running_var=None, *,
                  use_input_stats=True, momentum=0.1, eps=1e-5, axis=1, out=None, mean=None,
                  invstd=None, activation=None, residual=None, stream=None):
    """Instance normalization: statistics per sample and channel
    (``torch.nn.functional.instance_norm``).

    With ``use_input_stats`` each ``(sample, channel)`` is normalized by its own
    mean and variance, and running statistics, when given, are updated in place
    as PyTorch does: ``running = (1 - momentum) * running + momentum *
    batch``, ``batch`` the average over the samples of their means and
    unbiased variances.  Without it every sample is normalized by the running
    statistics (required then), which are left alone.

    Parameters
    ----------
    x : array, ``(N, C, *spatial)`` with ``axis=1`` (``(N, *spatial, C)``: ``axis=-1``)
    weight, bias : array of shape ``(C,)``, optional
    running_mean, running_var : array of shape ``(C,)``, optional
        Both or neither; any float dtype.
    use_input_stats : bool
    momentum : float in [0, 1]
    eps : float > 0
    axis : int
        The channel axis, any but 0.
    out, mean, invstd, activation, residual, stream :
        As ``group_norm``, with statistics of shape ``(N, C)``: the batch's, or
        the running ones broadcast over the samples.

    Returns
    -------
    ForwardResult
        ``(out, mean, invstd)``.

    Raises
    ------
    ValueError
        Also with ``use_input_stats`` and one value per instance ("expected more
        than 1 spatial element when training"), or without it and without
        running statistics.
    """
    be = _backend(_FORWARD_ARRAYS, (x, weight, bias, running_mean, running_var, out, mean,
                                    invstd, residual), stream)
    dev = be.device
    x = _data(x, dev)
    ax = _channel_axis(axis, x)
    C = x.shape[ax]
    use_input_stats = _flag(use_input_stats, "use_input_stats")
    if use_input_stats and x.size // (x.shape[0] * C) <= 1:
        raise ValueError(f"expected more than 1 spatial element when training, got input "
                         f"size {tuple(x.shape)}")
    momentum = _scalar(momentum, "momentum", 0.0, 1.0, low_open=False)
    running = _running(running_mean, running_var, C, use_input_stats, dev)
    return _grouped_forward(be, x, ax, C, weight, bias, eps, out, mean, invstd, activation,
                            residual, running, momentum, use_input_stats)


def instance_norm_backward(grad_out, x, mean, invstd, weight=None, *, use_input_stats=True,
                           axis=1, grad_input=None, grad_weight=None, grad_bias=None,
                           activation=None, forward_out=None, grad_residual=None, stream=None):
    """Gradients of ``instance_norm``; ``mean``, ``invstd`` of shape ``(N, C)`` as it
    returned them.  ``use_input_stats=False``: the statistics were the running
    ones, constants, and only the affine map is differentiated.  Returns a
    ``BackwardResult``; the other arguments as ``group_norm_backward``."""
    be = _backend(_BACKWARD_ARRAYS, (grad_out, x, mean, invstd, weight, grad_input,
                                     grad_weight, grad_bias, forward_out, grad_residual),
                  stream)
    x = _data(x, be.device)
    ax = _channel_axis(axis, x)
    use_input_stats = _flag(use_input_stats, "use_input_stats")
    return _grouped_backward(be, grad_out, x, ax, mean, invstd, weight, use_input_stats,
                             grad_input, grad_weight, grad_bias, activation, forward_out,
                             grad_residual, x.shape[ax])


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None, mean=None,
               invstd=None, activation=None, residual=None, stream=None):
    """Layer normalization over the trailing ``normalized_shape`` axes
    (``torch.nn.functional.layer_norm``).

    Parameters
    ----------
    x : array, floating point, ``ndim >= len(normalized_shape)``
        Read in C order (other memory orders are copied once on the host).
    normalized_shape : int or sequence of int
        The trailing axes of ``x``.
    weight, bias : array of shape ``normalized_shape``, optional
        Element-wise affine parameters of any float dtype.
    eps : float > 0
    out, mean, invstd, activation, residual, stream :
        As ``group_norm``, with statistics of shape
        ``x.shape[:-len(normalized_shape)]``.

    Returns
    -------
    ForwardResult
        ``(out, mean, invstd)``.
    """
    be = _backend(_FORWARD_ARRAYS, (x, weight, bias, None, None, out, mean, invstd, residual),
                  stream)
    return _rows_forward(be, x, normalized_shape, weight, bias, eps, out, mean, invstd,
                         activation, residual, rms=False)


def rms_norm(x, normalized_shape, weight=None, eps=None, *, out=None, invrms=None,
             activation=None, residual=None, stream=None):
    """RMS normalization over the trailing ``normalized_shape`` axes:
    ``out = x * invrms * weight``, ``invrms = 1 / sqrt(mean(x**2) + eps)``
    (``torch.nn.functional.rms_norm``; ``eps=None`` is the machine epsilon of
    ``x``'s dtype).  ``mean(x**2)`` comes from the same float64 moments as the
    other normalizations' statistics, ``M2 / n + mean**2``.

    Returns
    -------
    RMSNormResult
        ``(out, invrms)``, ``invrms`` of shape ``x.shape[:-len(normalized_shape)]``.
    """
    be = _backend(_FORWARD_ARRAYS, (x, weight, None, None, None, out, None, invrms, residual),
                  stream)
    res = _rows_forward(be, x, normalized_shape, weight, None, eps, out, None, invrms,
                        activation, residual, rms=True)
    return RMSNormResult(res.out, res.invstd)


def _rows_forward(be, x, normalized_shape, weight, bias, eps, out, mean, invstd, activation,
                  residual, rms):
    dev = be.device
    x = _rows_data(x, dev)
    ns = _normalized_shape(normalized_shape, x)
    relu = _activation(activation)
    eps = _eps_of(eps, x.dtype) if rms else _scalar(eps, "eps", 0.0, math.inf, low_open=True)
    weight = _shaped_input(weight, "weight", ns, dev, "normalized_shape")
    bias = _shaped_input(bias, "bias", ns, dev, "normalized_shape")
    residual = _like_x(residual, "residual", x, dev)
    stat_shape = tuple(x.shape[:x.ndim - len(ns)])
    out, mean, invstd = _forward_outputs(x, out, mean, invstd, stat_shape, dev, rms)
    _no_aliasing((("out", out), ("mean", mean), ("invstd", invstd)),
                 (("x", x), ("weight", weight), ("bias", bias), ("residual", residual)),
                 _FORWARD_MAY_BE, dev)
    lay = _rows_layout(x, len(ns))
    out, mean, invstd, _ = _forward(be, x, lay, 1, _flat(weight), _flat(bias), eps, rms, out,
                                    mean, invstd, residual, relu, stat_shape)
    return ForwardResult(out, mean, invstd)


def layer_norm_backward(grad_out, x, mean, invstd, weight=None, *, grad_input=None,
                        grad_weight=None, grad_bias=None, activation=None, forward_out=None,
                        grad_residual=None, stream=None):
    """Gradients of ``layer_norm``; ``normalized_shape`` is the part of ``x``'s
    shape that ``mean``'s leaves.  Returns a ``BackwardResult``, ``grad_weight``
    and ``grad_bias`` of shape ``normalized_shape``; the other arguments as
    ``group_norm_backward``."""
    be = _backend(_BACKWARD_ARRAYS, (grad_out, x, mean, invstd, weight, grad_input,
                                     grad_weight, grad_bias, forward_out, grad_residual),
                  stream)
    if mean is None or invstd is None:
        raise ValueError("backward needs the mean and invstd that forward returned")
    return BackwardResult(*_rows_backward(be, grad_out, x, mean, invstd, weight, grad_input,
                                          grad_weight, grad_bias, activation, forward_out,
                                          grad_residual, rms=False))


def rms_norm_backward(grad_out, x, invrms, weight=None, *, grad_input=None, grad_weight=None,
                      activation=None, forward_out=None, grad_residual=None, stream=None):
    """Gradients of ``rms_norm`` with respect to ``x`` and ``weight``
    (``grad_weight = sum(grad_out * x * invrms)``, returned with or without a
    weight).  Returns an ``RMSNormBackwardResult``."""
    be = _backend(_BACKWARD_ARRAYS, (grad_out, x, None, invrms, weight, grad_input,
                                     grad_weight, None, forward_out, grad_residual), stream)
    if invrms is None:
        raise ValueError("backward needs the invrms that rms_norm returned")
    gi, gw, _ = _rows_backward(be, grad_out, x, None, invrms, weight, grad_input, grad_weight,
                               None, activation, forward_out, grad_residual, rms=True)
    return RMSNormBackwardResult(gi, gw)


def _rows_backward(be, grad_out, x, mean, invstd, weight, grad_input, grad_weight, grad_bias,
                   activation, forward_out, grad_residual, rms):
    dev = be.device
    x = _rows_data(x, dev)
    name = "invrms" if rms else "mean"
    stat_shape = _stat_shape_of(invstd if rms else mean, x, name)
    ns = tuple(x.shape[len(stat_shape):])
    if x.size == 0:
        raise ValueError(f"expected a non-empty input, got shape {tuple(x.shape)}")
    relu = _activation(activation)
    grad_out = _like_x(grad_out, "grad_out", x, dev, required=True)
    if not rms:
        mean = _shaped_input(mean, "mean", stat_shape, dev, "x's leading axes")
    invstd = _shaped_input(invstd, "invrms" if rms else "invstd", stat_shape, dev,
                           "x's leading axes")
    weight = _shaped_input(weight, "weight", ns, dev, "normalized_shape")
    forward_out = _forward_out(forward_out, relu, x, dev)
    grad_input, grad_weight, grad_bias, grad_residual = _backward_outputs(
        x, grad_input, grad_weight, grad_bias, grad_residual, ns, dev)
    _no_aliasing((("grad_input", grad_input), ("grad_weight", grad_weight),
                  ("grad_bias", grad_bias), ("grad_residual", grad_residual)),
                 (("grad_out", grad_out), ("x", x), ("mean", mean), ("invstd", invstd),
                  ("weight", weight), ("forward_out", forward_out)), _BACKWARD_MAY_BE, dev)
    lay = _rows_layout(x, len(ns))
    return _backward(be, x, lay, 1, grad_out, mean, invstd, weight, rms, True, grad_input,
                     grad_weight, grad_bias, ns, forward_out, grad_residual)
