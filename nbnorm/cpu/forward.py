"""The normalizing pass: ``out = (x - center[c]) * scale[c] + shift[c]``.

``scale`` folds ``invstd * weight``.  The coefficients are float64 and so is
the arithmetic of float32 and float64 data, so the subtraction of a large
mean keeps its precision for float32 data, which are computed as
``x * scale[c] + (shift[c] - center[c] * scale[c])`` (fewer loads and
operations; see ``_normalize_rows``).  Half data compute in float32
(``convert.compute_type``), in the centred form with the center moved to a
float32 value and the shift compensating (``recentred``, ``convert.centre``:
exact subtraction near the mean), the coefficients rounded to float32 once
per call or table (``convert.coef``), the output rounded once from float32.
Elementwise, so ``out`` may be ``x`` itself.  Backward in inference mode reuses it with
``center = 0`` and ``shift = 0``.

``train_planar`` fuses statistics and normalization: one task per channel
reduces the channel and normalizes it while it is still in L2/L3, so ``x`` is
read from memory once instead of twice.  ``train_serial_*`` and
``normalize_serial_*`` run on the calling thread for small batches, where a
parallel launch costs more than the work.

``weight`` and ``bias`` are float64 arrays of length C, or of length 0 for
"scale 1" / "shift 0".

The parallel passes write outputs of at least ``config.STREAM_MIN_BYTES`` with
streaming (non-temporal) stores: ``streaming`` writes each run's aligned whole
lines, these functions its head and tail, with the same expressions, so the
bits do not depend on it.
"""

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .. import config
from . import per_channel, stats, streaming
from .convert import centre, coef, compact, compute_type, store, value
from .epilogue import finish, flat, row, run
from .epilogue import wide as wide_rows

invstd = per_channel.math.invstd
offsets = per_channel.math.offset
_running_update = per_channel.math.running_update
_moments_finite = per_channel.math.moments_finite


@njit(cache=True, inline="always")
def affine(c, inv, weight, bias):
    """``(inv * weight[c], bias[c])`` in float64, for any float dtype of
    ``weight`` and ``bias``; ``ops._scale_shift`` computes the same with NumPy."""
    inv = np.float64(inv)
    s = inv * np.float64(weight[c]) if weight.size else inv
    b = np.float64(bias[c]) if bias.size else 0.0
    return s, b


@njit(cache=True, inline="always")
def scale_shift(c, n, eps, mu, m2, weight, bias):
    """``affine`` for a channel with moments ``mu``, ``m2`` of ``n`` values."""
    return affine(c, invstd(m2, n, eps), weight, bias)


@njit(cache=True)
def _normalize_run(xr, rr, yr, m, s, b, act, stream):
    """``yr = act((xr - m) * s + b + rr)`` for scalars ``m``, ``s``, ``b``
    (compact data: ``xr * s + (b - m * s)``, see ``_normalize_rows``); ``rr``
    (the residual's run) and ``act`` may be None (``epilogue``); ``stream``:
    its whole lines with streaming stores (``streaming``), the same bits."""
    h, e = streaming.span(yr) if stream else (yr.size, yr.size)
    if compact(xr):  # a constant of the compiled signature
        sc = coef(s, xr)
        tc = coef(offsets(m, s, b), xr)
        for i in range(h):
            yr[i] = store(finish(value(xr[i]) * sc + tc, rr, i, act), yr)
        if e > h:
            streaming.scale_offset_lines(yr, h, e, xr, sc, tc, rr, act)
        for i in range(e, yr.size):
            yr[i] = store(finish(value(xr[i]) * sc + tc, rr, i, act), yr)
    else:
        m64, b64 = centre(m, s, b, xr)
        mc, sc, bc = coef(m64, xr), coef(s, xr), coef(b64, xr)
        for i in range(h):
            yr[i] = store(finish((value(xr[i]) - mc) * sc + bc, rr, i, act), yr)
        if e > h:
            streaming.affine_lines(yr, h, e, xr, mc, sc, bc, rr, act)
        for i in range(e, yr.size):
            yr[i] = store(finish((value(xr[i]) - mc) * sc + bc, rr, i, act), yr)


def recentred(center, scale, shift, x):
    """``convert.centre`` of arrays: ``(center, shift)`` for the centred form in
    ``x``'s compute type (themselves where it is float64)."""


@overload(recentred)
def _recentred(center, scale, shift, x):
    if compute_type(x.dtype) == types.float64:
        return lambda center, scale, shift, x: (center, shift)

    def moved(center, scale, shift, x):
        c2 = np.empty(center.size)
        t2 = np.empty(center.size)
        for j in range(center.size):
            c2[j], t2[j] = centre(center[j], scale[j], shift[j], x)
        return c2, t2
    return moved


@njit(cache=True)
def _normalize_rows(x, r0, r1, center, scale, shift, offset, out, res, act):
    """``out = (x - center) * scale + shift`` for rows ``[r0, r1)``, per-column
    ``center``, ``scale``, ``shift`` (``center`` and ``shift`` ``recentred``) and
    ``offset = offsets(center, scale, shift)`` (of them before).

    float32 data are normalized as ``x * scale + offset``: two loads of
    coefficients and two operations a value instead of three and three, which
    is what the pass costs once streaming stores take the output's reads away
    (NC 8192x1024 float32 inference, x copy time, same process, 9 medians of 15
    rounds in 3 processes: 0.81-1.17 -> 0.70-0.97, level with the elementwise
    floor).  In float64 arithmetic the form cancels ~1e-16 * |mean| / std of a
    value's magnitude, far below float32's rounding; float64 data keep the
    centred form, which loses nothing to a large mean.  Half data take the
    centred form in float32 arithmetic (``convert``), the center a float32
    value (``recentred``), so that nothing cancels near the mean either, and
    the coefficients rounded to float32 (``convert.coef``: the tables of the
    parallel passes hold them rounded already).  ``res`` (rows of the
    residual) and ``act`` may be None (``epilogue``).
    """
    for r in range(r0, r1):
        xr = x[r]
        yr = out[r]
        rr = row(res, r)
        if compact(x):  # a constant of the compiled signature
            for c in range(yr.size):
                yr[c] = store(finish(value(xr[c]) * coef(scale[c], xr) + coef(offset[c], xr),
                                     rr, c, act), yr)
        else:
            for c in range(yr.size):
                yr[c] = store(finish((value(xr[c]) - coef(center[c], xr)) * coef(scale[c], xr)
                                     + coef(shift[c], xr), rr, c, act), yr)


@njit(cache=True)
def _normalize_values(xf, yf, i0, i1, C, center, scale, shift, offset, rf, act):
    """``_normalize_rows`` of the values ``[i0, i1)`` of rows of ``C`` laid end to
    end; ``rf`` the residual as 1-D, or None."""
    c = i0 % C
    for i in range(i0, i1):
        if compact(xf):
            yf[i] = store(finish(value(xf[i]) * coef(scale[c], xf) + coef(offset[c], xf), rf,
                                 i, act), yf)
        else:
            yf[i] = store(finish((value(xf[i]) - coef(center[c], xf)) * coef(scale[c], xf)
                                 + coef(shift[c], xf), rf, i, act), yf)
        c = c + 1 if c + 1 < C else 0


@njit(cache=True)
def _normalize_span(xf, yf, i0, i1, C, center, scale, shift, offset, rf, act, stream):
    """``_normalize_values`` of ``[i0, i1)`` with a ``streaming`` column intrinsic
    for the whole vectors (lines, when ``stream``); the coefficients are
    ``streaming.periodic``.  The same bits either way."""
    h, e = streaming.cols_span(yf[i0:i1], stream)
    _normalize_values(xf, yf, i0, i0 + h, C, center, scale, shift, offset, rf, act)
    if e > h:
        if compact(xf):
            streaming.scale_offset_cols(yf, i0 + h, i0 + e, (i0 + h) % C, C, stream, xf,
                                        scale, offset, rf, act)
        else:
            streaming.affine_cols(yf, i0 + h, i0 + e, (i0 + h) % C, C, stream, xf, center,
                                  scale, shift, rf, act)
    _normalize_values(xf, yf, i0 + e, i1, C, center, scale, shift, offset, rf, act)


def task_split(n, size):
    """``(tasks, step)`` of a parallel elementwise pass: ``n`` runs or rows of
    ``size`` values each in at most ``config.TASKS`` tasks of ``step``, of at
    least ``config.TASK_MIN_VALUES`` values if possible (``ops`` computes it at
    every call, so patching the config takes effect at once)."""
    tasks = max(1, min(n, config.TASKS, n * size // config.TASK_MIN_VALUES))
    return tasks, -(-n // tasks)


@njit(parallel=True, cache=True)
def normalize_planar(x, center, scale, shift, out, stream, tasks, step, res, act):
    """``stream``: streaming stores (``streaming``), a fence at the end of each
    task; ``(tasks, step)``: ``task_split``; ``res``, ``act``: ``epilogue``."""
    outer, C, inner = x.shape
    for t in prange(tasks):
        for j in range(t * step, min(outer * C, (t + 1) * step)):
            o, c = divmod(np.int64(j), C)
            _normalize_run(x[o, c], run(res, o, c), out[o, c], center[c], scale[c], shift[c],
                           act, stream)
        if stream:
            streaming.fence()


@njit(parallel=True, cache=True)
def normalize_interleaved(x, center, scale, shift, out, stream, tasks, step, res, act,
                          repeat=1):
    """``out`` may be ``x``; ``stream``, ``tasks``, ``step``, ``res`` and ``act`` as
    in ``normalize_planar``; each value of
    ``center``, ``scale`` and ``shift`` serves ``repeat`` consecutive columns (a
    planar batch of short runs viewed as rows of ``C * inner``: ``repeat = inner``).

    A task's rows are one run of ``x`` and ``out`` as 1-D arrays, written by a
    column intrinsic (``streaming._cols``), so that no row boundary splits a
    streamed line.  Measured (NHWC 64x56x56x64 streamed, the pass alone, x copy
    time, same process, 2 threads, AMD Zen 3): row by row, over 256-value wide
    rows, float32 0.82-0.86 and float64 0.53-0.62; one run per task, float32
    0.51-0.55 and float64 0.38-0.40, level with the elementwise floor
    (0.52-0.61, 0.37-0.40).  Unstreamed outputs (under ``STREAM_MIN_BYTES``,
    cached) took the same time either way or less (float64 2048x512 0.46-0.55
    -> 0.35-0.39).
    """
    # Measured and dropped: walking the row ranges backwards, to find the rows the
    # statistics pass read last still in L3, was slower (NHWC float32 forward
    # training 1.63 -> 2.00 copy-times, NC 2.6 -> 2.9; same run, interleaved),
    # and still was with streaming stores, which leave L3 to x (NC float32
    # 1.27-1.63 -> 1.39-1.80, float64 1.24-1.32 -> 1.31-1.48).
    outer, C = x.shape
    xf = x.reshape(-1)
    yf = out.reshape(-1)
    rf = flat(res)
    offset = offsets(center, scale, shift)
    cc, bc = recentred(center, scale, shift, x)
    cp = streaming.periodic(cc, out, repeat)
    sp = streaming.periodic(scale, out, repeat)
    bp = streaming.periodic(bc, out, repeat)
    op = streaming.periodic(offset, out, repeat)
    for t in prange(tasks):
        r0 = min(outer, t * step)
        r1 = min(outer, r0 + step)
        _normalize_span(xf, yf, r0 * C, r1 * C, C, cp, sp, bp, op, rf, act, stream)
        if stream:
            streaming.fence()


@njit(cache=True)
def normalize_serial_planar(x, center, scale, shift, out, res, act):
    outer, C, inner = x.shape
    for o in range(outer):
        for c in range(C):
            _normalize_run(x[o, c], run(res, o, c), out[o, c], center[c], scale[c], shift[c],
                           act, False)


@njit(cache=True)
def _normalize_table(x, wide, coef, out, res, act):
    """``normalize_serial_interleaved`` with ``coef``: center, scale and shift
    tiled for the wide rows, shape ``(3, wide*C)``; its first C columns serve the
    leftover narrow rows."""
    C = x.shape[1]
    ow = x.shape[0] // wide
    offset = offsets(coef[0], coef[1], coef[2])
    center, shift = recentred(coef[0], coef[1], coef[2], x)
    _normalize_rows(stats.widen(x, wide), 0, ow, center, coef[1], shift, offset,
                    stats.widen(out, wide), wide_rows(res, wide), act)
    _normalize_rows(x, ow * wide, x.shape[0], center[:C], coef[1, :C], shift[:C],
                    offset[:C], out, res, act)


@njit(cache=True)
def normalize_serial_interleaved(x, wide, center, scale, shift, out, res, act):
    C = center.size
    coef = np.empty((3, wide * C))
    for j in range(wide):
        coef[0, j * C:(j + 1) * C] = center
        coef[1, j * C:(j + 1) * C] = scale
        coef[2, j * C:(j + 1) * C] = shift
    _normalize_table(x, wide, coef, out, res, act)


@njit(parallel=True, cache=True)
def train_planar(x, parts, block, eps, weight, bias, out, mean_out, m2_out, stream, res, act):
    """Statistics and normalization of ``x[outer, C, inner]``, one task per channel;
    ``stream``, ``res`` and ``act`` as in ``normalize_planar``."""
    outer, C, inner = x.shape
    n = outer * inner
    for c in prange(C):
        stats.channel_moments_planar(x, c, c + 1, parts, block, mean_out, m2_out)
        mu = mean_out[c]
        m2 = m2_out[c]
        s, b = scale_shift(c, n, eps, mu, m2, weight, bias)
        for o in range(outer):
            _normalize_run(x[o, c], run(res, o, c), out[o, c], mu, s, b, act, stream)
        if stream:
            streaming.fence()


@njit(cache=True)
def finish_train(mu, m2, n, eps, momentum, mean_out, invstd_out, running_mean, running_var,
                 keep, correction):
    """The O(C) end of a training step, in float64: ``mean_out``, ``invstd_out``
    and (when ``running_mean.size``) the running statistics, updated only where
    ``keep`` is True (``keep.size == 0``: everywhere), with the variance
    ``m2 / (n - correction)`` (``channel.running_update``).  One call instead of a
    dozen NumPy ufuncs: ~10 us less per small call."""
    for c in range(mu.size):
        mean_out[c] = mu[c]
        invstd_out[c] = invstd(m2[c], n, eps)
    if running_mean.size:
        for c in range(mu.size):
            if keep.size == 0 or keep[c]:
                running_mean[c], running_var[c] = _running_update(
                    np.float64(running_mean[c]), np.float64(running_var[c]), momentum, mu[c],
                    m2[c], n, correction)


@njit(cache=True)
def _all_finite(mean, m2):
    for c in range(mean.size):
        if not _moments_finite(mean[c], m2[c]):
            return False
    return True


#: ``on_nonfinite`` as the serial kernels take it (``ops`` maps ``guard.POLICIES``).
PROPAGATE, SKIP, RAISE = 0, 1, 2


@njit(cache=True)
def _keep(mu, m2, policy):
    """``guard.running_update_mask`` inside a kernel, as ``finish_train`` takes it:
    the channels whose running statistics update (length 0: all of them)."""
    if policy == PROPAGATE or _all_finite(mu, m2):
        return np.empty(0, dtype=np.bool_)
    keep = np.empty(mu.size, dtype=np.bool_)
    for c in range(mu.size):
        keep[c] = _moments_finite(mu[c], m2[c])
    return keep


@njit(cache=True)
def _infer_coef(eps, weight, bias, running_mean, running_var, mean_out, invstd_out):
    """The O(C) part of a small inference call: ``mean_out``, ``invstd_out`` from
    the running statistics, and rows (center, scale, shift, ``offsets``) in
    float64, as ``ops.forward_infer`` computes them with NumPy."""
    C = running_mean.size
    coef = np.empty((4, C))
    for c in range(C):
        mu = np.float64(running_mean[c])
        inv = invstd(np.float64(running_var[c]), 1.0, eps)
        coef[0, c] = mu
        coef[1, c], coef[2, c] = affine(c, inv, weight, bias)
        coef[3, c] = offsets(mu, coef[1, c], coef[2, c])
        mean_out[c] = mu
        invstd_out[c] = inv
    return coef


@njit(cache=True)
def infer_serial_planar(x, eps, weight, bias, running_mean, running_var, out, mean_out,
                        invstd_out, res, act):
    """A whole inference call for a small ``x[outer, C, inner]`` on the calling
    thread, in one Numba call instead of a dozen NumPy ones (as ``train_serial_*``)."""
    coef = _infer_coef(eps, weight, bias, running_mean, running_var, mean_out, invstd_out)
    normalize_serial_planar(x, coef[0], coef[1], coef[2], out, res, act)


@njit(cache=True)
def infer_serial_interleaved(x, eps, weight, bias, running_mean, running_var, out, mean_out,
                             invstd_out, res, act):
    """``infer_serial_planar`` for ``x[outer, C]``, row by row: tiling the
    coefficients for wide rows cost more than it saved at these sizes (a
    (32, 64) float32 call's kernel 2.2 -> 1.4 us; (512, 64) level)."""
    coef = _infer_coef(eps, weight, bias, running_mean, running_var, mean_out, invstd_out)
    center, shift = recentred(coef[0], coef[1], coef[2], x)
    _normalize_rows(x, 0, x.shape[0], center, coef[1], shift, coef[3], out, res, act)


@njit(cache=True)
def train_serial_planar(x, parts, block, eps, momentum, weight, bias, policy, out,
                        mean_out, invstd_out, running_mean, running_var, res, act, correction):
    """A whole training step of ``x[outer, C, inner]`` on the calling thread, in one
    call (a small batch's budget is microseconds): the float64 moments, ``out``,
    then ``finish_train``.  With ``policy == RAISE`` it returns False, having
    written nothing, when a channel's statistics are not finite."""
    outer, C, inner = x.shape
    n = outer * inner
    mu = np.empty(C)
    m2 = np.empty(C)
    stats.channel_moments_planar(x, 0, C, parts, block, mu, m2)
    if policy == RAISE and not _all_finite(mu, m2):
        return False
    for c in range(C):
        s, b = scale_shift(c, n, eps, mu[c], m2[c], weight, bias)
        for o in range(outer):
            _normalize_run(x[o, c], run(res, o, c), out[o, c], mu[c], s, b, act, False)
    finish_train(mu, m2, n, eps, momentum, mean_out, invstd_out, running_mean, running_var,
                 _keep(mu, m2, policy), correction)
    return True


@njit(cache=True)
def train_serial_interleaved(x, wide, parts, block, sum_c, sqdev_c, eps, momentum, weight, bias, policy,
                             out, mean_out, invstd_out, running_mean, running_var, res, act,
                             correction):
    """``train_serial_planar`` for ``x[outer, C]``."""
    outer, C = x.shape
    mu = np.empty(C)
    m2 = np.empty(C)
    stats.channel_stats_interleaved_serial(x, wide, parts, block, sum_c, sqdev_c, mu, m2)
    if policy == RAISE and not _all_finite(mu, m2):
        return False
    coef = np.empty((3, wide * C))  # one table instead of five arrays
    for c in range(C):
        s, b = scale_shift(c, outer, eps, mu[c], m2[c], weight, bias)
        for j in range(wide):
            coef[0, j * C + c] = mu[c]
            coef[1, j * C + c] = s
            coef[2, j * C + c] = b
    _normalize_table(x, wide, coef, out, res, act)
    finish_train(mu, m2, outer, eps, momentum, mean_out, invstd_out, running_mean,
                 running_var, _keep(mu, m2, policy), correction)
    return True
