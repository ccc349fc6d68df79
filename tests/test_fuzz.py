"""Fuzzing forward + backward against ``nbnorm.reference`` with hypothesis.

Each example draws a shape (2-5 dims, small, odd sizes), a channel axis
(negative too), a dtype, training/inference, affine and running-statistics
options, momentum and eps, the data's offset and scale (offsets up to 1e4
times the spread, spreads from 1e-3 to 1e3), the memory layout of x and
grad_out (C order, Fortran, permuted, stepped, reversed, broadcast grad_out),
and whether outputs are preallocated, strided or in place.  The CI run draws
``NBNORM_FUZZ_EXAMPLES`` small examples (3000 by default, a few seconds once the
kernels are compiled), a twentieth as many big ones (multi-part reductions) and
a sixth as many poisoned batches (NaN/inf in random channels) run under each
``on_nonfinite`` policy;
the ``slow`` marker (deselected by default: ``python -m pytest -m slow``) draws
20 times more small ones and 40 times more big ones (~6 minutes on 2 cores).
Examples are random on every run; a failure prints the seed to reproduce it
(``@reproduce_failure``), and any bug found gets a named regression test.
"""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nbnorm
from nbnorm import reference
from helpers import as_memory, bits, forward_call, refused

FUZZ_EXAMPLES = int(os.environ.get("NBNORM_FUZZ_EXAMPLES", "3000"))
SLOW_EXAMPLES = 20 * FUZZ_EXAMPLES
COMMON = dict(deadline=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

#: ``helpers.as_memory`` kinds of x and grad_out (grad_out also "broadcast").
LAYOUTS = ["C", "fortran", "permuted", "stepped", "reversed"]


#: Sizes for "big" problems: large enough that a channel's reduction is split into
#: several parallel parts (config.MIN_PART elements each) and blocks (config.BLOCK).
BIG_SIDES = [1, 2, 3, 7, 64, 257, 1031, 4099, 33001, 70001]
BIG_LIMIT = 300_000


@st.composite
def problems(draw, big=False):
    if big:
        ndim = draw(st.integers(2, 4))
        shape = tuple(draw(st.lists(st.sampled_from(BIG_SIDES), min_size=ndim,
                                    max_size=ndim).filter(
                                        lambda s: 2 <= int(np.prod(s)) <= BIG_LIMIT)))
    else:
        ndim = draw(st.integers(2, 5))
        cap = {2: 40, 3: 9, 4: 5, 5: 4}[ndim]
        shape = tuple(draw(st.lists(st.integers(1, cap), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    training = draw(st.booleans())
    n = int(np.prod(shape)) // shape[axis]
    if training and n < 2:  # one value per channel is an error (tested elsewhere)
        shape = tuple(s if i == axis % ndim else s + 1 for i, s in enumerate(shape))
    return dict(
        shape=shape, axis=axis, training=training,
        dtype=draw(st.sampled_from([np.float32, np.float64])),
        affine=draw(st.booleans()),
        running=True if not training else draw(st.booleans()),
        momentum=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]) | st.floats(0.0, 1.0)),
        eps=draw(st.sampled_from([1e-5, 1e-3, 1.0]) | st.floats(1e-8, 10.0)),
        offset=draw(st.sampled_from([0.0, 1.0, -3.0, 1e3, -1e4])),
        scale=10.0 ** draw(st.integers(-3, 3)),
        x_layout=draw(st.sampled_from(LAYOUTS)),
        dy_layout=draw(st.sampled_from(LAYOUTS + ["broadcast"])),
        x_perm=draw(st.permutations(range(ndim))),  # the "permuted" memory orders
        dy_perm=draw(st.permutations(range(ndim))),
        outputs=draw(st.sampled_from(["new", "preallocated", "strided", "in-place"])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def _tol(dtype, scale=1.0):
    f32 = np.dtype(dtype) == np.float32
    return dict(rtol=2e-5 if f32 else 1e-9, atol=(2e-5 if f32 else 1e-9) * scale)


def check(p):
    rng = np.random.default_rng(p["seed"])
    shape, axis, dt = p["shape"], p["axis"], p["dtype"]
    C = shape[axis]
    k = forward_call(rng, shape, dt, axis, p["training"], p["affine"], p["running"],
                     outputs=p["outputs"] == "preallocated", fill=np.nan,
                     loc=p["offset"] * p["scale"], scale=p["scale"])
    x0, w, b, rm, rv = (k[n] for n in ("x", "weight", "bias", "running_mean", "running_var"))
    # a copy in every layout ("C" too): never x0 itself, it is the oracle's
    x = as_memory(x0, p["x_layout"], perm=p["x_perm"])
    exp = reference.forward(x0, w, b, rm, rv, training=p["training"],
                            momentum=p["momentum"], eps=p["eps"], axis=axis)
    rm0 = None if rm is None else rm.copy()
    rv0 = None if rv is None else rv.copy()

    kw = {n: k[n] for n in ("out", "mean", "invstd") if n in k}  # "preallocated"
    if p["outputs"] == "strided":
        kw = dict(out=as_memory(np.full(shape, np.nan, dt), "stepped"),
                  mean=np.full(2 * C, np.nan, dt)[::2], invstd=np.full(2 * C, np.nan, dt)[1::2])
    elif p["outputs"] == "in-place":
        kw = dict(out=x)
    res = nbnorm.forward(x, w, b, rm, rv, training=p["training"], momentum=p["momentum"],
                         eps=p["eps"], axis=axis, **kw)
    for name in kw:
        assert getattr(res, name) is kw[name]

    tol = _tol(dt)
    np.testing.assert_allclose(res.mean, exp.mean, err_msg="mean",
                               **_tol(dt, abs(p["offset"] * p["scale"]) + p["scale"]))
    np.testing.assert_allclose(res.invstd, exp.invstd, err_msg="invstd", rtol=tol["rtol"] * 10)
    # |out| is up to a few times |weight| + |bias|; its error scales with that
    np.testing.assert_allclose(res.out, exp.out, err_msg="out", **_tol(dt, 10.0))
    if p["running"] and p["training"]:
        np.testing.assert_allclose(rm, exp.running_mean, err_msg="running_mean",
                                   **_tol(dt, abs(p["offset"] * p["scale"]) + p["scale"]))
        np.testing.assert_allclose(rv, exp.running_var, err_msg="running_var", rtol=tol["rtol"],
                                   atol=tol["atol"] * p["scale"] ** 2)
    elif p["running"]:
        assert rm.tobytes() == rm0.tobytes() and rv.tobytes() == rv0.tobytes()

    # backward with the statistics forward returned
    dy0 = rng.standard_normal(shape).astype(dt)
    if p["dy_layout"] == "broadcast":
        dy0 = np.ascontiguousarray(np.broadcast_to(dy0[:1], shape))
    dy = as_memory(dy0, p["dy_layout"], perm=p["dy_perm"])
    x0c = x0  # forward may have overwritten x (in place): use the original values
    gexp = reference.backward(dy0, x0c, res.mean, res.invstd, w, training=p["training"],
                              axis=axis)
    gkw = {}
    if p["outputs"] == "in-place" and dy.flags.writeable:
        gkw = dict(grad_input=dy)
    elif p["outputs"] in ("preallocated", "strided"):
        gkw = dict(grad_input=np.full(shape, np.nan, dt), grad_weight=np.full(C, np.nan, dt),
                   grad_bias=np.full(C, np.nan, dt))
    g = nbnorm.backward(dy, x0c.copy() if p["outputs"] == "in-place" else x, res.mean,
                        res.invstd, w, training=p["training"], axis=axis, **gkw)
    # error bounds: the float64 result rounded to dt, plus float64 noise relative
    # to the magnitudes summed (per channel for the reductions)
    k = np.abs(np.asarray(res.invstd, np.float64)) * (1.0 if w is None else np.abs(w).max())
    gi_scale = float(k.max()) * 4.0 + 1.0
    np.testing.assert_allclose(g.grad_input, gexp.grad_input, err_msg="grad_input",
                               **_tol(dt, gi_scale))
    dyc = np.moveaxis(dy0.astype(np.float64), axis, 0).reshape(C, -1)
    xhat = ((np.moveaxis(x0.astype(np.float64), axis, 0).reshape(C, -1)
             - np.asarray(res.mean, np.float64)[:, None]) * np.asarray(res.invstd)[:, None])
    _close_per_channel(g.grad_bias, gexp.grad_bias, np.abs(dyc).sum(1), dt, "grad_bias")
    _close_per_channel(g.grad_weight, gexp.grad_weight, np.abs(dyc * xhat).sum(1), dt,
                       "grad_weight")


def _close_per_channel(actual, expected, magnitude, dt, what):
    t = _tol(dt)
    err = np.abs(np.asarray(actual, np.float64) - expected)
    bound = t["rtol"] * np.abs(expected) + t["atol"] * (1.0 + magnitude)
    assert (err <= bound).all(), (what, err, bound)


@settings(max_examples=FUZZ_EXAMPLES, **COMMON)
@given(problems())
def test_fuzz_forward_backward(p):
    check(p)


@settings(max_examples=max(50, FUZZ_EXAMPLES // 20), **COMMON)
@given(problems(big=True))
def test_fuzz_big_shapes(p):
    """Fewer, larger problems: multi-part reductions, several cache blocks."""
    check(p)


@pytest.mark.slow
@settings(max_examples=SLOW_EXAMPLES // 10, **COMMON)
@given(problems(big=True))
def test_fuzz_big_shapes_slow(p):
    check(p)


@pytest.mark.slow
@settings(max_examples=SLOW_EXAMPLES, **COMMON)
@given(problems())
def test_fuzz_forward_backward_slow(p):
    check(p)


@st.composite
def poisoned(draw):
    p = draw(problems(big=draw(st.booleans())))
    p["training"] = True
    p["running"] = True
    shape, axis = p["shape"], p["axis"] % len(p["shape"])
    if int(np.prod(shape)) // shape[axis] < 2:
        p["shape"] = tuple(s + (i != axis) for i, s in enumerate(shape))
    p["outputs"] = draw(st.sampled_from(["new", "preallocated", "in-place"]))
    C = p["shape"][p["axis"]]
    p["bad"] = sorted(set(draw(st.lists(st.integers(0, C - 1), max_size=3))))
    p["poison"] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return p


def check_nonfinite(p):
    """propagate / skip / raise on the same poisoned batch: skip's outputs are
    propagate's bitwise, its running stats keep the bad channels and take
    propagate's values elsewhere; raise raises exactly when a channel is bad and
    then writes nothing (in place included); the good channels are exact."""
    rng = np.random.default_rng(p["seed"])
    shape, axis, dt = p["shape"], p["axis"], p["dtype"]
    C = shape[axis]
    k0 = forward_call(rng, shape, dt, axis, affine=False, outputs=False,
                      loc=p["offset"] * p["scale"], scale=p["scale"])
    x0, rm0, rv0 = k0["x"], k0["running_mean"], k0["running_var"]
    xc = np.moveaxis(x0, axis, 0)
    for c in p["bad"]:
        xc[c].flat[int(rng.integers(xc[c].size))] = p["poison"]
    results = {}
    for policy in ("propagate", "skip", "raise"):
        # the same memory layout for every policy (another layout may run another
        # kernel, whose last bits may differ)
        x = as_memory(x0, p["x_layout"], perm=p["x_perm"])
        rm, rv = rm0.copy(), rv0.copy()
        kw = {}
        if p["outputs"] == "preallocated":
            kw = dict(out=np.full(shape, 7, dt), mean=np.full(C, 7, dt),
                      invstd=np.full(C, 7, dt))
        elif p["outputs"] == "in-place":
            kw = dict(out=x)
        kw.update(x=x, running_mean=rm, running_var=rv, axis=axis, momentum=p["momentum"],
                  eps=p["eps"])
        if policy == "raise" and p["bad"]:
            refused(nbnorm.forward, FloatingPointError, None, **kw, on_nonfinite="raise")
            continue
        r = nbnorm.forward(**kw, on_nonfinite=policy)
        results[policy] = ([bits(a) for a in r], rm, rv, r)
    prop, skip = results["propagate"], results["skip"]
    assert prop[0] == skip[0]
    bad = np.zeros(C, bool)
    bad[p["bad"]] = True
    seen = ~(np.isfinite(skip[3].mean) & np.isfinite(skip[3].invstd))
    assert (seen == bad).all()
    assert skip[1][bad].tobytes() == rm0[bad].tobytes()
    assert skip[2][bad].tobytes() == rv0[bad].tobytes()
    assert skip[1][~bad].tobytes() == prop[1][~bad].tobytes()
    assert skip[2][~bad].tobytes() == prop[2][~bad].tobytes()
    if (~bad).any():
        good = np.flatnonzero(~bad)
        exp = reference.forward(np.take(x0, good, axis=axis), axis=axis, eps=p["eps"])
        np.testing.assert_allclose(np.take(skip[3].out, good, axis=axis), exp.out,
                                   **_tol(dt, 10.0))


# momentum=0 with an inf mean computes 0*inf for the running mean (NumPy warns;
# skip then discards the value, propagate stores the NaN like PyTorch)
NONFINITE_WARNINGS = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning")


@NONFINITE_WARNINGS
@settings(max_examples=max(100, FUZZ_EXAMPLES // 6), **COMMON)
@given(poisoned())
def test_fuzz_nonfinite_policies(p):
    check_nonfinite(p)


@pytest.mark.slow
@NONFINITE_WARNINGS
@settings(max_examples=SLOW_EXAMPLES // 6, **COMMON)
@given(poisoned())
def test_fuzz_nonfinite_policies_slow(p):
    check_nonfinite(p)
