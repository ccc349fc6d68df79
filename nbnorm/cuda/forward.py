"""The normalizing pass on the GPU: ``out = (x - coef[0, c]) * coef[1, c] + coef[2, c]``.

``coef`` is float64 (center, scale = invstd * weight, shift = bias), written on
the device by ``finalize``; the arithmetic is float64 as on the CPU, so the
subtraction of a large mean keeps its precision for float32 data.  Grid-stride
loops over the elements in memory order: consecutive threads touch consecutive
addresses whatever the pattern.  Elementwise (each element read before it is
written by the same thread), so ``out`` may be ``x``; backward in inference mode
reuses it with ``coef = (0, invstd * weight, 0)``.
"""

import functools

from numba import cuda

from .. import config
from ._device import INLINE


@functools.lru_cache(maxsize=None)
def kernels(tpb, shuffle, unroll):
    """name -> dispatcher (one set per configuration, like ``stats.kernels``)."""

    @cuda.jit
    def normalize_planar(x, coef, out):
        outer, C, inner = x.shape
        total = outer * C * inner
        o, c, i, do, dc, di = grid_stride_planar(C, inner)
        k = cuda.grid(1)
        while k < total:
            out[o, c, i] = (float(x[o, c, i]) - coef[0, c]) * coef[1, c] + coef[2, c]
            k += cuda.gridsize(1)
            o, c, i = step_planar(o, c, i, do, dc, di, C, inner)

    @cuda.jit
    def normalize_interleaved(x, coef, out):
        outer, C = x.shape
        total = outer * C
        o, c, do, dc = grid_stride_interleaved(C)
        k = cuda.grid(1)
        while k < total:
            out[o, c] = (float(x[o, c]) - coef[0, c]) * coef[1, c] + coef[2, c]
            k += cuda.gridsize(1)
            o, c = step_interleaved(o, c, do, dc, C)

    return {"normalize_planar": normalize_planar,
            "normalize_interleaved": normalize_interleaved}


# Grid-stride loops in memory order, with the element's (o, c, i) stepped by
# additions: 64-bit integer division costs ~100 instructions on a GPU, which
# would make an elementwise kernel compute-bound; here each thread divides
# once, at its start.

@cuda.jit(device=True, **INLINE)
def grid_stride_planar(C, inner):
    """(o, c, i) of this thread's first element and the per-step increments."""
    k = cuda.grid(1)
    r = k // inner
    s = cuda.gridsize(1)
    ds = s // inner
    return r // C, r % C, k % inner, ds // C, ds % C, s % inner


@cuda.jit(device=True, **INLINE)
def step_planar(o, c, i, do, dc, di, C, inner):
    i += di
    if i >= inner:
        i -= inner
        c += 1
    c += dc
    if c >= C:
        c -= C
        o += 1
    return o + do, c, i


@cuda.jit(device=True, **INLINE)
def grid_stride_interleaved(C):
    k = cuda.grid(1)
    s = cuda.gridsize(1)
    return k // C, k % C, s // C, s % C


@cuda.jit(device=True, **INLINE)
def step_interleaved(o, c, do, dc, C):
    c += dc
    if c >= C:
        c -= C
        o += 1
    return o + do, c


def elementwise_grid(total, tpb):
    """Blocks of an elementwise grid-stride kernel over ``total`` elements."""
    return max(1, min(-(-total // tpb), config.CUDA_ELEMENTWISE_BLOCKS))


def normalize_planar(x, coef, out, stream, params):
    tpb = params[0]
    k = kernels(*params)["normalize_planar"]
    k[elementwise_grid(x.size, tpb), tpb, stream](x, coef, out)


def normalize_interleaved(x, coef, out, stream, params):
    tpb = params[0]
    k = kernels(*params)["normalize_interleaved"]
    k[elementwise_grid(x.size, tpb), tpb, stream](x, coef, out)
