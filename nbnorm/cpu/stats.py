"""Per-channel batch statistics: blocked two-pass moments, Chan-merged in float64.

A channel's ``n`` values (in their logical order) are split into ``parts``
equal ranges (``planar_parts``/``interleaved_split``: a function of the shape
only), and a part is walked in cache blocks of ``block`` elements
(``config.BLOCK``).  Each block is summed, then its squared deviations from the
block mean are summed while it is still in cache, and the block's exact
``(count, mean, M2)`` is merged into its part with Chan's formula.  Parts are
merged per channel in index order.  Which thread computes a part, whether a
part is computed by its own task or by the task that owns its whole channel
(``channel_moments_planar``, used by the fused kernels of ``forward`` and for
small serial calls), and which channels share a task (``planar_group``)
changes nothing: every path runs the same functions on the same ranges in the
same order, so the result is bitwise the same for every thread count, and it
never uses ``E[x^2] - E[x]^2``.  Interleaved reductions
(NC, NHWC) split ranges of *wide* rows (``wide_rows``), then merge each channel's
column groups in order: still a function of the shape only.

Measured (2-core AMD EPYC, numba 0.68; ``(64, 64, 56*56)`` float32): the
fastmath ``reassoc`` flag on the run sums is what makes them vectorize; without
it a float64 sum is a serial add chain at ~12 GB/s, with it the statistics pass
reads at memory speed.
"""

import functools

import numpy as np
from numba import njit, prange

from .. import config
from . import per_channel
from .convert import load

#: Read when nbnorm.cpu is imported: fast-math flags are part of the compiled code.
_FM = set(config.FASTMATH)


def planar_parts(outer, C, inner):
    """Parts per channel for a planar reduction: a function of the shape only."""
    n = outer * inner
    wanted = -(-config.TARGET_TASKS // C)
    most = max(1, n // config.MIN_PART)
    return max(1, min(wanted, most))


def wide_rows(C):
    """How many rows of ``C`` channels an interleaved kernel views as one wide row.

    The row loops of the interleaved kernels pay a fixed setup per row (the
    vectorized loop's preamble, the accumulators' loads and stores), which
    dominates short rows: NHWC with C=64 is 256 bytes a row.  So the first
    ``outer // k * k`` rows are viewed, without a copy, as ``(outer // k, k*C)``
    with ``k*C >= config.WIDE_ROW``; per-channel arrays are tiled ``k`` times and
    the ``k`` column groups are merged per channel at the end, in group order.
    The ``outer % k`` rows left over run narrow.  Measured (statistics pass
    alone, x copy time, 2 threads): NHWC 64x56x56x64 float64 0.97 -> 0.51,
    float32 0.87 -> 0.55; wider rows than ~512 only shorten the cache blocks
    (NC 8192x1024 viewed 4096 wide: 0.65 -> 0.95).
    """
    return _wide(C, config.WIDE_ROW)


def _wide(C, wide_row):
    return max(1, -(-wide_row // C))


def interleaved_split(outer, C):
    """``(wide_rows(C), parts)``: the wide rows of an interleaved reduction and
    how many ranges of them it splits into, a function of the shape only."""
    return _split(outer, C, config.WIDE_ROW, config.MIN_PART, config.TARGET_TASKS)


@functools.lru_cache(maxsize=1024)
def _split(outer, C, wide_row, min_part, target_tasks):
    # Cached (a training loop repeats its shapes): 0.77 -> ~0.2 us of a ~11 us
    # small call.  The tunables are arguments, so a patched config is honoured.
    k = _wide(C, wide_row)
    rows = outer // k
    most = max(1, (rows * k * C) // min_part)
    return k, max(1, min(target_tasks, most, rows))


@njit(cache=True)
def widen(x, wide):
    """Rows ``[0, outer // wide * wide)`` of ``x[outer, C]`` as ``(outer // wide, wide*C)``
    (a view: ``x`` is C-contiguous)."""
    outer, C = x.shape
    return x[:outer // wide * wide].reshape((outer // wide, wide * C))


@njit(cache=True)
def tile(a, wide):
    """``a`` repeated ``wide`` times (per-channel values for a wide row), float64."""
    t = np.empty(wide * a.size)
    for j in range(wide):
        for c in range(a.size):
            t[j * a.size + c] = a[c]
    return t


chan_merge = per_channel.math.chan_merge
chan_step = per_channel.math.chan_step


@njit(cache=True, inline="always")
def chan_merge_all(cnt, nb, mean, m2, bmean, bq):
    """``chan_merge`` of ``(nb, bmean[i], bq[i])`` into ``(cnt, mean[i], m2[i])`` for
    every ``i``; returns the new count.  The counts are the same for every ``i``,
    so the division is hoisted (``chan_step``) and the loop vectorizes: same
    expressions, same bits as ``chan_merge`` value by value."""
    n = cnt + nb
    f = nb / n
    for i in range(mean.size):
        mean[i], m2[i] = chan_step(cnt, mean[i], m2[i], f, bmean[i], bq[i])
    return n


@njit(cache=True, fastmath=_FM)
def _run_sum(r):
    s = 0.0
    for i in range(r.size):
        s += load(r[i])
    return s


@njit(cache=True, fastmath=_FM)
def _run_sqdev(r, m):
    q = 0.0
    for i in range(r.size):
        d = load(r[i]) - m
        q += d * d
    return q


def planar_group(outer, C, inner, itemsize, parts):
    """Channels per task of a parallel planar reduction: a function of the shape only.

    A task reduces a group of adjacent channels row by row (``x[o, c0:c1]`` is
    contiguous), so a group of short runs reads as one long run instead of one
    run per channel with a jump of a whole batch row between runs.  Groups only
    change which task computes a channel, never its arithmetic: the bits are
    the same for every group size.  A batch row splits into a power of two of
    groups (tasks divide evenly among 2, 4, 8 ... threads) of at least
    ``config.PLANAR_GROUP_BYTES`` each, but into at least
    ``config.PLANAR_GROUP_MIN_TASKS`` tasks where there are that many channels.
    Measured (statistics pass alone, called back to back, x copy time, same
    process, Zen 3, 2 threads; one channel a task -> 32 or 64): 256x512x7x7
    float32 1.32 -> 0.85, float64 1.02 -> 0.62; 1024x64x4x4 float32 2.03 ->
    1.54 (2 tasks; 4 tasks of 16: 1.68); 64x256x14x14 float32 0.88 -> 0.61.
    With the other short-run rules, whole steps: docs/performance.md, "Small feature maps".
    Maps of 56x56 and more read whole kilobytes a run and keep one channel a
    task.
    """
    groups = 1 << (max(1, C * inner * itemsize // config.PLANAR_GROUP_BYTES).bit_length() - 1)
    while groups * parts < config.PLANAR_GROUP_MIN_TASKS:
        groups *= 2
    return -(-C // min(C, groups))


@njit(cache=True)
def _group_block_moments(x, c0, c1, j0, j1, bmean, bq):
    """(mean, M2) of elements ``[j0, j1)`` of each channel ``c0 <= c < c1`` in its
    logical order, into ``bmean[c - c0]``, ``bq[c - c0]``: each channel's runs
    summed in order, then their squared deviations from the block mean."""
    inner = x.shape[2]
    G = c1 - c0
    bmean[:G] = 0.0
    bq[:G] = 0.0
    o0 = j0 // inner
    o1 = -(-j1 // inner)
    for o in range(o0, o1):
        i0 = max(0, j0 - o * inner)
        i1 = min(inner, j1 - o * inner)
        for g in range(G):
            bmean[g] += _run_sum(x[o, c0 + g, i0:i1])
    for g in range(G):
        bmean[g] /= j1 - j0
    for o in range(o0, o1):
        i0 = max(0, j0 - o * inner)
        i1 = min(inner, j1 - o * inner)
        for g in range(G):
            bq[g] += _run_sqdev(x[o, c0 + g, i0:i1], bmean[g])


@njit(cache=True)
def planar_part_moments(x, c0, c1, j0, j1, block, mu, m2, bmean, bq):
    """(mean, M2) of elements ``[j0, j1)`` of channels ``[c0, c1)`` into ``mu[c - c0]``,
    ``m2[c - c0]``: blocks of ``block`` elements Chan-merged in order (``bmean``,
    ``bq``: scratch)."""
    G = c1 - c0
    mu[:G] = 0.0
    m2[:G] = 0.0
    cnt = 0.0
    j = j0
    while j < j1:
        k = min(j1, j + block)
        _group_block_moments(x, c0, c1, j, k, bmean, bq)
        cnt = chan_merge_all(cnt, float(k - j), mu[:G], m2[:G], bmean, bq)
        j = k


@njit(cache=True)
def channel_moments_planar(x, c0, c1, parts, block, mean_out, m2_out):
    """(mean, M2) of channels ``[c0, c1)`` of ``x[outer, C, inner]`` into
    ``mean_out[c]``, ``m2_out[c]``, all parts in one task.

    Bitwise the same as ``channel_stats_planar``, which computes the parts as
    separate tasks and merges them in the same order.
    """
    n = x.shape[0] * x.shape[2]
    step = -(-n // parts)
    G = c1 - c0
    w = np.empty((4, G))
    mean_out[c0:c1] = 0.0
    m2_out[c0:c1] = 0.0
    cnt = 0.0
    for p in range(parts):
        j0 = min(n, p * step)
        j1 = min(n, j0 + step)
        if j1 > j0:
            planar_part_moments(x, c0, c1, j0, j1, block, w[0], w[1], w[2], w[3])
            cnt = chan_merge_all(cnt, float(j1 - j0), mean_out[c0:c1], m2_out[c0:c1], w[0],
                                 w[1])


@njit(cache=True, inline="always")
def group_task(t, parts, group, C, n):
    """``(p, c0, c1, j0, j1)`` of task ``t`` of a planar reduction over (group of
    ``group`` channels, part) tasks: part ``p``, channels ``[c0, c1)``, elements
    ``[j0, j1)`` of each of ``n``; ``groups * parts`` tasks in all."""
    gi, p = divmod(np.int64(t), parts)
    c0 = gi * group
    step = -(-n // parts)
    j0 = min(n, p * step)
    return p, c0, min(C, c0 + group), j0, min(n, j0 + step)


@njit(cache=True)
def channel_stats_planar_serial(x, parts, block, mean_out, m2_out):
    """``channel_stats_planar`` on the calling thread (small batches), all
    channels as one group."""
    channel_moments_planar(x, 0, x.shape[1], parts, block, mean_out, m2_out)


@njit(parallel=True, cache=True)
def channel_stats_planar(x, parts, block, group, mean_out, m2_out):
    """Mean and M2 (sum of squared deviations) of each channel of ``x[outer, C, inner]``:
    one task per (group of ``group`` channels, part) (``planar_group``)."""
    outer, C, inner = x.shape
    n = outer * inner
    step = -(-n // parts)
    groups = -(-C // group)
    pmean = np.empty((parts, C))
    pm2 = np.empty((parts, C))
    for t in prange(groups * parts):
        p, c0, c1, j0, j1 = group_task(t, parts, group, C, n)
        if j1 > j0:
            w = np.empty((2, c1 - c0))
            planar_part_moments(x, c0, c1, j0, j1, block, pmean[p, c0:c1], pm2[p, c0:c1],
                                w[0], w[1])
    for c in prange(C):
        cnt = 0.0
        mu = 0.0
        m2 = 0.0
        for p in range(parts):
            j0 = min(n, p * step)
            nb = min(n, j0 + step) - j0
            if nb > 0:
                cnt, mu, m2 = chan_merge(cnt, mu, m2, float(nb), pmean[p, c], pm2[p, c])
        mean_out[c] = mu
        m2_out[c] = m2


def unroll(itemsize):
    """``(sum_c, sqdev_c)``: rows of at least this many values are summed (first
    pass) and their squared deviations summed (second pass, and backward's
    sums) four rows per accumulator update (``config.ROWS_UNROLL_MIN_C``,
    ``config.ROWS_SUM_UNROLL_MIN_ITEMSIZE``); read at every call.  Two int
    arguments of the kernels, not a tuple: Numba types a tuple argument in
    Python (~0.5 us a call), an int in C."""
    c = config.ROWS_UNROLL_MIN_C
    return (c if itemsize >= config.ROWS_SUM_UNROLL_MIN_ITEMSIZE else 1 << 62), c


@njit(cache=True, fastmath=_FM)
def _rows_sum(x, r0, r1, acc, unroll_c):
    """``acc[c] = sum(x[r0:r1, c])``, four rows per update of ``acc`` for float64.

    Measured (C=1024, a block in L2, one core): 0.09 -> 0.054 ns/element
    against one row per update; the accumulator's loads and stores, not the
    adds, were the cost.  But this pass reads its block from memory, and there
    float32 does better one row at a time, one sequential stream instead of four
    (statistics pass, x copy time, same process, two runs each: NC 8192x1024
    0.90/0.88 -> 0.80/0.77, 16384x512 0.93 -> 0.82, NHWC-wide 4 of 5 runs
    better), while float64 does better unrolled (NHWC 5 of 5 runs, NC 1024
    0.81/0.50 against 0.91/0.53).  Rows shorter than ``unroll_c`` are summed
    one at a time (NHWC, C=64, whole statistics pass: 0.76 -> 0.88 copy-times
    unrolled); since ``wide_rows`` only the leftover rows of a batch are that
    short.  (Measured and dropped: fusing the reduction and normalization of
    column groups of NC 8192x1024, as the planar kernels do per channel, ran 3-5x
    slower: rows 4 KiB apart map a group onto few cache sets.)
    """
    acc[:] = 0.0
    r = r0
    while r + 4 <= r1 and acc.size >= unroll_c:
        a0 = x[r]
        a1 = x[r + 1]
        a2 = x[r + 2]
        a3 = x[r + 3]
        for c in range(acc.size):
            acc[c] += (load(a0[c]) + load(a1[c])) + (load(a2[c]) + load(a3[c]))
        r += 4
    while r < r1:
        a0 = x[r]
        for c in range(acc.size):
            acc[c] += load(a0[c])
        r += 1


@njit(cache=True, fastmath=_FM)
def _rows_sqdev(x, r0, r1, m, acc, unroll_c):
    """``acc[c] = sum((x[r0:r1, c] - m[c])**2)``, four rows per update of ``acc``."""
    acc[:] = 0.0
    r = r0
    while r + 4 <= r1 and acc.size >= unroll_c:
        a0 = x[r]
        a1 = x[r + 1]
        a2 = x[r + 2]
        a3 = x[r + 3]
        for c in range(acc.size):
            mc = m[c]
            d0 = load(a0[c]) - mc
            d1 = load(a1[c]) - mc
            d2 = load(a2[c]) - mc
            d3 = load(a3[c]) - mc
            acc[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        r += 4
    while r < r1:
        a0 = x[r]
        for c in range(acc.size):
            d = load(a0[c]) - m[c]
            acc[c] += d * d
        r += 1


@njit(cache=True)
def interleaved_part_moments(x, r0, r1, brows, sum_c, sqdev_c, mean, m2, bmean, bq):
    """Per-channel (mean, M2) of rows ``[r0, r1)`` of ``x[outer, C]`` into ``mean``,
    ``m2``; blocks of ``brows`` rows Chan-merged in order (``bmean``, ``bq``:
    scratch of length C)."""
    C = x.shape[1]
    mean[:] = 0.0
    m2[:] = 0.0
    cnt = 0.0
    r = r0
    while r < r1:
        k = min(r1, r + brows)
        nb = float(k - r)
        _rows_sum(x, r, k, bmean, sum_c)
        for c in range(C):
            bmean[c] /= nb
        _rows_sqdev(x, r, k, bmean, bq, sqdev_c)
        cnt = chan_merge_all(cnt, nb, mean, m2, bmean, bq)
        r = k


@njit(cache=True)
def merge_interleaved_parts(outer, parts, work, mean_out, m2_out):
    """Per-channel (mean, M2) from the parts' ``work[p, 0]`` (mean) and ``work[p, 1]``
    (M2), merged in part order.  Every channel of a part has the same count, so
    chan_merge's division is hoisted out of the channel loop, which vectorizes
    (same expressions, same bits as ``chan_merge`` per channel).  ``work`` is
    indexed whole, not sliced to ``work[:, 0]``: a strided 2-D view does not
    vectorize (one part of 256 values: 0.21 us a merge).
    """
    step = -(-outer // parts)
    mean_out[:] = 0.0
    m2_out[:] = 0.0
    cnt = 0.0
    for p in range(parts):
        r0 = min(outer, p * step)
        nb = float(min(outer, r0 + step) - r0)
        if nb > 0:
            n = cnt + nb
            f = nb / n
            for c in range(mean_out.size):
                mean_out[c], m2_out[c] = chan_step(cnt, mean_out[c], m2_out[c], f,
                                                   work[p, 0, c], work[p, 1, c])
            cnt = n


@njit(cache=True)
def _fold_wide(wide, cnt, wmean, wm2, mean_out, m2_out):
    """Per-channel (mean, M2) from the ``wide`` column groups of wide-row statistics,
    each of ``cnt`` values, Chan-merged in group order (division hoisted, as in
    ``merge_interleaved_parts``)."""
    C = mean_out.size
    mean_out[:] = 0.0
    m2_out[:] = 0.0
    n = 0.0
    for j in range(wide):
        nn = n + cnt
        f = cnt / nn
        for c in range(C):
            mean_out[c], m2_out[c] = chan_step(n, mean_out[c], m2_out[c], f, wmean[j * C + c],
                                               wm2[j * C + c])
        n = nn


@njit(cache=True)
def _finish_interleaved(x, wide, parts, block, sum_c, sqdev_c, work, mean_out, m2_out):
    """The end of an interleaved reduction: merge the parts of the wide rows
    (``work[p, 0]``, ``work[p, 1]``), fold their column groups into channels,
    then merge the ``outer % wide`` narrow rows left over."""
    outer, C = x.shape
    ow = outer // wide
    if ow:
        wmean = work[0, 2]  # the parts' block scratch, free by now
        wm2 = work[0, 3]
        merge_interleaved_parts(ow, parts, work, wmean, wm2)
        _fold_wide(wide, float(ow), wmean, wm2, mean_out, m2_out)
    else:
        mean_out[:] = 0.0
        m2_out[:] = 0.0
    rest = outer - ow * wide
    if rest:
        r = np.empty((4, C))
        interleaved_part_moments(x, ow * wide, outer, max(1, block // C), sum_c, sqdev_c, r[0], r[1],
                                 r[2], r[3])
        n = float(ow * wide)
        f = rest / (n + rest)
        for c in range(C):
            mean_out[c], m2_out[c] = chan_step(n, mean_out[c], m2_out[c], f, r[0, c], r[1, c])


@njit(parallel=True, cache=True)
def channel_stats_interleaved(x, wide, parts, block, sum_c, sqdev_c, mean_out, m2_out, work):
    """Mean and M2 of each channel (column) of ``x[outer, C]``, over wide rows of
    ``wide`` rows (``wide_rows``).

    ``work``: float64 scratch of shape ``(parts, 4, wide*C)`` that the caller keeps
    between calls (``ops._work``): allocated here, its ~2 MB for NC 8192x1024
    came back from the OS page-faulted on many calls (statistics pass 0.85-1.0
    -> 0.6-0.8 copy-times with a kept buffer).
    """
    xw = widen(x, wide)
    for p in prange(parts):
        _interleaved_part(xw, p, parts, block, sum_c, sqdev_c, work[p])
    _finish_interleaved(x, wide, parts, block, sum_c, sqdev_c, work, mean_out, m2_out)


@njit(cache=True)
def channel_stats_interleaved_serial(x, wide, parts, block, sum_c, sqdev_c, mean_out, m2_out):
    """``channel_stats_interleaved`` on the calling thread (small batches)."""
    xw = widen(x, wide)
    work = np.empty((parts, 4, xw.shape[1]))
    for p in range(parts):
        _interleaved_part(xw, p, parts, block, sum_c, sqdev_c, work[p])
    _finish_interleaved(x, wide, parts, block, sum_c, sqdev_c, work, mean_out, m2_out)


@njit(cache=True)
def _interleaved_part(xw, p, parts, block, sum_c, sqdev_c, work):
    """Part ``p`` of ``parts`` of the wide rows ``xw``: its (mean, M2) into
    ``work[0]``, ``work[1]`` (``work[2:4]``: scratch)."""
    ow = xw.shape[0]
    step = -(-ow // parts)
    r0 = min(ow, p * step)
    r1 = min(ow, r0 + step)
    interleaved_part_moments(xw, r0, r1, max(1, block // xw.shape[1]), sum_c, sqdev_c, work[0], work[1],
                             work[2], work[3])
