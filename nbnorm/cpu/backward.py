"""Backward kernels: per-channel reductions and the training-mode ``grad_input``.

The reductions are ``sum(dy)`` and ``sum(dy * (x - mean))`` in float64, split
into parts exactly like the statistics (see ``stats``) and summed in part order,
so they too are bitwise independent of the thread count.
"""

import numpy as np
from numba import njit, prange

from .. import config

_FM = set(config.FASTMATH)


@njit(cache=True, fastmath=_FM)
def _run_dual_sum(dy, x, m):
    s = 0.0
    sx = 0.0
    for i in range(dy.size):
        g = np.float64(dy[i])
        s += g
        sx += g * (np.float64(x[i]) - m)
    return s, sx


@njit(parallel=True, cache=True)
def backward_reduce_planar(dy, x, mean, parts, sum_dy_out, sum_dy_xmu_out):
    outer, C, inner = x.shape
    n = outer * inner
    step = -(-n // parts)
    ps = np.empty((C, parts))
    psx = np.empty((C, parts))
    for t in prange(C * parts):
        c, p = divmod(np.int64(t), parts)
        j0 = min(n, p * step)
        j1 = min(n, j0 + step)
        m = mean[c]
        s = 0.0
        sx = 0.0
        j = j0
        while j < j1:
            o, i = divmod(j, inner)
            e = min(inner, i + j1 - j)
            a, b = _run_dual_sum(dy[o, c, i:e], x[o, c, i:e], m)
            s += a
            sx += b
            j += e - i
        ps[c, p] = s
        psx[c, p] = sx
    for c in prange(C):
        s = 0.0
        sx = 0.0
        for p in range(parts):
            s += ps[c, p]
            sx += psx[c, p]
        sum_dy_out[c] = s
        sum_dy_xmu_out[c] = sx


@njit(cache=True, fastmath=_FM)
def _rows_dual_sum(dy, x, r0, r1, mean, s, sx):
    s[:] = 0.0
    sx[:] = 0.0
    for r in range(r0, r1):
        gr = dy[r]
        xr = x[r]
        for c in range(s.size):
            g = np.float64(gr[c])
            s[c] += g
            sx[c] += g * (np.float64(xr[c]) - mean[c])


@njit(parallel=True, cache=True)
def backward_reduce_interleaved(dy, x, mean, parts, sum_dy_out, sum_dy_xmu_out):
    outer, C = x.shape
    step = -(-outer // parts)
    ps = np.empty((parts, C))
    psx = np.empty((parts, C))
    for p in prange(parts):
        r0 = min(outer, p * step)
        r1 = min(outer, r0 + step)
        _rows_dual_sum(dy, x, r0, r1, mean, ps[p], psx[p])
    for c in prange(C):
        s = 0.0
        sx = 0.0
        for p in range(parts):
            s += ps[p, c]
            sx += psx[p, c]
        sum_dy_out[c] = s
        sum_dy_xmu_out[c] = sx


@njit(parallel=True, cache=True)
def grad_input_planar(dy, x, mean, a, b, k, dx):
    """``dx = k[c] * (dy - a[c] - (x - mean[c]) * b[c])``."""
    outer, C, inner = x.shape
    for t in prange(outer * C):
        o, c = divmod(np.int64(t), C)
        m = mean[c]
        ac = a[c]
        bc = b[c]
        kc = k[c]
        gr = dy[o, c]
        xr = x[o, c]
        yr = dx[o, c]
        for i in range(inner):
            yr[i] = kc * (np.float64(gr[i]) - ac - (np.float64(xr[i]) - m) * bc)


@njit(parallel=True, cache=True)
def grad_input_interleaved(dy, x, mean, a, b, k, dx):
    """``dx = k[c] * (dy - a[c] - (x - mean[c]) * b[c])``."""
    outer, C = x.shape
    for r in prange(outer):
        gr = dy[r]
        xr = x[r]
        yr = dx[r]
        for c in range(C):
            yr[c] = k[c] * (np.float64(gr[c]) - a[c] - (np.float64(xr[c]) - mean[c]) * b[c])
