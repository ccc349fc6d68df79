"""The CUDA implementation of forward and backward on canonical device views.

Mirrors ``nbnorm.cpu.ops`` (same functions, same semantics, the same fused
epilogues: ``out = act(bn(x) + residual)`` forward, the ReLU mask and
``grad_residual`` backward); the device arrays themselves (adapters,
canonical views, streams, scratch) are ``arrays``', re-exported here for
``nbnorm.api``.

Every launch goes to one stream (``stream=None``: the default stream).  The
per-channel math runs in ``finalize`` kernels, so no call copies anything
between host and device or waits for the device -- except
``on_nonfinite="raise"``, which must know on the host whether to raise: it
copies the O(C) float64 batch moments back and synchronizes the stream.

Data (``x``, ``out``, ``residual``, ``dy``, ``forward_out``, ``grad_input``,
``grad_residual``) are canonical views of one layout, all of ``x``'s dtype:
float16/float32/float64, or int16 holding bfloat16 bits (``convert``).
Statistics accumulate in float64 for every dtype.
"""

from .. import guard
from . import backward as bwd
from . import convert, finalize
from . import forward as fwd
from . import stats
from ._device import launch_params
from .arrays import (SIMULATOR, as_stream, asarray, check_available, empty,  # noqa: F401
                     empty_like, extent, input_view, output_view, overlap,
                     overlaps_itself, plan, readonly, same, scratch)


def _planar(x):
    return x.ndim == 3


def _per_channel_grid(C, tpb):
    return -(-C // tpb)


def _reduce(x, stream, params, dy=None, mean=None, forward_out=None):
    """First pass: ``partials`` of the statistics (``dy is None``) or of the
    backward sums, laid out ``[k, C, parts]``; no parts (and no launch) for a
    view without values, which the finalize kernels merge to zeros."""
    C = x.shape[1]
    tpb = params[0]
    if x.size == 0:
        return scratch("partials", (3 if dy is None else 2, C, 0), stream)
    if _planar(x):
        parts, step = stats.planar_parts(*x.shape)
    else:
        bx, parts, step = stats.interleaved_parts(x.shape[0], C, tpb)
    partials = scratch("partials", (3 if dy is None else 2, C, parts), stream)
    if dy is None and _planar(x):
        stats.channel_stats_planar(x, partials, parts, step, stream, params)
    elif dy is None:
        stats.channel_stats_interleaved(x, partials, bx, parts, step, stream, params)
    elif _planar(x):
        bwd.backward_reduce_planar(dy, x, mean, partials, parts, step, stream, params,
                                   forward_out)
    else:
        bwd.backward_reduce_interleaved(dy, x, mean, partials, bx, parts, step, stream,
                                        params, forward_out)
    return partials


def normalize(x, coef, out, stream, params, residual=None, relu=False):
    """The elementwise pass: ``out = act(bn(x) + residual)`` with ``coef`` rows
    (center, scale, shift, offset) from ``finalize``; nothing to launch for a
    view without values (given moments: a process without rows)."""
    if x.size:
        kernel = fwd.normalize_planar if _planar(x) else fwd.normalize_interleaved
        kernel(x, coef, out, stream, params, residual, relu)


def _flags(weight, bias, running=None):
    return ((finalize.HAS_WEIGHT if weight is not None else 0)
            | (finalize.HAS_BIAS if bias is not None else 0)
            | (finalize.HAS_RUNNING if running is not None else 0))


def _or(a, placeholder):
    return placeholder if a is None else a


def _kind(a):
    return "float" if a is None else convert.param_kind(a.dtype)


def _dev(a):
    """A Numba device array viewing ``a`` (None stays None)."""
    return None if a is None else asarray(a)


def _merge_stats(partials, C, s, tpb, moments=None):
    """float64 ``(2, C)`` (mean, M2) of the statistics ``partials`` on the device."""
    if moments is None:
        moments = scratch("moments", (2, C), s)
    finalize.merge_stats[_per_channel_grid(C, tpb), tpb, s](partials, moments)
    return moments


def forward_train(x, weight, bias, eps, momentum, running_mean, running_var,
                  out, mean, invstd, on_nonfinite="propagate", residual=None, relu=False,
                  correction=1.0, moments=None, stream=None):
    """A training step: ``out = act(bn(x) + residual)`` (``residual`` None or a
    view like ``x``; ``act`` the ReLU when ``relu``), batch statistics into
    ``mean``/``invstd``, running statistics updated with the variance
    ``M2 / (n - correction)``.  ``moments``: None, or the ``(count, mean, m2)``
    (device arrays) to normalize with instead of ``x``'s own, whose reduction
    is then skipped."""
    params = launch_params()
    tpb = params[0]
    s = as_stream(stream)
    x, out, residual, mean, invstd = map(_dev, (x, out, residual, mean, invstd))
    weight, bias, running_mean, running_var = map(_dev, (weight, bias, running_mean,
                                                         running_var))
    C = x.shape[1]
    if moments is None:
        n = x.size // C
        partials = _reduce(x, s, params)
        given_mean = given_m2 = mean  # placeholders
        given = None
    else:
        n, given_mean, given_m2 = moments[0], _dev(moments[1]), _dev(moments[2])
        partials = given_mean  # a placeholder: the statistics are given
        given = (_kind(given_mean), _kind(given_m2))
    if on_nonfinite == "raise":  # the one host sync: the caller asked for the answer
        if moments is None:
            host = _merge_stats(partials, C, s, tpb).copy_to_host(stream=s)
            s.synchronize()
            guard.running_update_mask(host[0], host[1], "raise")
        else:
            host_mean = given_mean.copy_to_host(stream=s)
            host_m2 = given_m2.copy_to_host(stream=s)
            s.synchronize()
            guard.running_update_mask(host_mean.astype("f8"), host_m2.astype("f8"), "raise")
    flags = _flags(weight, bias, running_mean)
    if on_nonfinite == "skip":
        flags |= finalize.SKIP_NONFINITE
    coef = scratch("coef", (4, C), s)
    kernel = finalize.train_kernel(_kind(weight), _kind(bias), _kind(running_mean),
                                  _kind(running_var), given)
    kernel[_per_channel_grid(C, tpb), tpb, s](
        partials, given_mean, given_m2, float(n), eps, momentum, float(correction),
        _or(weight, mean), _or(bias, mean), _or(running_mean, mean), _or(running_var, mean),
        flags, mean, invstd, coef)
    normalize(x, coef, out, s, params, residual, relu)


def forward_infer(x, weight, bias, eps, running_mean, running_var, out, mean, invstd,
                  residual=None, relu=False, stream=None):
    """Inference with the running statistics, with ``forward_train``'s epilogue."""
    params = launch_params()
    tpb = params[0]
    s = as_stream(stream)
    x, out, residual, mean, invstd = map(_dev, (x, out, residual, mean, invstd))
    weight, bias, running_mean, running_var = map(_dev, (weight, bias, running_mean,
                                                         running_var))
    C = x.shape[1]
    coef = scratch("coef", (4, C), s)
    kernel = finalize.infer_kernel(_kind(running_mean), _kind(running_var), _kind(weight),
                                  _kind(bias))
    kernel[_per_channel_grid(C, tpb), tpb, s](
        running_mean, running_var, eps, _or(weight, mean),
        _or(bias, mean), _flags(weight, bias), mean, invstd, coef)
    normalize(x, coef, out, s, params, residual, relu)


def backward(dy, x, mean, invstd, weight, training, grad_input, grad_weight, grad_bias,
             forward_out=None, grad_residual=None, sums=None, count=None, local_sums=None,
             stream=None):
    """Gradients on canonical views.  ``forward_out`` (the fused ReLU's output, or
    None) masks ``dy``: ``g = dy`` where ``forward_out > 0``, else 0, and ``g``
    replaces ``dy`` everywhere; ``grad_residual`` (or None) receives ``g``.
    ``sums``: None, or the ``(sum_dy, sum_dy_xmu)`` of ``count`` values that
    ``grad_input`` uses instead of this batch's (training mode);
    ``grad_weight``/``grad_bias`` are then this batch's, from ``local_sums``
    (no reduction pass) or, when None, from the reduction."""
    params = launch_params()
    tpb = params[0]
    s = as_stream(stream)
    dy, x, grad_input, forward_out, grad_residual = map(
        _dev, (dy, x, grad_input, forward_out, grad_residual))
    mean, invstd, weight, grad_weight, grad_bias = map(
        _dev, (mean, invstd, weight, grad_weight, grad_bias))
    C = x.shape[1]
    given = (None, None) if sums is None else tuple(map(_dev, sums))
    local = (None, None) if local_sums is None else tuple(map(_dev, local_sums))
    if local_sums is None:
        partials = _reduce(x, s, params, dy=dy, mean=mean, forward_out=forward_out)
    else:
        partials = local[0]  # a placeholder: every sum is given
    n = x.size // C if sums is None else count
    coef = scratch("coef", (6, C), s)
    kernel = finalize.backward_kernel(
        _kind(mean), _kind(invstd), _kind(weight),
        None if sums is None else tuple(map(_kind, given)),
        None if local_sums is None else tuple(map(_kind, local)))
    kernel[_per_channel_grid(C, tpb), tpb, s](
        partials, *(_or(a, grad_bias) for a in given + local), float(n), mean, invstd,
        _or(weight, grad_bias), _flags(weight, None), grad_weight, grad_bias, coef)
    if x.size:  # else a process without rows: its grad_weight/grad_bias are zeros
        pass_ = bwd.grad_input_planar if _planar(x) else bwd.grad_input_interleaved
        pass_(dy, x, coef, grad_input, s, params, bool(training), forward_out, grad_residual)


def moments(x, stream=None):
    """float64 ``(mean, M2)`` device arrays of shape ``(C,)`` of a canonical view
    (``nbnorm.moments``): the statistics ``forward_train`` merges, written by
    ``merge_stats`` into a new ``(2, C)`` array; zeros for no values.  Nothing
    waits for the device."""
    params = launch_params()
    s = as_stream(stream)
    x = _dev(x)
    C = x.shape[1]
    out = _merge_stats(_reduce(x, s, params), C, s, params[0], empty((2, C), "f8"))
    return out[0], out[1]


def backward_sums(dy, x, mean, forward_out=None, stream=None):
    """float64 ``(sum g, sum g * (x - mean))`` device arrays (``nbnorm.backward_sums``):
    ``backward``'s reduction, added by ``merge_sums`` as ``finalize_backward``
    adds it; zeros for no values."""
    params = launch_params()
    s = as_stream(stream)
    dy, x, mean, forward_out = map(_dev, (dy, x, mean, forward_out))
    C = x.shape[1]
    partials = _reduce(x, s, params, dy=dy, mean=mean, forward_out=forward_out)
    out = empty((2, C), "f8")
    finalize.merge_sums[_per_channel_grid(C, params[0]), params[0], s](partials, out)
    return out[0], out[1]


def merge_moments(entries, C, stream=None):
    """``(count, mean, M2)`` of ``(count, mean, m2)`` device ``entries`` merged in
    order into a new float64 ``(2, C)`` array, one launch per entry with values
    (``finalize.merge_moments_kernel``: the bits of ``cpu.ops.merge_moments``)."""
    tpb = launch_params()[0]
    s = as_stream(stream)
    acc = empty((2, C), "f8")
    n = 0
    for nb, mb, qb in entries:
        if nb == 0:
            continue
        mb, qb = _dev(mb), _dev(qb)
        finalize.merge_moments_kernel(_kind(mb), _kind(qb))[_per_channel_grid(C, tpb), tpb, s](
            float(n), float(nb), mb, qb, acc)
        n += nb
    if n == 0:
        _merge_stats(scratch("partials", (3, C, 0), s), C, s, tpb, acc)  # zeros
    return n, acc[0], acc[1]
