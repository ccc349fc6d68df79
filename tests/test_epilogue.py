"""The fused epilogues: ``out = relu(bn(x) + residual)`` and its gradient.

Against the float64 reference and PyTorch's autograd of
``relu(F.batch_norm(x) + r)`` (cuDNN's fused forms compute the same), on
every layout and kernel path; the bits must not depend on the kernel path;
bad epilogue arguments are refused before anything is written.
"""

import numpy as np
import pytest

import nbnorm
from nbnorm import reference
from helpers import (DTYPES, KERNEL_PATHS, LAYOUT_IDS, LAYOUT_PARAMS, REF_TOL, TORCH_TOL,
                     as_memory, assert_close, assert_same, channel, data, positive, refused,
                     use_path)

EPILOGUES = [("relu", False), (None, True), ("relu", True)]
EPILOGUE_IDS = ["relu", "add", "add+relu"]


def _call(rng, shape, axis, dtype, training):
    C = shape[axis]
    return dict(x=data(rng, shape, dtype), weight=channel(rng, C, dtype),
                bias=channel(rng, C, dtype), running_mean=channel(rng, C, dtype),
                running_var=positive(rng, C, dtype), training=training, axis=axis)


def _forward(kw, activation, residual):
    kw = dict(kw, running_mean=kw["running_mean"].copy(), running_var=kw["running_var"].copy())
    res = nbnorm.forward(**kw, activation=activation, residual=residual)
    return res, kw["running_mean"], kw["running_var"]


#: Every kernel path in float32; float64 (the same code, compiled again) on the
#: serial path here and on every path in the bitwise test below: each path,
#: dtype and epilogue is a kernel of its own to compile on a cold CI machine.
DTYPE_PATHS = [(np.float32, p) for p in KERNEL_PATHS] + [(np.float64, "serial")]


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("activation,add", EPILOGUES, ids=EPILOGUE_IDS)
@pytest.mark.parametrize("shape,axis", LAYOUT_PARAMS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype,path", DTYPE_PATHS,
                         ids=[f"{np.dtype(d).name}-{p}" for d, p in DTYPE_PATHS])
def test_forward_matches_reference(rng, monkeypatch, dtype, shape, axis, activation, add,
                                   training, path):
    use_path(monkeypatch, path)
    kw = _call(rng, shape, axis, dtype, training)
    r = data(rng, shape, dtype, 0.0, 1.0) if add else None
    res, rm, rv = _forward(kw, activation, r)
    ref = reference.forward(**kw, residual=r, activation=activation)
    tol = REF_TOL[np.dtype(dtype)]
    assert_close(res.out, ref.out, tol, "out")
    assert_close(res.mean, ref.mean, tol, "mean")
    assert_close(res.invstd, ref.invstd, tol, "invstd")
    if training:
        assert_close(rm, ref.running_mean, tol, "running_mean")
    # the same bits as the call without epilogue, followed by the epilogue in float64
    plain, _, _ = _forward(kw, None, None)
    assert_same(res.mean, plain.mean)
    if activation == "relu":
        assert np.all(res.out >= 0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("activation,add", EPILOGUES, ids=EPILOGUE_IDS)
@pytest.mark.parametrize("shape,axis", [((40, 12, 70), 1), ((300, 24), 1), ((7, 9, 8, 40), -1)],
                         ids=["planar", "NC", "NHWC"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_kernel_path_gives_the_same_bits(rng, monkeypatch, dtype, shape, axis,
                                               activation, add, training):
    kw = _call(rng, shape, axis, dtype, training)
    r = data(rng, shape, dtype, 0.0, 1.0) if add else None
    dy = data(rng, shape, dtype, 0.0, 1.0)
    results = {}
    for path in KERNEL_PATHS:
        with monkeypatch.context() as m:
            use_path(m, path)
            f, rm, _ = _forward(kw, activation, r)
            gres = np.empty(shape, dtype)
            g = nbnorm.backward(dy, kw["x"], f.mean, f.invstd, kw["weight"], axis=axis,
                                training=training, activation=activation,
                                forward_out=f.out if activation else None, grad_residual=gres)
            results[path] = (f.out, f.mean, rm, *g, gres)
    first = results.pop("serial")
    for path, got in results.items():
        for a, b in zip(got, first):
            assert_same(a, b, path)


def _torch_fused(kw, r, activation, dy, training):
    """PyTorch autograd of ``act(batch_norm(x) + r)``: (out, running_mean,
    grad_x, grad_w, grad_b, grad_r), channels moved to axis 1 and back."""
    torch = pytest.importorskip("torch")
    axis = kw["axis"] % kw["x"].ndim

    def t(a, grad=False):
        v = torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, axis, 1)))
        return v.requires_grad_(grad)

    x = t(kw["x"], True)
    w = torch.from_numpy(kw["weight"].copy()).requires_grad_(True)
    b = torch.from_numpy(kw["bias"].copy()).requires_grad_(True)
    rm, rv = torch.from_numpy(kw["running_mean"].copy()), torch.from_numpy(kw["running_var"].copy())
    res = t(r, True) if r is not None else None
    y = torch.nn.functional.batch_norm(x, rm, rv, w, b, training=training, momentum=0.1)
    if res is not None:
        y = y + res
    if activation == "relu":
        y = torch.relu(y)
    y.backward(t(dy))

    def back(v):
        return np.moveaxis(v.detach().numpy(), 1, axis)

    # without a residual, its gradient is that of the sum: dy through the mask
    gr = back(res.grad) if res is not None else (
        reference.relu_backward(dy, back(y)) if activation == "relu" else dy)
    return back(y), rm.numpy(), back(x.grad), w.grad.numpy(), b.grad.numpy(), gr


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("activation,add", EPILOGUES, ids=EPILOGUE_IDS)
@pytest.mark.parametrize("shape,axis", [((6, 5, 7, 4), 1), ((33, 9), 1), ((5, 6, 4, 7), -1)],
                         ids=["NCHW", "NC", "NHWC"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_torch_autograd(rng, dtype, shape, axis, activation, add, training):
    kw = _call(rng, shape, axis, dtype, training)
    r = data(rng, shape, dtype, 0.0, 1.0) if add else None
    dy = data(rng, shape, dtype, 0.0, 1.0)
    f, rm, _ = _forward(kw, activation, r)
    gres = np.full(shape, np.nan, dtype)
    g = nbnorm.backward(dy, kw["x"], f.mean, f.invstd, kw["weight"], axis=axis,
                        training=training, activation=activation,
                        forward_out=f.out if activation else None, grad_residual=gres)
    ty, trm, tgx, tgw, tgb, tgr = _torch_fused(kw, r, activation, dy, training)
    tol = TORCH_TOL[np.dtype(dtype)]
    assert_close(f.out, ty, tol, "out")
    assert_close(rm, trm, tol, "running_mean")
    assert_close(g.grad_input, tgx, tol, "grad_input")
    assert_close(g.grad_weight, tgw, tol, "grad_weight")
    assert_close(g.grad_bias, tgb, tol, "grad_bias")
    assert_close(gres, tgr, tol, "grad_residual")


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("shape,axis", LAYOUT_PARAMS, ids=LAYOUT_IDS)
def test_backward_matches_reference(rng, shape, axis, training):
    dtype = np.float64
    kw = _call(rng, shape, axis, dtype, training)
    r = data(rng, shape, dtype, 0.0, 1.0)
    dy = data(rng, shape, dtype, 0.0, 1.0)
    f, _, _ = _forward(kw, "relu", r)
    gres = np.full(shape, np.nan)
    g = nbnorm.backward(dy, kw["x"], f.mean, f.invstd, kw["weight"], axis=axis,
                        training=training, activation="relu", forward_out=f.out,
                        grad_residual=gres)
    ref = reference.backward(dy, kw["x"], f.mean, f.invstd, kw["weight"], axis=axis,
                             training=training, activation="relu", forward_out=f.out)
    tol = REF_TOL[np.dtype(dtype)]
    assert_close(g.grad_input, ref.grad_input, tol, "grad_input")
    assert_close(g.grad_weight, ref.grad_weight, tol, "grad_weight")
    assert_close(g.grad_bias, ref.grad_bias, tol, "grad_bias")
    assert_same(gres, reference.relu_backward(dy, f.out))
    # without the activation the residual's gradient is grad_out itself
    g2 = nbnorm.backward(dy, kw["x"], f.mean, f.invstd, kw["weight"], axis=axis,
                         training=training, grad_residual=gres)
    assert_same(gres, dy)
    assert_close(g2.grad_input, reference.backward(dy, kw["x"], f.mean, f.invstd, kw["weight"],
                                                   axis=axis, training=training).grad_input,
                 tol, "grad_input without mask")


@pytest.mark.parametrize("kind", ["fortran", "channels_last", "stepped"])
def test_residual_and_outputs_in_other_memory_layouts(rng, kind):
    shape, axis = (4, 5, 6, 3), 1
    kw = _call(rng, shape, axis, np.float64, True)
    r = data(rng, shape, np.float64)
    dy = data(rng, shape, np.float64)
    exp, _, _ = _forward(kw, "relu", r)
    got, _, _ = _forward(kw, "relu", as_memory(r, kind, axis))
    assert_same(np.ascontiguousarray(got.out), np.ascontiguousarray(exp.out))
    gres = as_memory(np.zeros(shape), kind, axis)
    nbnorm.backward(as_memory(dy, kind, axis), kw["x"], exp.mean, exp.invstd, kw["weight"],
                    activation="relu", forward_out=as_memory(exp.out, kind, axis),
                    grad_residual=gres)
    assert_same(np.ascontiguousarray(gres), reference.relu_backward(dy, exp.out))


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
def test_in_place(rng, training):
    """``out=x`` and ``out=residual`` normalize in place; ``grad_input=grad_out``
    and ``grad_residual=grad_out`` compute the gradients in place."""
    shape = (9, 4, 11)
    kw = _call(rng, shape, 1, np.float64, training)
    r = data(rng, shape, np.float64)
    exp, _, _ = _forward(kw, "relu", r)
    for target in ("x", "residual"):
        k = dict(kw, x=kw["x"].copy())
        rr = r.copy()
        buf = k["x"] if target == "x" else rr
        got, _, _ = _forward(dict(k, out=buf), "relu", rr)
        assert got.out is buf
        assert_same(buf, exp.out)
    dy = data(rng, shape, np.float64)
    args = (kw["x"], exp.mean, exp.invstd, kw["weight"])
    opts = dict(training=training, activation="relu", forward_out=exp.out)
    gres = np.empty(shape)
    want = nbnorm.backward(dy, *args, **opts, grad_residual=gres)
    d = dy.copy()
    got = nbnorm.backward(d, *args, **opts, grad_input=d)
    assert got.grad_input is d
    assert_same(d, want.grad_input)
    d = dy.copy()
    nbnorm.backward(d, *args, **opts, grad_residual=d)
    assert_same(d, gres)


def test_relu_keeps_nan_as_torch_does(rng):
    torch = pytest.importorskip("torch")
    x = data(rng, (6, 3, 5), np.float64)
    r = data(rng, (6, 3, 5), np.float64)
    r[0, 1, 2] = np.nan
    out = nbnorm.forward(x, activation="relu", residual=r).out
    t = torch.relu(torch.nn.functional.batch_norm(torch.from_numpy(x), None, None,
                                                   training=True) + torch.from_numpy(r))
    assert np.isnan(out[0, 1, 2]) and np.isnan(t[0, 1, 2].item())
    assert_close(out, t.numpy(), TORCH_TOL[np.dtype(np.float64)], "with a NaN")


def test_half_epilogue(rng):
    """float16 and bfloat16 take the epilogues too (``test_half`` checks rounding)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    for dt in (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)):
        x = data(rng, (12, 6, 9), np.float64).astype(dt)
        r = data(rng, (12, 6, 9), np.float64).astype(dt)
        res = nbnorm.forward(x, residual=r, activation="relu")
        ref = reference.forward(x, residual=r, activation="relu")
        exact = reference.rounded(ref.out, dt).astype(np.float64)
        assert (res.out.astype(np.float64) == exact).mean() > 0.99
        dy = data(rng, (12, 6, 9), np.float64).astype(dt)
        gres = np.empty_like(x)
        g = nbnorm.backward(dy, x, res.mean, res.invstd, activation="relu",
                            forward_out=res.out, grad_residual=gres)
        assert_same(gres, reference.rounded(reference.relu_backward(dy, res.out), dt))
        rb = reference.backward(dy, x, res.mean, res.invstd, activation="relu",
                                forward_out=res.out)
        np.testing.assert_allclose(g.grad_weight, rb.grad_weight, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------- bad input

def _fwd_kw(rng, training=True):
    kw = _call(rng, (5, 3, 4), 1, np.float32, training)
    return dict(kw, out=np.full((5, 3, 4), 7, np.float32), mean=np.full(3, 7, np.float32),
                invstd=np.full(3, 7, np.float32), activation="relu",
                residual=data(rng, (5, 3, 4), np.float32))


def _bwd_kw(rng, training=True):
    x = data(rng, (5, 3, 4), np.float32)
    f = nbnorm.forward(x, activation="relu")
    return dict(grad_out=data(rng, (5, 3, 4), np.float32), x=x, mean=f.mean, invstd=f.invstd,
                weight=channel(rng, 3, np.float32), training=training, activation="relu",
                forward_out=f.out, grad_input=np.full((5, 3, 4), 7, np.float32),
                grad_weight=np.full(3, 7, np.float32), grad_bias=np.full(3, 7, np.float32),
                grad_residual=np.full((5, 3, 4), 7, np.float32))


FORWARD_REFUSALS = [
    ("residual-shape", dict(residual=np.zeros((5, 3, 5), np.float32)), ValueError, "shape"),
    ("residual-dtype", dict(residual=np.zeros((5, 3, 4))), TypeError, "dtype"),
    ("residual-int", dict(residual=np.zeros((5, 3, 4), np.int32)), TypeError, "dtype"),
    ("activation-unknown", dict(activation="gelu"), ValueError, "activation"),
    ("activation-True", dict(activation=True), ValueError, "activation"),
    ("activation-upper", dict(activation="ReLU"), ValueError, "activation"),
    ("out-overlaps-residual", "out=residual-shifted", ValueError, "overlap"),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("name,edit,exc,match", FORWARD_REFUSALS,
                         ids=[c[0] for c in FORWARD_REFUSALS])
def test_forward_refusal(rng, name, edit, exc, match, training):
    kw = _fwd_kw(rng, training)
    if edit == "out=residual-shifted":
        buf = np.zeros(kw["x"].size + 1, np.float32)
        kw["residual"] = buf[1:].reshape(kw["x"].shape)
        kw["out"] = buf[:-1].reshape(kw["x"].shape)
    else:
        kw.update(edit)
    refused(nbnorm.forward, exc, match, **kw)


def _overlapping_grad_residual(kw):
    kw["grad_residual"] = kw["grad_input"]


def _grad_residual_is_x(kw):
    kw["grad_residual"] = kw["x"]


def _grad_residual_is_forward_out(kw):
    kw["grad_residual"] = kw["forward_out"]


BACKWARD_REFUSALS = [
    ("relu-without-forward_out", dict(forward_out=None), ValueError, "forward_out"),
    ("forward_out-without-relu", dict(activation=None), ValueError, "forward_out"),
    ("forward_out-shape", dict(forward_out=np.zeros((5, 3, 5), np.float32)), ValueError,
     "shape"),
    ("forward_out-dtype", dict(forward_out=np.zeros((5, 3, 4))), TypeError, "dtype"),
    ("grad_residual-dtype", dict(grad_residual=np.zeros((5, 3, 4))), TypeError, "dtype"),
    ("grad_residual-shape", dict(grad_residual=np.zeros((5, 3, 5), np.float32)), ValueError,
     "shape"),
    ("grad_residual-readonly", "readonly", ValueError, "read-only"),
    ("grad_residual-is-grad_input", _overlapping_grad_residual, ValueError, "overlap"),
    ("grad_residual-is-x", _grad_residual_is_x, ValueError, "overlap"),
    ("grad_residual-is-forward_out", _grad_residual_is_forward_out, ValueError, "overlap"),
    ("activation-unknown", dict(activation="tanh"), ValueError, "activation"),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("name,edit,exc,match", BACKWARD_REFUSALS,
                         ids=[c[0] for c in BACKWARD_REFUSALS])
def test_backward_refusal(rng, name, edit, exc, match, training):
    kw = _bwd_kw(rng, training)
    if edit == "readonly":
        kw["grad_residual"].flags.writeable = False
    elif callable(edit):
        edit(kw)
    else:
        kw.update(edit)
    refused(nbnorm.backward, exc, match, **kw)


def test_refused_training_step_leaves_running_stats(rng):
    """A bad epilogue argument raises before the running statistics move."""
    kw = _fwd_kw(rng)
    rm, rv = kw["running_mean"].copy(), kw["running_var"].copy()
    with pytest.raises(TypeError):
        nbnorm.forward(**dict(kw, residual=kw["residual"].astype(np.float64)))
    assert_same(kw["running_mean"], rm)
    assert_same(kw["running_var"], rv)
