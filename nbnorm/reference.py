"""Float64 NumPy reference of forward and backward: the oracle for tests and docs.

Written for clarity, not speed: two-pass statistics in float64 on the whole
batch, the textbook gradient.  Returns new arrays and never modifies its inputs.
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


def forward(x, weight=None, bias=None, running_mean=None, running_var=None, *,
            training=True, momentum=0.1, eps=1e-5, axis=1):
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
    return ReferenceForward(_back(out2, x, axis), mean, invstd, rm, rv)


class ReferenceBackward(NamedTuple):
    grad_input: np.ndarray
    grad_weight: np.ndarray
    grad_bias: np.ndarray


def backward(grad_out, x, mean, invstd, weight=None, *, training=True, axis=1):
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
