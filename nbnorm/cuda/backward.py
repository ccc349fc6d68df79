"""Backward kernels on the GPU: per-channel reductions and the training ``grad_input``.

The reductions are ``sum(dy)`` and ``sum(dy * (x - mean))`` in float64, split
across blocks exactly like the statistics (``stats``): threads along a
channel's runs (planar) or across channels (interleaved), a warp-shuffle and
shared-memory tree per block, partials ``[2, C, parts]`` summed in part order by
``finalize.finalize_backward`` -- deterministic, no float atomics.
"""

import functools

from numba import cuda, float64

from ._device import reducers, run_position, run_step
from .forward import (elementwise_grid, grid_stride_interleaved, grid_stride_planar,
                      step_interleaved, step_planar)


@functools.lru_cache(maxsize=None)
def kernels(tpb, shuffle, unroll):
    """name -> dispatcher for one configuration."""
    _, block_sum2 = reducers(tpb, shuffle)

    @cuda.jit
    def backward_reduce_planar(dy, x, mean, parts, step, partials):
        outer, C, inner = x.shape
        n_all = outer * inner
        b = cuda.blockIdx.x
        c = b // parts
        p = b - c * parts
        t = cuda.threadIdx.x
        j1 = min(n_all, (p + 1) * step)
        j = p * step + t
        o, i, do, di = run_position(j, inner, tpb)
        mu = float(mean[c])
        s = 0.0
        sx = 0.0
        while j < j1:
            g = float(dy[o, c, i])
            s += g
            sx += g * (float(x[o, c, i]) - mu)
            j += tpb
            o, i = run_step(o, i, do, di, inner)
        sa = cuda.shared.array(tpb, float64)
        sb = cuda.shared.array(tpb, float64)
        s, sx = block_sum2(s, sx, t, 1, sa, sb)
        if t == 0:
            partials[0, c, p] = s
            partials[1, c, p] = sx

    @cuda.jit
    def backward_reduce_interleaved(dy, x, mean, bx, parts, step, partials):
        outer, C = x.shape
        cblocks = (C + bx - 1) // bx
        b = cuda.blockIdx.x
        p = b // cblocks
        t = cuda.threadIdx.x
        ty = t // bx
        by = tpb // bx
        c = (b - p * cblocks) * bx + (t - ty * bx)
        r1 = min(outer, (p + 1) * step)
        r = p * step + ty
        mu = 0.0
        if c < C:
            mu = float(mean[c])
        else:
            r = r1
        s = 0.0
        sx = 0.0
        while r < r1:
            g = float(dy[r, c])
            s += g
            sx += g * (float(x[r, c]) - mu)
            r += by
        sa = cuda.shared.array(tpb, float64)
        sb = cuda.shared.array(tpb, float64)
        s, sx = block_sum2(s, sx, t, bx, sa, sb)
        if ty == 0 and c < C:
            partials[0, c, p] = s
            partials[1, c, p] = sx

    @cuda.jit
    def grad_input_planar(dy, x, coef, dx):
        """``dx = k * (dy - a - (x - mean) * b)``, ``coef`` rows (mean, a, b, k)."""
        outer, C, inner = x.shape
        total = outer * C * inner
        o, c, i, do, dc, di = grid_stride_planar(C, inner)
        e = cuda.grid(1)
        while e < total:
            dx[o, c, i] = coef[3, c] * (float(dy[o, c, i]) - coef[1, c]
                                        - (float(x[o, c, i]) - coef[0, c]) * coef[2, c])
            e += cuda.gridsize(1)
            o, c, i = step_planar(o, c, i, do, dc, di, C, inner)

    @cuda.jit
    def grad_input_interleaved(dy, x, coef, dx):
        outer, C = x.shape
        total = outer * C
        o, c, do, dc = grid_stride_interleaved(C)
        e = cuda.grid(1)
        while e < total:
            dx[o, c] = coef[3, c] * (float(dy[o, c]) - coef[1, c]
                                     - (float(x[o, c]) - coef[0, c]) * coef[2, c])
            e += cuda.gridsize(1)
            o, c = step_interleaved(o, c, do, dc, C)

    return {"backward_reduce_planar": backward_reduce_planar,
            "backward_reduce_interleaved": backward_reduce_interleaved,
            "grad_input_planar": grad_input_planar,
            "grad_input_interleaved": grad_input_interleaved}


def backward_reduce_planar(dy, x, mean, partials, parts, step, stream, params):
    """Launch: ``partials[:, c, p]`` = (sum dy, sum dy * (x - mean)) of part ``p``."""
    k = kernels(*params)["backward_reduce_planar"]
    k[x.shape[1] * parts, params[0], stream](dy, x, mean, parts, step, partials)


def backward_reduce_interleaved(dy, x, mean, partials, bx, parts, step, stream, params):
    k = kernels(*params)["backward_reduce_interleaved"]
    k[-(-x.shape[1] // bx) * parts, params[0], stream](dy, x, mean, bx, parts, step, partials)


def grad_input_planar(dy, x, coef, dx, stream, params):
    k = kernels(*params)["grad_input_planar"]
    k[elementwise_grid(x.size, params[0]), params[0], stream](dy, x, coef, dx)


def grad_input_interleaved(dy, x, coef, dx, stream, params):
    k = kernels(*params)["grad_input_interleaved"]
    k[elementwise_grid(x.size, params[0]), params[0], stream](dy, x, coef, dx)
