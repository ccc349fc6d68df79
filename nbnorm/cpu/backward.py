"""Backward kernels: per-channel reductions and the training-mode ``grad_input``.

The reductions are ``sum(dy)`` and ``sum(dy * (x - mean))`` in float64, split
into parts exactly like the statistics (see ``stats``) and summed in part order,
so they too are bitwise independent of the thread count.

``train_planar`` fuses both: one task per channel reduces the channel, then
computes its ``grad_input`` while ``dy`` and ``x`` are still in L2/L3.  It runs
the same functions on the same parts in the same order as
``backward_reduce_planar`` + ``grad_input_planar``, so the two paths agree bit
for bit.  ``backward_serial_*`` do everything on the calling thread for small
batches.  ``mean``, ``invstd``, ``weight`` are float64; ``weight`` may have
length 0 (scale 1).  float32 ``grad_input`` is computed as ``k*dy + (q*x + r)``
by every kernel, planar or interleaved (``_grad_rows``), in float64; half
``grad_input`` in the centred form in float32 (``convert``: the mean moved to
a float32 value, ``a`` compensating, the coefficients rounded once).  A planar batch of
short runs reduces by channel groups and writes ``grad_input`` by
``grad_input_interleaved`` over rows of ``C * inner`` values (``ops``).
"""

import numpy as np
from numba import njit, prange

from . import per_channel, streaming
from .convert import centre, coef, compact, load, store, value
from .epilogue import cut, flat, grad, put, row, run
from .epilogue import wide as wide_rows
from .forward import _normalize_run, normalize_serial_interleaved, recentred
from .stats import _FM, group_task, tile, widen

_grad_coeffs = per_channel.math.grad_coeffs
_affine_coeffs = per_channel.math.affine_coeffs


@njit(cache=True, fastmath=_FM)
def _run_dual_sum(dy, fo, x, m):
    """``sum(g)``, ``sum(g * (x - m))`` of a run, ``g`` the gradient through the
    ReLU mask of ``fo`` (None: ``dy`` itself; ``epilogue.grad``)."""
    s = 0.0
    sx = 0.0
    for i in range(dy.size):
        g = np.float64(grad(dy, fo, i))  # the sums are float64 for every dtype
        s += g
        sx += g * (load(x[i]) - m)
    return s, sx


@njit(cache=True)
def mask_relu(dy, fo, g):
    """``g = dy * (fo > 0)`` of flat arrays (``g`` may be ``dy``): the masked
    gradient, for inference-mode backward (``ops``)."""
    for i in range(g.size):
        g[i] = store(grad(dy, fo, i), g)


@njit(cache=True)
def _planar_part_dual_sums(dy, fo, x, c0, c1, j0, j1, mean, s, sx):
    """``sum(dy)`` and ``sum(dy * (x - mean[c]))`` of elements ``[j0, j1)`` of each
    channel ``c0 <= c < c1`` into ``s[c - c0]``, ``sx[c - c0]``: the channels' runs
    row by row, each channel's in order (see ``stats.planar_group``)."""
    inner = x.shape[2]
    G = c1 - c0
    s[:G] = 0.0
    sx[:G] = 0.0
    for o in range(j0 // inner, -(-j1 // inner)):
        i0 = max(0, j0 - o * inner)
        i1 = min(inner, j1 - o * inner)
        for g in range(G):
            c = c0 + g
            a, b = _run_dual_sum(dy[o, c, i0:i1], cut(fo, o, c, i0, i1), x[o, c, i0:i1],
                                 np.float64(mean[c]))
            s[g] += a
            sx[g] += b


@njit(cache=True)
def _planar_channel_dual_sums(dy, fo, x, c0, c1, parts, mean, sum_dy_out, sum_dy_xmu_out):
    """``backward_reduce_planar`` for channels ``[c0, c1)``, all parts in one task."""
    n = x.shape[0] * x.shape[2]
    step = -(-n // parts)
    G = c1 - c0
    w = np.empty((2, G))
    sum_dy_out[c0:c1] = 0.0
    sum_dy_xmu_out[c0:c1] = 0.0
    for p in range(parts):
        j0 = min(n, p * step)
        _planar_part_dual_sums(dy, fo, x, c0, c1, j0, min(n, j0 + step), mean, w[0], w[1])
        for g in range(G):
            sum_dy_out[c0 + g] += w[0, g]
            sum_dy_xmu_out[c0 + g] += w[1, g]


@njit(parallel=True, cache=True)
def backward_reduce_planar(dy, fo, x, mean, parts, group, sum_dy_out, sum_dy_xmu_out):
    """One task per (group of ``group`` channels, part) (``stats.planar_group``);
    ``fo``: the ReLU mask's forward output, or None."""
    outer, C, inner = x.shape
    n = outer * inner
    groups = -(-C // group)
    ps = np.empty((parts, C))
    psx = np.empty((parts, C))
    for t in prange(groups * parts):
        p, c0, c1, j0, j1 = group_task(t, parts, group, C, n)
        _planar_part_dual_sums(dy, fo, x, c0, c1, j0, j1, mean, ps[p, c0:c1], psx[p, c0:c1])
    for c in prange(C):
        s = 0.0
        sx = 0.0
        for p in range(parts):
            s += ps[p, c]
            sx += psx[p, c]
        sum_dy_out[c] = s
        sum_dy_xmu_out[c] = sx


@njit(cache=True, fastmath=_FM)
def _rows_dual_sum(dy, fo, x, r0, r1, mean, s, sx, unroll_c):
    """Per-channel sums over rows ``[r0, r1)``, four rows per update of the
    accumulators (their loads and stores dominate; see ``stats._rows_sum``)."""
    s[:] = 0.0
    sx[:] = 0.0
    r = r0
    while r + 4 <= r1 and s.size >= unroll_c:
        g0 = dy[r]
        g1 = dy[r + 1]
        g2 = dy[r + 2]
        g3 = dy[r + 3]
        f0 = row(fo, r)
        f1 = row(fo, r + 1)
        f2 = row(fo, r + 2)
        f3 = row(fo, r + 3)
        x0 = x[r]
        x1 = x[r + 1]
        x2 = x[r + 2]
        x3 = x[r + 3]
        for c in range(s.size):
            m = mean[c]
            a0 = np.float64(grad(g0, f0, c))  # the sums are float64 for every dtype
            a1 = np.float64(grad(g1, f1, c))
            a2 = np.float64(grad(g2, f2, c))
            a3 = np.float64(grad(g3, f3, c))
            s[c] += (a0 + a1) + (a2 + a3)
            sx[c] += ((a0 * (load(x0[c]) - m) + a1 * (load(x1[c]) - m))
                      + (a2 * (load(x2[c]) - m) + a3 * (load(x3[c]) - m)))
        r += 4
    while r < r1:
        gr = dy[r]
        fr = row(fo, r)
        xr = x[r]
        for c in range(s.size):
            g = np.float64(grad(gr, fr, c))
            s[c] += g
            sx[c] += g * (load(xr[c]) - mean[c])
        r += 1


@njit(cache=True)
def _finish_interleaved(dy, fo, x, mean, wide, unroll_c, work, sum_dy_out, sum_dy_xmu_out):
    """Per-channel sums from the parts' wide-row sums (``work[p, 0]``,
    ``work[p, 1]``: added in part order, then the column groups in group order),
    plus the ``outer % wide`` narrow rows left over."""
    outer, C = x.shape
    ow = outer // wide
    ws = work[0, 0]
    wsx = work[0, 1]
    for p in range(1, work.shape[0]):
        for i in range(ws.size):
            ws[i] += work[p, 0, i]
            wsx[i] += work[p, 1, i]
    sum_dy_out[:] = 0.0
    sum_dy_xmu_out[:] = 0.0
    for j in range(wide):
        for c in range(C):
            sum_dy_out[c] += ws[j * C + c]
            sum_dy_xmu_out[c] += wsx[j * C + c]
    if outer > ow * wide:
        r = np.empty((2, C))
        _rows_dual_sum(dy, fo, x, ow * wide, outer, mean, r[0], r[1], unroll_c)
        for c in range(C):
            sum_dy_out[c] += r[0, c]
            sum_dy_xmu_out[c] += r[1, c]


@njit(parallel=True, cache=True)
def backward_reduce_interleaved(dy, fo, x, mean, wide, parts, unroll_c, sum_dy_out,
                                sum_dy_xmu_out, work):
    """``x`` viewed as wide rows of ``wide`` rows each (``stats.wide_rows``).  ``work``: float64
    scratch of shape ``(parts, 2, wide*C)`` kept by the caller (see
    ``stats.channel_stats_interleaved``)."""
    dyw = widen(dy, wide)
    fow = wide_rows(fo, wide)
    xw = widen(x, wide)
    mw = tile(mean, wide)
    ow = xw.shape[0]
    step = -(-ow // parts)
    for p in prange(parts):
        r0 = min(ow, p * step)
        r1 = min(ow, r0 + step)
        _rows_dual_sum(dyw, fow, xw, r0, r1, mw, work[p, 0], work[p, 1], unroll_c)
    _finish_interleaved(dy, fo, x, mean, wide, unroll_c, work, sum_dy_out, sum_dy_xmu_out)


@njit(cache=True, inline="always")
def grad_coeffs(c, n, s, sx, inv, weight):
    """``(a, b, k)`` of ``dx = k * (dy - a - (x - mean) * b)`` in float64, for any
    float dtype of ``inv`` and ``weight``; ``ops`` computes the same expressions
    with NumPy."""
    inv = np.float64(inv)
    return _grad_coeffs(n, s, sx, inv, np.float64(weight[c]) if weight.size else 1.0)


@njit(cache=True)
def _grad_run(gr, fr, xr, yr, er, m, a, b, k, stream):
    """``yr = k * (g - a - (xr - m) * b)`` for scalar coefficients (compact data:
    ``k * g + (q * xr + r)``, see ``_grad_rows``), ``g`` the run of ``gr``
    through the ReLU mask of ``fr`` (None: ``gr`` itself), written to ``er``
    too unless it is None (``epilogue``); ``stream``: its whole lines with
    streaming stores (``streaming``), the same bits."""
    h, e = streaming.span(yr) if stream else (yr.size, yr.size)
    if compact(xr):  # a constant of the compiled signature
        q, r = _affine_coeffs(m, a, b, k)
        kc, qc, rc = coef(k, xr), coef(q, xr), coef(r, xr)
        for i in range(h):
            g = grad(gr, fr, i)
            yr[i] = store(kc * g + (qc * value(xr[i]) + rc), yr)
            put(er, i, g)
        if e > h:
            streaming.grad_affine_lines(yr, h, e, gr, xr, kc, qc, rc, fr, er)
        for i in range(e, yr.size):
            g = grad(gr, fr, i)
            yr[i] = store(kc * g + (qc * value(xr[i]) + rc), yr)
            put(er, i, g)
    else:
        m64, a64 = centre(m, b, a, xr)  # the same map: -(x - m) * b - a
        mc, ac, bc, kc = coef(m64, xr), coef(a64, xr), coef(b, xr), coef(k, xr)
        for i in range(h):
            g = grad(gr, fr, i)
            yr[i] = store(kc * (g - ac - (value(xr[i]) - mc) * bc), yr)
            put(er, i, g)
        if e > h:
            streaming.grad_lines(yr, h, e, gr, xr, mc, ac, bc, kc, fr, er)
        for i in range(e, yr.size):
            g = grad(gr, fr, i)
            yr[i] = store(kc * (g - ac - (value(xr[i]) - mc) * bc), yr)
            put(er, i, g)


@njit(cache=True)
def _grad_rows(dy, fo, x, r0, r1, mean, a, b, k, q, r, dx, gres):
    """``dx`` of rows ``[r0, r1)``; ``q``, ``r`` from ``_affine_coeffs``; ``mean``
    and ``a`` ``forward.recentred`` (with ``b``).

    float32 data use ``k*dy + (q*x + r)``: two multiply-adds and three
    coefficient loads instead of four operations and four loads (NC 8192x1024
    grad pass, x copy time, same process: 1.91/1.63/1.40 -> 1.70/1.48/1.31).  In
    float64 arithmetic its cancellation, ~1e-16 * |mean| / std relative, is far
    below float32's rounding; float64 data keep the centred form, which does
    not lose digits to a large mean.  Half data take the centred form in
    float32 arithmetic, the mean moved to a float32 value
    (``forward._normalize_rows``).
    ``fo`` (the ReLU mask's forward output) and ``gres`` (``grad_residual``,
    written with the masked gradient) may be None (``epilogue``).
    """
    for i in range(r0, r1):
        gr = dy[i]
        fr = row(fo, i)
        xr = x[i]
        yr = dx[i]
        er = row(gres, i)
        if compact(x):  # a constant of the compiled signature
            for c in range(yr.size):
                g = grad(gr, fr, c)
                yr[c] = store(coef(k[c], xr) * g + (coef(q[c], xr) * value(xr[c])
                                                    + coef(r[c], xr)), yr)
                put(er, c, g)
        else:
            for c in range(yr.size):
                g = grad(gr, fr, c)
                yr[c] = store(coef(k[c], xr) * (g - coef(a[c], xr) - (value(xr[c])
                                                                   - coef(mean[c], xr))
                                                 * coef(b[c], xr)), yr)
                put(er, c, g)


@njit(cache=True)
def _grad_values(gf, ff, xf, yf, ef, i0, i1, C, mean, a, b, k, q, r):
    """``_grad_rows`` of the values ``[i0, i1)`` of rows of ``C`` laid end to end;
    ``ff`` and ``ef``: ``fo`` and ``gres`` as 1-D, or None."""
    c = i0 % C
    for i in range(i0, i1):
        g = grad(gf, ff, i)
        if compact(xf):
            yf[i] = store(coef(k[c], xf) * g + (coef(q[c], xf) * value(xf[i]) + coef(r[c], xf)),
                          yf)
        else:
            yf[i] = store(coef(k[c], xf) * (g - coef(a[c], xf) - (value(xf[i])
                                                                 - coef(mean[c], xf))
                                             * coef(b[c], xf)), yf)
        put(ef, i, g)
        c = c + 1 if c + 1 < C else 0


@njit(cache=True)
def _grad_span(gf, ff, xf, yf, ef, i0, i1, C, mean, a, b, k, q, r, stream):
    """``_grad_values`` of ``[i0, i1)`` with a ``streaming`` column intrinsic for
    the whole vectors, as ``forward._normalize_span``."""
    h, e = streaming.cols_span(yf[i0:i1], stream)
    _grad_values(gf, ff, xf, yf, ef, i0, i0 + h, C, mean, a, b, k, q, r)
    if e > h:
        if compact(xf):
            streaming.grad_affine_cols(yf, i0 + h, i0 + e, (i0 + h) % C, C, stream, gf, xf,
                                       k, q, r, ff, ef)
        else:
            streaming.grad_cols(yf, i0 + h, i0 + e, (i0 + h) % C, C, stream, gf, xf, mean,
                                a, b, k, ff, ef)
    _grad_values(gf, ff, xf, yf, ef, i0 + e, i1, C, mean, a, b, k, q, r)


@njit(parallel=True, cache=True)
def grad_input_planar(dy, fo, x, mean, a, b, k, dx, gres, stream, tasks, step):
    """``dx = k[c] * (g - a[c] - (x - mean[c]) * b[c])``, ``g = dy`` through the
    ReLU mask of ``fo``, also written to ``gres`` (both may be None);
    ``stream``: streaming stores (``streaming``), a fence at the end of each
    task; ``(tasks, step)``: ``forward.task_split``."""
    outer, C, inner = x.shape
    for t in prange(tasks):
        for j in range(t * step, min(outer * C, (t + 1) * step)):
            o, c = divmod(np.int64(j), C)
            _grad_run(dy[o, c], run(fo, o, c), x[o, c], dx[o, c], run(gres, o, c), mean[c],
                      a[c], b[c], k[c], stream)
        if stream:
            streaming.fence()


@njit(parallel=True, cache=True)
def grad_input_interleaved(dy, fo, x, mean, a, b, k, dx, gres, stream, tasks, step,
                           repeat=1):
    """``grad_input_planar`` of ``x[outer, C]``; ``dx`` may be ``dy``.  A task's rows are one
    run, as in ``forward.normalize_interleaved``; each coefficient serves
    ``repeat`` consecutive columns (a planar batch of short runs viewed as rows
    of ``C * inner``: ``repeat = inner``, the bits of ``grad_input_planar``)."""
    outer, C = x.shape
    gf = dy.reshape(-1)
    ff = flat(fo)
    xf = x.reshape(-1)
    yf = dx.reshape(-1)
    ef = flat(gres)
    if compact(dx):  # only k, q and r are read (``_grad_rows``)
        q, r = _affine_coeffs(mean, a, b, k)
        kp = streaming.periodic(k, dx, repeat)
        qp = streaming.periodic(q, dx, repeat)
        rp = streaming.periodic(r, dx, repeat)
        mp = ap = bp = kp
    else:  # only mean, a, b and k
        mc, ac = recentred(mean, b, a, x)
        mp = streaming.periodic(mc, dx, repeat)
        ap = streaming.periodic(ac, dx, repeat)
        bp = streaming.periodic(b, dx, repeat)
        kp = streaming.periodic(k, dx, repeat)
        qp = rp = kp
    for t in prange(tasks):
        r0 = min(outer, t * step)
        r1 = min(outer, r0 + step)
        _grad_span(gf, ff, xf, yf, ef, r0 * C, r1 * C, C, mp, ap, bp, kp, qp, rp, stream)
        if stream:
            streaming.fence()


@njit(cache=True)
def _planar_channel(dy, fo, x, c, mean, invstd, weight, parts, training, dx, gres, sum_dy_out,
                    sum_dy_xmu_out, stream):
    """The whole backward of channel ``c`` of ``x[outer, C, inner]``: its sums,
    then its ``dx`` while the channel is still in cache.  Inference mode
    (``training=False``) writes ``dx = dy * invstd * weight``.  ``stream`` as in
    ``_grad_run``."""
    outer, C, inner = x.shape
    m = np.float64(mean[c])
    _planar_channel_dual_sums(dy, fo, x, c, c + 1, parts, mean, sum_dy_out, sum_dy_xmu_out)
    s = sum_dy_out[c]
    sx = sum_dy_xmu_out[c]
    a, b, k = grad_coeffs(c, outer * inner, s, sx, invstd[c], weight)
    for o in range(outer):
        if training:
            _grad_run(dy[o, c], run(fo, o, c), x[o, c], dx[o, c], run(gres, o, c), m, a, b, k,
                      stream)
        else:  # the affine map's gradient (``ops`` applied any mask): dx does not depend on x
            _normalize_run(dy[o, c], None, dx[o, c], 0.0, k, 0.0, None, stream)


@njit(parallel=True, cache=True)
def train_planar(dy, fo, x, mean, invstd, weight, parts, dx, gres, sum_dy_out, sum_dy_xmu_out,
                 stream):
    """Training-mode backward of ``x[outer, C, inner]``, one task per channel;
    ``fo``, ``gres`` and ``stream`` as in ``grad_input_planar``."""
    for c in prange(x.shape[1]):
        _planar_channel(dy, fo, x, c, mean, invstd, weight, parts, True, dx, gres, sum_dy_out,
                        sum_dy_xmu_out, stream)
        if stream:
            streaming.fence()


@njit(cache=True)
def _weight_bias_grads(s, sx, invstd, grad_weight, grad_bias):
    """``grad_weight = sx * invstd`` and ``grad_bias = s``, as ``ops.backward``
    computes them with NumPy (float64, rounded once to the outputs' dtype)."""
    for c in range(s.size):
        grad_weight[c] = sx[c] * np.float64(invstd[c])
        grad_bias[c] = s[c]


@njit(cache=True)
def backward_serial_planar(dy, fo, x, mean, invstd, weight, parts, training, dx, gres,
                           grad_weight, grad_bias):
    """A whole backward call for a small ``x[outer, C, inner]`` on the calling
    thread, in one Numba call (``mean``, ``invstd``, ``weight`` of any float dtype)."""
    C = x.shape[1]
    s = np.empty(C)
    sx = np.empty(C)
    for c in range(C):
        _planar_channel(dy, fo, x, c, mean, invstd, weight, parts, training, dx, gres, s, sx,
                        False)
    _weight_bias_grads(s, sx, invstd, grad_weight, grad_bias)


@njit(cache=True)
def backward_serial_interleaved(dy, fo, x, mean, invstd, weight, wide, parts, unroll_c,
                                training, dx, gres, grad_weight, grad_bias):
    """``backward_serial_planar`` for ``x[outer, C]``."""
    outer, C = x.shape
    s = np.empty(C)
    sx = np.empty(C)
    dyw = widen(dy, wide)
    fow = wide_rows(fo, wide)
    xw = widen(x, wide)
    mw = tile(mean, wide)
    ow = xw.shape[0]
    step = -(-ow // parts)
    work = np.empty((parts, 2, xw.shape[1]))
    for p in range(parts):
        r0 = min(ow, p * step)
        _rows_dual_sum(dyw, fow, xw, r0, min(ow, r0 + step), mw, work[p, 0], work[p, 1],
                       unroll_c)
    _finish_interleaved(dy, fo, x, mean, wide, unroll_c, work, s, sx)
    a = np.empty(C)
    b = np.empty(C)
    k = np.empty(C)
    for c in range(C):
        a[c], b[c], k[c] = grad_coeffs(c, outer, s[c], sx[c], invstd[c], weight)
    if training:
        q, r = _affine_coeffs(mean, a, b, k)
        mc, ac = recentred(mean, b, a, x)
        _grad_rows(dyw, fow, xw, 0, ow, tile(mc, wide), tile(ac, wide), tile(b, wide),
                   tile(k, wide), tile(q, wide), tile(r, wide), widen(dx, wide),
                   wide_rows(gres, wide))
        _grad_rows(dy, fo, x, ow * wide, outer, mc, ac, b, k, q, r, dx, gres)
    else:  # the affine map's gradient (``ops`` applied any mask): dx does not depend on x
        a[:] = 0.0
        normalize_serial_interleaved(dy, wide, a, k, a, dx, None, None)
    _weight_bias_grads(s, sx, invstd, grad_weight, grad_bias)
