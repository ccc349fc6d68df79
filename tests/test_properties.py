"""Property test: random shapes, axes, dtypes and modes against the reference."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nbnorm
from nbnorm import reference
from nbnorm import config
from helpers import KERNEL_PATHS, REF_TOL, as_memory, assert_close, forward_call, use_path

# Inner/outer products from 1 to a few hundred: planar and interleaved, C=1,
# outer=1, inner=1 all come up.
shapes = st.lists(st.integers(1, 7), min_size=2, max_size=5)
LAYOUTS = ["C", "fortran", "stepped", "permuted"]


@st.composite
def problems(draw):
    shape = tuple(draw(shapes))
    ndim = len(shape)
    axis = draw(st.integers(-ndim, ndim - 1))
    n = int(np.prod(shape)) // shape[axis]
    training = draw(st.booleans()) if n > 1 else False
    return dict(shape=shape, axis=axis, training=training,
                dtype=draw(st.sampled_from([np.float32, np.float64])),
                affine=draw(st.booleans()), running=draw(st.booleans()) or not training,
                momentum=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
                # helpers.as_memory kinds ("permuted": in the memory order perm)
                layout=draw(st.sampled_from(LAYOUTS)),
                out_layout=draw(st.sampled_from([None] + LAYOUTS)),
                perm=draw(st.permutations(range(ndim))),
                path=draw(st.sampled_from(list(KERNEL_PATHS))),
                block=draw(st.sampled_from([None, 1, 7, 64])),
                seed=draw(st.integers(0, 2**32 - 1)))


@settings(deadline=None, max_examples=150)
@given(problems())
def test_forward_backward_match_reference(p):
    with pytest.MonkeyPatch.context() as m:
        use_path(m, p["path"])
        if p["block"] is not None:  # tiny blocks and parts: many merges
            m.setattr(config, "BLOCK", p["block"])
            m.setattr(config, "MIN_PART", 4 * p["block"])
        _check(p)


def _check(p):
    rng = np.random.default_rng(p["seed"])
    shape, axis, dt = p["shape"], p["axis"], p["dtype"]
    k = forward_call(rng, shape, dt, axis, p["training"], p["affine"], p["running"],
                     outputs=False, loc=rng.uniform(-5, 5))
    x, w, b, rm, rv = (k[n] for n in ("x", "weight", "bias", "running_mean", "running_var"))
    dy = rng.standard_normal(shape).astype(dt)
    exp = reference.forward(x, w, b, rm, rv, training=p["training"],
                            momentum=p["momentum"], axis=axis)
    out = None
    if p["out_layout"] is not None:
        out = as_memory(np.full(shape, np.nan, dt), p["out_layout"], perm=p["perm"][::-1])
    res = nbnorm.forward(as_memory(x, p["layout"], perm=p["perm"]), w, b, rm, rv,
                         training=p["training"], momentum=p["momentum"], axis=axis, out=out)
    assert out is None or res.out is out
    tol = REF_TOL[np.dtype(dt)]
    assert_close(res.out, exp.out, tol, "out")
    assert_close(res.mean, exp.mean, tol, "mean")
    assert_close(res.invstd, exp.invstd, tol, "invstd")
    if p["running"] and p["training"]:
        assert_close(rm, exp.running_mean, tol, "running_mean")
        assert_close(rv, exp.running_var, tol, "running_var")

    g = nbnorm.backward(as_memory(dy, p["layout"], perm=p["perm"]), x, res.mean, res.invstd, w,
                        training=p["training"], axis=axis)
    ge = reference.backward(dy, x, res.mean, res.invstd, w, training=p["training"],
                            axis=axis)
    assert_close(g.grad_input, ge.grad_input, tol, "grad_input")
    assert_close(g.grad_weight, ge.grad_weight, tol, "grad_weight")
    assert_close(g.grad_bias, ge.grad_bias, tol, "grad_bias")
