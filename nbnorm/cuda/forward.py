"""The normalizing pass on the GPU, with the fused epilogue:
``out = act((x - center) * scale + shift + residual)``.

``coef`` is float64 (center, scale = invstd * weight, shift = bias, offset =
shift - center * scale), written on the device by ``finalize``; the arithmetic
is float64 as on the CPU, in the CPU's two forms: float64 data keep the
centred form, which loses nothing to a large mean, and data of 4 bytes or
fewer take ``x * scale + offset`` (``convert.compact``), whose cancellation,
~1e-16 * |mean| / std relative, is far below their rounding.  ``residual`` is
added and ``act`` (``channel.relu``) applied before the one rounding to the
storage dtype (``convert.codec``).

Grid-stride loops over the elements in memory order: consecutive threads
touch consecutive addresses whatever the pattern.  Elementwise (each element
read before it is written by the same thread), so ``out`` may be ``x`` or
``residual``.
"""

import functools

from numba import cuda

from .. import config
from . import convert
from ._device import INLINE
from .per_channel import math as channel_math

CENTER, SCALE, SHIFT, OFFSET = range(4)


@functools.lru_cache(maxsize=None)
def kernels(tpb, shuffle, unroll, kind, residual=False, relu=False):
    """name -> dispatcher for one configuration, storage ``kind`` of the data
    and epilogue: ``residual`` (a residual array is added) and ``relu``.
    Without them the argument ``res`` is a placeholder that is never read."""
    load, store = convert.codec(kind)
    compact = convert.compact(kind)
    act = channel_math.relu

    @cuda.jit(device=True, **INLINE)
    def value(xv, rv, coef, c):
        """The output value of input ``xv`` (and residual ``rv``) in channel ``c``."""
        if compact:
            v = load(xv) * coef[SCALE, c] + coef[OFFSET, c]
        else:
            v = (load(xv) - coef[CENTER, c]) * coef[SCALE, c] + coef[SHIFT, c]
        if residual:
            v += load(rv)
        if relu:
            v = act(v)
        return store(v)

    @cuda.jit
    def normalize_planar(x, coef, res, out):
        outer, C, inner = x.shape
        total = outer * C * inner
        o, c, i, do, dc, di = grid_stride_planar(C, inner)
        k = cuda.grid(1)
        while k < total:
            out[o, c, i] = value(x[o, c, i], res[o, c, i] if residual else x[o, c, i], coef, c)
            k += cuda.gridsize(1)
            o, c, i = step_planar(o, c, i, do, dc, di, C, inner)

    @cuda.jit
    def normalize_interleaved(x, coef, res, out):
        outer, C = x.shape
        total = outer * C
        o, c, do, dc = grid_stride_interleaved(C)
        k = cuda.grid(1)
        while k < total:
            out[o, c] = value(x[o, c], res[o, c] if residual else x[o, c], coef, c)
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


def _launch(name, x, coef, residual, relu, out, stream, params):
    k = kernels(*params, convert.kind(x.dtype), residual is not None, bool(relu))[name]
    k[elementwise_grid(x.size, params[0]), params[0], stream](
        x, coef, x if residual is None else residual, out)


def normalize_planar(x, coef, out, stream, params, residual=None, relu=False):
    """Launch: ``out = act(bn(x) + residual)`` of ``(outer, C, inner)`` views."""
    _launch("normalize_planar", x, coef, residual, relu, out, stream, params)


def normalize_interleaved(x, coef, out, stream, params, residual=None, relu=False):
    """Launch: as ``normalize_planar`` for ``(outer, C)`` views."""
    _launch("normalize_interleaved", x, coef, residual, relu, out, stream, params)
