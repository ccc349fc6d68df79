"""The per-channel math, written once and compiled for both devices.

Plain Python functions of scalars: ``nbnorm.cpu`` wraps them with
``numba.njit(inline="always")`` and ``nbnorm.cuda`` with
``numba.cuda.jit(device=True)``, so the CPU and the GPU merge, finalize,
update and differentiate with the same expressions.

- Moments are ``(count, mean, M2)``, M2 the sum of squared deviations from
  the mean, merged with Chan et al.'s formula (``chan_merge``; ``chan_step``
  is the same update with the division ``nb / (na + nb)`` hoisted out of a
  loop over channels that share the counts, so that loop vectorizes: same
  expressions, same bits).
- ``invstd`` and ``running_update`` finish a training step (``invrms``: RMS
  normalization's, from the same moments); ``finite``
  decides ``on_nonfinite`` for one channel (``nbnorm.guard``).
- ``grad_coeffs`` and ``affine_coeffs`` are the backward's per-channel
  coefficients: ``dx = k * (dy - a - (x - mean) * b) = k * dy + (q * x + r)``.
- ``relu`` is the activation of the fused epilogue: NaN passes through (as in
  PyTorch), ``-0.0`` and negatives become ``0.0``.

``compiled(jit)`` returns all of them compiled by one decorator, with the
calls between them (``chan_merge`` calls ``chan_step``) bound to the compiled
versions: ``nbnorm.cpu.per_channel`` and ``nbnorm.cuda.per_channel`` are that
call for each device.
"""

import math
import types

import numpy as np

#: ``math.sqrt`` for scalars on both devices; ``on_arrays`` swaps in ``np.sqrt``.
sqrt = math.sqrt


def chan_step(na, ma, m2a, f, mb, m2b):
    """``(mean, M2)`` of ``(na, ma, m2a)`` merged with ``(nb, mb, m2b)``, where
    ``f = nb / (na + nb)`` (``na + nb > 0``).

    ``(d * na) * (d * f)``, not ``d * d * na * f``: merging into an empty
    accumulator (``na = 0``) must add an exact 0, not ``inf * 0`` once ``d * d``
    overflows (float64 data beyond ~1e154) although M2 may be finite.
    """
    d = mb - ma
    return ma + d * f, m2a + m2b + (d * na) * (d * f)


def chan_merge(na, ma, m2a, nb, mb, m2b):
    """``(count, mean, M2)`` of two merged triples; either may be empty."""
    if nb == 0.0:
        return na, ma, m2a
    n = na + nb
    m, q = chan_step(na, ma, m2a, nb / n, mb, m2b)
    return n, m, q


def invstd(m2, n, eps):
    """``1 / sqrt(var_biased + eps)`` of a channel of ``n`` values with sum of
    squared deviations ``m2``."""
    return 1.0 / sqrt(m2 / n + eps)


def invrms(mean, m2, n, eps):
    """``1 / sqrt(mean(x**2) + eps)`` (RMS normalization) of ``n`` values with mean
    ``mean`` and sum of squared deviations ``m2``: ``mean(x**2) = m2 / n +
    mean**2`` is a sum of two non-negative terms, so it keeps its precision
    whatever the mean, from the same moments as ``invstd``."""
    return 1.0 / sqrt(m2 / n + mean * mean + eps)


def running_update(running_mean, running_var, momentum, mean, m2, n, correction):
    """The running statistics after a batch: ``(1 - momentum) * running +
    momentum * batch``, with the batch variance ``m2 / (n - correction)``:
    1.0 is PyTorch's and cuDNN's unbiased variance, 0.0 the biased one of
    Keras 3, Flax and ONNX.  A float argument, not a compile-time choice, so
    both share one compiled kernel (``m2 / (n - 1.0)`` is bitwise
    ``m2 / (n - 1)``)."""
    return ((1.0 - momentum) * running_mean + momentum * mean,
            (1.0 - momentum) * running_var + momentum * (m2 / (n - correction)))


def finite(v):
    return not (math.isinf(v) or math.isnan(v))


def moments_finite(mean, m2):
    """Whether a channel's batch mean and variance are finite: ``on_nonfinite``
    ``"skip"`` updates its running statistics only then."""
    return finite(mean) and finite(m2)


def grad_coeffs(n, s, sx, inv, w):
    """``(a, b, k)`` of ``dx = k * (dy - a - (x - mean) * b)``, the training-mode
    gradient, from ``s = sum(dy)``, ``sx = sum(dy * (x - mean))``, ``invstd``
    and the weight ``w`` (1 without one)."""
    k = inv * w
    return s / n, sx * inv * inv / n, k


def affine_coeffs(mean, a, b, k):
    """``(q, r)`` of ``dx = k * dy + (q * x + r)``, the same map as ``grad_coeffs``'
    (the float32 form: two multiply-adds instead of four operations)."""
    return -k * b, k * (b * mean - a)


def offset(center, scale, shift):
    """``shift - center * scale``: the float32 form of the normalizing pass,
    ``x * scale + offset``."""
    return shift - center * scale


def relu(v):
    """``max(v, 0)`` that keeps NaN: ``v <= 0`` is false for NaN."""
    return 0.0 if v <= 0.0 else v


_FUNCTIONS = ("chan_step", "chan_merge", "invstd", "invrms", "running_update", "finite",
              "moments_finite", "grad_coeffs", "affine_coeffs", "offset", "relu")


def compiled(jit, **scope_overrides):
    """A namespace of every function above compiled with the decorator ``jit``
    (e.g. ``numba.njit(inline="always")`` or ``numba.cuda.jit(device=True)``).

    Each function is rebuilt over a globals dict in which the other functions'
    names are their compiled versions, so that a compiled function calls
    compiled functions; Numba compiles lazily, so the dict is complete by then.
    """
    scope = dict(globals(), **scope_overrides)
    done = {}
    for name in _FUNCTIONS:
        f = globals()[name]
        g = types.FunctionType(f.__code__, scope, name, f.__defaults__, f.__closure__)
        g.__qualname__ = f.__qualname__
        g.__doc__ = f.__doc__
        g.__module__ = f.__module__
        done[name] = scope[name] = jit(g)
    return types.SimpleNamespace(**done)


#: The same formulas on NumPy arrays, for the host code of ``nbnorm.cpu.ops``
#: (every function but ``relu``, ``finite`` and ``moments_finite``, which
#: branch, takes arrays).
on_arrays = compiled(lambda f: f, sqrt=np.sqrt)
