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


@functools.lru_cache(maxsize=None)
def kernels(tpb, shuffle, unroll):
    """name -> dispatcher (one set per configuration, like ``stats.kernels``)."""

    @cuda.jit
    def normalize_planar(x, coef, out):
        outer, C, inner = x.shape
        total = outer * C * inner
        k = cuda.grid(1)
        stride = cuda.gridsize(1)
        while k < total:
            r = k // inner
            i = k - r * inner
            o = r // C
            c = r - o * C
            out[o, c, i] = (float(x[o, c, i]) - coef[0, c]) * coef[1, c] + coef[2, c]
            k += stride

    @cuda.jit
    def normalize_interleaved(x, coef, out):
        outer, C = x.shape
        total = outer * C
        k = cuda.grid(1)
        stride = cuda.gridsize(1)
        while k < total:
            o = k // C
            c = k - o * C
            out[o, c] = (float(x[o, c]) - coef[0, c]) * coef[1, c] + coef[2, c]
            k += stride

    return {"normalize_planar": normalize_planar,
            "normalize_interleaved": normalize_interleaved}


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
