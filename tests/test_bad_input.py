"""The bad-input catalogue of docs/errors.md ("Bad input"), case by case.

tests/test_errors.py covers the basic error paths (wrong dtypes, shapes, axes,
read-only and overlapping outputs, eps/momentum out of range); this file covers
the wider catalogue: what is *accepted* and converted (lists, big-endian and
unaligned inputs, non-contiguous buffers, views that interleave without
overlapping, in-place calls) with its result checked bitwise against the plain
call, and the remaining refusals (byte order / alignment of outputs,
self-overlapping outputs, masked arrays, numeric strings, non-finite eps,
non-bool flags, exotic dtypes).  Every refused call is checked to have written
nothing: each array argument and the buffer behind it is compared bitwise.
NaN/inf and huge values are in tests/test_nonfinite.py.
"""

import numpy as np
import pytest

import nbnorm
from helpers import assert_unchanged, backward_call, bits, forward_call, refused, snapshot

SHAPE = (5, 3, 4)  # planar; the interleaved and channels-last variants below
JUNK = 7  # what the preallocated outputs of a valid call (helpers.forward_call) hold


# ------------------------------------------------------------------ helpers

def _run_fwd(kw):
    """forward on private copies of the running stats; (results..., rm, rv) as bytes."""
    kw = dict(kw)
    for k in ("running_mean", "running_var", "out", "mean", "invstd"):
        if isinstance(kw.get(k), np.ndarray) and kw[k].flags.writeable:
            kw[k] = kw[k].copy()
    r = nbnorm.forward(**kw)
    extra = [kw[k] for k in ("running_mean", "running_var") if kw.get(k) is not None]
    return [bits(np.asarray(a)) for a in (*r, *extra)]


def _run_bwd(kw):
    kw = {k: (v.copy() if k.startswith("grad_") and isinstance(v, np.ndarray)
              and k != "grad_out" else v) for k, v in kw.items()}
    return [bits(np.asarray(a)) for a in nbnorm.backward(**kw)]


def _bigendian(a):
    return a.astype(a.dtype.newbyteorder(">"))


def _unaligned(a):
    """The same values in a buffer offset by one byte (flags.aligned is False)."""
    buf = np.zeros(a.nbytes + 1, np.uint8)
    u = np.ndarray(a.shape, a.dtype, buffer=buf, offset=1)
    u[...] = a
    assert not u.flags.aligned
    return u


def _strided(a):
    """The same values in every other element of a larger buffer."""
    buf = np.full(2 * a.size, 9, a.dtype)
    v = buf[::2].reshape(a.shape) if a.ndim == 1 else buf[::2][: a.size].reshape(a.shape)
    v[...] = a
    return v


LAYOUTS = [(SHAPE, 1), ((9, 4), 1), ((2, 3, 3, 4), -1)]
LAYOUT_IDS = ["planar", "interleaved", "channels-last"]


# ------------------------------------------ accepted: converted inputs, same result

INPUT_CONVERSIONS = [
    ("x-list", "fwd", "x", lambda a: a.tolist()),
    ("x-tuple-of-lists", "fwd", "x", lambda a: tuple(a.tolist())),
    ("weight-list", "fwd", "weight", lambda a: a.tolist()),
    ("bias-list", "fwd", "bias", lambda a: a.tolist()),
    ("x-bigendian", "fwd", "x", _bigendian),
    ("weight-bigendian", "fwd", "weight", _bigendian),
    ("bias-bigendian", "fwd", "bias", _bigendian),
    ("x-unaligned", "fwd", "x", _unaligned),
    ("weight-unaligned", "fwd", "weight", _unaligned),
    ("weight-strided", "fwd", "weight", _strided),
    ("x-readonly", "fwd", "x", lambda a: np.lib.stride_tricks.as_strided(a, writeable=False)),
    ("grad_out-list", "bwd", "grad_out", lambda a: a.tolist()),
    ("grad_out-bigendian", "bwd", "grad_out", _bigendian),
    ("x-bigendian", "bwd", "x", _bigendian),
    ("mean-bigendian", "bwd", "mean", _bigendian),
    ("invstd-list", "bwd", "invstd", lambda a: a.tolist()),
    ("grad_out-unaligned", "bwd", "grad_out", _unaligned),
    ("invstd-unaligned", "bwd", "invstd", _unaligned),
    ("mean-strided", "bwd", "mean", _strided),
    ("grad_out-broadcast", "bwd", "grad_out",
     lambda a: np.broadcast_to(a[:1], a.shape)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("name,which,arg,convert", INPUT_CONVERSIONS,
                         ids=[f"{w}-{n}" for n, w, _, _ in INPUT_CONVERSIONS])
def test_converted_input_gives_the_same_result(rng, name, which, arg, convert, shape, axis,
                                               dtype):
    """Inputs that are not native, aligned ndarrays are converted (lists via
    np.asarray; big-endian and unaligned arrays copied); the result is bitwise
    that of the plain call, and the caller's input is untouched."""
    make, run = (forward_call, _run_fwd) if which == "fwd" else (backward_call, _run_bwd)
    kw = make(rng, shape, dtype, axis, fill=JUNK)
    if arg == "grad_out" and "broadcast" in name:
        kw[arg] = np.ascontiguousarray(np.broadcast_to(kw[arg][:1], shape))
    expected = run(kw)
    if dtype == np.float32 and "list" in name:
        if arg in ("x", "grad_out"):
            # a list of Python floats is float64: x and grad_out must agree
            other = "grad_out" if arg == "x" else "x"
            if which == "bwd":
                kw[other] = kw[other].astype(np.float64)
            kw[arg] = kw[arg].astype(np.float64)
            for k in ("out", "mean", "invstd", "grad_input", "grad_weight", "grad_bias"):
                if k in kw:
                    kw[k] = kw[k].astype(np.float64)
            expected = run(kw)
    converted = convert(kw[arg])
    snap = snapshot({arg: converted})
    assert run({**kw, arg: converted}) == expected
    assert_unchanged(snap)


def test_torch_cpu_tensor_input(rng):
    """Anything np.asarray understands is an input, e.g. a PyTorch CPU tensor."""
    torch = pytest.importorskip("torch")
    kw = forward_call(rng, SHAPE, fill=JUNK)
    expected = _run_fwd(kw)
    assert _run_fwd({**kw, "x": torch.from_numpy(kw["x"].copy())}) == expected


@pytest.mark.parametrize("mode", ["strided", "fortran-like-reversed"])
def test_noncontiguous_outputs_and_running_stats_are_written(rng, mode):
    """Outputs and running statistics with any strides (no self-overlap) are
    written correctly; the gaps between their elements are left alone."""
    kw = forward_call(rng, SHAPE, np.float64, fill=JUNK)
    expected = _run_fwd(kw)
    if mode == "strided":
        new = {k: _strided(kw[k]) for k in ("running_mean", "running_var", "mean", "invstd")}
        buf = np.full((SHAPE[0], 2 * SHAPE[1], SHAPE[2]), 9.0)
        new["out"] = buf[:, ::2]
    else:
        new = {k: np.ascontiguousarray(kw[k][::-1])[::-1]
               for k in ("running_mean", "running_var", "mean", "invstd")}
        new["out"] = np.full(SHAPE[::-1], 9.0).T[::-1]
    for k in ("running_mean", "running_var"):
        new[k][...] = kw[k]
    r = nbnorm.forward(**{**kw, **new})
    got = [bits(np.asarray(a)) for a in (*r, new["running_mean"], new["running_var"])]
    assert got == expected
    if mode == "strided":
        assert (buf[:, 1::2] == 9.0).all()


@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=LAYOUT_IDS)
def test_in_place_forward_and_backward(rng, shape, axis):
    """out=x normalizes in place and grad_input=grad_out computes in place, with
    the bitwise result of the out-of-place calls."""
    kw = forward_call(rng, shape, np.float32, axis, fill=JUNK)
    expected = _run_fwd(kw)
    x = kw["x"].copy()
    assert _run_fwd({**kw, "x": x, "out": x}) == expected
    bw = backward_call(rng, shape, np.float32, axis, fill=JUNK)
    expected = _run_bwd(bw)
    dy = bw["grad_out"].copy()
    r = nbnorm.backward(**{**bw, "grad_out": dy, "grad_input": dy})
    assert r.grad_input is dy
    assert [bits(a) for a in r] == expected


def test_in_place_on_a_noncontiguous_x(rng):
    """out=x where x has no canonical view (a stepped view): read through a copy,
    written through a temporary, still exact."""
    kw = forward_call(rng, SHAPE, np.float64, fill=JUNK)
    expected = _run_fwd(kw)
    buf = np.full(2 * kw["x"].size, 9.0)
    x = buf[::2].reshape(SHAPE)
    x[...] = kw["x"]
    assert _run_fwd({**kw, "x": x, "out": x}) == expected
    assert (buf[1::2] == 9.0).all()


def test_interleaved_views_of_one_buffer_are_not_overlap(rng):
    """mean/invstd as the two columns of one (C, 2) buffer share no element:
    accepted (the overlap check is exact, not by bounds)."""
    kw = forward_call(rng, SHAPE, fill=JUNK)
    expected = _run_fwd(kw)
    pair = np.full((3, 2), 7, np.float32)
    r = nbnorm.forward(**{**kw, "mean": pair[:, 0], "invstd": pair[:, 1],
                          "running_mean": kw["running_mean"].copy(),
                          "running_var": kw["running_var"].copy()})
    assert [bits(r.out), bits(r.mean), bits(r.invstd)] == expected[:3]
    gw = np.full((3, 2), 7, np.float32)
    bw = backward_call(rng, SHAPE, fill=JUNK)
    expected = _run_bwd(bw)
    r = nbnorm.backward(**{**bw, "grad_weight": gw[:, 0], "grad_bias": gw[:, 1]})
    assert [bits(a) for a in r] == expected


@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_momentum_bounds(rng, momentum):
    """momentum=0 leaves the running stats bitwise unchanged (finite batch);
    momentum=1 replaces them by the batch statistics."""
    kw = forward_call(rng, SHAPE, np.float64, fill=JUNK)
    rm, rv = kw["running_mean"].copy(), kw["running_var"].copy()
    r = nbnorm.forward(**kw, momentum=momentum)
    if momentum == 0.0:
        assert bits(kw["running_mean"]) == bits(rm) and bits(kw["running_var"]) == bits(rv)
    else:
        n = kw["x"].size // 3
        np.testing.assert_allclose(kw["running_mean"], r.mean, rtol=1e-15)
        np.testing.assert_allclose(kw["running_var"], (r.invstd ** -2 - 1e-5) * n / (n - 1),
                                   rtol=1e-9)


@pytest.mark.parametrize("flag", [True, False, np.True_, np.False_, 1, 0])
def test_bool_like_training_flags(rng, flag):
    kw = forward_call(rng, SHAPE, training=flag, fill=JUNK)
    expected = _run_fwd({**kw, "training": bool(flag)})
    assert _run_fwd(kw) == expected


def test_inference_converts_running_stats_like_inputs(rng):
    """Inference only reads the running statistics, so they are inputs there:
    big-endian, unaligned, strided, read-only or lists are converted."""
    kw = forward_call(rng, SHAPE, training=False, fill=JUNK)
    expected = _run_fwd(kw)
    for convert in (_bigendian, _unaligned, _strided, lambda a: a.tolist()):
        rm, rv = convert(kw["running_mean"]), convert(kw["running_var"])
        snap = snapshot({"rm": rm, "rv": rv})
        r = nbnorm.forward(**{**kw, "running_mean": rm, "running_var": rv,
                              "out": kw["out"].copy(), "mean": kw["mean"].copy(),
                              "invstd": kw["invstd"].copy()})
        assert [bits(a) for a in r] == expected[:3]
        assert_unchanged(snap)


# ---------------------------------------------------------------- refused

def _self_overlapping(a):
    """Writeable, with elements sharing memory (stride 0 in 1-D, one item in n-D)."""
    strides = (a.itemsize,) * a.ndim if a.ndim > 1 else (0,)
    return np.lib.stride_tricks.as_strided(np.zeros(a.size, a.dtype), shape=a.shape,
                                           strides=strides)


def _masked(a):
    return np.ma.masked_array(a, mask=np.zeros(a.shape, bool))


FORWARD_REFUSALS = [
    # (name, arg, replacement(a) or value, exception, match, training)
    ("out-bigendian", "out", _bigendian, TypeError, "byte order", True),
    ("mean-bigendian", "mean", _bigendian, TypeError, "byte order", True),
    ("running_mean-bigendian", "running_mean", _bigendian, TypeError, "byte order", True),
    ("out-unaligned", "out", _unaligned, ValueError, "aligned", True),
    ("invstd-unaligned", "invstd", _unaligned, ValueError, "aligned", True),
    ("running_var-unaligned", "running_var", _unaligned, ValueError, "aligned", True),
    ("out-self-overlapping", "out", _self_overlapping, ValueError, "overlapping elements", True),
    ("out-broadcast-writeable", "out",
     lambda a: np.lib.stride_tricks.as_strided(np.zeros(a.shape[1:], a.dtype), shape=a.shape,
                                               strides=(0,) + a.strides[1:]),
     ValueError, "overlapping elements", True),
    ("mean-self-overlapping", "mean", _self_overlapping, ValueError, "overlapping", True),
    ("running_mean-list", "running_mean", lambda a: a.tolist(), TypeError, "ndarray", True),
    ("running_var-tuple", "running_var", lambda a: tuple(a.tolist()), TypeError, "ndarray",
     True),
    ("mean-list", "mean", lambda a: a.tolist(), TypeError, "ndarray", True),
    ("x-masked", "x", _masked, TypeError, "masked", True),
    ("weight-masked", "weight", _masked, TypeError, "masked", True),
    ("running_mean-masked-infer", "running_mean", _masked, TypeError, "masked", False),
    ("x-complex64", "x", lambda a: a.astype(np.complex64), TypeError, "floating", True),
    ("x-longdouble", "x", lambda a: a.astype(np.longdouble),
     TypeError, "longdouble|float128|float64|floating", True),
    ("x-datetime", "x", lambda a: a.astype("datetime64[s]"), TypeError, "floating", True),
    ("x-timedelta", "x", lambda a: a.astype("m8[s]"), TypeError, "floating", True),
    ("x-str", "x", lambda a: a.astype(str), TypeError, "floating", True),
    ("x-bool-list", "x", lambda a: (a > 0).tolist(), TypeError, "floating", True),
    ("x-complex-list", "x", lambda a: (a + 1j).tolist(), TypeError, "floating", True),
    ("x-structured", "x", lambda a: np.zeros(a.shape, [("v", "f4")]), TypeError, "floating",
     True),
    ("x-0d-list", "x", lambda a: 1.5, ValueError, "dimensions", True),
    ("x-1d-list", "x", lambda a: [1.0, 2.0, 3.0], ValueError, "dimensions", True),
    ("x-ragged-list", "x", lambda a: [[1.0, 2.0], [3.0]], ValueError, "inhomogeneous|sequence",
     True),
    ("weight-object", "weight", lambda a: a.astype(object), TypeError, "weight", True),
    ("running_mean-float-bool", "running_mean", lambda a: a > 0, TypeError, "running_mean",
     True),
    ("running_var-bool-infer", "running_var", lambda a: a > 0, TypeError, "running_var",
     False),
]


@pytest.mark.parametrize("name,arg,replace,exc,match,training", FORWARD_REFUSALS,
                         ids=[c[0] for c in FORWARD_REFUSALS])
def test_forward_refusal(rng, name, arg, replace, exc, match, training):
    kw = forward_call(rng, SHAPE, training=training, fill=JUNK)
    kw[arg] = replace(kw[arg])
    refused(nbnorm.forward, exc, match, **kw)


BACKWARD_REFUSALS = [
    ("grad_input-bigendian", "grad_input", _bigendian, TypeError, "byte order"),
    ("grad_bias-bigendian", "grad_bias", _bigendian, TypeError, "byte order"),
    ("grad_input-unaligned", "grad_input", _unaligned, ValueError, "aligned"),
    ("grad_weight-unaligned", "grad_weight", _unaligned, ValueError, "aligned"),
    ("grad_input-self-overlapping", "grad_input", _self_overlapping, ValueError, "overlapping"),
    ("grad_weight-list", "grad_weight", lambda a: a.tolist(), TypeError, "ndarray"),
    ("grad_out-masked", "grad_out", _masked, TypeError, "masked"),
    ("grad_out-complex-list", "grad_out", lambda a: (a + 1j).tolist(), TypeError, "grad_out"),
    ("grad_out-float64-list-for-float32", "grad_out", lambda a: a.tolist(), TypeError,
     "grad_out"),
    ("mean-str", "mean", lambda a: a.astype(str), TypeError, "mean"),
]


@pytest.mark.parametrize("name,arg,replace,exc,match", BACKWARD_REFUSALS,
                         ids=[c[0] for c in BACKWARD_REFUSALS])
def test_backward_refusal(rng, name, arg, replace, exc, match):
    kw = backward_call(rng, SHAPE, fill=JUNK)
    kw[arg] = replace(kw[arg])
    refused(nbnorm.backward, exc, match, **kw)


@pytest.mark.parametrize("eps", [float("inf"), -float("inf"), 0.0, -0.0, b"1e-5", "1e-5",
                                 [1e-5], np.array([1e-5]), complex(1e-5, 0), None])
def test_bad_eps(rng, eps):
    """eps must be a finite real number > 0; numeric strings are not numbers."""
    exc = ValueError if isinstance(eps, float) else TypeError
    refused(nbnorm.forward, exc, "eps", **forward_call(rng, SHAPE, fill=JUNK), eps=eps)


@pytest.mark.parametrize("momentum", [float("inf"), -1e-12, 1 + 1e-12, "0.1", [0.1],
                                      complex(0.1, 0)])
def test_bad_momentum(rng, momentum):
    exc = ValueError if isinstance(momentum, float) else TypeError
    refused(nbnorm.forward, exc, "momentum", **forward_call(rng, SHAPE, fill=JUNK),
            momentum=momentum)


@pytest.mark.parametrize("flag", ["False", "", None, 2, -1, 0.5, [True]])
@pytest.mark.parametrize("func", ["forward", "backward"])
def test_bad_training_flag(rng, func, flag):
    """training='False' used to mean True (bool of a non-empty string)."""
    exc = ValueError if isinstance(flag, int) else TypeError
    make = forward_call if func == "forward" else backward_call
    kw = make(rng, SHAPE, fill=JUNK)
    refused(getattr(nbnorm, func), exc, "training", **{**kw, "training": flag})


def test_eps_scalar_types_accepted(rng):
    """Any real scalar works for eps and momentum: numpy scalars, 0-d arrays, ints."""
    kw = forward_call(rng, SHAPE, np.float64, fill=JUNK)
    expected = _run_fwd({**kw, "eps": 1e-3, "momentum": 1.0})
    for eps, mom in [(np.float32(1e-3), np.int64(1)), (np.array(1e-3), True),
                     (np.float64(1e-3), 1)]:
        if isinstance(eps, np.float32):
            exp = _run_fwd({**kw, "eps": float(np.float32(1e-3)), "momentum": 1.0})
        else:
            exp = expected
        assert _run_fwd({**kw, "eps": eps, "momentum": mom}) == exp
