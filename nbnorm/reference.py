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
