"""Device functions shared by the kernels: Chan's merge, block reductions, and
the stepping of a thread through a planar channel's runs.

The block reductions come from a factory, ``reducers(tpb, shuffle)``, because
their shared-memory buffers need the block size as a compile-time constant and
because the warp-shuffle path must be swapped for a shared-memory one on the
simulator (it has no ``shfl_*_sync``).  ``shuffle`` is a closure constant, so
the branch not taken is pruned from the compiled kernel.

Both paths are trees over a fixed pairing of threads: the result of a launch
depends on the shape and the configuration only, never on timing.
"""

import functools

from numba import cuda

from .. import config
from . import per_channel

FULL_MASK = 0xFFFFFFFF
WARP = 32


def _simulator():
    from numba import config as numba_config
    return bool(numba_config.ENABLE_CUDASIM)


#: Options of small device functions: inlined into the kernel (their arguments
#: include register arrays), except on the simulator, whose jit has no such option.
INLINE = {} if _simulator() else {"forceinline": True}


@cuda.jit(device=True, **INLINE)
def run_position(j, inner, tpb):
    """``(o, i, do, di)``: element ``j`` of a planar channel is ``x[o, c, i]``, and
    ``run_step`` moves it ``tpb`` elements on by adding ``(do, di)``."""
    o = j // inner
    do = tpb // inner
    return o, j - o * inner, do, tpb - do * inner


@cuda.jit(device=True, **INLINE)
def run_step(o, i, do, di, inner):
    """``(o, i)`` of the element ``tpb`` after ``x[o, c, i]`` (see ``run_position``):
    additions only, since a 64-bit division costs ~100 instructions on a GPU."""
    o += do
    i += di
    if i >= inner:
        i -= inner
        o += 1
    return o, i


def use_shuffle():
    """``config.CUDA_WARP_SHUFFLE``, or (``None``) shuffles except on the simulator."""
    if config.CUDA_WARP_SHUFFLE is not None:
        return bool(config.CUDA_WARP_SHUFFLE)
    return not _simulator()


def launch_params():
    """``(tpb, shuffle, unroll)`` from ``config``, checked."""
    tpb = int(config.CUDA_THREADS)
    if tpb < WARP or tpb > 1024 or tpb & (tpb - 1):
        raise ValueError(f"config.CUDA_THREADS must be a power of two in [32, 1024], got {tpb}")
    unroll = int(config.CUDA_UNROLL)
    if unroll < 1:
        raise ValueError(f"config.CUDA_UNROLL must be >= 1, got {unroll}")
    return tpb, use_shuffle(), unroll


#: Chan's merge of two ``(count, mean, M2)`` triples and the finiteness test:
#: ``nbnorm.channel``'s, the CPU's expressions.
merge = per_channel.math.chan_merge
finite = per_channel.math.finite


@functools.lru_cache(maxsize=None)
def reducers(tpb, shuffle):
    """``(block_merge, block_sum2)`` for blocks of ``tpb`` threads.

    A block is ``by = tpb // bx`` rows of ``bx`` threads (``bx`` a power of two:
    1 for planar data, where the whole block reduces one channel; up to 32 for
    interleaved data, one channel per column).  Thread ``t = ty * bx + tx``
    reduces with every thread of its column; the result is valid in row 0
    (``t < bx``).  With ``shuffle``, lanes of a warp ``off = 16, 8, .., bx``
    apart merge first (they are in the same column), then the shared-memory
    tree over the remaining rows, one row per warp.
    """
    if tpb < WARP or tpb & (tpb - 1):
        raise ValueError(f"threads per block must be a power of two >= 32, got {tpb}")

    @cuda.jit(device=True)
    def block_merge(n, m, q, t, bx, sn, sm, sq):
        by = tpb // bx
        first = 1
        if shuffle:
            off = WARP // 2
            while off >= bx:
                n2 = cuda.shfl_down_sync(FULL_MASK, n, off)
                m2 = cuda.shfl_down_sync(FULL_MASK, m, off)
                q2 = cuda.shfl_down_sync(FULL_MASK, q, off)
                n, m, q = merge(n, m, q, n2, m2, q2)
                off //= 2
            if bx < WARP:
                first = WARP // bx
        sn[t] = n
        sm[t] = m
        sq[t] = q
        cuda.syncthreads()
        ty = t // bx
        s = first
        while s < by:
            if ty % (2 * s) == 0 and ty + s < by:
                o = t + s * bx
                n, m, q = merge(sn[t], sm[t], sq[t], sn[o], sm[o], sq[o])
                sn[t] = n
                sm[t] = m
                sq[t] = q
            cuda.syncthreads()
            s *= 2
        return sn[t], sm[t], sq[t]

    @cuda.jit(device=True)
    def block_sum2(a, b, t, bx, sa, sb):
        by = tpb // bx
        first = 1
        if shuffle:
            off = WARP // 2
            while off >= bx:
                a += cuda.shfl_down_sync(FULL_MASK, a, off)
                b += cuda.shfl_down_sync(FULL_MASK, b, off)
                off //= 2
            if bx < WARP:
                first = WARP // bx
        sa[t] = a
        sb[t] = b
        cuda.syncthreads()
        ty = t // bx
        s = first
        while s < by:
            if ty % (2 * s) == 0 and ty + s < by:
                o = t + s * bx
                sa[t] += sa[o]
                sb[t] += sb[o]
            cuda.syncthreads()
            s *= 2
        return sa[t], sb[t]

    return block_merge, block_sum2


def column_width(C, tpb):
    """Threads across channels for interleaved data: coalesced 128-byte rows of a
    warp when ``C >= 32``, else the smallest power of two ``>= C``, so that the
    rest of the block's threads take more rows."""
    bx = 1
    while bx < min(C, WARP):
        bx *= 2
    return min(bx, tpb)
