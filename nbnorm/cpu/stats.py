"""Per-channel batch statistics: blocked two-pass moments, Chan-merged in float64.

Each task reduces one part of one channel (planar) or one range of rows of every
channel (interleaved).  A part is walked in cache blocks of ``block`` elements
(``config.BLOCK``); each block is summed, then its squared deviations from the block mean
are summed while it is still in cache, and the block's exact ``(count, mean, M2)``
is merged into the part with Chan's formula.  Parts are then merged per channel
in index order.  The split depends on the shape only, so the result is bitwise
the same for every thread count, and it never uses ``E[x^2] - E[x]^2``.
"""

import numpy as np
from numba import njit, prange

from .. import config

_FM = set(config.FASTMATH)


def planar_parts(outer, C, inner):
    """Parts per channel for a planar reduction: a function of the shape only."""
    n = outer * inner
    wanted = -(-config.TARGET_TASKS // C)
    most = max(1, n // config.MIN_PART)
    return max(1, min(wanted, most))


def interleaved_parts(outer, C):
    """Row ranges for an interleaved reduction: a function of the shape only."""
    most = max(1, (outer * C) // config.MIN_PART)
    return max(1, min(config.TARGET_TASKS, most, outer))


@njit(cache=True, inline="always")
def chan_merge(na, ma, m2a, nb, mb, m2b):
    """Merge two (count, mean, M2) triples (Chan et al.); ``na + nb > 0``."""
    n = na + nb
    d = mb - ma
    f = nb / n
    # (d * na) first: merging into an empty accumulator (na = 0) must add 0, not
    # d*d*0, which is NaN once |d| > 1.3e154 (d*d overflows) although M2 may be finite.
    return n, ma + d * f, m2a + m2b + (d * na) * (d * f)


@njit(cache=True, fastmath=_FM)
def _run_sum(r):
    s = 0.0
    for i in range(r.size):
        s += np.float64(r[i])
    return s


@njit(cache=True, fastmath=_FM)
def _run_sqdev(r, m):
    q = 0.0
    for i in range(r.size):
        d = np.float64(r[i]) - m
        q += d * d
    return q


@njit(cache=True)
def _planar_block_moments(x, c, j0, j1):
    """(mean, M2) of elements ``[j0, j1)`` of channel ``c`` in its logical order."""
    inner = x.shape[2]
    s = 0.0
    j = j0
    while j < j1:
        o, i = divmod(j, inner)
        e = min(inner, i + j1 - j)
        s += _run_sum(x[o, c, i:e])
        j += e - i
    m = s / (j1 - j0)
    q = 0.0
    j = j0
    while j < j1:
        o, i = divmod(j, inner)
        e = min(inner, i + j1 - j)
        q += _run_sqdev(x[o, c, i:e], m)
        j += e - i
    return m, q


@njit(parallel=True, cache=True)
def channel_stats_planar(x, parts, block, mean_out, m2_out):
    """Mean and M2 (sum of squared deviations) of each channel of ``x[outer, C, inner]``."""
    outer, C, inner = x.shape
    n = outer * inner
    step = -(-n // parts)
    pmean = np.empty((C, parts))
    pm2 = np.empty((C, parts))
    for t in prange(C * parts):
        c, p = divmod(np.int64(t), parts)
        j0 = min(n, p * step)
        j1 = min(n, j0 + step)
        cnt = 0.0
        mu = 0.0
        m2 = 0.0
        j = j0
        while j < j1:
            k = min(j1, j + block)
            bm, bq = _planar_block_moments(x, c, j, k)
            cnt, mu, m2 = chan_merge(cnt, mu, m2, float(k - j), bm, bq)
            j = k
        pmean[c, p] = mu
        pm2[c, p] = m2
    for c in prange(C):
        cnt = 0.0
        mu = 0.0
        m2 = 0.0
        for p in range(parts):
            j0 = min(n, p * step)
            nb = min(n, j0 + step) - j0
            if nb > 0:
                cnt, mu, m2 = chan_merge(cnt, mu, m2, float(nb), pmean[c, p], pm2[c, p])
        mean_out[c] = mu
        m2_out[c] = m2


@njit(cache=True, fastmath=_FM)
def _rows_sum(x, r0, r1, acc):
    acc[:] = 0.0
    for r in range(r0, r1):
        row = x[r]
        for c in range(acc.size):
            acc[c] += row[c]


@njit(cache=True, fastmath=_FM)
def _rows_sqdev(x, r0, r1, m, acc):
    acc[:] = 0.0
    for r in range(r0, r1):
        row = x[r]
        for c in range(acc.size):
            d = np.float64(row[c]) - m[c]
            acc[c] += d * d


@njit(parallel=True, cache=True)
def channel_stats_interleaved(x, parts, block, mean_out, m2_out):
    """Mean and M2 of each channel (column) of ``x[outer, C]``."""
    outer, C = x.shape
    step = -(-outer // parts)
    brows = max(1, block // C)
    pmean = np.zeros((parts, C))
    pm2 = np.zeros((parts, C))
    bmean = np.empty((parts, C))
    bq = np.empty((parts, C))
    for p in prange(parts):
        r0 = min(outer, p * step)
        r1 = min(outer, r0 + step)
        cnt = 0.0
        r = r0
        while r < r1:
            k = min(r1, r + brows)
            nb = float(k - r)
            _rows_sum(x, r, k, bmean[p])
            bmean[p] /= nb
            _rows_sqdev(x, r, k, bmean[p], bq[p])
            for c in range(C):
                _, pmean[p, c], pm2[p, c] = chan_merge(
                    cnt, pmean[p, c], pm2[p, c], nb, bmean[p, c], bq[p, c])
            cnt += nb
            r = k
    for c in prange(C):
        cnt = 0.0
        mu = 0.0
        m2 = 0.0
        for p in range(parts):
            r0 = min(outer, p * step)
            nb = min(outer, r0 + step) - r0
            if nb > 0:
                cnt, mu, m2 = chan_merge(cnt, mu, m2, float(nb), pmean[p, c], pm2[p, c])
        mean_out[c] = mu
        m2_out[c] = m2
