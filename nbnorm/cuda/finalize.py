"""O(C) per-channel kernels: the second pass of every reduction, on the device.

One thread per channel merges (statistics: Chan) or sums (backward) the
channel's ``parts`` partials in index order -- deterministic -- and computes
what ``nbnorm.cpu.ops`` computes on the host, with the same expressions
(``nbnorm.channel``, compiled in ``per_channel``): ``invstd``, the ``coef``
rows that the elementwise kernels read, the running-statistic update,
``grad_weight``/``grad_bias``.  So the per-channel math never leaves the
device and no host sync is needed.

``flags`` is a bit set (``HAS_WEIGHT`` ...); arrays that are absent are passed
as a placeholder (any float array) and not read.  Per-channel arrays may have
any float dtype, bfloat16 as int16 bits: the kernels come from factories keyed
by the ``convert.param_kind`` of each per-channel input (``train_kernel`` ...),
compiled for the combinations actually called.

Statistics given by the caller (``forward(moments=)``, ``backward(sums=)``:
synchronized batch norm) replace the merged partials in the same kernels: the
factories take the kinds of those arrays (``given``, ``sums``, ``local``) and
pick, at compile time, the device function that reads a channel's statistics
(``_statistics``, ``_sums``), so the math after it is the same code.
``merge_stats``/``merge_sums`` write the merged partials themselves
(``nbnorm.moments``, ``nbnorm.backward_sums``) and ``merge_moments_kernel``
folds one ``Moments`` into an accumulator (``nbnorm.merge_moments``).

``on_nonfinite``: ``SKIP_NONFINITE`` makes ``finalize_train`` leave the running
statistics of a channel alone when its batch mean or M2 is not finite -- the
same per-channel test as ``nbnorm.guard`` on the CPU, O(C).  ``"raise"`` needs
the answer on the host before anything is written: ``merge_stats`` writes the
float64 (mean, M2) for ``ops`` to copy back and hand to ``nbnorm.guard``.
"""

import functools

from numba import cuda

from . import convert
from ._device import merge
from .backward import A, B, K, MEAN, Q, R
from .forward import CENTER, OFFSET, SCALE, SHIFT
from .per_channel import math as channel_math

HAS_WEIGHT = 1
HAS_BIAS = 2
HAS_RUNNING = 4
SKIP_NONFINITE = 8

_invstd = channel_math.invstd
_running_update = channel_math.running_update
_moments_finite = channel_math.moments_finite
_grad_coeffs = channel_math.grad_coeffs
_affine_coeffs = channel_math.affine_coeffs
_offset = channel_math.offset


@cuda.jit(device=True)
def _merged(partials, c):
    n = 0.0
    m = 0.0
    q = 0.0
    for p in range(partials.shape[2]):
        n, m, q = merge(n, m, q, partials[0, c, p], partials[1, c, p], partials[2, c, p])
    return m, q


@cuda.jit(device=True)
def _summed(partials, c):
    """``(sum g, sum g * (x - mean))`` of channel ``c``: its parts added in order."""
    s = 0.0
    sx = 0.0
    for p in range(partials.shape[2]):
        s += partials[0, c, p]
        sx += partials[1, c, p]
    return s, sx


@functools.lru_cache(maxsize=None)
def _statistics(given):
    """``stats_of(partials, mean, m2, c)``: channel ``c``'s float64 ``(mean, M2)``,
    merged from ``partials`` (``given`` None; ``mean``, ``m2`` placeholders) or
    loaded from ``mean``, ``m2`` of kinds ``given`` (``partials`` a placeholder)."""
    if given is None:
        @cuda.jit(device=True)
        def stats_of(partials, mean, m2, c):
            return _merged(partials, c)
    else:
        load_m, _ = convert.codec(given[0])
        load_q, _ = convert.codec(given[1])

        @cuda.jit(device=True)
        def stats_of(partials, mean, m2, c):
            return load_m(mean[c]), load_q(m2[c])
    return stats_of


@functools.lru_cache(maxsize=None)
def _sums(kinds):
    """``sums_of(partials, s, sx, c)``: channel ``c``'s float64 backward sums,
    added from ``partials`` (``kinds`` None) or loaded from ``s``, ``sx`` of
    ``kinds``."""
    if kinds is None:
        @cuda.jit(device=True)
        def sums_of(partials, s, sx, c):
            return _summed(partials, c)
    else:
        load_s, _ = convert.codec(kinds[0])
        load_sx, _ = convert.codec(kinds[1])

        @cuda.jit(device=True)
        def sums_of(partials, s, sx, c):
            return load_s(s[c]), load_sx(sx[c])
    return sums_of


@functools.lru_cache(maxsize=None)
def _normalizer(weight_kind, bias_kind):
    load_w, _ = convert.codec(weight_kind)
    load_b, _ = convert.codec(bias_kind)

    @cuda.jit(device=True)
    def write_normalize(c, m, inv, weight, bias, flags, mean_out, invstd_out, coef):
        """``mean_out``, ``invstd_out`` and ``coef`` (center, scale, shift, offset)
        of channel ``c`` with mean ``m`` and ``invstd`` ``inv``: what ``normalize``
        reads."""
        w = 1.0
        if flags & HAS_WEIGHT:
            w = load_w(weight[c])
        b = 0.0
        if flags & HAS_BIAS:
            b = load_b(bias[c])
        s = inv * w
        coef[CENTER, c] = m
        coef[SCALE, c] = s
        coef[SHIFT, c] = b
        coef[OFFSET, c] = _offset(m, s, b)
        mean_out[c] = m
        invstd_out[c] = inv

    return write_normalize


@cuda.jit
def merge_stats(partials, moments):
    """``moments[:, c]`` = float64 (mean, M2) of channel ``c``."""
    c = cuda.grid(1)
    if c < moments.shape[1]:
        m, q = _merged(partials, c)
        moments[0, c] = m
        moments[1, c] = q


@cuda.jit
def merge_sums(partials, sums):
    """``sums[:, c]`` = float64 (sum g, sum g * (x - mean)) of channel ``c``,
    added as ``finalize_backward`` adds them."""
    c = cuda.grid(1)
    if c < sums.shape[1]:
        s, sx = _summed(partials, c)
        sums[0, c] = s
        sums[1, c] = sx


@functools.lru_cache(maxsize=None)
def merge_moments_kernel(mean_kind="float", m2_kind="float"):
    """``merge_moments`` for a ``mean`` and ``m2`` of these kinds."""
    load_m, _ = convert.codec(mean_kind)
    load_q, _ = convert.codec(m2_kind)

    @cuda.jit
    def merge_moments(na, nb, mean, m2, acc):
        """Fold ``(nb, mean, m2)`` (``nb > 0``) into the float64 accumulator
        ``acc[:, c]`` = (mean, M2) of ``na`` values: taken as it is when ``na``
        is 0, else ``channel.chan_merge``, as ``cpu.ops.merge_moments``."""
        c = cuda.grid(1)
        if c >= acc.shape[1]:
            return
        if na == 0.0:
            acc[0, c] = load_m(mean[c])
            acc[1, c] = load_q(m2[c])
        else:
            _, m, q = merge(na, acc[0, c], acc[1, c], nb, load_m(mean[c]), load_q(m2[c]))
            acc[0, c] = m
            acc[1, c] = q

    return merge_moments


@functools.lru_cache(maxsize=None)
def train_kernel(weight_kind="float", bias_kind="float", running_mean_kind="float",
                 running_var_kind="float", given=None):
    """``finalize_train`` for per-channel arrays of these kinds; ``given``: None
    (the statistics are the merged ``partials``) or the kinds of the
    ``(mean, m2)`` the caller gives (``_statistics``)."""
    write_normalize = _normalizer(weight_kind, bias_kind)
    load_rm, store_rm = convert.codec(running_mean_kind)
    load_rv, store_rv = convert.codec(running_var_kind)
    stats_of = _statistics(given)

    @cuda.jit
    def finalize_train(partials, given_mean, given_m2, n, eps, momentum, correction, weight,
                       bias, running_mean, running_var, flags, mean_out, invstd_out, coef):
        """Batch statistics -> ``mean_out``, ``invstd_out``, running stats (the
        variance ``M2 / (n - correction)``), and ``coef`` for ``normalize``."""
        c = cuda.grid(1)
        if c >= mean_out.shape[0]:
            return
        m, q = stats_of(partials, given_mean, given_m2, c)
        write_normalize(c, m, _invstd(q, n, eps), weight, bias, flags, mean_out,
                        invstd_out, coef)
        if flags & HAS_RUNNING:
            if (flags & SKIP_NONFINITE) and not _moments_finite(m, q):
                return
            rm, rv = _running_update(load_rm(running_mean[c]), load_rv(running_var[c]),
                                     momentum, m, q, n, correction)
            running_mean[c] = store_rm(rm)
            running_var[c] = store_rv(rv)

    return finalize_train


@functools.lru_cache(maxsize=None)
def infer_kernel(running_mean_kind="float", running_var_kind="float", weight_kind="float",
                 bias_kind="float"):
    """``finalize_infer`` for per-channel arrays of these kinds."""
    write_normalize = _normalizer(weight_kind, bias_kind)
    load_rm, _ = convert.codec(running_mean_kind)
    load_rv, _ = convert.codec(running_var_kind)

    @cuda.jit
    def finalize_infer(running_mean, running_var, eps, weight, bias, flags,
                       mean_out, invstd_out, coef):
        """Running statistics -> ``mean_out``, ``invstd_out`` and ``coef``."""
        c = cuda.grid(1)
        if c >= mean_out.shape[0]:
            return
        inv = _invstd(load_rv(running_var[c]), 1.0, eps)
        write_normalize(c, load_rm(running_mean[c]), inv, weight, bias, flags, mean_out,
                        invstd_out, coef)

    return finalize_infer


@functools.lru_cache(maxsize=None)
def backward_kernel(mean_kind="float", invstd_kind="float", weight_kind="float", sums=None,
                    local=None):
    """``finalize_backward`` for per-channel arrays of these kinds.  ``sums``:
    None (``coef`` from the summed ``partials``) or the kinds of the given
    ``(sum_dy, sum_dy_xmu)`` (``_sums``); ``local``: the kinds of this batch's
    own given sums for ``grad_weight``/``grad_bias``, or None (from
    ``partials``, which are those sums whether ``sums`` is given or not)."""
    load_m, _ = convert.codec(mean_kind)
    load_i, _ = convert.codec(invstd_kind)
    load_w, _ = convert.codec(weight_kind)
    sums_of = _sums(sums)
    local_of = _sums(local)
    own = sums is not None or local is not None  # grad_weight/grad_bias from local_of

    @cuda.jit
    def finalize_backward(partials, s_in, sx_in, ls_in, lsx_in, n, mean, invstd, weight, flags,
                          grad_weight, grad_bias, coef):
        """Sums of ``g`` and ``g * (x - mean)`` over ``n`` values -> ``coef`` rows
        (mean, a, b, k, q, r) for ``grad_input``; this batch's sums ->
        ``grad_weight``, ``grad_bias``."""
        c = cuda.grid(1)
        if c >= grad_bias.shape[0]:
            return
        s, sx = sums_of(partials, s_in, sx_in, c)
        mu = load_m(mean[c])
        inv = load_i(invstd[c])
        w = 1.0
        if flags & HAS_WEIGHT:
            w = load_w(weight[c])
        a, b, k = _grad_coeffs(n, s, sx, inv, w)
        q, r = _affine_coeffs(mu, a, b, k)
        coef[MEAN, c] = mu
        coef[A, c] = a
        coef[B, c] = b
        coef[K, c] = k
        coef[Q, c] = q
        coef[R, c] = r
        if own:
            s, sx = local_of(partials, ls_in, lsx_in, c)
        grad_weight[c] = sx * inv
        grad_bias[c] = s

    return finalize_backward


def kernels(weight_kind="float", bias_kind="float", running_kind="float", mean_kind="float",
            invstd_kind="float"):
    """name -> dispatcher of every per-channel kernel for these kinds (both
    running statistics of ``running_kind``)."""
    return {"merge_stats": merge_stats, "merge_sums": merge_sums,
            "merge_moments": merge_moments_kernel(),
            "finalize_train": train_kernel(weight_kind, bias_kind, running_kind, running_kind),
            "finalize_infer": infer_kernel(running_kind, running_kind, weight_kind, bias_kind),
            "finalize_backward": backward_kernel(mean_kind, invstd_kind, weight_kind)}
