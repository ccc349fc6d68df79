"""The CPU implementation of forward and backward on canonical views.

``api`` has validated every argument and allocated every output; this module
only runs kernels on ``(outer, C, inner)`` (planar) or ``(outer, C)``
(interleaved) views and does the O(C) per-channel arithmetic in float64.
``nbnorm.cuda.ops`` has the same functions for device arrays.
"""

import numpy as np

from .. import config, guard
from . import backward as bwd
from . import forward as fwd
from . import stats
from .threads import serialized


def empty(shape, dtype):
    return np.empty(shape, dtype=dtype)


def _planar(x):
    return x.ndim == 3


def _count(x):
    return x.size // x.shape[1]


def _per_channel(a, C, default):
    return np.full(C, default) if a is None else np.asarray(a, dtype=np.float64)


def batch_moments(x):
    """float64 ``(mean, M2)`` per channel of a canonical view."""
    C = x.shape[1]
    mean = np.empty(C)
    m2 = np.empty(C)
    if _planar(x):
        parts = stats.planar_parts(*x.shape)
        stats.channel_stats_planar(x, parts, config.BLOCK, mean, m2)
    else:
        parts = stats.interleaved_parts(*x.shape)
        stats.channel_stats_interleaved(x, parts, config.BLOCK, mean, m2)
    return mean, m2


def normalize(x, center, scale, shift, out):
    kernel = fwd.normalize_planar if _planar(x) else fwd.normalize_interleaved
    kernel(x, center, scale, shift, out)


@serialized
def forward_train(x, weight, bias, eps, momentum, running_mean, running_var,
                  out, mean, invstd, on_nonfinite="propagate"):
    C = x.shape[1]
    n = _count(x)
    mu, m2 = batch_moments(x)
    # on_nonfinite: O(C), decided (or raised) before anything is written.
    keep = guard.running_update_mask(mu, m2, on_nonfinite)
    inv = 1.0 / np.sqrt(m2 / n + eps)
    normalize(x, mu, inv * _per_channel(weight, C, 1.0), _per_channel(bias, C, 0.0), out)
    mean[...] = mu
    invstd[...] = inv
    if running_mean is not None:
        # Computed whole before either is written: never half-updated.
        new_mean = (1.0 - momentum) * running_mean + momentum * mu
        new_var = (1.0 - momentum) * running_var + momentum * (m2 / (n - 1))
        if keep is not None:  # on_nonfinite="skip": bad channels keep their value
            new_mean = np.where(keep, new_mean, running_mean)
            new_var = np.where(keep, new_var, running_var)
        running_mean[...] = new_mean
        running_var[...] = new_var


@serialized
def forward_infer(x, weight, bias, eps, running_mean, running_var, out, mean, invstd):
    C = x.shape[1]
    # Contiguous: strided running stats must not compile another kernel signature.
    mu = np.ascontiguousarray(running_mean, dtype=np.float64)
    inv = 1.0 / np.sqrt(np.asarray(running_var, dtype=np.float64) + eps)
    normalize(x, mu, inv * _per_channel(weight, C, 1.0), _per_channel(bias, C, 0.0), out)
    mean[...] = mu
    invstd[...] = inv


@serialized
def backward(dy, x, mean, invstd, weight, training, grad_input, grad_weight, grad_bias):
    C = x.shape[1]
    n = _count(x)
    mu = np.asarray(mean, dtype=np.float64)
    inv = np.asarray(invstd, dtype=np.float64)
    s = np.empty(C)
    sx = np.empty(C)
    if _planar(x):
        parts = stats.planar_parts(*x.shape)
        bwd.backward_reduce_planar(dy, x, mu, parts, s, sx)
    else:
        parts = stats.interleaved_parts(*x.shape)
        bwd.backward_reduce_interleaved(dy, x, mu, parts, s, sx)
    k = inv * _per_channel(weight, C, 1.0)
    if training:
        kernel = bwd.grad_input_planar if _planar(x) else bwd.grad_input_interleaved
        kernel(dy, x, mu, s / n, sx * inv * inv / n, k, grad_input)
    else:
        zeros = np.zeros(C)
        normalize(dy, zeros, k, zeros, grad_input)
    grad_weight[...] = sx * inv
    grad_bias[...] = s
