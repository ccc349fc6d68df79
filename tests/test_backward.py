"""nbnorm.backward against the float64 reference, PyTorch autograd and central
differences of nbnorm.forward, with preallocated and in-place outputs."""

import numpy as np
import pytest

import nbnorm
from nbnorm import config, reference
from helpers import (DTYPES, KERNEL_PATHS, LAYOUT_IDS, LAYOUT_PARAMS, MEMORY_KINDS,
                     REF_TOL, SAME_ORDER_KINDS, TORCH_TOL, as_memory, assert_close,
                     assert_same, backward_call, data, forward_call, torch_backward,
                     use_path)


def _case(rng, shape, axis, dtype, affine, training):
    """(grad_out, x, weight, bias, running_mean, running_var, mean, invstd): a
    ``helpers.forward_call``'s arrays, and the statistics its forward returns."""
    k = forward_call(rng, shape, dtype, axis, training, affine, outputs=False)
    rm, rv = k["running_mean"], k["running_var"]
    fwd = nbnorm.forward(**{**k, "running_mean": rm.copy(), "running_var": rv.copy()})
    return data(rng, shape, dtype), k["x"], k["weight"], k["bias"], rm, rv, fwd.mean, fwd.invstd


def _check(res, exp, dtype, tol_table=REF_TOL):
    tol = tol_table[np.dtype(dtype)]
    assert_close(res[0], exp[0], tol, "grad_input")
    assert_close(res[1], exp[1], tol, "grad_weight")
    assert_close(res[2], exp[2], tol, "grad_bias")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("shape,axis", LAYOUT_PARAMS, ids=LAYOUT_IDS)
def test_matches_reference(rng, shape, axis, affine, training, dtype):
    dy, x, w, _, _, _, mean, invstd = _case(rng, shape, axis, dtype, affine, training)
    dy0, x0 = dy.copy(), x.copy()
    res = nbnorm.backward(dy, x, mean, invstd, w, training=training, axis=axis)
    assert isinstance(res, nbnorm.BackwardResult)
    C = shape[axis]
    assert res.grad_input.dtype == dtype and res.grad_input.shape == shape
    assert res.grad_weight.dtype == dtype and res.grad_weight.shape == (C,)
    assert res.grad_bias.dtype == dtype and res.grad_bias.shape == (C,)
    assert_same(dy, dy0, "grad_out changed")
    assert_same(x, x0, "x changed")
    exp = reference.backward(dy, x, mean, invstd, w, training=training, axis=axis)
    _check(res, exp, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("shape,axis", LAYOUT_PARAMS, ids=LAYOUT_IDS)
def test_matches_torch_autograd(rng, shape, axis, affine, training, dtype):
    pytest.importorskip("torch")
    eps = 1e-5
    dy, x, w, b, rm, rv, mean, invstd = _case(rng, shape, axis, dtype, affine, training)
    exp = torch_backward(dy, x, w, b, rm, rv, training=training, eps=eps, axis=axis)
    res = nbnorm.backward(dy, x, mean, invstd, w, training=training, axis=axis)
    _check(res, exp, dtype, TORCH_TOL)


# ------------------------------------------------------ central differences

def _loss(x, w, b, rm, rv, R, training, axis):
    out = nbnorm.forward(x, w, b, None if training else rm, None if training else rv,
                         training=training, eps=1e-3, axis=axis).out
    return float(np.sum(out * R))


def _numeric_grad(f, a, h=1e-6):
    g = np.empty_like(a)
    flat, gflat = a.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        v = flat[i]
        flat[i] = v + h
        fp = f()
        flat[i] = v - h
        fm = f()
        flat[i] = v
        gflat[i] = (fp - fm) / (2 * h)
    return g


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("shape,axis", [((3, 2, 4), 1), ((5, 3), 1), ((2, 3, 2, 3), -1)],
                         ids=["planar", "interleaved", "NHWC"])
def test_central_differences(rng, shape, axis, training):
    """backward is the gradient of L = sum(forward(x, w, b).out * R) in float64."""
    k = forward_call(rng, shape, np.float64, axis, outputs=False)
    x, w, b, rm, rv = (k[n] for n in ("x", "weight", "bias", "running_mean", "running_var"))
    R = data(rng, shape, np.float64)

    def f():
        return _loss(x, w, b, rm, rv, R, training, axis)

    gx, gw, gb = _numeric_grad(f, x), _numeric_grad(f, w), _numeric_grad(f, b)
    fwd = nbnorm.forward(x, w, b, None if training else rm, None if training else rv,
                         training=training, eps=1e-3, axis=axis)
    res = nbnorm.backward(R, x, fwd.mean, fwd.invstd, w, training=training, axis=axis)
    tol = dict(rtol=1e-6, atol=1e-7)
    assert_close(res.grad_input, gx, tol, "grad_input")
    assert_close(res.grad_weight, gw, tol, "grad_weight")
    assert_close(res.grad_bias, gb, tol, "grad_bias")


def test_gradients_without_weight(rng):
    """weight=None means 1: the gradients equal those with an explicit ones weight,
    and grad_weight/grad_bias are still returned."""
    x = data(rng, (4, 3, 5), np.float64)
    dy = data(rng, x.shape, np.float64)
    fwd = nbnorm.forward(x)
    res = nbnorm.backward(dy, x, fwd.mean, fwd.invstd)
    exp = nbnorm.backward(dy, x, fwd.mean, fwd.invstd, np.ones(3))
    for a, e in zip(res, exp):
        assert_close(a, e, REF_TOL[x.dtype])


# ------------------------------------------------------------ outputs

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("shape,axis", [((3, 4, 5, 6), 1), ((17, 5), 1), ((3, 5, 4, 6), -1)],
                         ids=["NCHW", "NC", "NHWC"])
@pytest.mark.parametrize("path", list(KERNEL_PATHS))
def test_preallocated_outputs(rng, monkeypatch, shape, axis, training, dtype, path):
    use_path(monkeypatch, path)
    k = backward_call(rng, shape, dtype, axis, training, fill=np.nan)
    gi, gw, gb = k["grad_input"], k["grad_weight"], k["grad_bias"]
    res = nbnorm.backward(**k)
    assert res.grad_input is gi and res.grad_weight is gw and res.grad_bias is gb
    assert np.isfinite(gi).all() and np.isfinite(gw).all() and np.isfinite(gb).all()
    exp = nbnorm.backward(k["grad_out"], k["x"], k["mean"], k["invstd"], k["weight"],
                          training=training, axis=axis)
    for a, e in zip(res, exp):
        assert_same(a, e)


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("kind", ["C", "fortran", "stepped", "channels_last"])
@pytest.mark.parametrize("shape,axis", [((3, 4, 5, 6), 1), ((17, 5), 1)],
                         ids=["planar", "interleaved"])
@pytest.mark.parametrize("path", list(KERNEL_PATHS))
def test_in_place(rng, monkeypatch, shape, axis, kind, training, path):
    """``grad_input=grad_out`` computes in place, in any memory layout of grad_out."""
    use_path(monkeypatch, path)
    dtype = np.float64
    dy, x, w, _, _, _, mean, invstd = _case(rng, shape, axis, dtype, True, training)
    exp = nbnorm.backward(dy, x, mean, invstd, w, training=training, axis=axis)
    g = as_memory(dy, kind, axis)
    res = nbnorm.backward(g, x, mean, invstd, w, training=training, axis=axis,
                          grad_input=g)
    assert res.grad_input is g
    assert_close(g, exp.grad_input, REF_TOL[np.dtype(dtype)])
    assert_close(res.grad_weight, exp.grad_weight, REF_TOL[np.dtype(dtype)])
    assert_close(res.grad_bias, exp.grad_bias, REF_TOL[np.dtype(dtype)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", MEMORY_KINDS)
@pytest.mark.parametrize("shape,axis", [((4, 3, 5, 6), 1), ((5, 6, 4, 3), -1), ((7, 5), 1)],
                         ids=["NCHW", "NHWC", "NC"])
def test_memory_layouts(rng, shape, axis, kind, dtype):
    """Inputs in any memory order or stride give the answer of contiguous copies."""
    dy, x, w, _, _, _, mean, invstd = _case(rng, shape, axis, dtype, True, True)
    exp = nbnorm.backward(dy, x, mean, invstd, w, axis=axis)
    xs, dys = as_memory(x, kind, axis), as_memory(dy, kind, axis)
    res = nbnorm.backward(dys, xs, mean, invstd, w, axis=axis)
    assert_same(xs, x)
    assert_same(dys, dy)
    for a, e in zip(res, exp):
        if kind in SAME_ORDER_KINDS:
            assert_same(a, e)
        else:
            assert_close(a, e, REF_TOL[np.dtype(dtype)])
    gi = as_memory(np.full(shape, np.nan, dtype), kind, axis)
    res = nbnorm.backward(dy, x, mean, invstd, w, axis=axis, grad_input=gi)
    assert res.grad_input is gi
    assert_close(gi, exp.grad_input, REF_TOL[np.dtype(dtype)])


@pytest.mark.parametrize("x_kind,dy_kind", [("fortran", "C"), ("C", "channels_last"),
                                             ("channels_last", "stepped")])
def test_mixed_input_layouts(rng, x_kind, dy_kind):
    """x and grad_out in different memory layouts (the plan follows x)."""
    shape, axis = (4, 3, 5, 6), 1
    dy, x, w, _, _, _, mean, invstd = _case(rng, shape, axis, np.float64, True, True)
    exp = reference.backward(dy, x, mean, invstd, w, axis=axis)
    xs, dys = as_memory(x, x_kind, axis), as_memory(dy, dy_kind, axis)
    res = nbnorm.backward(dys, xs, mean, invstd, w, axis=axis)
    _check(res, exp, np.float64)
    res = nbnorm.backward(dys, xs, mean, invstd, w, axis=axis, grad_input=dys)
    assert res.grad_input is dys
    _check(res, exp, np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((5, 3, 301), 1), ((3001, 7), 1), ((40, 5, 5, 6), -1),
                                        ((301, 50), 1)],
                         ids=["planar", "interleaved", "NHWC", "wide-interleaved"])
@pytest.mark.parametrize("path", list(KERNEL_PATHS))
def test_many_parts(rng, monkeypatch, path, shape, axis, dtype):
    """Reductions split into many parts still match the reference."""
    use_path(monkeypatch, path)
    monkeypatch.setattr(config, "BLOCK", 37)
    monkeypatch.setattr(config, "MIN_PART", 100)
    dy, x, w, _, _, _, mean, invstd = _case(rng, shape, axis, dtype, True, True)
    res = nbnorm.backward(dy, x, mean, invstd, w, axis=axis)
    exp = reference.backward(dy, x, mean, invstd, w, axis=axis)
    _check(res, exp, dtype)


def test_large_offset(rng):
    """float32 data offset by 1e4: the reductions subtract the mean in float64."""
    x = (rng.standard_normal((16, 3, 2000)) + 1e4).astype(np.float32)
    dy = data(rng, x.shape, np.float32)
    fwd = nbnorm.forward(x)
    res = nbnorm.backward(dy, x, fwd.mean, fwd.invstd)
    exp = reference.backward(dy, x, fwd.mean, fwd.invstd)
    assert_close(res.grad_bias, exp.grad_bias, dict(rtol=1e-5, atol=1e-3))
    assert_close(res.grad_weight, exp.grad_weight, dict(rtol=1e-5, atol=1e-3))
    assert_close(res.grad_input, exp.grad_input, dict(rtol=1e-5, atol=1e-5))


@pytest.mark.parametrize("small_blocks", [False, True], ids=["config", "small-blocks"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUT_PARAMS + [((3, 9, 40, 30), 1), ((900, 40), 1)],
                         ids=LAYOUT_IDS + ["NCHW-9", "NC-900"])
def test_kernel_paths_agree_bitwise(rng, monkeypatch, shape, axis, dtype, small_blocks):
    """Serial, fused and parallel backward kernels give bitwise the same gradients."""
    if small_blocks:
        monkeypatch.setattr(config, "MIN_PART", 100)
    results = {}
    for training in [True, False]:
        dy, x, w, _, _, _, mean, invstd = _case(rng, shape, axis, dtype, True, training)
        for path in KERNEL_PATHS:
            with monkeypatch.context() as m:
                use_path(m, path)
                g = nbnorm.backward(dy, x, mean, invstd, w, training=training, axis=axis)
                results[path, training] = g
        for path in ["fused", "parallel", "rows"]:
            for name, a, e in zip(g._fields, results[path, training],
                                  results["serial", training]):
                assert_same(a, e, f"{name} (training={training}): {path} != serial")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("C", [3, 64, 100])
@pytest.mark.parametrize("path", list(KERNEL_PATHS))
def test_wide_rows(rng, monkeypatch, path, C, training, dtype):
    """Interleaved kernels view groups of short rows as one wide row: batches
    with no wide row, wide rows only, and leftover narrow rows all match the
    reference, also in place (``grad_input=grad_out``)."""
    from nbnorm.cpu import stats

    use_path(monkeypatch, path)
    k = stats.wide_rows(C)
    for outer in (k - 1, k, k + 1, 3 * k + 2):
        dy, x, w, _, _, _, mean, invstd = _case(rng, (outer, C), 1, dtype, True, training)
        exp = reference.backward(dy, x, mean, invstd, w, training=training)
        _check(nbnorm.backward(dy, x, mean, invstd, w, training=training), exp, dtype)
        res = nbnorm.backward(dy, x, mean, invstd, w, training=training, grad_input=dy)
        _check(res, exp, dtype)


@pytest.mark.parametrize("pdtype", [np.float16, np.float32, np.float64, np.longdouble],
                         ids=["float16", "float32", "float64", "longdouble"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("path", ["serial", "parallel"])
@pytest.mark.parametrize("shape,axis", [((16, 5), 1), ((3, 4, 5, 6), 1), ((3, 5, 4, 6), -1)],
                         ids=["NC", "NCHW", "NHWC"])
def test_parameters_of_any_float_dtype(rng, monkeypatch, shape, axis, path, training, dtype,
                                       pdtype):
    """backward reads mean, invstd and weight in float64 whatever their float dtype
    (the serial kernels take float32/float64 ones as they are): the gradients are
    bitwise those of the same values passed as float64."""
    use_path(monkeypatch, path)
    dy, x, w, _, _, _, mean, invstd = _case(rng, shape, axis, dtype, True, training)
    params = [a.astype(pdtype) for a in (mean, invstd, w)]
    got = nbnorm.backward(dy, x, *params, training=training, axis=axis)
    exp = nbnorm.backward(dy, x, *[a.astype(np.float64) for a in params], training=training,
                          axis=axis)
    for name, a, e in zip(got._fields, got, exp):
        assert_same(a, e, name)
    _check(got, reference.backward(dy, x, *params, training=training, axis=axis), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,rows", [((90, 8, 7, 7), True), ((12, 8, 40, 40), False)],
                         ids=["7x7", "40x40"])
def test_short_runs_take_grad_input_as_rows(rng, monkeypatch, shape, rows, dtype):
    """Training backward of a planar batch of short runs reduces by channel groups
    and writes ``grad_input`` by the interleaved pass over rows of C*inner values,
    also in place, with bitwise the planar kernels' gradients; other planar
    batches keep the fused kernel."""
    from nbnorm.cpu import backward as bwd

    monkeypatch.setattr(config, "SERIAL_MAX", 0)
    calls = []
    for name in ("train_planar", "backward_reduce_planar", "grad_input_planar",
                 "grad_input_interleaved"):
        kernel = getattr(bwd, name)
        monkeypatch.setattr(bwd, name, lambda *a, _k=kernel, _n=name: (calls.append(_n), _k(*a))[1])
    dy, x, w, _, _, _, mean, invstd = _case(rng, shape, 1, dtype, True, True)
    got = nbnorm.backward(dy, x, mean, invstd, w)
    in_place = nbnorm.backward(dy.copy(), x, mean, invstd, w, grad_input=dy.copy())
    assert calls == (["backward_reduce_planar", "grad_input_interleaved"] * 2 if rows
                     else ["train_planar"] * 2)
    monkeypatch.setattr(config, "PLANAR_ROWS_MAX_RUN_BYTES", 0)  # never rows
    monkeypatch.setattr(config, "FUSE_MIN_C", 1 << 62)
    exp = nbnorm.backward(dy, x, mean, invstd, w)
    for g in (got, in_place):
        for name, a, e in zip(g._fields, g, exp):
            assert_same(a, e, name)
    _check(got, reference.backward(dy, x, mean, invstd, w), dtype)
