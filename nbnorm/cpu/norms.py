"""Group, layer, instance and RMS normalization on the CPU: batch norm's kernels
over other reduction axes.

``nbnorm.norms`` hands every call over as one *group view* of ``x``,
``(N, S, G, K, R)`` in memory order: ``N`` samples, statistics per
``(sample, group)`` ``u = n * G + g`` over its ``S * K * R`` values, the affine
parameters per channel ``c = g * K + k``, constant over runs of ``R`` values
(``nbnorm.norms`` lists the view of each normalization).  Two memory patterns
follow, as for batch norm:

- **planar** (``S == 1``: group and instance norm of NCHW, layer and RMS norm):
  each unit is ``K * R`` contiguous values, seen as ``x[U, K, R]``.  Its moments
  are batch norm's planar ones with a unit as the channel of a ``(1, U, K * R)``
  view (``stats.channel_moments_planar``, blocked two-pass, Chan-merged in
  float64).  When a unit takes one part (``stats.planar_parts``: all but a few
  huge units) one task reduces its units and normalizes them while they are in
  cache (``forward_planar``), or reduces ``dy`` and ``x`` and writes ``dx``
  (``backward_planar``).  Runs of ``R > 1`` values take batch norm's run
  functions with the run's scalar coefficients (``forward._normalize_run``,
  ``backward._run_dual_sum``); runs of one value (layer norm's element-wise
  weight) the column loops below.  Huge units reduce by parts
  (``stats.channel_stats_planar``) and normalize by chunks.
- **interleaved** (``S > 1``: channels-last group and instance norm): each row of
  ``x[N, S, C * R]`` holds a value of every group.  Per-sample column moments are
  batch norm's interleaved ones (``stats._interleaved_part``, ``_finish_interleaved``),
  folded into groups with Chan's merge in column order; the normalizing and
  gradient passes are batch norm's row passes with per-sample coefficient tables.

Every split (tasks, parts, chunks, wide rows) is a function of the shape only,
and partial sums are merged in a fixed order, so the results are bitwise the
same for every thread count.  Statistics are float64 ``(mean, M2)`` of each
unit; RMS normalization takes ``invrms`` from the same moments and centres at
0.  ``nbnorm.cuda.norms`` has the same ``forward`` and ``backward``.

The gradient of a unit with statistics ``(mu, inv)`` and weight ``w[c]`` is
batch norm's with ``g = w * dy``: ``dx = k * (w * dy - a - (x - mu) * b)``
(float64 data), ``(k * w) * dy + (q * x + r)`` (data of 4 bytes or fewer), with
``(a, b, k)`` from ``channel.grad_coeffs`` over the unit (``a = 0`` for RMS,
``a = b = 0`` for statistics that are constants) and ``(q, r)`` from
``channel.affine_coeffs``; ``grad_weight[c] = sum(dy * (x - mu) * inv)`` and
``grad_bias[c] = sum(dy)`` are accumulated per task and added in task order.
"""

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from .. import channel, config
from . import per_channel, stats, streaming
from .backward import _finish_interleaved as _finish_dual_sums
from .backward import _grad_span, _rows_dual_sum, _run_dual_sum
from .convert import (centre, coef, compact, compact_dtype, compact_type, compute_dtype, load,
                      store, value)
from .epilogue import _none, cut, finish, flat, grad, put, row, run
from .epilogue import wide as wide_rows
from .forward import _normalize_run, _normalize_span, task_split
from .ops import _work
from .stats import _FM, widen
from .streaming import fence
from .threads import launching

_invstd = per_channel.math.invstd
_invrms = per_channel.math.invrms
_grad_coeffs = per_channel.math.grad_coeffs
_affine_coeffs = per_channel.math.affine_coeffs
_offset = per_channel.math.offset
_chan_merge = per_channel.math.chan_merge


# ------------------------------------------------------------ small helpers

def part(v, j0, j1):
    """``v[j0:j1]`` of an array, the scalar ``v`` itself, or None.  The loops below
    run over such slices from 0: with a start not known to be >= 0 Numba keeps
    its negative-index wraparound in the loop, which then does not vectorize
    (a layer-norm row, one core: 1.8 against 0.3 ns a value)."""


@overload(part, inline="always")
def _part(v, j0, j1):
    if _none(v):
        return lambda v, j0, j1: None
    if isinstance(v, types.Array):
        return lambda v, j0, j1: v[j0:j1]
    return lambda v, j0, j1: v


def at(v, i):
    """``v[i]`` of an array, or the scalar ``v`` itself: one loop serves per-value
    and per-run coefficients."""


@overload(at, inline="always")
def _at(v, i):
    if isinstance(v, types.Array):
        return lambda v, i: np.float64(v[i])
    return lambda v, i: np.float64(v)


# Streaming stores (``streaming``) for the loops with a coefficient per value:
# batch norm's intrinsics with these expressions, the same operations in the
# same types and order as the scalar loops below (the coefficients in float64,
# then cast to the compute type: ``f.coef``, ``convert.coef``), so the bits do
# not depend on which part of a run is streamed.

def _scaled_affine(f, x, w, b, m, inv):
    """``(x - m) * (inv * w) + b``: ``_normalize_values``."""
    s = f.mul(inv, w)
    mc, bc = f.centre(m, s, b)
    return f.add(f.mul(f.sub(x, f.coef(mc)), f.coef(s)), f.coef(bc))


def _scaled_offset(f, x, w, b, m, inv):
    """``x * s + (b - m * s)``, ``s = inv * w``: ``_normalize_values``, compact data."""
    s = f.mul(inv, w)
    return f.add(f.mul(x, f.coef(s)), f.coef(f.sub(b, f.mul(m, s))))


def _weighted_grad(f, dy, x, w, m, a, b, k):
    """``k * (w * dy - a - (x - m) * b)``: ``_grad_values``."""
    mc, ac = f.centre(m, b, a)
    return f.mul(f.coef(k), f.sub(f.sub(f.mul(f.coef(w), dy), f.coef(ac)),
                                  f.mul(f.sub(x, f.coef(mc)), f.coef(b))))


def _weighted_grad_affine(f, dy, x, w, k, q, r):
    """``(k * w) * dy + (q * x + r)``: ``_grad_values``, compact data."""
    return f.add(f.mul(f.coef(f.mul(k, w)), dy), f.add(f.mul(f.coef(q), x), f.coef(r)))


@intrinsic
def scaled_affine_lines(typingctx, y, i0, i1, x, w, b, m, inv, res, act):
    return streaming._lines(_scaled_affine, streaming._FORWARD, y, i0, i1, x, w, b, m, inv,
                            res, act)


@intrinsic
def scaled_offset_lines(typingctx, y, i0, i1, x, w, b, m, inv, res, act):
    return streaming._lines(_scaled_offset, streaming._FORWARD, y, i0, i1, x, w, b, m, inv,
                            res, act)


@intrinsic
def weighted_grad_lines(typingctx, y, i0, i1, dy, x, w, m, a, b, k, fo, gres):
    return streaming._lines(_weighted_grad, streaming._BACKWARD, y, i0, i1, dy, x, w, m, a,
                            b, k, fo, gres)


@intrinsic
def weighted_grad_affine_lines(typingctx, y, i0, i1, dy, x, w, k, q, r, fo, gres):
    return streaming._lines(_weighted_grad_affine, streaming._BACKWARD, y, i0, i1, dy, x, w,
                            k, q, r, fo, gres)


def _compact_type(a):
    """``convert.compact`` at typing time.  The overloads below pick their form by
    it, so that a kernel compiles the form its dtype runs only (a branch on
    ``compact(x)`` compiles both)."""
    return compact_type(a.dtype)


def normalize_lines(yr, h, e, xr, w, b, m, inv, rr, act):
    """The streamed middle of ``_normalize_streamed``, in ``xr``'s form."""


@overload(normalize_lines, inline="always")
def _normalize_lines(yr, h, e, xr, w, b, m, inv, rr, act):
    if _compact_type(xr):
        return lambda yr, h, e, xr, w, b, m, inv, rr, act: scaled_offset_lines(
            yr, h, e, xr, w, b, m, inv, rr, act)
    return lambda yr, h, e, xr, w, b, m, inv, rr, act: scaled_affine_lines(
        yr, h, e, xr, w, b, m, inv, rr, act)


def grad_lines(yr, h, e, gr, xr, w, m, a, b, k, fr, er):
    """The streamed middle of ``_grad_streamed``, in ``xr``'s form."""


@overload(grad_lines, inline="always")
def _grad_lines(yr, h, e, gr, xr, w, m, a, b, k, fr, er):
    if _compact_type(xr):
        def compact_form(yr, h, e, gr, xr, w, m, a, b, k, fr, er):
            q, r = _affine_coeffs(m, a, b, k)
            weighted_grad_affine_lines(yr, h, e, gr, xr, w, k, q, r, fr, er)
        return compact_form
    return lambda yr, h, e, gr, xr, w, m, a, b, k, fr, er: weighted_grad_lines(
        yr, h, e, gr, xr, w, m, a, b, k, fr, er)


@njit(cache=True, inline="always")
def unit_invstd(mu, m2, n, eps, rms):
    """A unit's ``invstd`` (``invrms`` for RMS normalization) from its moments."""
    return _invrms(mu, m2, n, eps) if rms else _invstd(m2, n, eps)


# ------------------------------------------------------------ forward

@njit(cache=True)
def _normalize_values(xr, rr, yr, m, inv, w, b, act):
    """``yr[j] = act((xr[j] - m) * s + b[j] + rr[j])`` with ``s = inv * w[j]``
    (compact data: ``xr * s + (b - m * s)``), the coefficients arrays or scalars
    (``at``): batch norm's ``_normalize_run`` with a coefficient per value, as
    layer norm's element-wise weight needs."""
    for j in range(yr.size):
        s = at(inv, j) * at(w, j)
        if compact(xr):  # a constant of the compiled signature; each branch stores
            # its own type (half data: float32, ``convert.coef``)
            v = value(xr[j]) * coef(s, xr) + coef(_offset(at(m, j), s, at(b, j)), xr)
            yr[j] = store(finish(v, rr, j, act), yr)
        else:
            m64, b64 = centre(at(m, j), s, at(b, j), xr)
            v = (value(xr[j]) - coef(m64, xr)) * coef(s, xr) + coef(b64, xr)
            yr[j] = store(finish(v, rr, j, act), yr)


@njit(cache=True)
def _normalize_streamed(xr, rr, yr, m, inv, w, b, act, stream):
    """``_normalize_values`` (scalar ``m``, ``inv``; arrays ``w``, ``b``) with the
    whole 64-byte lines of ``yr`` streamed when ``stream``: the same bits."""
    h, e = streaming.span(yr) if stream else (yr.size, yr.size)
    _normalize_values(xr[:h], part(rr, 0, h), yr[:h], m, inv, w[:h], b[:h], act)
    if e > h:
        normalize_lines(yr, h, e, xr, w, b, m, inv, rr, act)
    n = yr.size
    _normalize_values(xr[e:], part(rr, e, n), yr[e:], m, inv, w[e:], b[e:], act)


def _normalize_unit(x, res, out, u, j0, j1, m, inv, w, b, act, stream):
    """Values ``[j0, j1)`` of unit ``u`` of ``x`` into ``out`` (and the residual
    ``res``, None or like ``x``) with its statistics ``m``, ``inv`` and its
    float64 affine parameters ``w``, ``b``: ``x[U, L]`` has a weight per value
    (layer norm: the column loop), ``x[U, K, R]`` one per run of ``R``
    (``forward._normalize_run``).  The pattern is the array's type: rows of
    ``x[U, L]`` are plain views, where a reshape of a 3-D unit costs ~0.3 ns a
    value of a 1024-value row."""


@overload(_normalize_unit)
def _normalize_unit_impl(x, res, out, u, j0, j1, m, inv, w, b, act, stream):
    if x.ndim == 2:
        def columns(x, res, out, u, j0, j1, m, inv, w, b, act, stream):
            _normalize_streamed(x[u, j0:j1], part(row(res, u), j0, j1), out[u, j0:j1], m, inv,
                                w[j0:j1], b[j0:j1], act, stream)
        return columns

    def runs(x, res, out, u, j0, j1, m, inv, w, b, act, stream):
        R = x.shape[2]
        for k in range(j0 // R, -(-j1 // R)):
            i0 = max(0, j0 - k * R)
            i1 = min(R, j1 - k * R)
            _normalize_run(x[u, k, i0:i1], cut(res, u, k, i0, i1), out[u, k, i0:i1], m,
                           inv * w[k], b[k], act, stream)
    return runs


@njit(parallel=True, cache=True)
def forward_planar(x, G, block, group, chunks, step, eps, rms, given, weight, bias, mu, m2,
                   inv, out, stream, res, act):
    """Group-view normalization of ``x[U, K, R]`` or ``x[U, L]`` (``U = N * G``
    units, ``_normalize_unit``).

    Task ``t`` takes units ``[t // chunks * group, ...)`` (``group`` of them) and
    values ``[t % chunks * step, ...)`` of each.  Unless ``given``, each task
    first computes its units' float64 moments into ``mu``, ``m2`` and
    ``inv = unit_invstd(...)`` (``chunks == 1``: a unit in one task, while it is
    in cache); ``given``: ``mu`` and ``inv`` hold the statistics.  ``weight``,
    ``bias``: float64 ``(G, K)``.  ``rms``: centre at 0 (``mu`` is still the
    mean).  ``stream``: streaming stores and a fence per task."""
    U = x.shape[0]
    L = x.size // U
    xl = x.reshape((1, U, L))
    tasks = -(-U // group) * chunks
    for t in prange(tasks):
        gi, ci = divmod(np.int64(t), chunks)
        u0 = gi * group
        u1 = min(U, u0 + group)
        j0 = min(L, ci * step)
        j1 = min(L, j0 + step)
        if not given:
            stats.channel_moments_planar(xl, u0, u1, 1, block, mu, m2)
            for u in range(u0, u1):
                inv[u] = unit_invstd(mu[u], m2[u], L, eps, rms)
        for u in range(u0, u1):
            g = u % G
            _normalize_unit(x, res, out, u, j0, j1, 0.0 if rms else mu[u], inv[u], weight[g],
                            bias[g], act, stream)
        if stream:
            fence()


@njit(cache=True)
def _sample_moments(x, n, p0, p1, wide, parts, block, sum_c, sqdev_c, work):
    """Parts ``[p0, p1)`` of sample ``n``'s column moments into ``work[n, p]``:
    batch norm's interleaved reduction of ``x[n]`` (``wide`` rows as one)."""
    xw = widen(x[n], wide)
    for p in range(p0, p1):
        stats._interleaved_part(xw, p, parts, block, sum_c, sqdev_c, work[n, p])


@njit(cache=True)
def _sample_statistics(x, n, K, R, wide, parts, block, sum_c, sqdev_c, eps, rms, work, mu, m2,
                       inv):
    """Sample ``n``'s group moments and ``invstd`` from its parts in ``work[n]``:
    the parts merged per column in order (``stats._finish_interleaved``), then
    each group's ``K * R`` columns Chan-merged in column order."""
    S, W = x.shape[1], x.shape[2]
    col_mean = np.empty(W)
    col_m2 = np.empty(W)
    stats._finish_interleaved(x[n], wide, parts, block, sum_c, sqdev_c, work[n], col_mean,
                              col_m2)
    width = K * R
    for g in range(mu.shape[1]):
        cnt = 0.0
        m = 0.0
        q = 0.0
        for j in range(g * width, (g + 1) * width):
            cnt, m, q = _chan_merge(cnt, m, q, float(S), col_mean[j], col_m2[j])
        mu[n, g] = m
        m2[n, g] = q
        inv[n, g] = unit_invstd(m, q, cnt, eps, rms)


@njit(cache=True)
def _forward_tables(x, n, K, R, mu, inv, weight, bias, t):
    """Sample ``n``'s coefficient rows (center, scale, shift, offset; center and
    shift moved by ``convert.centre`` for ``x``) of the normalizing pass into
    ``t[:, j]``, column ``j`` in channel ``j // R % C``: periodic, for
    ``forward._normalize_span``."""
    C = weight.size
    for j in range(t.shape[1]):
        c = j // R % C
        g = c // K
        s = inv[n, g] * weight[c]
        t[0, j], t[2, j] = centre(mu[n, g], s, bias[c], x)
        t[1, j] = s
        t[3, j] = _offset(mu[n, g], s, bias[c])


@njit(cache=True)
def _sample_normalize(x, res, out, n, s0, s1, t, act, stream):
    """Rows ``[s0, s1)`` of sample ``n`` normalized with its tables ``t``: batch
    norm's pass over rows laid end to end (``forward._normalize_span``)."""
    W = x.shape[2]
    _normalize_span(x[n].reshape(-1), out[n].reshape(-1), s0 * W, s1 * W, W, t[0], t[1], t[2],
                    t[3], flat(row(res, n)), act, stream)
    if stream:
        fence()


@njit(parallel=True, cache=True)
def forward_interleaved(x, K, R, wide, parts, chunks, block, sum_c, sqdev_c, eps, rms, given,
                        weight, bias, work, mu, m2, inv, tables, out, res, act, stream):
    """Group-view normalization of ``x[N, S, C * R]`` (statistics per sample and
    group of ``K`` channels, ``weight``/``bias`` float64 ``(C,)``) in three
    passes: (sample, part) reductions, per-sample statistics and tables,
    (sample, chunk) normalization.  ``given``: ``mu``/``inv`` hold the
    statistics.  ``work``: float64 ``(N, parts, 4, wide * W)``; ``tables``:
    ``(N, 4, W + LINE // itemsize)`` of ``x``'s compute type (``convert``).

    (Measured and dropped: a task per sample that reduces it and normalizes it
    from cache, as the planar kernels do per unit: GroupNorm(32, 256) on
    32x28x28x256 float32, x copy time, same process: forward 1.22 -> 0.97,
    backward 2.09 -> 1.83; samples of 800 KB are read back from L3, not L2.
    Not worth a second kernel body, which doubles its compile time, and it
    leaves a small batch on one thread.)"""
    N, S, W = x.shape
    if not given:
        for t in prange(N * parts):
            n, p = divmod(np.int64(t), parts)
            _sample_moments(x, n, p, p + 1, wide, parts, block, sum_c, sqdev_c, work)
    for n in prange(N):
        if not given:
            _sample_statistics(x, n, K, R, wide, parts, block, sum_c, sqdev_c, eps, rms, work,
                               mu, m2, inv)
        _forward_tables(x, n, K, R, mu, inv, weight, bias, tables[n])
    step = -(-S // chunks)
    for t in prange(N * chunks):
        n, ci = divmod(np.int64(t), chunks)
        s0 = min(S, ci * step)
        _sample_normalize(x, res, out, n, s0, min(S, s0 + step), tables[n], act, stream)


# ------------------------------------------------------------ backward

@njit(cache=True, fastmath=_FM)
def _dual_sums_values(dy, fo, x, m, inv, w, gw, gb):
    """``(sum(w * g), sum(w * g * (x - m)))`` of values with a weight each, ``g`` =
    ``dy`` through the ReLU mask of ``fo``; adds ``g * (x - m) * inv`` to
    ``gw[j]`` and ``g`` to ``gb[j]``."""
    s = 0.0
    sx = 0.0
    for j in range(x.size):
        g = np.float64(grad(dy, fo, j))  # the sums are float64 for every dtype
        d = load(x[j]) - m
        wg = w[j] * g
        s += wg
        sx += wg * d
        gw[j] += g * d * inv
        gb[j] += g
    return s, sx


def _unit_dual_sums(dy, fo, x, u, j0, j1, m, inv, w, gw, gb):
    """The weighted sums of values ``[j0, j1)`` of unit ``u`` (``_normalize_unit``'s
    patterns); ``gw``, ``gb``: the unit's channels' accumulators."""


@overload(_unit_dual_sums)
def _unit_dual_sums_impl(dy, fo, x, u, j0, j1, m, inv, w, gw, gb):
    if x.ndim == 2:
        def columns(dy, fo, x, u, j0, j1, m, inv, w, gw, gb):
            return _dual_sums_values(dy[u, j0:j1], part(row(fo, u), j0, j1), x[u, j0:j1], m,
                                     inv, w[j0:j1], gw[j0:j1], gb[j0:j1])
        return columns

    def runs(dy, fo, x, u, j0, j1, m, inv, w, gw, gb):
        R = x.shape[2]
        s = 0.0
        sx = 0.0
        for k in range(j0 // R, -(-j1 // R)):
            i0 = max(0, j0 - k * R)
            i1 = min(R, j1 - k * R)
            a, b = _run_dual_sum(dy[u, k, i0:i1], cut(fo, u, k, i0, i1), x[u, k, i0:i1], m)
            s += w[k] * a
            sx += w[k] * b
            gw[k] += b * inv
            gb[k] += a
        return s, sx
    return runs


@njit(cache=True)
def _grad_values(gr, fr, xr, yr, er, m, a, b, k, w):
    """``yr[j] = k * (w * g - a - (xr[j] - m) * b)`` (compact data: ``(k * w) * g +
    (q * x + r)``, ``channel.affine_coeffs``), ``g`` = ``gr`` through the ReLU
    mask of ``fr``, written to ``er`` too unless it is None; the coefficients
    arrays or scalars (``at``)."""
    for j in range(yr.size):
        g = grad(gr, fr, j)
        kj = at(k, j)
        if compact(xr):
            q, r = _affine_coeffs(at(m, j), at(a, j), at(b, j), kj)
            yr[j] = store(coef(kj * at(w, j), xr) * g + (coef(q, xr) * value(xr[j])
                                                         + coef(r, xr)), yr)
        else:
            m64, a64 = centre(at(m, j), at(b, j), at(a, j), xr)
            yr[j] = store(coef(kj, xr) * (coef(at(w, j), xr) * g - coef(a64, xr)
                                          - (value(xr[j]) - coef(m64, xr)) * coef(at(b, j), xr)),
                          yr)
        put(er, j, g)


@njit(cache=True)
def _grad_streamed(gr, fr, xr, yr, er, m, a, b, k, w, stream):
    """``_grad_values`` (scalar ``m``, ``a``, ``b``, ``k``; ``w`` an array or a
    scalar) with the whole 64-byte lines of ``yr`` streamed when ``stream``."""
    h, e = streaming.span(yr) if stream else (yr.size, yr.size)
    _grad_values(gr[:h], part(fr, 0, h), xr[:h], yr[:h], part(er, 0, h), m, a, b, k,
                 part(w, 0, h))
    if e > h:
        grad_lines(yr, h, e, gr, xr, w, m, a, b, k, fr, er)
    n = yr.size
    _grad_values(gr[e:], part(fr, e, n), xr[e:], yr[e:], part(er, e, n), m, a, b, k,
                 part(w, e, n))


def _grad_unit(dy, fo, x, dx, gres, u, j0, j1, m, a, b, k, w, stream):
    """``dx`` (and ``gres``) of values ``[j0, j1)`` of unit ``u`` (``_normalize_unit``'s
    patterns)."""


@overload(_grad_unit)
def _grad_unit_impl(dy, fo, x, dx, gres, u, j0, j1, m, a, b, k, w, stream):
    if x.ndim == 2:
        def columns(dy, fo, x, dx, gres, u, j0, j1, m, a, b, k, w, stream):
            _grad_streamed(dy[u, j0:j1], part(row(fo, u), j0, j1), x[u, j0:j1], dx[u, j0:j1],
                           part(row(gres, u), j0, j1), m, a, b, k, w[j0:j1], stream)
        return columns

    def runs(dy, fo, x, dx, gres, u, j0, j1, m, a, b, k, w, stream):
        R = x.shape[2]
        for kk in range(j0 // R, -(-j1 // R)):
            i0 = max(0, j0 - kk * R)
            i1 = min(R, j1 - kk * R)
            _grad_streamed(dy[u, kk, i0:i1], cut(fo, u, kk, i0, i1), x[u, kk, i0:i1],
                           dx[u, kk, i0:i1], cut(gres, u, kk, i0, i1), m, a, b, k, w[kk],
                           stream)
    return runs


@njit(cache=True, inline="always")
def unit_coeffs(n, s, sx, inv, rms, training):
    """``(a, b, k)`` of a unit's gradient: ``channel.grad_coeffs`` with weight 1,
    ``a = 0`` for RMS (nothing is centred), ``a = b = 0`` where the statistics
    are constants (``training`` False)."""
    a, b, k = _grad_coeffs(n, s, sx, inv, 1.0)
    if not training:
        return 0.0, 0.0, k
    return (0.0 if rms else a), b, k


@njit(parallel=True, cache=True)
def backward_planar(dy, fo, x, G, group, mu, inv, weight, rms, training, dx, gres, acc,
                    stream):
    """The whole backward of ``x[U, K, R]`` or ``x[U, L]`` (``_normalize_unit``),
    one task per ``group`` units: each unit's weighted sums, then its ``dx``
    while it is in cache.  ``acc``: float64 ``(tasks, 2, G * K)``, each task's
    ``grad_weight``, ``grad_bias`` sums."""
    U = x.shape[0]
    L = x.size // U
    K = weight.shape[1]
    for t in prange(-(-U // group)):
        acc[t] = 0.0
        for u in range(t * group, min(U, (t + 1) * group)):
            g = u % G
            m = 0.0 if rms else np.float64(mu[u])
            iv = np.float64(inv[u])
            s, sx = _unit_dual_sums(dy, fo, x, u, 0, L, m, iv, weight[g],
                                    acc[t, 0, g * K:(g + 1) * K], acc[t, 1, g * K:(g + 1) * K])
            a, b, k = unit_coeffs(L, s, sx, iv, rms, training)
            _grad_unit(dy, fo, x, dx, gres, u, 0, L, m, a, b, k, weight[g], stream)
        if stream:
            fence()


@njit(parallel=True, cache=True)
def backward_reduce_planar(dy, fo, x, G, chunks, step, mu, inv, weight, rms, sums, acc):
    """Huge units: the weighted sums of each (unit, chunk) task into ``sums[:, t]``
    and its ``grad_weight``/``grad_bias`` sums into ``acc[t]`` (``(tasks, 2, K)``)."""
    U = x.shape[0]
    L = x.size // U
    for t in prange(U * chunks):
        u, ci = divmod(np.int64(t), chunks)
        j0 = min(L, ci * step)
        acc[t] = 0.0
        m = 0.0 if rms else np.float64(mu[u])
        sums[0, t], sums[1, t] = _unit_dual_sums(dy, fo, x, u, j0, min(L, j0 + step), m,
                                                 np.float64(inv[u]), weight[u % G], acc[t, 0],
                                                 acc[t, 1])


@njit(parallel=True, cache=True)
def grad_input_planar(dy, fo, x, G, chunks, step, mu, coef, weight, rms, dx, gres, stream):
    """Huge units: ``dx`` by (unit, chunk) tasks with each unit's ``coef[:, u]``
    (``a``, ``b``, ``k``)."""
    U = x.shape[0]
    L = x.size // U
    for t in prange(U * chunks):
        u, ci = divmod(np.int64(t), chunks)
        j0 = min(L, ci * step)
        _grad_unit(dy, fo, x, dx, gres, u, j0, min(L, j0 + step),
                   0.0 if rms else np.float64(mu[u]), coef[0, u], coef[1, u], coef[2, u],
                   weight[u % G], stream)
        if stream:
            fence()


@njit(cache=True)
def _sample_dual_sums(dy, fo, x, n, p0, p1, wide, parts, unroll_c, mean_table, work):
    """Parts ``[p0, p1)`` of sample ``n``'s column sums ``sum(g)``, ``sum(g * (x -
    mean))`` into ``work[n, p]``: batch norm's interleaved backward reduction of
    ``x[n]`` with the column means ``mean_table`` (tiled for ``wide`` rows)."""
    xw = widen(x[n], wide)
    dyw = widen(dy[n], wide)
    fow = wide_rows(row(fo, n), wide)
    ow = xw.shape[0]
    step = -(-ow // parts)
    for p in range(p0, p1):
        r0 = min(ow, p * step)
        _rows_dual_sum(dyw, fow, xw, r0, min(ow, r0 + step), mean_table, work[n, p, 0],
                       work[n, p, 1], unroll_c)


@njit(cache=True)
def _mean_table(n, K, R, mu, width):
    """Sample ``n``'s group means by column, ``width`` columns."""
    t = np.empty(width)
    for j in range(width):
        t[j] = mu[n, j // R // K % mu.shape[1]]
    return t


@njit(cache=True)
def _backward_tables(dy, fo, x, n, K, R, wide, unroll_c, mu, inv, weight, training, work,
                     mean_table, acc, t):
    """Sample ``n``'s gradient from its parts in ``work[n]``: the column sums
    (``backward._finish_interleaved``), its channels' ``grad_weight`` and
    ``grad_bias`` terms into ``acc[n]``, and its gradient rows into ``t``:
    compact data ``(k * w, q, r)`` (periodic, for ``backward._grad_span``),
    float64 data ``(mean, a, b, k, w)``."""
    S, W = x.shape[1], x.shape[2]
    C = weight.size
    G = mu.shape[1]
    sg = np.empty(W)
    sgx = np.empty(W)
    _finish_dual_sums(dy[n], row(fo, n), x[n], mean_table, wide, unroll_c, work[n], sg, sgx)
    s = np.zeros(G)
    sx = np.zeros(G)
    for c in range(C):
        a = 0.0
        b = 0.0
        for r in range(c * R, (c + 1) * R):
            a += sg[r]
            b += sgx[r]
        g = c // K
        acc[n, 0, c] = b * inv[n, g]
        acc[n, 1, c] = a
        s[g] += weight[c] * a
        sx[g] += weight[c] * b
    coef = np.empty((5, G))
    for g in range(G):
        iv = np.float64(inv[n, g])
        a, b, k = unit_coeffs(S * K * R, s[g], sx[g], iv, False, training)
        coef[0, g] = mu[n, g]
        coef[1, g] = a
        coef[2, g] = b
        coef[3, g] = k
    for j in range(t.shape[1]):
        c = j // R % C
        g = c // K
        if compact(x):
            q, r = _affine_coeffs(coef[0, g], coef[1, g], coef[2, g], coef[3, g])
            t[0, j] = coef[3, g] * weight[c]
            t[1, j] = q
            t[2, j] = r
        else:
            for i in range(4):
                t[i, j] = coef[i, g]
            t[4, j] = weight[c]


def _sample_grad(dy, fo, x, dx, gres, n, s0, s1, t, stream):
    """``dx`` (and ``gres``) of rows ``[s0, s1)`` of sample ``n`` with its rows
    ``t`` (``_backward_tables``): compact data by batch norm's pass over rows
    laid end to end, float64 data row by row (``_grad_values``)."""


@overload(_sample_grad)
def _sample_grad_impl(dy, fo, x, dx, gres, n, s0, s1, t, stream):
    if _compact_type(x):
        def compact_form(dy, fo, x, dx, gres, n, s0, s1, t, stream):
            W = x.shape[2]
            kw = t[0]  # only k, q and r are read
            _grad_span(dy[n].reshape(-1), flat(row(fo, n)), x[n].reshape(-1),
                       dx[n].reshape(-1), flat(row(gres, n)), s0 * W, s1 * W, W, kw, kw, kw,
                       kw, t[1], t[2], stream)
            if stream:
                fence()
        return compact_form

    def centred(dy, fo, x, dx, gres, n, s0, s1, t, stream):
        W = x.shape[2]
        for s in range(s0, s1):
            _grad_values(dy[n, s], run(fo, n, s), x[n, s], dx[n, s],
                         run(gres, n, s), t[0, :W], t[1, :W], t[2, :W], t[3, :W],
                         t[4, :W])
    return centred


@njit(parallel=True, cache=True)
def backward_interleaved(dy, fo, x, K, R, wide, parts, chunks, unroll_c, mu, inv, weight,
                         training, work, acc, tables, dx, gres, stream):
    """The backward of ``forward_interleaved``, in its three passes: per-sample
    column sums by (sample, part), each sample's coefficients and ``acc[n]``
    (``grad_weight``, ``grad_bias`` terms), then ``dx`` by (sample, chunk)."""
    N, S, W = x.shape
    for t in prange(N * parts):
        n, p = divmod(np.int64(t), parts)
        _sample_dual_sums(dy, fo, x, n, p, p + 1, wide, parts, unroll_c,
                          _mean_table(n, K, R, mu, wide * W), work)
    for n in prange(N):
        _backward_tables(dy, fo, x, n, K, R, wide, unroll_c, mu, inv, weight, training, work,
                         _mean_table(n, K, R, mu, wide * W), acc, tables[n])
    step = -(-S // chunks)
    for t in prange(N * chunks):
        n, ci = divmod(np.int64(t), chunks)
        s0 = min(S, ci * step)
        _sample_grad(dy, fo, x, dx, gres, n, s0, min(S, s0 + step), tables[n], stream)


# ------------------------------------------------------------ the calls

def _table(a, G, K, fill):
    """A per-channel parameter (None or ``(G * K,)``) as float64 ``(G, K)``."""
    if a is None:
        return np.full((G, K), fill)
    return np.ascontiguousarray(a, dtype=np.float64).reshape(G, K)


def _act(residual, relu):
    """The kernels' activation argument: None without any epilogue, else the bool
    (``epilogue.finish``)."""
    return bool(relu) if relu or residual is not None else None


def _stream(out):
    return out.nbytes >= config.STREAM_MIN_BYTES


def _chunks(U, L):
    """``(chunks, step)``: each of ``U`` huge units' ``L`` values in ``chunks``
    tasks of ``step`` values, about ``config.TASKS`` tasks in all."""
    chunks = max(1, min(-(-config.TASKS // U), L // config.TASK_MIN_VALUES))
    return chunks, -(-L // chunks)


def _fused_group(U, L, most):
    """Units per task of a fused planar kernel: at most ``most`` tasks of at
    least ``config.TASK_MIN_VALUES`` values."""
    tasks = max(1, min(U, most, U * L // config.TASK_MIN_VALUES))
    return -(-U // tasks)


def _sample_chunks(N, S, W):
    """Tasks per sample of an interleaved pass over ``N`` samples of ``S`` rows of
    ``W`` values (``forward.task_split``'s total)."""
    return max(1, task_split(N * S, W)[0] // N)


def _unit_shape(U, K, R):
    """The planar kernels' view: ``(U, K * R)`` for a weight per value, else
    ``(U, K, R)`` (``_normalize_unit``)."""
    return (U, K) if R == 1 and K > 1 else (U, K, R)


def _views(arrays, shape):
    return [None if a is None else a.reshape(shape) for a in arrays]


def forward(x, weight, bias, eps, rms, out, mean, invstd, residual=None, relu=False,
            given=None):
    """Normalize the group view ``x[N, S, G, K, R]`` into ``out`` (and ``residual``,
    ``relu``: the fused epilogue), statistics into ``mean`` and ``invstd``
    (``(N, G)``, ``mean`` None for RMS).  ``given``: running ``(mean, var)`` of
    shape ``(G,)`` to normalize every sample with instead of its own
    statistics.  Returns the float64 ``(mean, M2)`` of each unit (None with
    ``given``)."""
    N, S, G, K, R = x.shape
    act = _act(residual, relu)
    U = N * G
    if given is not None:
        given = (np.broadcast_to(np.asarray(given[0], np.float64), (N, G)),
                 np.broadcast_to(channel.on_arrays.invstd(np.asarray(given[1], np.float64),
                                                          1.0, eps), (N, G)))
    if S == 1:
        if weight is None and bias is None:  # one run per unit: scalar coefficients
            K, R = 1, K * R
        L = K * R
        x3, out3, res3 = _views((x, out, residual), _unit_shape(U, K, R))
        w, b = _table(weight, G, K, 1.0), _table(bias, G, K, 0.0)
        mu, m2, inv = np.empty(U), np.empty(U), np.empty(U)
        parts = stats.planar_parts(1, U, L)
        with launching():
            if given is not None:
                mu[:] = given[0].reshape(U)
                inv[:] = given[1].reshape(U)
            elif parts > 1:  # a few huge units: reduced by parts, then normalized by chunks
                xl = x3.reshape(1, U, L)
                stats.channel_stats_planar(xl, parts, config.BLOCK,
                                           stats.planar_group(1, U, L, x3.itemsize, parts), mu, m2)
                inv[:] = (channel.on_arrays.invrms(mu, m2, L, eps) if rms
                          else channel.on_arrays.invstd(m2, L, eps))
            if given is None and parts == 1:
                group, chunks, step = _fused_group(U, L, config.TASKS), 1, L
            else:
                group, (chunks, step) = 1, _chunks(U, L)
            forward_planar(x3, G, config.BLOCK, group, chunks, step, eps, rms,
                           not (given is None and parts == 1), w, b, mu, m2, inv, out3,
                           _stream(out3), res3, act)
        mu, m2, inv = mu.reshape(N, G), m2.reshape(N, G), inv.reshape(N, G)
    else:
        W = G * K * R
        x3, out3, res3 = _views((x, out, residual), (N, S, W))
        wide, parts = stats.interleaved_split(S, W)
        mu, m2, inv = np.empty((N, G)), np.empty((N, G)), np.empty((N, G))
        if given is not None:
            mu[...], inv[...] = given
        C = G * K
        with launching():
            forward_interleaved(x3, K, R, wide, parts, _sample_chunks(N, S, W), config.BLOCK,
                                *stats.unroll(x3.itemsize), eps, rms, given is not None,
                                _table(weight, 1, C, 1.0)[0], _table(bias, 1, C, 0.0)[0],
                                _work(N, parts, 4, wide * W), mu, m2, inv,
                                np.empty((N, 4, W + streaming.LINE // x3.itemsize),
                                         compute_dtype(x3.dtype)), out3,
                                res3, act, _stream(out3))
    if mean is not None:
        mean[...] = mu
    invstd[...] = inv
    return None if given is not None else (mu, m2)


def running_update(moments, n, momentum, running_mean, running_var):
    """Instance norm's running statistics after a batch, as PyTorch updates them:
    the batch average of each instance's update, that is ``(1 - momentum) *
    running + momentum * batch`` with the batch's averages of the instances'
    means and unbiased variances (``n`` values each)."""
    mu, m2 = moments
    new_mean, new_var = channel.on_arrays.running_update(
        np.asarray(running_mean, np.float64), np.asarray(running_var, np.float64), momentum,
        mu.mean(axis=0), m2.mean(axis=0), n, 1.0)
    running_mean[...] = new_mean
    running_var[...] = new_var


def backward(dy, x, mean, invstd, weight, rms, training, grad_input, grad_weight, grad_bias,
             forward_out=None, grad_residual=None):
    """Gradients of ``forward`` on the group view ``x[N, S, G, K, R]`` (``mean``
    None for RMS; ``grad_bias`` None for RMS); ``training`` False: the statistics
    are constants.  ``forward_out`` (the ReLU's output, or None) masks ``dy``;
    ``grad_residual`` (or None) receives the masked gradient."""
    N, S, G, K, R = x.shape
    U, C = N * G, G * K
    inv = np.ascontiguousarray(invstd, dtype=np.float64).reshape(N, G)
    mu = np.zeros((N, G)) if mean is None else np.ascontiguousarray(mean, np.float64).reshape(N, G)
    if S == 1:
        L = K * R
        dy3, fo3, x3, dx3, gr3 = _views((dy, forward_out, x, grad_input, grad_residual),
                                        _unit_shape(U, K, R))
        w = _table(weight, G, K, 1.0)
        mu1, inv1 = mu.reshape(U), inv.reshape(U)
        if stats.planar_parts(1, U, L) == 1:
            group = _fused_group(U, L, config.TARGET_TASKS)
            acc = np.empty((-(-U // group), 2, C))
            with launching():
                backward_planar(dy3, fo3, x3, G, group, mu1, inv1, w, rms, bool(training),
                                dx3, gr3, acc, _stream(dx3))
            gw, gb = acc[:, 0].sum(axis=0), acc[:, 1].sum(axis=0)
        else:
            chunks, step = _chunks(U, L)
            sums = np.empty((2, U * chunks))
            acc = np.empty((U * chunks, 2, K))
            with launching():
                backward_reduce_planar(dy3, fo3, x3, G, chunks, step, mu1, inv1, w, rms, sums,
                                       acc)
                s, sx = sums.reshape(2, U, chunks).sum(axis=2)
                a, b, k = channel.on_arrays.grad_coeffs(L, s, sx, inv1, 1.0)
                if rms or not training:
                    a = np.zeros(U)
                if not training:
                    b = np.zeros(U)
                grad_input_planar(dy3, fo3, x3, G, chunks, step, mu1, np.stack((a, b, k)), w,
                                  rms, dx3, gr3, _stream(dx3))
            acc = acc.reshape(N, G, chunks, 2, K)
            gw, gb = acc[:, :, :, 0].sum(axis=(0, 2)), acc[:, :, :, 1].sum(axis=(0, 2))
    else:
        W = C * R
        dy3, fo3, x3, dx3, gr3 = _views((dy, forward_out, x, grad_input, grad_residual),
                                        (N, S, W))
        wide, parts = stats.interleaved_split(S, W)
        acc = np.empty((N, 2, C))
        rows = 3 if compact_dtype(x3.dtype) else 5
        with launching():
            backward_interleaved(dy3, fo3, x3, K, R, wide, parts, _sample_chunks(N, S, W),
                                 config.ROWS_UNROLL_MIN_C, mu, inv, _table(weight, 1, C, 1.0)[0],
                                 bool(training), _work(N, parts, 2, wide * W), acc,
                                 np.empty((N, rows, W + streaming.LINE // x3.itemsize)), dx3,
                                 gr3, _stream(dx3))
        gw, gb = acc[:, 0].sum(axis=0), acc[:, 1].sum(axis=0)
    grad_weight[...] = gw.reshape(grad_weight.shape)
    if grad_bias is not None:
        grad_bias[...] = gb.reshape(grad_bias.shape)
