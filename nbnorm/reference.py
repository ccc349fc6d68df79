"""Float64 NumPy reference of forward and backward: the oracle for tests and docs.

Written for clarity, not speed: two-pass statistics in float64 on the whole
batch, the textbook gradient, the fused epilogue ``act(bn(x) + residual)``
and its gradient through the ReLU mask of the forward output.  Returns new
float64 arrays and never modifies its inputs; ``rounded`` gives the correctly
rounded value of a float64 result in a storage dtype (half included), which
is what nbnorm's outputs are, but for a sliver of values within one unit in
the last place of it.
"""

from typing import NamedTuple

import numpy as np


class ReferenceForward(NamedTuple):
    out: np.ndarray
    mean: np.ndarray
    invstd: np.ndarray
    running_mean: object  # the updated running statistics, or None
    running_var: object


def _moved(a, axis):
    """float64 ``a`` with the channel axis first, flattened to ``(C, n)``."""
    a = np.moveaxis(np.asarray(a, dtype=np.float64), axis, 0)
    return a.reshape(a.shape[0], -1)


def _back(a2, like, axis):
    shape = np.moveaxis(np.empty(like.shape, dtype=bool), axis, 0).shape
    return np.moveaxis(a2.reshape(shape), 0, axis)


def _channel(a, C, default):
    return np.full(C, default) if a is None else np.asarray(a, dtype=np.float64)


def relu(a):
    """``max(a, 0)`` keeping NaN (PyTorch's ``relu``)."""
    return np.where(a <= 0, 0.0, a)


def relu_backward(grad_out, forward_out):
    """The gradient through a ReLU whose output was ``forward_out``: ``grad_out``
    where ``forward_out > 0``, else 0 (cuDNN's and PyTorch's mask)."""
    return np.where(np.asarray(forward_out, np.float64) > 0,
                    np.asarray(grad_out, np.float64), 0.0)


def rounded(a, dtype):
    """Float64 ``a`` rounded to nearest even in ``dtype`` (NumPy's and ml_dtypes'
    conversions from float64 round once)."""
    return np.asarray(a, np.float64).astype(dtype)


def forward(x, weight=None, bias=None, running_mean=None, running_var=None, *,
            training=True, momentum=0.1, eps=1e-5, axis=1, residual=None, activation=None):
    x2 = _moved(x, axis)
    C, n = x2.shape
    w, b = _channel(weight, C, 1.0), _channel(bias, C, 0.0)
    rm = rv = None
    if training:
        mean = x2.mean(axis=1)
        var = ((x2 - mean[:, None]) ** 2).mean(axis=1)
        if running_mean is not None:
            unbiased = var * n / (n - 1)
            rm = (1 - momentum) * np.asarray(running_mean, np.float64) + momentum * mean
            rv = (1 - momentum) * np.asarray(running_var, np.float64) + momentum * unbiased
    else:
        mean = np.asarray(running_mean, dtype=np.float64)
        var = np.asarray(running_var, dtype=np.float64)
    invstd = 1.0 / np.sqrt(var + eps)
    out2 = (x2 - mean[:, None]) * (invstd * w)[:, None] + b[:, None]
    out = _back(out2, x, axis)
    if residual is not None:
        out = out + np.asarray(residual, np.float64)
    if activation == "relu":
        out = relu(out)
    elif activation is not None:
        raise ValueError(activation)
    return ReferenceForward(out, mean, invstd, rm, rv)


class ReferenceBackward(NamedTuple):
    grad_input: np.ndarray
    grad_weight: np.ndarray
    grad_bias: np.ndarray


def backward(grad_out, x, mean, invstd, weight=None, *, training=True, axis=1,
             activation=None, forward_out=None):
    """The gradients of ``forward``; with ``activation="relu"``, through the mask
    of ``forward_out`` (the gradient with respect to ``residual`` is then
    ``relu_backward(grad_out, forward_out)``, else ``grad_out``)."""
    if activation == "relu":
        grad_out = relu_backward(grad_out, forward_out)
    x2 = _moved(x, axis)
    dy = _moved(grad_out, axis)
    C, n = x2.shape
    mean = np.asarray(mean, dtype=np.float64)[:, None]
    invstd = np.asarray(invstd, dtype=np.float64)[:, None]
    w = _channel(weight, C, 1.0)[:, None]
    xhat = (x2 - mean) * invstd
    grad_bias = dy.sum(axis=1)
    grad_weight = (dy * xhat).sum(axis=1)
    if training:
        dx = w * invstd / n * (n * dy - grad_bias[:, None] - xhat * grad_weight[:, None])
    else:
        dx = dy * w * invstd
    return ReferenceBackward(_back(dx, x, axis), grad_weight, grad_bias)


# ------------------------------------------------- group, layer, instance, RMS
# The same two-pass float64 statistics over other axes: each sample's groups of
# channels (group norm), each sample's channels (instance norm), each sample's
# trailing ``normalized_shape`` values (layer and RMS norm).  The affine
# parameters are per channel (group, instance) or per element of
# ``normalized_shape`` (layer, RMS).


class ReferenceNorm(NamedTuple):
    out: np.ndarray
    mean: np.ndarray      # statistics of shape (N, G), (N, C) or x.shape[:-len(shape)]
    invstd: np.ndarray
    running_mean: object  # instance norm's updated running statistics, else None
    running_var: object


def _epilogue(out, residual, activation):
    if residual is not None:
        out = out + np.asarray(residual, np.float64)
    if activation == "relu":
        return relu(out)
    if activation is not None:
        raise ValueError(activation)
    return out


def _by_group(x, groups, axis):
    """float64 ``x`` as ``(N, G, values)`` (the channel axis moved to 1), and the
    ``(N, C, ...)`` shape to undo it with ``_from_groups``."""
    xm = np.moveaxis(np.asarray(x, np.float64), axis, 1)
    return xm.reshape(xm.shape[0], groups, -1), xm.shape


def _from_groups(a3, shape, axis):
    return np.moveaxis(a3.reshape(shape), 1, axis)


def _per_channel(a, shape, default):
    """A per-channel parameter broadcast over ``(N, C, ...)``."""
    C = shape[1]
    v = np.full(C, default) if a is None else np.asarray(a, np.float64)
    return v.reshape((1, C) + (1,) * (len(shape) - 2))


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, axis=1, residual=None,
               activation=None):
    """Group normalization: statistics per (sample, group of channels along ``axis``)."""
    x3, shape = _by_group(x, num_groups, axis)
    mean = x3.mean(axis=2)
    var = ((x3 - mean[..., None]) ** 2).mean(axis=2)
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = ((x3 - mean[..., None]) * invstd[..., None]).reshape(shape)
    out = xhat * _per_channel(weight, shape, 1.0) + _per_channel(bias, shape, 0.0)
    out = _epilogue(_from_groups(out, shape, axis), residual, activation)
    return ReferenceNorm(out, mean, invstd, None, None)


def group_norm_backward(grad_out, x, mean, invstd, weight=None, *, axis=1, activation=None,
                        forward_out=None, training=True):
    """The gradients of ``group_norm`` (``mean``, ``invstd`` of shape (N, G)); with
    ``training=False`` the statistics are constants (``instance_norm`` with running
    statistics) and only the affine map is differentiated."""
    if activation == "relu":
        grad_out = relu_backward(grad_out, forward_out)
    mean = np.asarray(mean, np.float64)
    invstd = np.asarray(invstd, np.float64)
    G = mean.shape[1]
    x3, shape = _by_group(x, G, axis)
    dy = np.moveaxis(np.asarray(grad_out, np.float64), axis, 1)
    xhat = (x3 - mean[..., None]) * invstd[..., None]
    red = (0,) + tuple(range(2, len(shape)))
    grad_weight = (dy * xhat.reshape(shape)).sum(axis=red)
    grad_bias = dy.sum(axis=red)
    g = (dy * _per_channel(weight, shape, 1.0)).reshape(x3.shape)
    M = x3.shape[2]
    if training:
        dx = invstd[..., None] / M * (M * g - g.sum(axis=2, keepdims=True)
                                      - xhat * (g * xhat).sum(axis=2, keepdims=True))
    else:
        dx = g * invstd[..., None]
    return ReferenceBackward(_from_groups(dx, shape, axis), grad_weight, grad_bias)


def instance_norm(x, weight=None, bias=None, running_mean=None, running_var=None, *,
                  use_input_stats=True, momentum=0.1, eps=1e-5, axis=1, residual=None,
                  activation=None):
    """Instance normalization: statistics per (sample, channel).  With running
    statistics and ``use_input_stats`` they are updated as PyTorch does, with
    the batch averages of the instances' means and unbiased variances."""
    C = np.shape(x)[axis]
    if use_input_stats:
        res = group_norm(x, C, weight, bias, eps, axis=axis, residual=residual,
                         activation=activation)
        if running_mean is None:
            return res
        x3, _ = _by_group(x, C, axis)
        M = x3.shape[2]
        unbiased = ((x3 - res.mean[..., None]) ** 2).sum(axis=2) / (M - 1)
        rm = (1 - momentum) * np.asarray(running_mean, np.float64) + momentum * res.mean.mean(0)
        rv = (1 - momentum) * np.asarray(running_var, np.float64) + momentum * unbiased.mean(0)
        return ReferenceNorm(res.out, res.mean, res.invstd, rm, rv)
    x3, shape = _by_group(x, C, axis)
    mean = np.broadcast_to(np.asarray(running_mean, np.float64), (shape[0], C))
    invstd = 1.0 / np.sqrt(np.broadcast_to(np.asarray(running_var, np.float64),
                                           (shape[0], C)) + eps)
    xhat = ((x3 - mean[..., None]) * invstd[..., None]).reshape(shape)
    out = xhat * _per_channel(weight, shape, 1.0) + _per_channel(bias, shape, 0.0)
    out = _epilogue(_from_groups(out, shape, axis), residual, activation)
    return ReferenceNorm(out, mean.copy(), invstd, None, None)


def _rows(x, normalized_shape):
    """float64 ``x`` as ``(rows, D)`` over its trailing ``normalized_shape`` axes."""
    shape = (normalized_shape,) if np.ndim(normalized_shape) == 0 else tuple(normalized_shape)
    x = np.asarray(x, np.float64)
    lead = x.shape[:x.ndim - len(shape)]
    return x.reshape(-1, int(np.prod(shape))), lead


def _element(a, D, default):
    return np.full(D, default) if a is None else np.asarray(a, np.float64).reshape(D)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, residual=None,
               activation=None):
    """Layer normalization: statistics per row of the trailing ``normalized_shape``
    axes, an affine map per element of ``normalized_shape``."""
    x2, lead = _rows(x, normalized_shape)
    mean = x2.mean(axis=1)
    invstd = 1.0 / np.sqrt(((x2 - mean[:, None]) ** 2).mean(axis=1) + eps)
    D = x2.shape[1]
    out = (x2 - mean[:, None]) * invstd[:, None] * _element(weight, D, 1.0) \
        + _element(bias, D, 0.0)
    out = _epilogue(out.reshape(np.shape(x)), residual, activation)
    return ReferenceNorm(out, mean.reshape(lead), invstd.reshape(lead), None, None)


def _rows_backward(grad_out, x, stat, weight, activation, forward_out):
    """What layer and RMS norm's backwards start from: ``x`` and ``grad_out``
    (through the ReLU mask) as float64 rows of the ``normalized_shape`` that
    ``stat``'s shape leaves, ``g = dy * weight``, that shape, and ``stat`` as a
    column."""
    if activation == "relu":
        grad_out = relu_backward(grad_out, forward_out)
    stat = np.asarray(stat, np.float64)
    ns = np.shape(x)[stat.ndim:]
    x2, _ = _rows(x, ns)
    dy, _ = _rows(grad_out, ns)
    return x2, dy, dy * _element(weight, x2.shape[1], 1.0), ns, stat.reshape(-1, 1)


def layer_norm_backward(grad_out, x, mean, invstd, weight=None, *, activation=None,
                        forward_out=None):
    """The gradients of ``layer_norm``; ``normalized_shape`` is what ``mean``'s shape leaves."""
    x2, dy, g, ns, mu = _rows_backward(grad_out, x, mean, weight, activation, forward_out)
    D = x2.shape[1]
    inv = np.asarray(invstd, np.float64).reshape(-1, 1)
    xhat = (x2 - mu) * inv
    dx = inv / D * (D * g - g.sum(axis=1, keepdims=True)
                    - xhat * (g * xhat).sum(axis=1, keepdims=True))
    return ReferenceBackward(dx.reshape(np.shape(x)), (dy * xhat).sum(0).reshape(ns),
                             dy.sum(0).reshape(ns))


class ReferenceRMS(NamedTuple):
    out: np.ndarray
    invrms: np.ndarray


class ReferenceRMSBackward(NamedTuple):
    grad_input: np.ndarray
    grad_weight: np.ndarray


def rms_norm(x, normalized_shape, weight=None, eps=None, *, residual=None, activation=None):
    """RMS normalization: ``x / sqrt(mean(x**2) + eps) * weight`` per row of the
    trailing ``normalized_shape`` axes; ``eps=None`` is the machine epsilon of
    ``x``'s dtype (``torch.nn.functional.rms_norm``)."""
    if eps is None:
        eps = float(np.finfo(np.dtype(x.dtype)).eps) if np.dtype(x.dtype).name != "bfloat16" \
            else 2.0 ** -7
    x2, lead = _rows(x, normalized_shape)
    invrms = 1.0 / np.sqrt((x2 ** 2).mean(axis=1) + eps)
    out = x2 * invrms[:, None] * _element(weight, x2.shape[1], 1.0)
    out = _epilogue(out.reshape(np.shape(x)), residual, activation)
    return ReferenceRMS(out, invrms.reshape(lead))


def rms_norm_backward(grad_out, x, invrms, weight=None, *, activation=None, forward_out=None):
    """The gradients of ``rms_norm`` with respect to ``x`` and ``weight``."""
    x2, dy, g, ns, r = _rows_backward(grad_out, x, invrms, weight, activation, forward_out)
    D = x2.shape[1]
    dx = r * (g - x2 * r * r * (g * x2).sum(axis=1, keepdims=True) / D)
    return ReferenceRMSBackward(dx.reshape(np.shape(x)), (dy * x2 * r).sum(0).reshape(ns))
