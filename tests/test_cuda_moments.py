"""The mergeable statistics on CUDA arrays, against the CPU and the whole batch.

As ``tests/test_cuda.py``: without a GPU the kernels run on Numba's simulator
(``tests/conftest.py``), with tiny shapes and ``config`` patched to small blocks
so that channels split over several blocks.  The real warp-shuffle path and the
new per-channel kernels are compiled to PTX in ``test_cuda_ptx.py``.
"""

import numpy as np
import pytest

pytest.importorskip("numba_cuda", reason="numba-cuda is not installed: pip install 'nbnorm[cuda]'")

from numba import config as numba_config  # noqa: E402
from numba import cuda  # noqa: E402

import nbnorm  # noqa: E402
from nbnorm import config  # noqa: E402

SIM = bool(numba_config.ENABLE_CUDASIM)
if not SIM and not cuda.is_available():
    pytest.skip("no CUDA GPU, and NUMBA_ENABLE_CUDASIM=0 turns the simulator off",
                allow_module_level=True)

TOL = {np.dtype(np.float32): dict(rtol=3e-6, atol=3e-6),
       np.dtype(np.float64): dict(rtol=1e-11, atol=1e-11)}

#: (id, shape, axis, dtype): planar with 3 blocks a channel, interleaved wider than a block
CASES = [("planar-f32", (6, 2, 37), 1, np.float32), ("interleaved-f64", (37, 40), 1, np.float64)]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(config, "CUDA_THREADS", 32)
    monkeypatch.setattr(config, "CUDA_MIN_BLOCK_ELEMENTS", 16)
    monkeypatch.setattr(config, "CUDA_TARGET_BLOCKS", 6)
    monkeypatch.setattr(config, "CUDA_ELEMENTWISE_BLOCKS", 2)
    monkeypatch.setattr(config, "CUDA_UNROLL", 2)


def dev(a):
    return None if a is None else cuda.to_device(np.ascontiguousarray(a))


def host(d):
    return d.copy_to_host()


def on_device(a):
    return cuda.is_cuda_array(a) if not SIM else hasattr(a, "copy_to_host")


def close(actual, expected, dtype, what):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                               err_msg=what, **TOL[np.dtype(dtype)])


def rand(rng, shape, dtype, loc=None):
    loc = rng.uniform(-2, 2) if loc is None else loc
    return (rng.standard_normal(shape) * rng.uniform(0.5, 3) + loc).astype(dtype)


def _parts(x):
    """Uneven parts along axis 0, one without rows."""
    n = x.shape[0]
    return [x[:2], x[2:2], x[2:n - 1], x[n - 1:]]


@pytest.mark.parametrize("shape,axis,dtype", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_moments_and_merge_on_the_device(rng, shape, axis, dtype):
    x = rand(rng, shape, dtype, loc=1e4)
    m = nbnorm.moments(dev(x), axis=axis)
    mc = nbnorm.moments(x, axis=axis)
    assert on_device(m.mean) and on_device(m.m2) and m.count == mc.count
    assert host(m.mean).dtype == np.float64
    np.testing.assert_allclose(host(m.mean), mc.mean, rtol=1e-14)
    np.testing.assert_allclose(host(m.m2), mc.m2, rtol=1e-9)
    empty = nbnorm.moments(dev(x[:0]), axis=axis)
    assert empty.count == 0 and not host(empty.mean).any() and not host(empty.m2).any()
    # the device merge has the host merge's bits, for the same entries in the same order
    hosts = [nbnorm.moments(p, axis=axis) for p in _parts(x)]
    devs = [nbnorm.Moments(h.count, dev(h.mean), dev(h.m2)) for h in hosts]
    md, mh = nbnorm.merge_moments(devs), nbnorm.merge_moments(hosts)
    assert md.count == mh.count == x.size // shape[axis]
    assert host(md.mean).tobytes() == mh.mean.tobytes()
    assert host(md.m2).tobytes() == mh.m2.tobytes()
    zeros = nbnorm.merge_moments([devs[1], devs[1]])
    assert zeros.count == 0 and not host(zeros.mean).any()


@pytest.mark.parametrize("shape,axis,dtype", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_forward_and_backward_with_global_statistics(rng, shape, axis, dtype):
    """Each part normalized with the merged moments and differentiated with the
    summed sums: the whole batch's forward and backward (on the CPU)."""
    C = shape[axis]
    x, dy = rand(rng, shape, dtype), rand(rng, shape, dtype)
    w, b = rng.uniform(-1.5, 1.5, C).astype(dtype), rng.uniform(-1.5, 1.5, C).astype(dtype)
    rm0, rv0 = rng.uniform(-1, 1, C).astype(dtype), rng.uniform(0.3, 2, C).astype(dtype)
    rm_c, rv_c = rm0.copy(), rv0.copy()
    full = nbnorm.forward(x, w, b, rm_c, rv_c, axis=axis, momentum=0.3, unbiased=False)
    gfull = nbnorm.backward(dy, x, full.mean, full.invstd, w, axis=axis)
    xs, dys = _parts(x), _parts(dy)
    merged = nbnorm.merge_moments([nbnorm.moments(dev(p), axis=axis) for p in xs])
    outs, grads = [], []
    wd, bd = dev(w), dev(b)
    for p, g in zip(xs, dys):
        pd, gd, rmd, rvd = dev(p), dev(g), dev(rm0), dev(rv0)
        r = nbnorm.forward(pd, wd, bd, rmd, rvd, axis=axis, momentum=0.3, unbiased=False,
                           moments=merged)
        close(host(rmd), rm_c, dtype, "running_mean")
        close(host(rvd), rv_c, dtype, "running_var (biased)")
        close(host(r.mean), full.mean, dtype, "mean")
        close(host(r.invstd), full.invstd, dtype, "invstd")
        outs.append(host(r.out))
        grads.append((gd, pd, r))
    assert outs[1].shape == xs[1].shape
    close(np.concatenate(outs), full.out, dtype, "out")
    local = [nbnorm.backward_sums(gd, pd, r.mean, r.invstd, axis=axis) for gd, pd, r in grads]
    assert all(on_device(s) for pair in local for s in pair)
    total = tuple(dev(sum(host(s[k]) for s in local)) for k in (0, 1))
    n = x.size // C
    gi, gw, gb = [], 0.0, 0.0
    for (gd, pd, r), own in zip(grads, local):
        g = nbnorm.backward(gd, pd, r.mean, r.invstd, wd, axis=axis, sums=total, count=n,
                            local_sums=own)
        g2 = nbnorm.backward(gd, pd, r.mean, r.invstd, wd, axis=axis, sums=total, count=n)
        for name, a, c in zip(g._fields, g, g2):
            assert host(a).tobytes() == host(c).tobytes(), f"{name} without local_sums"
        gi.append(host(g.grad_input))
        gw = gw + host(g.grad_weight).astype(np.float64)
        gb = gb + host(g.grad_bias).astype(np.float64)
    assert not host(nbnorm.backward(grads[1][0], grads[1][1], merged.mean, merged.mean,
                                    sums=total, count=n).grad_bias).any()
    close(np.concatenate(gi), gfull.grad_input, dtype, "grad_input")
    close(gw, gfull.grad_weight, dtype, "summed grad_weight")
    close(gb, gfull.grad_bias, dtype, "summed grad_bias")


def test_given_moments_decide_on_nonfinite_on_the_device(rng):
    x = rand(rng, (4, 3, 9), np.float32)
    m = nbnorm.moments(x)
    m2 = m.m2.copy()
    m2[1] = np.nan
    bad = nbnorm.Moments(m.count, dev(m.mean), dev(m2))
    rm0, rv0 = np.zeros(3, np.float32), np.ones(3, np.float32)
    rmd, rvd = dev(rm0), dev(rv0)
    out = dev(np.full(x.shape, 7.0, np.float32))
    with pytest.raises(FloatingPointError):
        nbnorm.forward(dev(x), None, None, rmd, rvd, out=out, moments=bad, on_nonfinite="raise")
    assert np.all(host(out) == 7.0) and np.array_equal(host(rvd), rv0)
    nbnorm.forward(dev(x), None, None, rmd, rvd, out=out, moments=bad, on_nonfinite="skip")
    assert host(rmd)[1] == 0 and host(rvd)[1] == 1 and host(rmd)[0] != 0


def test_host_statistics_with_device_data_are_refused(rng):
    x = rand(rng, (4, 3, 5), np.float32)
    xd = dev(x)
    m = nbnorm.moments(x)
    out = dev(np.full(x.shape, 7.0, np.float32))
    with pytest.raises(TypeError, match="on the host"):
        nbnorm.forward(xd, out=out, moments=m)
    with pytest.raises(TypeError, match="on the host"):
        nbnorm.merge_moments([nbnorm.moments(xd), m])
    f = nbnorm.forward(xd)
    s = nbnorm.backward_sums(x, x, host(f.mean))
    with pytest.raises(TypeError, match="on the host"):
        nbnorm.backward(xd, xd, f.mean, f.invstd, grad_input=out, sums=s, count=20)
    assert np.all(host(out) == 7.0)
