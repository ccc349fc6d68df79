"""O(C) per-channel kernels: the second pass of every reduction, on the device.

One thread per channel merges (statistics: Chan) or sums (backward) the
channel's ``parts`` partials in index order -- deterministic -- and computes
what ``nbnorm.cpu.ops`` computes on the host: ``invstd``, the folded
``coef`` rows that the elementwise kernels read, the running-statistic update,
``grad_weight``/``grad_bias``.  So the per-channel math never leaves the
device and no host sync is needed.

``flags`` is a bit set (``HAS_WEIGHT`` ...); arrays that are absent are passed
as a placeholder (any float array) and not read.

``on_nonfinite``: ``SKIP_NONFINITE`` makes ``finalize_train`` leave the running
statistics of a channel alone when its batch mean or M2 is not finite -- the
same per-channel test as ``nbnorm.guard`` on the CPU, O(C).  ``"raise"`` needs
the answer on the host before anything is written: ``merge_stats`` writes the
float64 (mean, M2) for ``ops`` to copy back and hand to ``nbnorm.guard``.
"""

import math

from numba import cuda

from ._device import finite, merge

HAS_WEIGHT = 1
HAS_BIAS = 2
HAS_RUNNING = 4
SKIP_NONFINITE = 8
TRAINING = 16


@cuda.jit(device=True)
def _merged(partials, c):
    n = 0.0
    m = 0.0
    q = 0.0
    for p in range(partials.shape[2]):
        n, m, q = merge(n, m, q, partials[0, c, p], partials[1, c, p], partials[2, c, p])
    return m, q


@cuda.jit(device=True)
def _write_normalize(c, m, inv, weight, bias, flags, mean_out, invstd_out, coef):
    """``mean_out``, ``invstd_out`` and ``coef`` = (center, scale, shift) of channel
    ``c`` with mean ``m`` and ``invstd`` ``inv``: what ``normalize`` reads."""
    w = 1.0
    if flags & HAS_WEIGHT:
        w = float(weight[c])
    b = 0.0
    if flags & HAS_BIAS:
        b = float(bias[c])
    coef[0, c] = m
    coef[1, c] = inv * w
    coef[2, c] = b
    mean_out[c] = m
    invstd_out[c] = inv


@cuda.jit
def merge_stats(partials, moments):
    """``moments[:, c]`` = float64 (mean, M2) of channel ``c``."""
    c = cuda.grid(1)
    if c < moments.shape[1]:
        m, q = _merged(partials, c)
        moments[0, c] = m
        moments[1, c] = q


@cuda.jit
def finalize_train(partials, n, eps, momentum, weight, bias, running_mean, running_var,
                   flags, mean_out, invstd_out, coef):
    """Batch statistics -> ``mean_out``, ``invstd_out``, running stats, and
    ``coef`` = (center, scale, shift) for ``normalize``."""
    c = cuda.grid(1)
    if c >= mean_out.shape[0]:
        return
    m, q = _merged(partials, c)
    inv = 1.0 / math.sqrt(q / n + eps)
    _write_normalize(c, m, inv, weight, bias, flags, mean_out, invstd_out, coef)
    if flags & HAS_RUNNING:
        if (flags & SKIP_NONFINITE) and not (finite(m) and finite(q)):
            return
        rm = float(running_mean[c])
        rv = float(running_var[c])
        running_mean[c] = (1.0 - momentum) * rm + momentum * m
        running_var[c] = (1.0 - momentum) * rv + momentum * (q / (n - 1))


@cuda.jit
def finalize_infer(running_mean, running_var, eps, weight, bias, flags,
                   mean_out, invstd_out, coef):
    """Running statistics -> ``mean_out``, ``invstd_out`` and ``coef``."""
    c = cuda.grid(1)
    if c >= mean_out.shape[0]:
        return
    inv = 1.0 / math.sqrt(float(running_var[c]) + eps)
    _write_normalize(c, float(running_mean[c]), inv, weight, bias, flags, mean_out,
                     invstd_out, coef)


@cuda.jit
def finalize_backward(partials, n, mean, invstd, weight, flags,
                      grad_weight, grad_bias, coef):
    """Sums of ``dy`` and ``dy * (x - mean)`` -> ``grad_weight``, ``grad_bias`` and
    ``coef``: (mean, a, b, k) for ``grad_input`` when training, else
    (0, k, 0) for ``normalize`` (``dx = dy * k``), ``k = invstd * weight``."""
    c = cuda.grid(1)
    if c >= grad_bias.shape[0]:
        return
    s = 0.0
    sx = 0.0
    for p in range(partials.shape[2]):
        s += partials[0, c, p]
        sx += partials[1, c, p]
    mu = float(mean[c])
    inv = float(invstd[c])
    w = 1.0
    if flags & HAS_WEIGHT:
        w = float(weight[c])
    k = inv * w
    if flags & TRAINING:
        coef[0, c] = mu
        coef[1, c] = s / n
        coef[2, c] = sx * inv * inv / n
        coef[3, c] = k
    else:
        coef[0, c] = 0.0
        coef[1, c] = k
        coef[2, c] = 0.0
    grad_weight[c] = sx * inv
    grad_bias[c] = s


KERNELS = {"merge_stats": merge_stats, "finalize_train": finalize_train,
           "finalize_infer": finalize_infer, "finalize_backward": finalize_backward}
