"""nbnorm.forward against the float64 reference and PyTorch, over layouts,
dtypes, affine/running-statistics modes, memory orders and preallocated outputs."""

import numpy as np
import pytest

import nbnorm
from nbnorm import config, reference
from helpers import (DTYPES, KERNEL_PATHS, LAYOUT_IDS, LAYOUT_PARAMS, MEMORY_KINDS,
                     REF_TOL, SAME_ORDER_KINDS, TORCH_TOL, as_memory, assert_close,
                     assert_same, channel, data, forward_call, positive, torch_forward,
                     use_path)

# train: batch statistics only; train+running: also updates running statistics;
# infer: normalizes with the running statistics.
MODES = ["train", "train+running", "infer"]


def _args(rng, shape, axis, dtype, affine, mode):
    """``(x, weight, bias, running_mean, running_var)`` of ``helpers.forward_call``,
    for positional calls: no running statistics in mode "train"."""
    k = forward_call(rng, shape, dtype, axis, affine=affine, running=mode != "train",
                     outputs=False)
    return k["x"], k["weight"], k["bias"], k["running_mean"], k["running_var"]


def _check_against_reference(res, x, w, b, rm0, rv0, rm, rv, *, training, momentum, eps,
                             axis):
    """``res`` and the running statistics ``rm``/``rv`` (updated in place from
    ``rm0``/``rv0``) against the reference."""
    dt = x.dtype
    tol = REF_TOL[dt]
    exp = reference.forward(x, w, b, rm0, rv0, training=training, momentum=momentum,
                            eps=eps, axis=axis)
    C = x.shape[axis]
    assert res.out.dtype == dt and res.out.shape == x.shape
    assert res.mean.dtype == dt and res.mean.shape == (C,)
    assert res.invstd.dtype == dt and res.invstd.shape == (C,)
    assert_close(res.out, exp.out, tol, "out")
    assert_close(res.mean, exp.mean, tol, "mean")
    assert_close(res.invstd, exp.invstd, tol, "invstd")
    if rm is not None:
        if training:
            assert_close(rm, exp.running_mean, tol, "running_mean")
            assert_close(rv, exp.running_var, tol, "running_var")
        else:
            assert_same(rm, rm0, "running_mean changed in inference")
            assert_same(rv, rv0, "running_var changed in inference")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("shape,axis", LAYOUT_PARAMS, ids=LAYOUT_IDS)
def test_matches_reference(rng, shape, axis, affine, mode, dtype):
    x, w, b, rm, rv = _args(rng, shape, axis, dtype, affine, mode)
    x0 = x.copy()
    rm0 = None if rm is None else rm.copy()
    rv0 = None if rv is None else rv.copy()
    training = mode != "infer"
    res = nbnorm.forward(x, w, b, rm, rv, training=training, momentum=0.1, eps=1e-5,
                         axis=axis)
    assert isinstance(res, nbnorm.ForwardResult)
    assert_same(x, x0, "x changed")
    _check_against_reference(res, x, w, b, rm0, rv0, rm, rv, training=training,
                             momentum=0.1, eps=1e-5, axis=axis)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("shape,axis", LAYOUT_PARAMS, ids=LAYOUT_IDS)
def test_matches_torch(rng, shape, axis, affine, mode, dtype):
    pytest.importorskip("torch")
    x, w, b, rm, rv = _args(rng, shape, axis, dtype, affine, mode)
    training = mode != "infer"
    exp = torch_forward(x, w, b, rm, rv, training=training, momentum=0.1, eps=1e-5,
                        axis=axis)
    res = nbnorm.forward(x, w, b, rm, rv, training=training, momentum=0.1, eps=1e-5,
                         axis=axis)
    tol = TORCH_TOL[np.dtype(dtype)]
    assert_close(res.out, exp[0], tol, "out")
    if training:
        assert_close(res.mean, exp[1], tol, "mean")
        assert_close(res.invstd, exp[2], tol, "invstd")
    if rm is not None:
        assert_close(rm, exp[3], tol, "running_mean")
        assert_close(rv, exp[4], tol, "running_var")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("shape,axis", [((6, 5, 7), 1), ((23, 4), 1)],
                         ids=["planar", "interleaved"])
def test_momentum(rng, shape, axis, momentum, dtype):
    x, w, b, rm, rv = _args(rng, shape, axis, dtype, True, "train+running")
    rm0, rv0 = rm.copy(), rv.copy()
    res = nbnorm.forward(x, w, b, rm, rv, momentum=momentum, axis=axis)
    _check_against_reference(res, x, w, b, rm0, rv0, rm, rv, training=True,
                             momentum=momentum, eps=1e-5, axis=axis)
    if momentum == 0.0:
        assert_same(rm, rm0)
        assert_same(rv, rv0)
    if momentum == 1.0:
        assert_same(rm, res.mean)  # the batch mean, rounded once
        n = x.size // x.shape[axis]
        unbiased = np.moveaxis(x.astype(np.float64), axis, 0).reshape(x.shape[axis], -1)
        assert_close(rv, unbiased.var(axis=1, ddof=1), REF_TOL[np.dtype(dtype)])
        assert n > 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_momentum_as_torch(rng, dtype):
    pytest.importorskip("torch")
    shape, axis = (5, 3, 4, 2), 1
    for momentum in [0.0, 0.1, 0.5, 1.0]:
        x, w, b, rm, rv = _args(rng, shape, axis, dtype, True, "train+running")
        exp = torch_forward(x, w, b, rm, rv, training=True, momentum=momentum, eps=1e-3,
                            axis=axis)
        nbnorm.forward(x, w, b, rm, rv, momentum=momentum, eps=1e-3, axis=axis)
        assert_close(rm, exp[3], TORCH_TOL[np.dtype(dtype)], f"momentum {momentum}")
        assert_close(rv, exp[4], TORCH_TOL[np.dtype(dtype)], f"momentum {momentum}")


@pytest.mark.parametrize("eps", [1e-12, 1e-5, 0.5])
def test_eps(rng, eps):
    x = data(rng, (9, 4, 3), np.float64, scale=1e-3)
    res = nbnorm.forward(x, eps=eps)
    exp = reference.forward(x, eps=eps)
    assert_close(res.invstd, exp.invstd, REF_TOL[x.dtype])
    assert_close(res.out, exp.out, REF_TOL[x.dtype])


def test_mixed_parameter_dtypes(rng):
    """float32 data with float64 affine parameters and running statistics."""
    x = data(rng, (6, 3, 5), np.float32)
    w, b = channel(rng, 3, np.float64), channel(rng, 3, np.float64)
    rm, rv = channel(rng, 3, np.float64), positive(rng, 3, np.float64)
    rm0, rv0 = rm.copy(), rv.copy()
    res = nbnorm.forward(x, w, b, rm, rv)
    assert res.out.dtype == np.float32 and res.mean.dtype == np.float32
    _check_against_reference(res, x, w, b, rm0, rv0, rm, rv, training=True,
                             momentum=0.1, eps=1e-5, axis=1)


def test_inference_batch_of_one(rng):
    """One value per channel is fine when not training."""
    x = data(rng, (1, 6), np.float64)
    rm, rv = channel(rng, 6, np.float64), positive(rng, 6, np.float64)
    res = nbnorm.forward(x, None, None, rm, rv, training=False)
    exp = reference.forward(x, None, None, rm, rv, training=False)
    assert_close(res.out, exp.out, REF_TOL[x.dtype])


def test_array_likes(rng):
    """Lists and non-native byte order are read as arrays."""
    x = data(rng, (5, 3), np.float64)
    res = nbnorm.forward(x.tolist())
    assert_close(res.out, reference.forward(x).out, REF_TOL[x.dtype])
    swapped = x.astype(x.dtype.newbyteorder(">"))
    res = nbnorm.forward(swapped, x[0].astype(">f8"))
    assert res.out.dtype.isnative
    assert_close(res.out, reference.forward(x, x[0]).out, REF_TOL[x.dtype])


def test_weight_as_list(rng):
    x = data(rng, (5, 3, 2), np.float64)
    w, b = channel(rng, 3, np.float64), channel(rng, 3, np.float64)
    res = nbnorm.forward(x, w.tolist(), b.tolist())
    assert_close(res.out, reference.forward(x, w, b).out, REF_TOL[x.dtype])


# ----------------------------------------------------------- memory layouts

@pytest.mark.parametrize("shape,axis", [((4, 3, 5), 1), ((6, 4), 1), ((2, 3, 4, 5), -1)],
                         ids=["planar", "interleaved", "NHWC"])
def test_broadcast_input(rng, shape, axis):
    """A read-only, zero-stride (broadcast) x reads like its contiguous copy."""
    row = data(rng, (1,) + shape[1:], np.float64)
    x = np.broadcast_to(row, shape)
    res = nbnorm.forward(x, axis=axis)
    exp = reference.forward(np.ascontiguousarray(x), axis=axis)
    assert_close(res.out, exp.out, REF_TOL[x.dtype])
    assert_close(res.invstd, exp.invstd, REF_TOL[x.dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", MEMORY_KINDS)
@pytest.mark.parametrize("shape,axis", [((4, 3, 5, 6), 1), ((5, 6, 4, 3), -1),
                                        ((7, 5), 1), ((3, 4, 5, 6), 2)],
                         ids=["NCHW", "NHWC", "NC", "mid-axis"])
def test_memory_layouts(rng, shape, axis, kind, dtype):
    """Any memory order or stride gives the answer of a contiguous copy."""
    base, w, b, rm, rv = _args(rng, shape, axis, dtype, True, "train+running")
    x = as_memory(base, kind, axis)
    assert_same(x, base)
    rm2, rv2 = rm.copy(), rv.copy()
    res = nbnorm.forward(x, w, b, rm, rv, axis=axis)
    exp = nbnorm.forward(base, w, b, rm2, rv2, axis=axis)
    tol = REF_TOL[np.dtype(dtype)]

    def check(a, e, what):
        if kind in SAME_ORDER_KINDS:
            assert_same(a, e, what)
        else:
            assert_close(a, e, tol, what)

    assert_same(x, base, "x changed")
    for name in ["out", "mean", "invstd"]:
        check(getattr(res, name), getattr(exp, name), name)
    check(rm, rm2, "running_mean")
    check(rv, rv2, "running_var")
    inf = nbnorm.forward(x, w, b, rm, rv, training=False, axis=axis)
    inf_exp = nbnorm.forward(base, w, b, rm, rv, training=False, axis=axis)
    check(inf.out, inf_exp.out, "inference out")


@pytest.mark.parametrize("kind", MEMORY_KINDS)
@pytest.mark.parametrize("shape,axis", [((4, 3, 5, 6), 1), ((11, 4), 1)],
                         ids=["planar", "interleaved"])
@pytest.mark.parametrize("path", list(KERNEL_PATHS))
def test_output_memory_layouts(rng, monkeypatch, shape, axis, kind, path):
    """A preallocated ``out`` in any layout is fully written, nothing around it is."""
    use_path(monkeypatch, path)
    x = data(rng, shape, np.float64)
    out = as_memory(np.full(shape, np.nan), kind, axis)
    base = out.base if kind == "stepped" else None
    res = nbnorm.forward(x, out=out, axis=axis)
    assert res.out is out
    assert not np.isnan(out).any()
    assert_close(out, reference.forward(x, axis=axis).out, REF_TOL[x.dtype])
    if base is not None:  # the gaps of the stepped view are still NaN
        mask = np.ones(base.shape, bool)
        mask[tuple(slice(1, None, 2) for _ in shape)] = False
        assert np.isnan(base[mask]).all()


# ------------------------------------------------------ preallocated outputs

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("shape,axis", [((3, 4, 5, 6), 1), ((17, 5), 1), ((3, 5, 4, 6), -1)],
                         ids=["NCHW", "NC", "NHWC"])
@pytest.mark.parametrize("path", list(KERNEL_PATHS))
def test_preallocated_outputs(rng, monkeypatch, shape, axis, training, dtype, path):
    use_path(monkeypatch, path)
    k = forward_call(rng, shape, dtype, axis, training, fill=np.nan)
    out, mean, invstd, rm, rv = (k[n] for n in ("out", "mean", "invstd", "running_mean",
                                                "running_var"))
    rm2, rv2 = rm.copy(), rv.copy()
    res = nbnorm.forward(**k)
    assert res.out is out and res.mean is mean and res.invstd is invstd
    assert np.isfinite(out).all() and np.isfinite(mean).all() and np.isfinite(invstd).all()
    exp = nbnorm.forward(k["x"], k["weight"], k["bias"], rm2, rv2, training=training,
                         axis=axis)
    assert_same(out, exp.out)
    assert_same(mean, exp.mean)
    assert_same(invstd, exp.invstd)
    assert_same(rm, rm2)
    assert_same(rv, rv2)


@pytest.mark.parametrize("partial", ["out", "mean", "invstd"])
def test_some_outputs_preallocated(rng, partial):
    x = data(rng, (6, 4, 3), np.float32)
    buf = np.full(x.shape if partial == "out" else (4,), np.nan, np.float32)
    res = nbnorm.forward(x, **{partial: buf})
    assert getattr(res, partial) is buf
    assert not np.isnan(buf).any()
    exp = nbnorm.forward(x)
    for name in ["out", "mean", "invstd"]:
        assert_same(getattr(res, name), getattr(exp, name), name)


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("kind", ["C", "fortran", "stepped", "channels_last"])
@pytest.mark.parametrize("shape,axis", [((3, 4, 5, 6), 1), ((17, 5), 1)],
                         ids=["planar", "interleaved"])
@pytest.mark.parametrize("path", list(KERNEL_PATHS))
def test_in_place(rng, monkeypatch, shape, axis, kind, training, path):
    """``out=x`` normalizes in place, in any memory layout."""
    use_path(monkeypatch, path)
    dtype = np.float32
    base, w, b, rm, rv = _args(rng, shape, axis, dtype, True, "train+running")
    x = as_memory(base, kind, axis)
    exp = nbnorm.forward(base, w, b, rm.copy(), rv.copy(), training=training, axis=axis)
    res = nbnorm.forward(x, w, b, rm, rv, training=training, axis=axis, out=x)
    assert res.out is x
    assert_close(x, exp.out, REF_TOL[np.dtype(dtype)])
    assert_close(res.mean, exp.mean, REF_TOL[np.dtype(dtype)])


def test_running_stats_as_views(rng):
    """Strided running statistics are updated exactly where they are."""
    x = data(rng, (8, 3, 4), np.float64)
    buf_m = channel(rng, 7, np.float64)
    buf_v = positive(rng, 7, np.float64)
    bm0, bv0 = buf_m.copy(), buf_v.copy()
    rm, rv = buf_m[1::2], buf_v[::3]
    res = nbnorm.forward(x, None, None, rm, rv)
    exp = reference.forward(x, None, None, bm0[1::2], bv0[::3])
    assert_close(rm, exp.running_mean, REF_TOL[x.dtype])
    assert_close(rv, exp.running_var, REF_TOL[x.dtype])
    assert_same(buf_m[0::2], bm0[0::2])
    keep = np.ones(7, bool)
    keep[::3] = False
    assert_same(buf_v[keep], bv0[keep])
    assert_close(res.out, exp.out, REF_TOL[x.dtype])


# ------------------------------------------------------------- statistics

def _var_from_invstd(invstd, eps):
    return 1.0 / np.asarray(invstd, np.float64) ** 2 - eps


@pytest.mark.parametrize("path", list(KERNEL_PATHS))
@pytest.mark.parametrize("small_blocks", [False, True], ids=["config", "small-blocks"])
@pytest.mark.parametrize("offset", [1e4, 1e5])
@pytest.mark.parametrize("shape,axis", [((8, 3, 4096), 1), ((20000, 5), 1),
                                        ((64, 9, 9, 6), -1)],
                         ids=["planar", "interleaved", "NHWC"])
def test_float32_offset_statistics(rng, monkeypatch, shape, axis, offset, small_blocks,
                                   path):
    """float32 data offset by 1e4/1e5 with std 1: the variance is accurate to 1e-6
    relative to float64 statistics of the same float32 data (E[x^2]-E[x]^2 fails)."""
    use_path(monkeypatch, path)
    if small_blocks:
        monkeypatch.setattr(config, "BLOCK", 100)
        monkeypatch.setattr(config, "MIN_PART", 1000)
    C = shape[axis]
    shift_shape = [1] * len(shape)
    shift_shape[axis] = C
    shift = (offset * rng.uniform(0.5, 1.5, C)).reshape(shift_shape)
    x = (rng.standard_normal(shape) + shift).astype(np.float32)
    eps = 1e-5
    rm = np.zeros(C, np.float32)
    rv = np.ones(C, np.float32)
    res = nbnorm.forward(x, None, None, rm, rv, momentum=1.0, eps=eps, axis=axis)
    exp = reference.forward(x, eps=eps, axis=axis)
    var_exp = 1.0 / exp.invstd ** 2 - eps
    n = x.size // C
    rel = np.abs(_var_from_invstd(res.invstd, eps) - var_exp) / var_exp
    assert rel.max() <= 1e-6, rel
    rel_inv = np.abs(res.invstd - exp.invstd) / exp.invstd
    assert rel_inv.max() <= 1e-6, rel_inv
    rel_rv = np.abs(rv - var_exp * n / (n - 1)) / (var_exp * n / (n - 1))
    assert rel_rv.max() <= 1e-6, rel_rv
    assert_close(res.mean, exp.mean, dict(rtol=1e-7, atol=0))
    assert_close(rm, exp.mean, dict(rtol=1e-7, atol=0))
    assert_close(res.out, exp.out, dict(rtol=1e-5, atol=1e-5))


@pytest.mark.parametrize("path", list(KERNEL_PATHS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((8, 3, 300), 1), ((500, 4), 1)],
                         ids=["planar", "interleaved"])
def test_tiny_variance(rng, monkeypatch, shape, axis, dtype, path):
    """std 1e-4 around 1 (float32 data is quantized at ~6e-8) and eps far below it."""
    use_path(monkeypatch, path)
    x = data(rng, shape, dtype, loc=1.0, scale=1e-4)
    eps = 1e-14
    res = nbnorm.forward(x, eps=eps, axis=axis)
    exp = reference.forward(x, eps=eps, axis=axis)
    var_exp = 1.0 / exp.invstd ** 2 - eps
    rel = np.abs(_var_from_invstd(res.invstd, eps) - var_exp) / var_exp
    assert rel.max() <= 1e-6, rel
    assert_close(res.out, exp.out, dict(rtol=1e-5, atol=1e-5))


@pytest.mark.parametrize("path", list(KERNEL_PATHS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((5, 3, 7), 1), ((9, 3), 1)],
                         ids=["planar", "interleaved"])
def test_constant_channel(rng, monkeypatch, shape, axis, dtype, path):
    """A constant (non-zero) channel has variance exactly 0: out is the bias."""
    use_path(monkeypatch, path)
    x = data(rng, shape, dtype)
    idx = [slice(None)] * x.ndim
    idx[axis] = 1
    x[tuple(idx)] = dtype(3.25)
    C = shape[axis]
    w, b = channel(rng, C, dtype), channel(rng, C, dtype)
    eps = 1e-3
    res = nbnorm.forward(x, w, b, eps=eps, axis=axis)
    assert res.mean[1] == dtype(3.25)
    assert res.invstd[1] == dtype(1.0 / np.sqrt(eps))
    assert (res.out[tuple(idx)] == b[1]).all()


def _parts(shape):
    from nbnorm.cpu import stats

    if len(shape) == 3:
        return stats.planar_parts(*shape)
    return stats.interleaved_split(*shape)[1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((5, 3, 301), 1), ((3001, 7), 1), ((7, 2, 9, 31), 1),
                                        ((40, 5, 5, 6), -1), ((301, 50), 1)],
                         ids=["planar", "interleaved", "NCHW", "NHWC", "wide-interleaved"])
@pytest.mark.parametrize("path", list(KERNEL_PATHS))
def test_many_parts_and_blocks(rng, monkeypatch, path, shape, axis, dtype):
    """Small blocks and parts: many Chan merges inside parts and across parts."""
    use_path(monkeypatch, path)
    monkeypatch.setattr(config, "BLOCK", 37)
    monkeypatch.setattr(config, "MIN_PART", 100)
    x = data(rng, shape, dtype, loc=50.0)
    C = shape[axis]
    outer = int(np.prod(shape[:axis % len(shape)]))
    inner = x.size // (outer * C)
    assert _parts((outer, C, inner) if inner > 1 else (outer, C)) > 1
    rm, rv = channel(rng, C, dtype), positive(rng, C, dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    res = nbnorm.forward(x, None, None, rm, rv, axis=axis)
    _check_against_reference(res, x, None, None, rm0, rv0, rm, rv, training=True,
                             momentum=0.1, eps=1e-5, axis=axis)


@pytest.mark.parametrize("shape,axis", [((4, 2, 65536), 1), ((120000, 6), 1)],
                         ids=["planar", "interleaved"])
def test_large_default_config(rng, shape, axis):
    """Shapes large enough for several parts and blocks with the shipped config."""
    C = shape[axis]
    three = (shape[0], C, int(np.prod(shape[2:])))
    assert _parts(three if three[2] > 1 else three[:2]) > 1
    x = data(rng, shape, np.float32, loc=1e3)
    res = nbnorm.forward(x, axis=axis)
    exp = reference.forward(x, axis=axis)
    tol = REF_TOL[x.dtype]
    assert_close(res.mean, exp.mean, tol)
    assert_close(res.invstd, exp.invstd, tol)
    assert_close(res.out, exp.out, dict(rtol=1e-5, atol=1e-5))


@pytest.mark.parametrize("small_blocks", [False, True], ids=["config", "small-blocks"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUT_PARAMS + [((3, 9, 40, 30), 1), ((900, 40), 1)],
                         ids=LAYOUT_IDS + ["NCHW-9", "NC-900"])
def test_kernel_paths_agree_bitwise(rng, monkeypatch, shape, axis, dtype, small_blocks):
    """Serial, fused and parallel kernels compute the same parts and merge them in
    the same order: their results are bitwise identical (so the reference checks
    above, which mostly take the serial path, cover all three)."""
    if small_blocks:
        monkeypatch.setattr(config, "BLOCK", 37)
        monkeypatch.setattr(config, "MIN_PART", 100)
    x, w, b, rm, rv = _args(rng, shape, axis, dtype, True, "train+running")
    results = {}
    for path in KERNEL_PATHS:
        with monkeypatch.context() as m:
            use_path(m, path)
            rm_p, rv_p = rm.copy(), rv.copy()
            f = nbnorm.forward(x, w, b, rm_p, rv_p, axis=axis)
            fi = nbnorm.forward(x, w, b, rm, rv, training=False, axis=axis)
            results[path] = [f.out, f.mean, f.invstd, rm_p, rv_p, fi.out, fi.invstd]
    names = ["out", "mean", "invstd", "running_mean", "running_var", "infer out",
             "infer invstd"]
    for path in ["fused", "parallel", "rows"]:
        for name, a, e in zip(names, results[path], results["serial"]):
            assert_same(a, e, f"{name}: {path} differs from serial")


def _wide_row_shapes():
    """NC shapes around multiples of ``wide_rows(C)``: no wide row at all, wide
    rows only, and wide rows plus narrow rows left over."""
    from nbnorm.cpu import stats

    shapes = []
    for C in (3, 64, 100):
        k = stats.wide_rows(C)
        assert k > 1
        shapes += [(outer, C) for outer in (k - 1, k, k + 1, 3 * k + 2)]
    return shapes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", _wide_row_shapes(), ids=str)
@pytest.mark.parametrize("path", list(KERNEL_PATHS))
def test_wide_rows(rng, monkeypatch, path, shape, dtype):
    """Interleaved kernels view groups of short rows as one wide row: every
    split into wide rows and leftover narrow rows matches the reference, also
    in place (``out=x``) and in inference."""
    use_path(monkeypatch, path)
    x, w, b, rm, rv = _args(rng, shape, 1, dtype, True, "train+running")
    rm0, rv0 = rm.copy(), rv.copy()
    res = nbnorm.forward(x, w, b, rm, rv)
    _check_against_reference(res, x, w, b, rm0, rv0, rm, rv, training=True,
                             momentum=0.1, eps=1e-5, axis=1)
    inf = nbnorm.forward(x, w, b, rm, rv, training=False)
    exp = reference.forward(x, w, b, rm, rv, training=False)
    assert_close(inf.out, exp.out, REF_TOL[x.dtype], "inference out")
    xi = x.copy()
    nbnorm.forward(xi, w, b, out=xi)
    assert_close(xi, reference.forward(x, w, b).out, REF_TOL[x.dtype], "in place")


@pytest.mark.parametrize("rdtype", [np.float16, np.longdouble], ids=["float16", "longdouble"])
@pytest.mark.parametrize("shape,axis", [((16, 5), 1), ((4, 3, 7), 1), ((300, 40), 1),
                                        ((64, 9, 200), 1)],
                         ids=["NC-serial", "NCL-serial", "NC-parallel", "NCL-parallel"])
@pytest.mark.parametrize("policy", ["propagate", "skip"])
def test_running_stats_of_other_float_dtypes(rng, shape, axis, rdtype, policy):
    """Running statistics in float16 or longdouble (the kernels update float32 and
    float64 ones; NumPy does these): updated like the reference, rounded to their
    dtype, on the serial and the parallel paths; with skip, a channel with a NaN
    keeps its old values."""
    x = data(rng, shape, np.float32)
    C = shape[axis]
    if policy == "skip":
        x[(0,) * axis + (1,)] = np.nan  # channel 1
    rm0 = channel(rng, C, np.float32).astype(rdtype)
    rv0 = positive(rng, C, np.float32).astype(rdtype)
    rm, rv = rm0.copy(), rv0.copy()
    nbnorm.forward(x, None, None, rm, rv, axis=axis, on_nonfinite=policy)
    exp = reference.forward(x, None, None, rm0.astype(np.float64), rv0.astype(np.float64),
                            axis=axis)
    good = np.arange(C) != 1 if policy == "skip" else np.ones(C, bool)
    tol = dict(rtol=2e-3, atol=2e-3) if rdtype == np.float16 else dict(rtol=1e-6, atol=1e-6)
    assert rm.dtype == rdtype and rv.dtype == rdtype
    assert_close(rm[good], exp.running_mean[good], tol, "running_mean")
    assert_close(rv[good], exp.running_var[good], tol, "running_var")
    if policy == "skip":
        assert_same(rm[~good], rm0[~good], "skipped running_mean")
        assert_same(rv[~good], rv0[~good], "skipped running_var")


@pytest.mark.parametrize("pdtype", [np.float16, np.float32, np.float64, np.longdouble],
                         ids=["float16", "float32", "float64", "longdouble"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", ["serial", "parallel"])
@pytest.mark.parametrize("shape,axis", [((16, 5), 1), ((3, 4, 5, 6), 1), ((3, 5, 4, 6), -1)],
                         ids=["NC", "NCHW", "NHWC"])
def test_inference_parameters_of_any_float_dtype(rng, monkeypatch, shape, axis, path, dtype,
                                                 pdtype):
    """Inference reads weight, bias and the running statistics in float64 whatever
    their float dtype (the serial kernel takes float32/float64 ones as they are):
    the outputs are bitwise those of the same values passed as float64."""
    use_path(monkeypatch, path)
    x, w, b, rm, rv = _args(rng, shape, axis, dtype, True, "infer")
    params = [a.astype(pdtype) for a in (w, b, rm, rv)]
    got = nbnorm.forward(x, *params, training=False, axis=axis)
    exp = nbnorm.forward(x, *[a.astype(np.float64) for a in params], training=False,
                         axis=axis)
    for name, a, e in zip(got._fields, got, exp):
        assert_same(a, e, name)
    assert_close(got.out, reference.forward(x, *params, training=False, axis=axis).out,
                 REF_TOL[np.dtype(dtype)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,expected_kernels", [
    ((90, 8, 7, 7), ["normalize_interleaved"] * 2),
    ((12, 8, 40, 40), ["train_planar", "normalize_planar"]),
    ((40, 400, 3, 1), ["normalize_planar"] * 2),
], ids=["7x7", "40x40", "C*inner-too-wide"])
def test_short_runs_normalize_as_rows(rng, monkeypatch, shape, expected_kernels, dtype):
    """A planar batch of short runs (and not too wide rows) is normalized by the
    interleaved pass over rows of C*inner values, in training and in inference,
    with the planar kernel's bits; other planar batches keep it.  Runs shorter
    than ``config.FUSE_MIN_RUN_BYTES`` are never fused, rows or not."""
    from nbnorm.cpu import forward as fwd

    monkeypatch.setattr(config, "SERIAL_MAX", 0)
    monkeypatch.setattr(config, "PLANAR_ROWS_MAX_VALUES", 1000)
    calls = []
    for name in ("normalize_planar", "normalize_interleaved", "train_planar"):
        kernel = getattr(fwd, name)
        monkeypatch.setattr(fwd, name, lambda *a, _k=kernel, _n=name: (calls.append(_n), _k(*a))[1])
    x, w, b, rm, rv = _args(rng, shape, 1, dtype, True, "train+running")
    got = [nbnorm.forward(x, w, b, axis=1), nbnorm.forward(x, w, b, rm, rv, training=False)]
    assert calls == expected_kernels
    monkeypatch.setattr(config, "PLANAR_ROWS_MAX_RUN_BYTES", 0)  # never rows
    monkeypatch.setattr(config, "FUSE_MIN_C", 1 << 62)
    exp = [nbnorm.forward(x, w, b, axis=1), nbnorm.forward(x, w, b, rm, rv, training=False)]
    for g, e in zip(got, exp):
        for name, a, c in zip(g._fields, g, e):
            assert_same(a, c, name)
    assert_close(got[1].out, reference.forward(x, w, b, rm, rv, training=False).out,
                 REF_TOL[np.dtype(dtype)])
