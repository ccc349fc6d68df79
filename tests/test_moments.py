"""Mergeable statistics: ``moments``, ``merge_moments``, ``forward(moments=)``,
``backward_sums`` and ``backward(sums=, count=)`` on the CPU.

Synchronized batch norm splits one batch over processes: each computes its
part's moments, all merge them in one order, each normalizes its part with the
merged ones; backward adds each part's sums.  Here the "processes" are slices
of one batch, so every result is checked against the plain call on the whole
batch (and ``nbnorm.reference``), with uneven parts and a part without rows.
The CUDA versions are in ``tests/test_cuda_moments.py``, the ``unbiased=``
conventions in ``tests/test_conventions.py``.
"""

import numpy as np
import pytest

import nbnorm
from nbnorm import reference
from helpers import (REF_TOL, assert_close, assert_same, bits, channel, data, positive,
                     refused, use_path)

#: (id, shape, axis): planar, interleaved and channels-last; the batch axis is
#: the one split (axis 0; for channels-last too).
CASES = [("NCHW", (9, 3, 4, 5), 1), ("NC", (23, 6), 1), ("NHWC", (7, 3, 4, 5), -1)]
CASE_IDS = [c[0] for c in CASES]
CASE_PARAMS = [c[1:] for c in CASES]


def _split(x, sizes):
    """``x`` cut along axis 0 into parts of ``sizes`` rows (0 allowed)."""
    edges = np.cumsum([0, *sizes])
    assert edges[-1] == x.shape[0]
    return [x[a:b] for a, b in zip(edges[:-1], edges[1:])]


def _uneven(n):
    """Uneven part sizes of ``n`` rows with an empty part in the middle."""
    a = max(1, n // 4)
    return [a, 0, n - 3 * a, 2 * a]


def _ref_moments(x, axis):
    x2 = np.moveaxis(x.astype(np.float64), axis, 0).reshape(x.shape[axis], -1)
    mean = x2.mean(axis=1)
    return x2.shape[1], mean, ((x2 - mean[:, None]) ** 2).sum(axis=1)


# ------------------------------------------------------------------ moments

@pytest.mark.parametrize("offset", [0.0, 1e4])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", CASE_PARAMS, ids=CASE_IDS)
def test_moments_match_the_float64_reference(rng, shape, axis, dtype, offset):
    """Exact against two-pass float64 on the same values, also where |mean| >> std."""
    x = data(rng, shape, dtype, loc=offset + rng.uniform(-2, 2), scale=1.0)
    m = nbnorm.moments(x, axis=axis)
    n, mean, m2 = _ref_moments(x, axis)
    assert type(m) is nbnorm.Moments and type(m.count) is int and m.count == n
    assert m.mean.dtype == m.m2.dtype == np.float64 and m.mean.shape == (shape[axis],)
    np.testing.assert_allclose(m.mean, mean, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(m.m2, m2, rtol=1e-10)


def test_moments_of_half_data(rng):
    x = data(rng, (6, 3, 7), np.float16)
    m = nbnorm.moments(x)
    n, mean, m2 = _ref_moments(x, 1)
    assert m.count == n
    np.testing.assert_allclose(m.mean, mean, rtol=1e-14)
    np.testing.assert_allclose(m.m2, m2, rtol=1e-12)


@pytest.mark.parametrize("shape,axis", [((0, 3, 4), 1), ((0, 5), 1), ((2, 3, 0), 1),
                                        ((0, 4, 3), -1)])
def test_a_batch_without_rows_has_count_zero(shape, axis):
    m = nbnorm.moments(np.empty(shape, np.float32), axis=axis)
    C = shape[axis]
    assert m.count == 0 and m.mean.shape == m.m2.shape == (C,)
    assert not m.mean.any() and not m.m2.any()


@pytest.mark.parametrize("path", ["serial", "fused", "parallel", "rows"])
def test_moments_are_the_statistics_forward_normalizes_with(rng, monkeypatch, path):
    """``forward(x, moments=moments(x))`` is bitwise ``forward(x)`` on every kernel
    path: outputs, statistics and running statistics."""
    use_path(monkeypatch, path)
    shape = (5, 4, 7) if path != "parallel" else (29, 4)
    x = data(rng, shape, np.float32)
    w, b = channel(rng, 4, np.float32), channel(rng, 4, np.float32)
    rm, rv = channel(rng, 4, np.float32), positive(rng, 4, np.float32)
    plain = nbnorm.forward(x, w, b, rm.copy(), rv.copy(), momentum=0.3)
    rm_p, rv_p = rm.copy(), rv.copy()
    nbnorm.forward(x, w, b, rm_p, rv_p, momentum=0.3)
    rm_g, rv_g = rm.copy(), rv.copy()
    given = nbnorm.forward(x, w, b, rm_g, rv_g, momentum=0.3, moments=nbnorm.moments(x))
    for name, a, g in zip(plain._fields, plain, given):
        assert_same(g, a, name)
    assert_same(rm_g, rm_p, "running_mean")
    assert_same(rv_g, rv_p, "running_var")


# ------------------------------------------------------------- merge_moments

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", CASE_PARAMS, ids=CASE_IDS)
def test_merged_parts_are_the_moments_of_the_whole(rng, shape, axis, dtype):
    x = data(rng, shape, dtype, loc=1e4, scale=1.0)
    parts = [nbnorm.moments(p, axis=axis) for p in _split(x, _uneven(shape[0]))]
    merged = nbnorm.merge_moments(parts)
    whole = nbnorm.moments(x, axis=axis)
    assert merged.count == whole.count
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-13)
    # The parts' means carry ~1e-16 * 1e4 of rounding, and Chan's d * d * na * nb / n
    # turns that into ~1e-12 of M2: the same error as any other split of the sums.
    np.testing.assert_allclose(merged.m2, whole.m2, rtol=1e-11)
    # the same list in the same order: the same bits, on every "process"
    again = nbnorm.merge_moments(list(parts))
    assert bits(again.mean) == bits(merged.mean) and bits(again.m2) == bits(merged.m2)
    # empty parts change nothing, wherever they are; one part merges to itself
    kept = [p for p in parts if p.count]
    empty = nbnorm.Moments(0, np.full(shape[axis], np.nan), np.full(shape[axis], np.inf))
    for seq in ([empty, *kept], [*kept, empty], [kept[0], empty, *kept[1:]]):
        m = nbnorm.merge_moments(seq)
        assert m.count == merged.count
        assert bits(m.mean) == bits(merged.mean) and bits(m.m2) == bits(merged.m2)
    one = nbnorm.merge_moments([kept[0]])
    assert bits(one.mean) == bits(kept[0].mean) and one.mean is not kept[0].mean


def test_merge_follows_chans_formula_in_the_given_order(rng):
    """A left fold of Chan's formula (float64 NumPy, written out here), so a
    different order may differ in the last bits but not more."""
    C = 5
    seq = [nbnorm.Moments(int(n), rng.standard_normal(C) + 10, rng.uniform(0.5, 3, C) * n)
           for n in (3, 17, 1, 8)]
    n, mean, m2 = seq[0].count, seq[0].mean, seq[0].m2
    for e in seq[1:]:
        d = e.mean - mean
        total = n + e.count
        mean, m2 = mean + d * e.count / total, m2 + e.m2 + d * d * n * e.count / total
        n = total
    got = nbnorm.merge_moments(seq)
    assert got.count == n
    np.testing.assert_allclose(got.mean, mean, rtol=1e-15)
    np.testing.assert_allclose(got.m2, m2, rtol=1e-14)
    backwards = nbnorm.merge_moments(seq[::-1])
    np.testing.assert_allclose(backwards.m2, got.m2, rtol=1e-14)


def test_merge_of_only_empty_batches_and_of_other_float_dtypes(rng):
    z = nbnorm.merge_moments([nbnorm.Moments(0, np.ones(3), np.ones(3))] * 2)
    assert z.count == 0 and not z.mean.any() and not z.m2.any()
    m = nbnorm.moments(data(rng, (10, 3), np.float64))
    as32 = (m.count, m.mean.astype(np.float32), list(m.m2))  # any float arrays, lists too
    got = nbnorm.merge_moments([as32, m])
    assert got.mean.dtype == np.float64 and got.count == 2 * m.count
    np.testing.assert_allclose(got.mean, m.mean, rtol=1e-7)


# -------------------------------------------------- forward(moments=)

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", CASE_PARAMS, ids=CASE_IDS)
def test_forward_with_merged_moments_is_forward_on_the_whole_batch(rng, shape, axis, dtype):
    C = shape[axis]
    x = data(rng, shape, dtype, loc=1e4 if dtype == np.float64 else None)
    w, b = channel(rng, C, dtype), channel(rng, C, dtype)
    rm0, rv0 = channel(rng, C, dtype), positive(rng, C, dtype)
    rm, rv = rm0.copy(), rv0.copy()
    full = nbnorm.forward(x, w, b, rm, rv, momentum=0.2, axis=axis)
    ref = reference.forward(x, w, b, rm0, rv0, momentum=0.2, axis=axis)
    parts = _split(x, _uneven(shape[0]))
    merged = nbnorm.merge_moments([nbnorm.moments(p, axis=axis) for p in parts])
    results, running = [], []
    for p in parts:
        rm_p, rv_p = rm0.copy(), rv0.copy()
        results.append(nbnorm.forward(p, w, b, rm_p, rv_p, momentum=0.2, axis=axis,
                                      moments=merged))
        running.append((rm_p, rv_p))
    tol = REF_TOL[np.dtype(dtype)]
    assert results[1].out.shape == parts[1].shape  # the part without rows
    assert_close(np.concatenate([r.out for r in results]), full.out, tol, "out")
    assert_close(np.concatenate([r.out for r in results]), ref.out, tol, "out vs reference")
    for r, (rm_p, rv_p) in zip(results, running):  # every part: the same bits
        for got, first in ((r.mean, results[0].mean), (r.invstd, results[0].invstd),
                           (rm_p, running[0][0]), (rv_p, running[0][1])):
            assert_same(got, first)
    for name, got, whole, r in (("mean", results[0].mean, full.mean, ref.mean),
                                ("invstd", results[0].invstd, full.invstd, ref.invstd),
                                ("running_mean", running[0][0], rm, ref.running_mean),
                                ("running_var", running[0][1], rv, ref.running_var)):
        assert_close(got, whole, tol, name)
        assert_close(got, r, tol, f"{name} vs reference")


def test_forward_with_moments_keeps_the_epilogue_and_on_nonfinite(rng):
    x = data(rng, (6, 3, 5), np.float32)
    res = data(rng, x.shape, np.float32)
    m = nbnorm.moments(x)
    a = nbnorm.forward(x, moments=m, activation="relu", residual=res)
    b = nbnorm.forward(x, activation="relu", residual=res)
    assert_same(a.out, b.out)
    # decided on the given moments, not on x: a NaN channel in m skips or raises
    bad = nbnorm.Moments(m.count, m.mean.copy(), m.m2.copy())
    bad.m2[1] = np.nan
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    nbnorm.forward(x, None, None, rm, rv, moments=bad, on_nonfinite="skip")
    assert rm[1] == 0 and rv[1] == 1 and rm[0] != 0
    refused(nbnorm.forward, FloatingPointError, "not finite", x=x, running_mean=rm,
            running_var=rv, out=np.zeros_like(x), moments=bad, on_nonfinite="raise")


# ----------------------------------------------- backward_sums, backward(sums=)

@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", CASE_PARAMS, ids=CASE_IDS)
def test_backward_with_global_sums_is_backward_on_the_whole_batch(rng, shape, axis, dtype,
                                                                 relu):
    C = shape[axis]
    x = data(rng, shape, dtype)
    dy = data(rng, shape, dtype)
    w, b = channel(rng, C, dtype), channel(rng, C, dtype)
    act = "relu" if relu else None
    f = nbnorm.forward(x, w, b, axis=axis, activation=act)
    fo = f.out if relu else None
    full = nbnorm.backward(dy, x, f.mean, f.invstd, w, axis=axis, activation=act,
                           forward_out=fo)
    ref = reference.backward(dy, x, f.mean, f.invstd, w, axis=axis, activation=act,
                             forward_out=fo)
    sizes = _uneven(shape[0])
    xs, dys = _split(x, sizes), _split(dy, sizes)
    fos = _split(fo, sizes) if relu else [None] * len(sizes)
    local = [nbnorm.backward_sums(g, p, f.mean, f.invstd, axis=axis, activation=act,
                                  forward_out=o) for g, p, o in zip(dys, xs, fos)]
    total = (sum(s[0] for s in local), sum(s[1] for s in local))
    assert all(s[0].dtype == s[1].dtype == np.float64 for s in local)
    assert not local[1][0].any() and not local[1][1].any()  # no rows: zero sums
    n = x.size // C
    grads = []
    for g, p, o, own in zip(dys, xs, fos, local):
        grads.append(nbnorm.backward(g, p, f.mean, f.invstd, w, axis=axis, activation=act,
                                     forward_out=o, sums=total, count=n, local_sums=own))
        reduced = nbnorm.backward(g, p, f.mean, f.invstd, w, axis=axis, activation=act,
                                  forward_out=o, sums=total, count=n)  # reduces its own
        for name, a, r in zip(reduced._fields, grads[-1], reduced):
            assert_same(r, a, f"{name} without local_sums")
    tol = REF_TOL[np.dtype(dtype)]
    gi = np.concatenate([q.grad_input for q in grads])
    assert_close(gi, full.grad_input, tol, "grad_input")
    assert_close(gi, ref.grad_input, tol, "grad_input vs reference")
    # grad_weight / grad_bias are each part's own (PyTorch's SyncBatchNorm): they add up
    assert not grads[1].grad_weight.any() and not grads[1].grad_bias.any()
    for name in ("grad_weight", "grad_bias"):
        total_grad = sum(getattr(q, name).astype(np.float64) for q in grads)
        assert_close(total_grad, getattr(full, name), tol, name)
        assert_close(total_grad, getattr(ref, name), tol, f"{name} vs reference")
    for q, own in zip(grads, local):
        assert_same(q.grad_bias, own[0].astype(dtype), "grad_bias is the local sum_dy")


@pytest.mark.parametrize("path", ["serial", "fused", "parallel", "rows"])
def test_backward_of_its_own_sums_is_plain_backward(rng, monkeypatch, path):
    """One process: ``backward(sums=backward_sums(...), count=n)`` has the bits of
    ``backward``, whose reduction it is."""
    use_path(monkeypatch, path)
    shape = (5, 4, 7) if path != "parallel" else (29, 4)
    x, dy = data(rng, shape, np.float32), data(rng, shape, np.float32)
    w = channel(rng, 4, np.float32)
    f = nbnorm.forward(x, w)
    plain = nbnorm.backward(dy, x, f.mean, f.invstd, w)
    sums = nbnorm.backward_sums(dy, x, f.mean, f.invstd)
    given = nbnorm.backward(dy, x, f.mean, f.invstd, w, sums=sums, count=x.size // 4)
    for name, a, g in zip(plain._fields, plain, given):
        assert_same(g, a, name)


def test_preallocated_outputs_with_given_statistics(rng):
    x, dy = data(rng, (7, 3, 4), np.float64), data(rng, (7, 3, 4), np.float64)
    m = nbnorm.moments(x)
    out, mean, invstd = np.full_like(x, np.nan), np.full(3, np.nan), np.full(3, np.nan)
    r = nbnorm.forward(x, moments=m, out=out, mean=mean, invstd=invstd)
    assert r.out is out and r.mean is mean and r.invstd is invstd
    assert_same(out, nbnorm.forward(x).out)
    gi, gw, gb = np.full_like(x, np.nan), np.full(3, np.nan), np.full(3, np.nan)
    s = nbnorm.backward_sums(dy, x, mean)
    g = nbnorm.backward(dy, x, mean, invstd, sums=s, count=m.count, local_sums=s,
                        grad_input=gi, grad_weight=gw, grad_bias=gb)
    assert g.grad_input is gi and g.grad_weight is gw and g.grad_bias is gb
    for a, b in zip(g, nbnorm.backward(dy, x, mean, invstd)):
        assert_same(a, b)


def test_statistics_in_other_forms_are_accepted(rng):
    """Lists, strided views and a ``(2, C)`` array of sums: the same bits."""
    x, dy = data(rng, (6, 3, 5), np.float64), data(rng, (6, 3, 5), np.float64)
    m = nbnorm.moments(x)
    plain = nbnorm.forward(x, moments=m)
    other = nbnorm.forward(x, moments=(np.int64(m.count), m.mean.tolist(),
                                       np.repeat(m.m2, 2)[::2]))
    for a, b in zip(plain, other):
        assert_same(a, b)
    s = nbnorm.backward_sums(dy, x, plain.mean)
    g = nbnorm.backward(dy, x, plain.mean, plain.invstd, sums=s, count=m.count)
    g2 = nbnorm.backward(dy, x, plain.mean, plain.invstd, sums=np.stack(s), count=m.count,
                         local_sums=[s[0].tolist(), s[1]])
    for a, b in zip(g, g2):
        assert_same(a, b)


# ----------------------------------------------------------------- bad input

def _forward_kwargs(rng):
    x = data(rng, (4, 3, 5), np.float32)
    m = nbnorm.moments(x)
    return dict(x=x, running_mean=np.zeros(3, np.float32), running_var=np.ones(3, np.float32),
                out=np.full(x.shape, 7, np.float32), mean=np.full(3, 7, np.float32),
                invstd=np.full(3, 7, np.float32)), m


@pytest.mark.parametrize("moments,exc,match", [
    (5, TypeError, "moments must be a sequence"),
    ((3, np.zeros(3)), TypeError, "moments must be a sequence"),
    ((-1, np.zeros(3), np.ones(3)), ValueError, r"moments.count must be >= 0"),
    ((0, np.zeros(3), np.ones(3)), ValueError, "more than 1 value per channel"),
    ((1, np.zeros(3), np.ones(3)), ValueError, "more than 1 value per channel"),
    ((2.5, np.zeros(3), np.ones(3)), TypeError, "moments.count must be an integer"),
    (("20", np.zeros(3), np.ones(3)), TypeError, "moments.count must be an integer"),
    ((True, np.zeros(3), np.ones(3)), TypeError, "moments.count must be an integer"),
    ((20, np.zeros(4), np.ones(3)), ValueError, r"moments.mean must have shape \(3,\)"),
    ((20, np.zeros(3), np.ones((3, 1))), ValueError, r"moments.m2 must have shape"),
    ((20, np.zeros(3, np.int64), np.ones(3)), TypeError, "moments.mean must be a floating"),
    ((20, None, np.ones(3)), TypeError, "moments.mean must be an array"),
], ids=["not-a-sequence", "two-items", "negative-count", "count-0", "count-1", "float-count",
        "str-count", "bool-count", "mean-shape", "m2-2d", "int-mean", "no-mean"])
def test_bad_moments_are_refused_before_anything_is_written(rng, moments, exc, match):
    kw, _ = _forward_kwargs(rng)
    refused(nbnorm.forward, exc, match, moments=moments, **kw)


def test_moments_in_inference_or_aliasing_an_output_are_refused(rng):
    kw, m = _forward_kwargs(rng)
    refused(nbnorm.forward, ValueError, "moments= is for training", moments=m,
            **dict(kw, training=False))
    buf = np.zeros(3)
    kw.update(mean=np.full(3, 7.0), invstd=np.full(3, 7.0), x=kw["x"].astype(np.float64),
              out=None)
    refused(nbnorm.forward, ValueError, "overlap", moments=(m.count, buf, m.m2),
            **dict(kw, invstd=buf))
    refused(nbnorm.forward, TypeError, "unbiased must be a bool", moments=m,
            **dict(kw, unbiased="no"))


def _backward_kwargs(rng):
    x = data(rng, (4, 3, 5), np.float32)
    f = nbnorm.forward(x)
    return dict(grad_out=data(rng, x.shape, np.float32), x=x, mean=f.mean, invstd=f.invstd,
                grad_input=np.full(x.shape, 7, np.float32), grad_weight=np.full(3, 7, np.float32),
                grad_bias=np.full(3, 7, np.float32))


_S = (np.ones(3), np.ones(3))


@pytest.mark.parametrize("extra,exc,match", [
    (dict(sums=_S), ValueError, "sums= needs count="),
    (dict(count=20), ValueError, "go with sums="),
    (dict(local_sums=_S, count=20), ValueError, "go with sums="),
    (dict(sums=_S, count=20, training=False), ValueError, "sums= is for training"),
    (dict(sums=np.ones(3), count=20), TypeError, "sums must be a sequence"),
    (dict(sums=(np.ones(3),), count=20), TypeError, "sums must be a sequence"),
    (dict(sums=(np.ones(4), np.ones(3)), count=20), ValueError, r"sums\[0\] \(sum_dy\)"),
    (dict(sums=(np.ones(3), None), count=20), TypeError, r"sums\[1\] \(sum_dy_xmu\)"),
    (dict(sums=_S, count=20, local_sums=(np.ones(3), np.ones(2))), ValueError,
     r"local_sums\[1\]"),
    (dict(sums=_S, count=1), ValueError, "more than 1 value per channel"),
    (dict(sums=_S, count=-3), ValueError, "count must be >= 0"),
    (dict(sums=_S, count=20.0), TypeError, "count must be an integer"),
    (dict(sums=(np.ones(3, np.int32), np.ones(3)), count=20), TypeError, "floating"),
], ids=["no-count", "count-alone", "local-alone", "inference", "one-array", "one-item",
        "sum-shape", "none-sum", "local-shape", "count-1", "negative-count", "float-count",
        "int-sums"])
def test_bad_sums_are_refused_before_anything_is_written(rng, extra, exc, match):
    refused(nbnorm.backward, exc, match, **_backward_kwargs(rng), **extra)


def test_sums_aliasing_an_output_are_refused(rng):
    kw = _backward_kwargs(rng)
    gb = np.full(3, 7, np.float32)
    refused(nbnorm.backward, ValueError, "overlap", sums=(gb, np.ones(3)), count=20,
            **dict(kw, grad_bias=gb))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(mean=None), ValueError, "needs the mean"),
    (dict(mean=np.zeros(4)), ValueError, r"mean must have shape \(3,\)"),
    (dict(invstd=np.zeros(2)), ValueError, r"invstd must have shape \(3,\)"),
    (dict(grad_out=np.zeros((4, 3, 4), np.float32)), ValueError, "grad_out must have x's shape"),
    (dict(forward_out=np.zeros((4, 3, 5), np.float32)), ValueError, "only read with"),
    (dict(activation="relu"), ValueError, "needs forward_out"),
], ids=["no-mean", "mean-shape", "invstd-shape", "grad_out-shape", "forward_out-alone",
        "relu-alone"])
def test_backward_sums_bad_input(rng, kwargs, exc, match):
    x = data(rng, (4, 3, 5), np.float32)
    base = dict(grad_out=data(rng, x.shape, np.float32), x=x, mean=np.zeros(3),
                invstd=np.ones(3))
    refused(nbnorm.backward_sums, exc, match, **dict(base, **kwargs))


@pytest.mark.parametrize("seq,exc,match", [
    ([], ValueError, "at least one"),
    ([(2, np.zeros(3), np.zeros(3)), (2, np.zeros(4), np.zeros(4))], ValueError,
     r"seq\[1\].mean must have shape \(3,\)"),
    ([(2, np.zeros((3, 1)), np.zeros(3))], ValueError, "1-dimensional"),
    ([(-2, np.zeros(3), np.zeros(3))], ValueError, r"seq\[0\].count must be >= 0"),
    ([(2, np.zeros(3), np.zeros(3)), (1.5, np.zeros(3), np.zeros(3))], TypeError,
     r"seq\[1\].count must be an integer"),
    ([(2, np.zeros(3, np.int8), np.zeros(3))], TypeError, "floating"),
    ([(2, None, np.zeros(3))], TypeError, "None"),
    ([7], TypeError, r"seq\[0\] must be a sequence"),
], ids=["empty", "other-C", "2d", "negative", "float-count", "int-mean", "none-mean",
        "not-a-sequence"])
def test_merge_moments_bad_input(seq, exc, match):
    with pytest.raises(exc, match=match):
        nbnorm.merge_moments(seq)
