"""The plain-call path of ``nbnorm.api`` (``_plain_forward``, ``_plain_backward``).

A call of exact, C-contiguous, aligned float32/float64 ndarrays with float
scalars skips the general validation helpers.  It must do exactly what the
general path does, and take nothing else: every call here runs both ways (the
general path by disabling the plain one) and must give the same bits in every
output and running statistic; the calls that are not plain must not take it.
The bad-input catalogue (test_bad_input.py, test_errors.py) runs through
``forward``/``backward`` as users call them, so its errors still come from the
general path.
"""

import numpy as np
import pytest

import nbnorm
from nbnorm import api
from helpers import LAYOUT_IDS, LAYOUT_PARAMS, DTYPES, assert_same, channel, data, positive


class _Spy:
    """Wraps ``api._plain_*`` and records whether each call was taken as plain."""

    def __init__(self, monkeypatch):
        self.taken = []
        for name in ("_plain_forward", "_plain_backward"):
            real = getattr(api, name)

            def spy(*args, _real=real):
                r = _real(*args)
                self.taken.append(r is not None)
                return r

            monkeypatch.setattr(api, name, spy)


@pytest.fixture
def spy(monkeypatch):
    return _Spy(monkeypatch)


def _general(monkeypatch, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with the plain path disabled."""
    with monkeypatch.context() as m:
        m.setattr(api, "_plain_forward", lambda *a: None)
        m.setattr(api, "_plain_backward", lambda *a: None)
        return fn(*args, **kwargs)


def _step(rng, shape, axis, dtype, pdtype, affine, prealloc):
    """Arguments of a forward call, and a backward call's extra ones."""
    C = shape[axis]
    x = data(rng, shape, dtype)
    w = channel(rng, C, pdtype) if affine else None
    b = channel(rng, C, pdtype) if affine else None
    rm, rv = channel(rng, C, pdtype), positive(rng, C, pdtype)
    outs = {}
    if prealloc:
        outs = dict(out=np.empty(shape, dtype), mean=np.empty(C, dtype),
                    invstd=np.empty(C, dtype))
    return x, w, b, rm, rv, outs, data(rng, shape, dtype)


def _run_forward(x, w, b, rm, rv, outs, **kw):
    rm, rv = rm.copy(), rv.copy()
    outs = {k: v.copy() for k, v in outs.items()}
    r = nbnorm.forward(x, w, b, rm, rv, **outs, **kw)
    return (*r, rm, rv)


@pytest.mark.parametrize("prealloc", [False, True], ids=["allocated", "preallocated"])
@pytest.mark.parametrize("dtype,pdtype", [(np.float32, np.float32), (np.float64, np.float64),
                                          (np.float32, np.float64)])
@pytest.mark.parametrize("shape,axis", LAYOUT_PARAMS, ids=LAYOUT_IDS)
def test_plain_calls_match_the_general_path(rng, monkeypatch, spy, shape, axis, dtype,
                                            pdtype, prealloc):
    x, w, b, rm, rv, outs, dy = _step(rng, shape, axis, dtype, pdtype, True, prealloc)
    for training in (True, False):
        for kw in (dict(), dict(momentum=0.3, eps=1e-3, on_nonfinite="skip")):
            got = _run_forward(x, w, b, rm, rv, outs, training=training, axis=axis, **kw)
            assert spy.taken.pop() is True
            want = _general(monkeypatch, _run_forward, x, w, b, rm, rv, outs,
                            training=training, axis=axis, **kw)
            for g, e in zip(got, want):
                assert_same(g, e, f"training={training} {kw}")
    mean, invstd = got[1], got[2]
    for training in (True, False):
        gouts = {}
        if prealloc:
            C = x.shape[axis]
            gouts = dict(grad_input=np.empty(shape, dtype), grad_weight=np.empty(C, dtype),
                         grad_bias=np.empty(C, dtype))
        got = nbnorm.backward(dy, x, mean, invstd, w, training=training, axis=axis, **gouts)
        assert spy.taken.pop() is True
        want = _general(monkeypatch, nbnorm.backward, dy, x, mean, invstd, w,
                        training=training, axis=axis)
        for g, e in zip(got, want):
            assert_same(g, e, f"backward training={training}")
        if prealloc:
            assert got.grad_input is gouts["grad_input"]


def test_plain_call_without_parameters(rng, spy):
    x = data(rng, (6, 5), np.float32)
    r = nbnorm.forward(x)
    assert spy.taken == [True]
    nbnorm.backward(x, x.copy(), r.mean, r.invstd)
    assert spy.taken == [True, True]


def _not_plain(rng):
    """(what, forward keyword arguments) of calls that the general path accepts but
    that are not plain."""
    C = 4
    x = data(rng, (6, C, 3), np.float32)
    rm, rv = channel(rng, C, np.float32), positive(rng, C, np.float32)
    base = dict(x=x, running_mean=rm, running_var=rv)
    view_base = np.zeros((2, C), np.float32)
    yield "Fortran-order x", dict(base, x=np.asfortranarray(x))
    yield "x a list", dict(base, x=x.tolist())
    yield "big-endian x", dict(base, x=x.astype(">f4"))
    yield "float16 weight", dict(base, weight=channel(rng, C, np.float16))
    yield "strided weight", dict(base, weight=channel(rng, 2 * C, np.float32)[::2])
    yield "list weight", dict(base, weight=[1.0] * C)
    yield "int eps", dict(base, eps=1)
    yield "numpy-scalar momentum", dict(base, momentum=np.float64(0.2))
    yield "bool axis", dict(base, axis=True)
    yield "numpy-int axis", dict(base, axis=np.int64(1))
    yield "int training", dict(base, training=1)
    yield "out=x", dict(base, x=x.copy(), out=None, _out_is_x=True)
    yield "running stats that are views", dict(base, running_mean=view_base[0],
                                               running_var=np.abs(view_base[1]) + 1)
    yield "x a view, running stats updated", dict(base, x=np.concatenate([x, x])[:6])
    yield "float64 mean for float32 x", dict(base, mean=np.empty(C))


def test_other_calls_take_the_general_path(rng, monkeypatch, spy):
    for what, kw in _not_plain(rng):
        kw = dict(kw)
        if kw.pop("_out_is_x", False):
            kw["out"] = kw["x"]
        if what == "float64 mean for float32 x":
            with pytest.raises(TypeError):  # the general path's error, not a plain call
                nbnorm.forward(**kw)
            assert spy.taken.pop() is False, what
            continue
        rm, rv = kw.pop("running_mean"), kw.pop("running_var")
        x = kw.pop("x")
        xp = np.ascontiguousarray(np.asarray(x, dtype=np.float32)).copy()  # before out=x
        r = nbnorm.forward(x, running_mean=rm, running_var=rv, **kw)
        assert spy.taken.pop() is False, what
        # and the general path's results are those of the same data made plain
        want = nbnorm.forward(xp, running_mean=np.ascontiguousarray(rm),
                              running_var=np.ascontiguousarray(rv),
                              **{k: v for k, v in kw.items() if k != "out"})
        np.testing.assert_allclose(r.out, want.out, rtol=1e-6, atol=1e-6, err_msg=what)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_in_place_takes_the_general_path(rng, spy, dtype):
    x = data(rng, (8, 3), dtype)
    r = nbnorm.forward(x)
    dy = data(rng, (8, 3), dtype)
    want = nbnorm.backward(dy.copy(), x, r.mean, r.invstd).grad_input
    spy.taken.clear()
    got = nbnorm.backward(dy, x, r.mean, r.invstd, grad_input=dy).grad_input
    assert spy.taken == [False] and got is dy
    assert_same(got, want)


def test_a_plain_call_with_bad_values_raises_the_general_error(rng):
    """Calls that are plain in form but wrong in value (training on one value per
    channel, eps <= 0) still raise the general path's errors, and write nothing."""
    x = data(rng, (1, 4), np.float32)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nbnorm.forward(x, running_mean=rm, running_var=rv)
    x = data(rng, (5, 4), np.float32)
    with pytest.raises(ValueError, match="eps"):
        nbnorm.forward(x, running_mean=rm, running_var=rv, eps=0.0)
    with pytest.raises(ValueError, match="momentum"):
        nbnorm.forward(x, running_mean=rm, running_var=rv, momentum=1.5)
    assert not rm.any() and (rv == 1).all()
