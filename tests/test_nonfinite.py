"""``forward(on_nonfinite=...)``: guarded running statistics, NaN/inf propagation.

propagate (default, PyTorch's behaviour) lets NaN/inf reach the running stats;
skip keeps them for exactly the channels whose batch mean/variance is not finite
(visible to the caller as a non-finite returned mean/invstd); raise writes
nothing at all.
"""

import numpy as np
import pytest

import nbnorm
from nbnorm import reference
from helpers import bits, data, forward_call, refused

# (shape, axis): planar, interleaved, channels-last, middle axis (small: the
# serial kernels), then shapes for each parallel path of cpu/ops (fused planar
# with C >= 8, split planar, split interleaved): each must decide before writing.
CASES = [((6, 4, 9), 1), ((33, 5), 1), ((3, 4, 5, 6), -1), ((4, 3, 5, 2), 2)]
BIG_CASES = [((4, 16, 1024), 1), ((2, 3, 50000), 1), ((70000, 2), 1)]
ALL_CASES = CASES + BIG_CASES
POISONS = [np.nan, np.inf, -np.inf, "inf-inf"]


def _poison(x, axis, c, poison, rng):
    """Put ``poison`` into one random element of channel ``c`` (two for inf-inf)."""
    xc = np.moveaxis(x, axis, 0)[c]  # a view
    flat = rng.choice(xc.size, size=2, replace=False)
    idx = np.unravel_index(flat, xc.shape)
    if poison == "inf-inf":
        xc[tuple(i[0] for i in idx)] = np.inf
        xc[tuple(i[1] for i in idx)] = -np.inf
    else:
        xc[tuple(i[0] for i in idx)] = poison


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("poison", POISONS, ids=["nan", "inf", "-inf", "inf-inf"])
@pytest.mark.parametrize("shape,axis", ALL_CASES)
def test_nonfinite_stays_in_its_channel(rng, shape, axis, poison, dtype):
    """NaN/inf in one channel make that channel's mean/invstd/out non-finite
    (propagate) and leave every other channel exact; the backward gradients of the
    other channels are unaffected too."""
    k = forward_call(rng, shape, dtype, axis, outputs=False)
    x, w, b, rm, rv = (k[n] for n in ("x", "weight", "bias", "running_mean", "running_var"))
    C = shape[axis]
    c = int(rng.integers(C))
    _poison(x, axis, c, poison, rng)
    rm0, rv0 = rm.copy(), rv.copy()
    res = nbnorm.forward(x, w, b, rm, rv, axis=axis)

    good = np.arange(C) != c
    assert not np.isfinite(res.mean[c]) or not np.isfinite(res.invstd[c])
    assert np.isfinite(res.mean[good]).all() and np.isfinite(res.invstd[good]).all()
    out_c = np.moveaxis(res.out, axis, 0)
    assert not np.isfinite(out_c[c]).all()
    assert np.isfinite(out_c[good]).all()
    # propagate: the bad channel's running stats are poisoned, like PyTorch's
    assert not (np.isfinite(rm[c]) and np.isfinite(rv[c]))

    # the good channels equal a computation on the good channels alone
    keep = np.flatnonzero(good)
    xg = np.take(x, keep, axis=axis)
    exp = reference.forward(xg, w[keep], b[keep], rm0[keep], rv0[keep], axis=axis)
    tol = dict(rtol=3e-6, atol=3e-6) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(np.take(res.out, keep, axis=axis), exp.out, **tol)
    np.testing.assert_allclose(rm[keep], exp.running_mean, **tol)
    np.testing.assert_allclose(rv[keep], exp.running_var, **tol)

    dy = data(rng, shape, dtype)
    g = nbnorm.backward(dy, x, res.mean, res.invstd, w, axis=axis)
    gi = np.moveaxis(g.grad_input, axis, 0)
    assert np.isfinite(gi[good]).all()
    assert np.isfinite(g.grad_weight[good]).all() and np.isfinite(g.grad_bias[good]).all()
    ref = reference.backward(np.take(dy, keep, axis=axis), xg, res.mean[keep],
                             res.invstd[keep], w[keep], axis=axis)
    gtol = dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(np.take(g.grad_input, keep, axis=axis), ref.grad_input, **gtol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", ALL_CASES)
def test_skip_keeps_running_stats_of_bad_channels(rng, shape, axis, dtype):
    """skip: outputs identical to propagate's, bad channels' running stats unchanged
    bitwise, good channels updated exactly as propagate updates them."""
    C = shape[axis]
    k = forward_call(rng, shape, dtype, axis, affine=False, outputs=False)
    x, rm, rv = k["x"], k["running_mean"], k["running_var"]
    bad = rng.choice(C, size=max(1, C // 2), replace=False)
    for i, c in enumerate(bad):
        _poison(x, axis, c, POISONS[i % len(POISONS)], rng)
    rm_p, rv_p = rm.copy(), rv.copy()
    rm_s, rv_s = rm.copy(), rv.copy()
    p = nbnorm.forward(x, None, None, rm_p, rv_p, axis=axis)
    s = nbnorm.forward(x, None, None, rm_s, rv_s, axis=axis, on_nonfinite="skip")
    for a, b in zip(p, s):
        assert bits(a) == bits(b)
    # which channels were skipped is visible in the returned statistics
    seen = ~(np.isfinite(s.mean) & np.isfinite(s.invstd))
    assert set(np.flatnonzero(seen)) == set(bad.tolist())
    assert bits(rm_s[seen]) == bits(rm[seen]) and bits(rv_s[seen]) == bits(rv[seen])
    assert bits(rm_s[~seen]) == bits(rm_p[~seen]) and bits(rv_s[~seen]) == bits(rv_p[~seen])
    assert np.isfinite(rm_s).all() and np.isfinite(rv_s).all()


def test_skip_with_all_finite_equals_propagate(rng):
    k = forward_call(rng, (8, 3, 7), np.float32, affine=False, outputs=False)
    x, r1 = k["x"], (k["running_mean"], k["running_var"])
    r2 = tuple(a.copy() for a in r1)
    a = nbnorm.forward(x, None, None, *r1)
    b = nbnorm.forward(x, None, None, *r2, on_nonfinite="skip")
    c = nbnorm.forward(x, None, None, *(t.copy() for t in r1), on_nonfinite="raise")
    assert all(bits(u) == bits(v) == bits(w) for u, v, w in zip(a, b, c))
    assert all(bits(u) == bits(v) for u, v in zip(r1, r2))


@pytest.mark.parametrize("preallocated", [False, True, "in-place"])
@pytest.mark.parametrize("shape,axis", ALL_CASES)
def test_raise_writes_nothing(rng, shape, axis, preallocated):
    """raise: FloatingPointError, and no output buffer (in-place x included) and no
    running statistic has changed."""
    k = forward_call(rng, shape, np.float32, axis, affine=False, outputs=bool(preallocated),
                     fill=7)
    _poison(k["x"], axis, int(rng.integers(shape[axis])), np.nan, rng)
    if preallocated == "in-place":
        k["out"] = k["x"]
    refused(nbnorm.forward, FloatingPointError, "not finite", **k, on_nonfinite="raise")
    # also without running statistics: a bad batch is an error in itself
    refused(nbnorm.forward, FloatingPointError, None,
            **{**k, "running_mean": None, "running_var": None}, on_nonfinite="raise")


def test_inference_ignores_on_nonfinite(rng):
    """Inference computes no batch statistics; NaN in x or in the running stats
    just propagates, under every policy."""
    k = forward_call(rng, (5, 3, 4), np.float64, training=False, affine=False,
                     outputs=False)
    k["x"][0, 1, 0] = np.nan
    k["running_mean"][2] = np.nan
    for policy in ("propagate", "skip", "raise"):
        r = nbnorm.forward(**k, on_nonfinite=policy)
        assert np.isnan(r.out[0, 1, 0]) and np.isfinite(r.out[1:, 1]).all()
        assert np.isnan(r.out[:, 2]).all() and np.isfinite(r.out[:, 0]).all()


@pytest.mark.parametrize("bad", ["ignore", "", "Skip", None, 1, True])
def test_unknown_policy_is_refused_before_writing(rng, bad):
    k = forward_call(rng, (4, 3), np.float32, affine=False, fill=5)
    refused(nbnorm.forward, ValueError, "on_nonfinite", **k, on_nonfinite=bad)


def test_float64_variance_overflow_is_skipped(rng):
    """float64 data beyond ~1e154: the mean is finite but M2 overflows to inf, so
    invstd is 0; skip treats the channel as non-finite and keeps its running var."""
    x = data(rng, (16, 2), np.float64)
    x[:, 0] *= 1e200
    rm, rv = np.zeros(2), np.ones(2)
    r = nbnorm.forward(x, None, None, rm, rv, on_nonfinite="skip")
    assert np.isfinite(r.mean[0]) and r.invstd[0] == 0.0
    assert rm[0] == 0.0 and rv[0] == 1.0
    assert rv[1] != 1.0
    with pytest.raises(FloatingPointError):
        nbnorm.forward(x, on_nonfinite="raise")


def test_huge_float32_values_do_not_overflow_statistics(rng):
    """float32 data of magnitude 1e30 (squares overflow float32): statistics in
    float64 stay finite and exact, invstd ~1e-30 is representable, the output is
    the normalized data; a float64 running_var holds the 1e60 variance, and the
    policy does not trip."""
    z = rng.standard_normal((64, 3)).astype(np.float64)
    x = (z * 1e30 + 2e30).astype(np.float32)
    rm, rv = np.zeros(3), np.ones(3)
    r = nbnorm.forward(x, None, None, rm, rv, on_nonfinite="raise")
    exp = reference.forward(x, None, None, np.zeros(3), np.ones(3))
    assert np.isfinite(r.mean).all() and np.isfinite(r.invstd).all() and (r.invstd > 0).all()
    np.testing.assert_allclose(r.out, exp.out, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(r.mean, exp.mean, rtol=1e-6)
    np.testing.assert_allclose(r.invstd, exp.invstd, rtol=1e-6)
    np.testing.assert_allclose(rv, exp.running_var, rtol=1e-12)
    assert 1e58 < rv.min() < rv.max() < 1e62
    g = nbnorm.backward(np.ones_like(x), x, r.mean, r.invstd)
    assert np.isfinite(g.grad_input).all() and np.abs(g.grad_input).max() < 1e-30 * 100


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_float32_running_var_overflows_like_pytorch(rng):
    """Documented limit: a float32 running_var cannot hold a variance above
    ~3.4e38 (|x| beyond ~1e19); it becomes inf as in PyTorch, even under skip,
    because the float64 batch variance itself is finite.  Keep float64 running
    statistics for such data."""
    x = (rng.standard_normal((64, 2)) * 1e30).astype(np.float32)
    rm, rv = np.zeros(2, np.float32), np.ones(2, np.float32)
    r = nbnorm.forward(x, None, None, rm, rv, on_nonfinite="skip")
    assert np.isfinite(r.out).all() and np.isfinite(r.invstd).all()
    assert np.isinf(rv).all() and np.isfinite(rm).all()


@pytest.mark.parametrize("shape", [(16, 2), (8, 2, 5), (40000, 2), (4, 2, 40000)],
                         ids=["interleaved", "planar", "interleaved-parts", "planar-parts"])
def test_regression_chan_merge_huge_mean_gave_nan(rng, shape):
    """Regression (found by test_float64_variance_overflow_is_skipped): merging a
    block into the empty accumulator computed ``d*d*na*f`` with na = 0, which is
    inf*0 = NaN once |mean| > 1.3e154, so float64 data of mean 1e160 and std 1e150
    (a finite variance of 1e300) got NaN statistics.  Now ``(d*na)*(d*f)``."""
    x = 1e160 + rng.standard_normal(shape) * 1e150
    r = nbnorm.forward(x)
    exp = reference.forward(x)
    assert np.isfinite(r.invstd).all()
    np.testing.assert_allclose(r.mean, exp.mean, rtol=1e-14)
    np.testing.assert_allclose(r.invstd, exp.invstd, rtol=1e-7)
