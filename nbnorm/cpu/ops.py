"""The CPU implementation of forward and backward on canonical views.

``api`` has validated every argument and allocated every output; this module
only runs kernels on ``(outer, C, inner)`` (planar) or ``(outer, C)``
(interleaved) views and does the O(C) per-channel arithmetic in float64.
``nbnorm.cuda.ops`` has the same functions for device arrays.

Which kernels run is a function of the shape (and of ``on_nonfinite``), never of
the thread count:

- ``x.size <= config.SERIAL_MAX``: one serial kernel does the whole call on the
  calling thread (a parallel launch costs more than the work).
- planar, ``C >= config.FUSE_MIN_C``, a channel of at most
  ``config.FUSE_MAX_BYTES`` and runs of at least ``config.FUSE_MIN_RUN_BYTES``:
  one parallel task per channel reduces it and
  normalizes it (or computes its gradient) while it is still in cache.
- otherwise: a parallel reduction over (channel, part) tasks, then a parallel
  elementwise pass.  A planar reduction's task takes a group of adjacent
  channels (``stats.planar_group``) so that short runs read as long ones; a
  planar batch of short runs (``_planar_rows``) takes this path, and its
  elementwise pass runs over rows of ``C * inner`` values.

Every path computes the same parts with the same functions and merges them in
the same order, so they agree bit for bit.
"""

import threading

import numpy as np

from .. import channel, config, guard
from . import backward as bwd
from . import forward as fwd
from . import stats
from .threads import launching

#: ``weight``/``bias`` of None: kernels read a length-0 array as scale 1 / shift 0.
_NONE = np.empty(0)
#: ``keep`` of ``forward.finish_train``: update every channel's running statistics.
_ALL = np.empty(0, dtype=np.bool_)


_local = threading.local()


def _work(*shape):
    """float64 scratch of ``shape`` for the interleaved reductions, kept between
    calls (one buffer per Python thread, grown as needed): O(C x parts)."""
    n = 1
    for d in shape:
        n *= d
    buf = getattr(_local, "work", None)
    if buf is None or buf.size < n:
        buf = _local.work = np.empty(n)
    return buf[:n].reshape(shape)


def empty(shape, dtype):
    return np.empty(shape, dtype=dtype)


def _param(a):
    """A per-channel parameter as a contiguous float64 array (``_NONE`` for None)."""
    if a is None:
        return _NONE
    return np.ascontiguousarray(a, dtype=np.float64)


def _param_as_is(a):
    """``_param``, but a float32/float64 parameter as it is (``api`` made it
    contiguous): the serial kernels read it in float64 anyway, and the
    conversion is ~0.3 us of a ~12 us small call."""
    if a is not None and a.dtype.char in "fd":
        return a
    return _param(a)


def _parts(x):
    """Parts per channel of a planar reduction (interleaved ones: ``stats.interleaved_split``)."""
    return stats.planar_parts(*x.shape)


def _fused(x, itemsize):
    """Whether a planar kernel reduces and finishes each channel in one task.

    ``itemsize``: bytes per element of all the arrays a channel's task reads
    (x for forward; dy and x for backward).
    """
    outer, C, inner = x.shape
    return (C >= config.FUSE_MIN_C and outer * inner * itemsize <= config.FUSE_MAX_BYTES
            and inner * x.itemsize >= config.FUSE_MIN_RUN_BYTES)


def batch_moments(x, serial=False):
    """float64 ``(mean, M2)`` per channel of a canonical view.

    ``serial``: on the calling thread, bitwise the same; for the rare small-batch
    paths that need the moments after a serial kernel and must not launch a
    parallel one (they run outside ``launching()``).
    """
    C = x.shape[1]
    mean = np.empty(C)
    m2 = np.empty(C)
    if x.ndim == 3 and serial:
        stats.channel_stats_planar_serial(x, _parts(x), config.BLOCK, mean, m2)
    elif x.ndim == 3:
        parts = _parts(x)
        stats.channel_stats_planar(x, parts, config.BLOCK,
                                   stats.planar_group(*x.shape, x.itemsize, parts), mean, m2)
    elif serial:
        wide, parts = stats.interleaved_split(*x.shape)
        stats.channel_stats_interleaved_serial(x, wide, parts, config.BLOCK,
                                               *stats.unroll(x.itemsize), mean, m2)
    else:
        wide, parts = stats.interleaved_split(*x.shape)
        stats.channel_stats_interleaved(x, wide, parts, config.BLOCK, *stats.unroll(x.itemsize),
                                        mean, m2,
                                        _work(parts, 4, wide * C))
    return mean, m2


def moments(x):
    """float64 ``(mean, M2)`` per channel of a canonical view (``nbnorm.moments``):
    bitwise what a training step of ``x`` normalizes with; zeros for a view
    without values.  Small batches on the calling thread (``batch_moments``'
    ``serial``, the same bits)."""
    C = x.shape[1]
    if x.size == 0:
        return np.zeros(C), np.zeros(C)
    if x.size <= config.SERIAL_MAX:
        return batch_moments(x, serial=True)
    with launching():
        return batch_moments(x)


def merge_moments(entries, C):
    """``(count, mean, M2)`` of the ``(count, mean, m2)`` ``entries`` (host arrays
    of ``C`` floats, any float dtype) merged in the given order with
    ``channel.chan_merge``.  An entry of count 0 changes nothing; the first
    entry with values is taken as it is (as float64), so merging one entry gives
    its own bits.  New float64 arrays."""
    n, mu, m2 = 0, None, None
    for nb, mb, qb in entries:
        if nb == 0:
            continue
        if n == 0:
            n, mu, m2 = nb, np.array(mb, np.float64), np.array(qb, np.float64)
        else:
            n, mu, m2 = channel.on_arrays.chan_merge(n, mu, m2, nb, mb, qb)
    if n == 0:
        return 0, np.zeros(C), np.zeros(C)
    return n, mu, m2


def _stream(out):
    """Whether a parallel pass writes ``out`` with streaming stores (``streaming``):
    when it is too large to stay in cache for its reader anyway."""
    return out.nbytes >= config.STREAM_MIN_BYTES


def _planar_rows(x, out):
    """Whether a planar pass over ``x`` into ``out`` (normalizing, or ``grad_input``)
    runs as an interleaved pass over rows of ``C * inner`` values
    (``config.PLANAR_ROWS_MAX_RUN_BYTES``): the same expressions, the same bits."""
    outer, C, inner = x.shape
    return (inner * x.itemsize < config.PLANAR_ROWS_MAX_RUN_BYTES
            and C * inner <= config.PLANAR_ROWS_MAX_VALUES
            and x.flags.c_contiguous and out.flags.c_contiguous)


def _rows(a, shape):
    return None if a is None else a.reshape(shape)


def normalize(x, center, scale, shift, out, res=None, act=None):
    """The parallel elementwise pass (small batches normalize inside their serial
    kernel): ``out = act((x - center) * scale + shift + res)``, ``res`` and
    ``act`` (None or True: the ReLU) optional.

    A planar batch of short runs is normalized as rows of ``C * inner`` values
    with each channel's coefficients serving ``inner`` columns: the same
    expressions, so the same bits, without a run's fixed cost.
    """
    if x.ndim == 3 and _planar_rows(x, out):
        outer, C, inner = x.shape
        rows_of = (outer, C * inner)
        fwd.normalize_interleaved(x.reshape(rows_of), center, scale, shift,
                                  out.reshape(rows_of), _stream(out),
                                  *fwd.task_split(outer, C * inner), _rows(res, rows_of), act,
                                  inner)
    elif x.ndim == 3:
        outer, C, inner = x.shape
        fwd.normalize_planar(x, center, scale, shift, out, _stream(out),
                             *fwd.task_split(outer * C, inner), res, act)
    else:
        fwd.normalize_interleaved(x, center, scale, shift, out, _stream(out),
                                  *fwd.task_split(*x.shape), res, act)


def _grad_input_pass(dy, fo, x, mean, a, b, k, dx, gres):
    """``dx = k * (g - a - (x - mean) * b)``, the training-mode ``grad_input``
    pass, ``g`` = ``dy`` through the ReLU mask of ``fo`` (None: no mask), also
    written to ``gres`` unless it is None; a planar batch of short runs runs as
    rows, as in ``normalize``."""
    if x.ndim == 3 and _planar_rows(x, dx):
        outer, C, inner = x.shape
        rows_of = (outer, C * inner)
        bwd.grad_input_interleaved(dy.reshape(rows_of), _rows(fo, rows_of), x.reshape(rows_of),
                                   mean, a, b, k, dx.reshape(rows_of), _rows(gres, rows_of),
                                   _stream(dx), *fwd.task_split(outer, C * inner), inner)
    elif x.ndim == 3:
        outer, C, inner = x.shape
        bwd.grad_input_planar(dy, fo, x, mean, a, b, k, dx, gres, _stream(dx),
                              *fwd.task_split(outer * C, inner))
    else:
        bwd.grad_input_interleaved(dy, fo, x, mean, a, b, k, dx, gres, _stream(dx),
                                   *fwd.task_split(*x.shape))


def _scale_shift(inv, w, b, C):
    """What ``forward.affine`` computes, for all channels."""
    return (inv * w if w.size else inv), (b if b.size else np.zeros(C))


def _train_parallel(x, n, w, b, eps, on_nonfinite, out, res, act):
    """The parallel kernels of a training step (``n`` values a channel): ``out``,
    and the float64 ``(mean, M2)`` returned."""
    C = x.shape[1]
    if x.ndim == 3 and on_nonfinite != "raise" and _fused(x, x.itemsize):
        mu = np.empty(C)
        m2 = np.empty(C)
        fwd.train_planar(x, _parts(x), config.BLOCK, eps, w, b, out, mu, m2, _stream(out),
                         res, act)
        return mu, m2
    mu, m2 = batch_moments(x)
    guard.running_update_mask(mu, m2, on_nonfinite)  # "raise": before any write
    scale, shift = _scale_shift(channel.on_arrays.invstd(m2, n, eps), w, b, C)
    normalize(x, mu, scale, shift, out, res, act)
    return mu, m2


#: ``on_nonfinite`` codes of the serial kernels.
_POLICY = {"propagate": fwd.PROPAGATE, "skip": fwd.SKIP, "raise": fwd.RAISE}


def _act(residual, relu):
    """The kernels' activation argument: None without any epilogue (the plain
    kernels), else the bool (``epilogue.finish``)."""
    return bool(relu) if relu or residual is not None else None


def forward_train(x, weight, bias, eps, momentum, running_mean, running_var,
                  out, mean, invstd, on_nonfinite="propagate", residual=None, relu=False,
                  correction=1.0, moments=None):
    """A training step on canonical views: ``out = act(bn(x) + residual)``
    (``residual`` None or a view like ``x``; ``act`` the ReLU when ``relu``),
    running variance ``m2 / (n - correction)``.  ``moments``: None, or the
    ``(count, mean, m2)`` to normalize with instead of ``x``'s own (``x`` may
    then have no values)."""
    act = _act(residual, relu)
    C = x.shape[1]
    serial = x.size <= config.SERIAL_MAX
    w = _param_as_is(weight) if serial else _param(weight)
    b = _param_as_is(bias) if serial else _param(bias)
    # The kernels update float32/float64 running statistics; other float dtypes
    # (float16, longdouble) are NumPy's job, at the end.
    numpy_running = running_mean is not None and not (running_mean.dtype.char in "fd"
                                                      and running_var.dtype.char in "fd")
    if running_mean is None or numpy_running:
        rm = rv = _NONE
    else:
        rm, rv = running_mean, running_var
    if moments is not None:
        n, mu, m2 = moments[0], _param(moments[1]), _param(moments[2])
        keep = guard.running_update_mask(mu, m2, on_nonfinite)  # "raise": before any write
        if x.size:
            _normalize_given(x, n, mu, m2, _param(weight), _param(bias), eps, out, residual,
                             act, serial)
        fwd.finish_train(mu, m2, n, eps, momentum, mean, invstd, rm, rv,
                         _ALL if keep is None else keep, correction)
    elif serial:
        n = x.size // C
        # One kernel call for the whole step: each call of a Numba kernel costs
        # ~0.5-1 us of dispatch, a tenth of a small call.
        policy = _POLICY[on_nonfinite]
        if x.ndim == 3:
            ok = fwd.train_serial_planar(x, _parts(x), config.BLOCK, eps, momentum, w, b,
                                         policy, out, mean, invstd, rm, rv, residual, act,
                                         correction)
        else:
            wide, parts = stats.interleaved_split(*x.shape)
            ok = fwd.train_serial_interleaved(x, wide, parts, config.BLOCK,
                                              *stats.unroll(x.itemsize), eps, momentum, w, b,
                                              policy, out, mean, invstd, rm, rv, residual, act,
                                              correction)
        if not ok:  # "raise": the same moments again, for the message; nothing written
            guard.running_update_mask(*batch_moments(x, serial=True), on_nonfinite)
        if numpy_running:  # rare: the moments again, bitwise the kernel's
            mu, m2 = batch_moments(x, serial=True)
    else:
        n = x.size // C
        with launching():
            mu, m2 = _train_parallel(x, n, w, b, eps, on_nonfinite, out, residual, act)
        # on_nonfinite="skip": channels whose statistics are not finite keep their
        # running statistics (the outputs are written either way).
        keep = guard.running_update_mask(mu, m2, on_nonfinite)
        fwd.finish_train(mu, m2, n, eps, momentum, mean, invstd, rm, rv,
                         _ALL if keep is None else keep, correction)
    if numpy_running:
        keep = guard.running_update_mask(mu, m2, on_nonfinite)
        new_mean, new_var = channel.on_arrays.running_update(running_mean.astype(np.float64),
                                                   running_var.astype(np.float64), momentum,
                                                   mu, m2, n, correction)
        if keep is not None:
            new_mean = np.where(keep, new_mean, running_mean)
            new_var = np.where(keep, new_var, running_var)
        running_mean[...] = new_mean
        running_var[...] = new_var


def _normalize_given(x, n, mu, m2, w, b, eps, out, res, act, serial):
    """``out`` of a training step with the given float64 moments ``(n, mu, m2)``
    (``w``, ``b``: ``_param``s): the normalizing pass alone, serial for small
    batches.  The coefficients are those of the fused kernels
    (``forward.scale_shift``), so ``moments=nbnorm.moments(x)`` gives the plain
    call's bits."""
    scale, shift = _scale_shift(channel.on_arrays.invstd(m2, n, eps), w, b, x.shape[1])
    if not serial:
        with launching():
            normalize(x, mu, scale, shift, out, res, act)
    elif x.ndim == 3:
        fwd.normalize_serial_planar(x, mu, scale, shift, out, res, act)
    else:
        fwd.normalize_serial_interleaved(x, stats.interleaved_split(*x.shape)[0], mu, scale,
                                         shift, out, res, act)


def forward_infer(x, weight, bias, eps, running_mean, running_var, out, mean, invstd,
                  residual=None, relu=False):
    """Inference on canonical views, with the epilogue of ``forward_train``."""
    act = _act(residual, relu)
    C = x.shape[1]
    if x.size <= config.SERIAL_MAX:  # one kernel call: ~4 us less than the NumPy below
        w, b = _param_as_is(weight), _param_as_is(bias)
        rm, rv = _param_as_is(running_mean), _param_as_is(running_var)
        if x.ndim == 3:
            fwd.infer_serial_planar(x, eps, w, b, rm, rv, out, mean, invstd, residual, act)
        else:
            fwd.infer_serial_interleaved(x, eps, w, b, rm, rv, out, mean, invstd, residual, act)
        return
    # Contiguous: strided running stats must not compile another kernel signature.
    mu = np.ascontiguousarray(running_mean, dtype=np.float64)
    inv = channel.on_arrays.invstd(np.asarray(running_var, dtype=np.float64), 1.0, eps)
    scale, shift = _scale_shift(inv, _param(weight), _param(bias), C)
    with launching():
        normalize(x, mu, scale, shift, out, residual, act)
    mean[...] = mu
    invstd[...] = inv


def _reduce_sums(dy, fo, x, mu, s, sx):
    """The parallel reduction of ``backward``: ``sum(g)`` and ``sum(g * (x - mu))``
    per channel into ``s`` and ``sx``, ``g`` = ``dy`` through the ReLU mask of
    ``fo`` (None: no mask)."""
    if x.ndim == 3:
        parts = _parts(x)
        bwd.backward_reduce_planar(dy, fo, x, mu, parts,
                                   stats.planar_group(*x.shape, x.itemsize * 2, parts), s, sx)
    else:
        wide, parts = stats.interleaved_split(*x.shape)
        bwd.backward_reduce_interleaved(dy, fo, x, mu, wide, parts, config.ROWS_UNROLL_MIN_C,
                                        s, sx, _work(parts, 2, wide * x.shape[1]))


def backward_sums(dy, x, mean, forward_out=None):
    """float64 ``(sum(g), sum(g * (x - mean)))`` per channel of canonical views
    (``nbnorm.backward_sums``), ``g`` = ``dy`` through the ReLU mask of
    ``forward_out``: the reduction pass of ``backward`` alone, bitwise the sums
    a training-mode ``backward`` of the same views computes; zeros for views
    without values."""
    C = x.shape[1]
    s = np.zeros(C)
    sx = np.zeros(C)
    if x.size:
        with launching():
            _reduce_sums(dy, forward_out, x, _param(mean), s, sx)
    return s, sx


def _backward_given(dy, fo, x, mean, invstd, weight, grad_input, gres, grad_weight, grad_bias,
                    sums, count, local_sums):
    """Training-mode backward with given ``sums`` of ``count`` values (the whole
    batch's, over every process): the ``grad_input`` pass alone.
    ``grad_weight``/``grad_bias`` are this batch's own, from ``local_sums``
    (reduced here when None), as PyTorch's ``SyncBatchNorm`` returns them."""
    mu, inv, w = _param(mean), _param(invstd), _param(weight)
    if local_sums is None:
        local_sums = backward_sums(dy, x, mu, fo)
    if x.size:
        a, b, k = channel.on_arrays.grad_coeffs(count, _param(sums[0]), _param(sums[1]), inv,
                                                w if w.size else 1.0)
        with launching():
            _grad_input_pass(dy, fo, x, mu, a, b, k, grad_input, gres)
    grad_weight[...] = _param(local_sums[1]) * inv
    grad_bias[...] = local_sums[0]


def _backward_parallel(dy, fo, x, mu, inv, w, training, grad_input, gres, s, sx):
    """The parallel kernels of ``backward``: ``grad_input`` (and ``gres``), and
    ``sum(g)``, ``sum(g * (x - mu))`` per channel into ``s``, ``sx``."""
    C = x.shape[1]
    n = x.size // C
    planar = x.ndim == 3
    if training and planar and _fused(x, x.itemsize * (3 if fo is not None else 2)):
        bwd.train_planar(dy, fo, x, mu, inv, w, _parts(x), grad_input, gres, s, sx,
                         _stream(grad_input))
        return
    _reduce_sums(dy, fo, x, mu, s, sx)
    a, b, k = channel.on_arrays.grad_coeffs(n, s, sx, inv, w if w.size else 1.0)
    if training:
        _grad_input_pass(dy, fo, x, mu, a, b, k, grad_input, gres)
    else:
        zeros = np.zeros(C)
        normalize(dy, zeros, k, zeros, grad_input)


def _mask_first(dy, forward_out, grad_input, grad_residual):
    """Inference-mode backward with an epilogue: the masked gradient ``g`` (the
    gradient with respect to ``residual``) written first, into
    ``grad_residual`` or else into ``grad_input`` itself, and returned; the
    affine map's gradient is then ``g * k`` in place.  ``g`` is ``dy`` or 0, so
    it is exact in every dtype."""
    g = grad_residual if grad_residual is not None else grad_input
    if forward_out is None:
        np.copyto(g, dy)
    else:
        bwd.mask_relu(dy.reshape(-1), forward_out.reshape(-1), g.reshape(-1))
    return g


def backward(dy, x, mean, invstd, weight, training, grad_input, grad_weight, grad_bias,
             forward_out=None, grad_residual=None, sums=None, count=None, local_sums=None):
    """Backward on canonical views.  ``forward_out`` (the ReLU's output, or None)
    masks ``dy``; ``grad_residual`` (or None) receives the masked gradient.
    ``sums``: None, or the ``(sum_dy, sum_dy_xmu)`` of ``count`` values that
    ``grad_input`` uses instead of this batch's (training mode; ``x`` may then
    have no values), ``local_sums`` this batch's own or None."""
    if sums is not None:
        _backward_given(dy, forward_out, x, mean, invstd, weight, grad_input, grad_residual,
                        grad_weight, grad_bias, sums, count, local_sums)
        return
    C = x.shape[1]
    planar = x.ndim == 3
    if not training and (forward_out is not None or grad_residual is not None):
        dy = _mask_first(dy, forward_out, grad_input, grad_residual)
        forward_out = grad_residual = None
    if x.size <= config.SERIAL_MAX:  # one kernel call, gradients of weight and bias too
        args = (_param_as_is(mean), _param_as_is(invstd), _param_as_is(weight))
        if planar:
            bwd.backward_serial_planar(dy, forward_out, x, *args, _parts(x), bool(training),
                                       grad_input, grad_residual, grad_weight, grad_bias)
        else:
            wide, parts = stats.interleaved_split(*x.shape)
            bwd.backward_serial_interleaved(dy, forward_out, x, *args, wide, parts,
                                            config.ROWS_UNROLL_MIN_C,
                                            bool(training), grad_input, grad_residual,
                                            grad_weight, grad_bias)
        return
    mu = _param(mean)
    inv = _param(invstd)
    w = _param(weight)
    s = np.empty(C)
    sx = np.empty(C)
    with launching():
        _backward_parallel(dy, forward_out, x, mu, inv, w, training, grad_input, grad_residual,
                           s, sx)
    grad_weight[...] = sx * inv
    grad_bias[...] = s
