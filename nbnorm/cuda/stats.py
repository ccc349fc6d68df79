"""Per-channel batch statistics on the GPU: Welford/Chan partials per block.

First pass (these kernels): every thread reduces its share of one channel in
register blocks of ``unroll`` values -- sum, then squared deviations from the
block mean, the block's exact ``(count, mean, M2)`` Chan-merged into the
thread's triple (one division per ``unroll`` values, never ``E[x^2] - E[x]^2``)
-- accumulating in float64 for every dtype (``convert.codec``: half data are
read exactly as float64).  Threads then merge by warp
shuffles and a shared-memory tree (``_device.reducers``), and one thread per
(channel, block) writes the block's triple to ``partials[3, C, parts]``.

Second pass: ``finalize`` merges a channel's ``parts`` triples in index order.
The split is a function of the shape and ``config`` only, and no float atomics
are used, so a result is the same on every run.

Loads are coalesced: planar data is read by a block's threads along a channel's
runs of ``inner`` values (consecutive threads, consecutive addresses);
interleaved data by threads across channels (``bx`` columns) of ``by`` rows at
a time.  A channel is split across ``parts`` blocks so that a large GPU fills
even when ``C`` is small.
"""

import functools

from numba import cuda, float64

from .. import config
from . import convert
from ._device import INLINE, column_width, merge, reducers, run_position, run_step


def _split(n, want):
    """``(parts, step)``: ``n`` items in ``parts`` nonempty ranges of ``step``."""
    parts = max(1, min(want, n))
    step = -(-n // parts)
    return -(-n // step), step


def planar_parts(outer, C, inner):
    """``(parts, step)`` per channel of a planar reduction: shape and config only."""
    n = outer * inner
    wanted = -(-config.CUDA_TARGET_BLOCKS // C)
    most = max(1, n // config.CUDA_MIN_BLOCK_ELEMENTS)
    return _split(n, min(wanted, most))


def interleaved_parts(outer, C, tpb):
    """``(bx, parts, step)`` of an interleaved reduction: ``bx`` channels per block,
    ``parts`` row ranges of ``step`` rows each."""
    bx = column_width(C, tpb)
    cblocks = -(-C // bx)
    wanted = -(-config.CUDA_TARGET_BLOCKS // cblocks)
    most = max(1, (outer * bx) // config.CUDA_MIN_BLOCK_ELEMENTS)
    return (bx,) + _split(outer, min(wanted, most))


@functools.lru_cache(maxsize=None)
def kernels(tpb, shuffle, unroll, kind):
    """The statistics kernels for one configuration and storage ``kind`` of ``x``
    (``convert.KINDS``): name -> CUDA dispatcher."""
    block_merge, _ = reducers(tpb, shuffle)
    load, _ = convert.codec(kind)

    @cuda.jit(device=True, **INLINE)
    def block_moments(buf):
        """Exact (mean, M2) of a full register block: constant trip counts, so
        the loops unroll and ``buf`` lives in registers."""
        s = 0.0
        for u in range(unroll):
            s += buf[u]
        bm = s / unroll
        bq = 0.0
        for u in range(unroll):
            d = buf[u] - bm
            bq += d * d
        return bm, bq

    @cuda.jit
    def channel_stats_planar(x, parts, step, partials):
        outer, C, inner = x.shape
        n_all = outer * inner
        b = cuda.blockIdx.x
        c = b // parts
        p = b - c * parts
        t = cuda.threadIdx.x
        j1 = min(n_all, (p + 1) * step)
        j = p * step + t
        o, i, do, di = run_position(j, inner, tpb)
        buf = cuda.local.array(unroll, float64)
        n = 0.0
        m = 0.0
        q = 0.0
        while j < j1:
            if j + (unroll - 1) * tpb < j1:  # a full register block
                for u in range(unroll):
                    buf[u] = load(x[o, c, i])
                    j += tpb
                    o, i = run_step(o, i, do, di, inner)
                bm, bq = block_moments(buf)
                n, m, q = merge(n, m, q, float(unroll), bm, bq)
            else:  # the last few values: Welford's update, a merge of one
                n, m, q = merge(n, m, q, 1.0, load(x[o, c, i]), 0.0)
                j += tpb
                o, i = run_step(o, i, do, di, inner)
        sn = cuda.shared.array(tpb, float64)
        sm = cuda.shared.array(tpb, float64)
        sq = cuda.shared.array(tpb, float64)
        n, m, q = block_merge(n, m, q, t, 1, sn, sm, sq)
        if t == 0:
            partials[0, c, p] = n
            partials[1, c, p] = m
            partials[2, c, p] = q

    @cuda.jit
    def channel_stats_interleaved(x, bx, parts, step, partials):
        outer, C = x.shape
        cblocks = (C + bx - 1) // bx
        b = cuda.blockIdx.x
        p = b // cblocks
        t = cuda.threadIdx.x
        ty = t // bx
        by = tpb // bx
        c = (b - p * cblocks) * bx + (t - ty * bx)
        r1 = min(outer, (p + 1) * step)
        buf = cuda.local.array(unroll, float64)
        n = 0.0
        m = 0.0
        q = 0.0
        r = p * step + ty
        if c >= C:
            r = r1  # a column past the last channel: contributes nothing
        while r < r1:
            if r + (unroll - 1) * by < r1:
                for u in range(unroll):
                    buf[u] = load(x[r, c])
                    r += by
                bm, bq = block_moments(buf)
                n, m, q = merge(n, m, q, float(unroll), bm, bq)
            else:
                n, m, q = merge(n, m, q, 1.0, load(x[r, c]), 0.0)
                r += by
        sn = cuda.shared.array(tpb, float64)
        sm = cuda.shared.array(tpb, float64)
        sq = cuda.shared.array(tpb, float64)
        n, m, q = block_merge(n, m, q, t, bx, sn, sm, sq)
        if ty == 0 and c < C:
            partials[0, c, p] = n
            partials[1, c, p] = m
            partials[2, c, p] = q

    return {"channel_stats_planar": channel_stats_planar,
            "channel_stats_interleaved": channel_stats_interleaved}


def channel_stats_planar(x, partials, parts, step, stream, params):
    """Launch: ``partials[:, c, p]`` = (count, mean, M2) of part ``p`` of channel ``c``."""
    k = kernels(*params, convert.kind(x.dtype))["channel_stats_planar"]
    k[x.shape[1] * parts, params[0], stream](x, parts, step, partials)


def channel_stats_interleaved(x, partials, bx, parts, step, stream, params):
    """Launch: as ``channel_stats_planar`` for an ``(outer, C)`` view."""
    k = kernels(*params, convert.kind(x.dtype))["channel_stats_interleaved"]
    k[-(-x.shape[1] // bx) * parts, params[0], stream](x, bx, parts, step, partials)
