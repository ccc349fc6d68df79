"""Backward kernels on the GPU: per-channel reductions and ``grad_input``.

The reductions are ``sum(g)`` and ``sum(g * (x - mean))`` in float64, split
across blocks exactly like the statistics (``stats``): threads along a
channel's runs (planar) or across channels (interleaved), a warp-shuffle and
shared-memory tree per block, partials ``[2, C, parts]`` summed in part order by
``finalize`` -- deterministic, no float atomics.

``g`` is the gradient the kernels differentiate: ``dy`` itself, or with
``mask`` the gradient through the fused ReLU, ``dy`` where the forward output
``fo > 0`` and 0 elsewhere (NaN included), as cuDNN does.  It replaces ``dy``
everywhere, and with ``grad_residual`` it is also written out, in the
``grad_input`` pass, as the gradient with respect to the residual.

``grad_input`` reads ``coef`` rows (mean, a, b, k, q, r) from ``finalize``:
training ``dx = k * (g - a - (x - mean) * b)`` (float64 data) or the same
map ``k * g + (q * x + r)`` (data of 4 bytes or fewer, as on the CPU);
inference ``dx = g * k + 0.0`` (the CPU's normalizing pass with centre and
shift 0).  Elementwise, so ``grad_input`` may be ``dy``.
"""

import functools

from numba import cuda, float64

from . import convert
from ._device import INLINE, reducers, run_position, run_step
from .forward import (elementwise_grid, grid_stride_interleaved, grid_stride_planar,
                      step_interleaved, step_planar)

MEAN, A, B, K, Q, R = range(6)


@functools.lru_cache(maxsize=None)
def kernels(tpb, shuffle, unroll, kind, mean_kind="float", mask=False, grad_residual=False,
            training=True):
    """name -> dispatcher for one configuration, storage ``kind`` of the data,
    ``mean_kind`` of ``mean`` (``convert.param_kind``) and epilogue: ``mask``
    (``fo`` is the forward output of a fused ReLU), ``grad_residual`` (``gres``
    is written).  Absent arrays are placeholders, never read or written."""
    _, block_sum2 = reducers(tpb, shuffle)
    load, store = convert.codec(kind)
    load_mean, _ = convert.codec(mean_kind)
    compact = convert.compact(kind)

    @cuda.jit(device=True, **INLINE)
    def grad(dyv, fov):
        """The float64 gradient ``g`` of one element."""
        g = load(dyv)
        if mask:
            if not load(fov) > 0.0:
                g = 0.0
        return g

    @cuda.jit(device=True, **INLINE)
    def grad_value(g, xv, coef, c):
        """``dx`` of one element, rounded for its store."""
        if not training:
            v = g * coef[K, c] + 0.0
        elif compact:
            v = coef[K, c] * g + (coef[Q, c] * load(xv) + coef[R, c])
        else:
            v = coef[K, c] * (g - coef[A, c] - (load(xv) - coef[MEAN, c]) * coef[B, c])
        return store(v)

    @cuda.jit
    def backward_reduce_planar(dy, fo, x, mean, parts, step, partials):
        outer, C, inner = x.shape
        n_all = outer * inner
        b = cuda.blockIdx.x
        c = b // parts
        p = b - c * parts
        t = cuda.threadIdx.x
        j1 = min(n_all, (p + 1) * step)
        j = p * step + t
        o, i, do, di = run_position(j, inner, tpb)
        mu = load_mean(mean[c])
        s = 0.0
        sx = 0.0
        while j < j1:
            g = grad(dy[o, c, i], fo[o, c, i] if mask else dy[o, c, i])
            s += g
            sx += g * (load(x[o, c, i]) - mu)
            j += tpb
            o, i = run_step(o, i, do, di, inner)
        sa = cuda.shared.array(tpb, float64)
        sb = cuda.shared.array(tpb, float64)
        s, sx = block_sum2(s, sx, t, 1, sa, sb)
        if t == 0:
            partials[0, c, p] = s
            partials[1, c, p] = sx

    @cuda.jit
    def backward_reduce_interleaved(dy, fo, x, mean, bx, parts, step, partials):
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
            mu = load_mean(mean[c])
        else:
            r = r1  # a column past the last channel: contributes nothing
        s = 0.0
        sx = 0.0
        while r < r1:
            g = grad(dy[r, c], fo[r, c] if mask else dy[r, c])
            s += g
            sx += g * (load(x[r, c]) - mu)
            r += by
        sa = cuda.shared.array(tpb, float64)
        sb = cuda.shared.array(tpb, float64)
        s, sx = block_sum2(s, sx, t, bx, sa, sb)
        if ty == 0 and c < C:
            partials[0, c, p] = s
            partials[1, c, p] = sx

    @cuda.jit
    def grad_input_planar(dy, fo, x, coef, dx, gres):
        outer, C, inner = x.shape
        total = outer * C * inner
        o, c, i, do, dc, di = grid_stride_planar(C, inner)
        e = cuda.grid(1)
        while e < total:
            g = grad(dy[o, c, i], fo[o, c, i] if mask else dy[o, c, i])
            xv = x[o, c, i]  # both loads before the stores: dx may be dy
            dx[o, c, i] = grad_value(g, xv, coef, c)
            if grad_residual:
                gres[o, c, i] = store(g)
            e += cuda.gridsize(1)
            o, c, i = step_planar(o, c, i, do, dc, di, C, inner)

    @cuda.jit
    def grad_input_interleaved(dy, fo, x, coef, dx, gres):
        outer, C = x.shape
        total = outer * C
        o, c, do, dc = grid_stride_interleaved(C)
        e = cuda.grid(1)
        while e < total:
            g = grad(dy[o, c], fo[o, c] if mask else dy[o, c])
            xv = x[o, c]
            dx[o, c] = grad_value(g, xv, coef, c)
            if grad_residual:
                gres[o, c] = store(g)
            e += cuda.gridsize(1)
            o, c = step_interleaved(o, c, do, dc, C)

    return {"backward_reduce_planar": backward_reduce_planar,
            "backward_reduce_interleaved": backward_reduce_interleaved,
            "grad_input_planar": grad_input_planar,
            "grad_input_interleaved": grad_input_interleaved}


def _kernel(name, dy, mean, fo, gres, training, params):
    return kernels(*params, convert.kind(dy.dtype), convert.param_kind(mean.dtype),
                   fo is not None, gres is not None, bool(training))[name]


def backward_reduce_planar(dy, x, mean, partials, parts, step, stream, params,
                           forward_out=None):
    """Launch: ``partials[:, c, p]`` = (sum g, sum g * (x - mean)) of part ``p``."""
    k = _kernel("backward_reduce_planar", dy, mean, forward_out, None, True, params)
    k[x.shape[1] * parts, params[0], stream](
        dy, dy if forward_out is None else forward_out, x, mean, parts, step, partials)


def backward_reduce_interleaved(dy, x, mean, partials, bx, parts, step, stream, params,
                                forward_out=None):
    k = _kernel("backward_reduce_interleaved", dy, mean, forward_out, None, True, params)
    k[-(-x.shape[1] // bx) * parts, params[0], stream](
        dy, dy if forward_out is None else forward_out, x, mean, bx, parts, step, partials)


def _grad_input(name, dy, x, coef, dx, stream, params, training, forward_out, grad_residual):
    k = _kernel(name, dy, coef, forward_out, grad_residual, training, params)
    k[elementwise_grid(x.size, params[0]), params[0], stream](
        dy, dy if forward_out is None else forward_out, x, coef, dx,
        dx if grad_residual is None else grad_residual)


def grad_input_planar(dy, x, coef, dx, stream, params, training=True, forward_out=None,
                      grad_residual=None):
    """Launch: ``dx`` (and ``grad_residual = g``) of ``(outer, C, inner)`` views."""
    _grad_input("grad_input_planar", dy, x, coef, dx, stream, params, training,
                forward_out, grad_residual)


def grad_input_interleaved(dy, x, coef, dx, stream, params, training=True, forward_out=None,
                           grad_residual=None):
    _grad_input("grad_input_interleaved", dy, x, coef, dx, stream, params, training,
                forward_out, grad_residual)
