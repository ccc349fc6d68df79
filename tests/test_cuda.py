"""The CUDA kernels against the CPU kernels and the float64 reference.

Without a GPU these run on Numba's CUDA simulator (``tests/conftest.py`` sets
``NUMBA_ENABLE_CUDASIM=1`` when there is no ``/dev/nvidia0``), which runs every
thread in Python: shapes are tiny and ``config`` is patched to 32 threads per
block, small reduction blocks (so channels split across several blocks) and
two-block elementwise grids.  The same tests run unchanged on a real GPU.
The warp-shuffle path, which the simulator cannot run, is compiled to PTX in
``test_cuda_ptx.py``.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("numba_cuda", reason="numba-cuda is not installed: pip install 'nbnorm[cuda]'")

from numba import config as numba_config  # noqa: E402
from numba import cuda  # noqa: E402

import nbnorm  # noqa: E402
from nbnorm import config, reference  # noqa: E402

SIM = bool(numba_config.ENABLE_CUDASIM)
if not SIM and not cuda.is_available():
    pytest.skip("no CUDA GPU, and NUMBA_ENABLE_CUDASIM=0 turns the simulator off",
                allow_module_level=True)

from nbnorm.cuda import arrays, ops, stats  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

#: float64 is computed in float64 on both devices; float32 outputs are rounded
#: once, so CUDA and CPU agree to float32 rounding of the values involved.
TOL = {np.dtype(np.float32): dict(rtol=3e-6, atol=3e-6),
       np.dtype(np.float64): dict(rtol=1e-11, atol=1e-11)}


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(config, "CUDA_THREADS", 32)
    monkeypatch.setattr(config, "CUDA_MIN_BLOCK_ELEMENTS", 16)
    monkeypatch.setattr(config, "CUDA_TARGET_BLOCKS", 6)
    monkeypatch.setattr(config, "CUDA_ELEMENTWISE_BLOCKS", 2)
    # register blocks of 2: a block of 32 threads takes the unrolled path once a
    # part has more than 64 values, the one-value tail below that; both run here
    monkeypatch.setattr(config, "CUDA_UNROLL", 2)


def dev(a):
    return None if a is None else cuda.to_device(np.ascontiguousarray(a))


def host(d):
    return d.copy_to_host()


def dev_permuted(a, memory_axes):
    """``a`` on the device, stored in the axis order ``memory_axes`` (e.g. NHWC
    memory for NCHW ``a``) and seen with ``a``'s logical shape: no copy."""
    base = cuda.to_device(np.ascontiguousarray(a.transpose(memory_axes)))
    strides = [0] * a.ndim
    for k, ax in enumerate(memory_axes):
        strides[ax] = base.strides[k]
    return arrays.strided(base, a.shape, tuple(strides))


def close(actual, expected, dtype, what):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                               err_msg=what, **TOL[np.dtype(dtype)])


def rand(rng, shape, dtype, loc=None, scale=None):
    loc = rng.uniform(-2, 2) if loc is None else loc
    scale = rng.uniform(0.5, 3) if scale is None else scale
    return (rng.standard_normal(shape) * scale + loc).astype(dtype)


# (id, shape, axis, dtype, affine, memory order or None)
CASES = [
    ("NCL-3-blocks-per-channel", (6, 2, 37), 1, np.float32, True, None),
    ("NCHW-f64", (2, 3, 5, 7), 1, np.float64, False, None),
    ("NC-C-wider-than-block", (37, 40), 1, np.float32, False, None),
    ("NHWC-f64", (2, 3, 5, 6), -1, np.float64, True, None),
    ("C1-planar", (5, 1, 9), 1, np.float32, True, None),
    ("mid-axis", (3, 4, 2, 5), 2, np.float64, True, None),
    ("NCHW-channels-last-memory", (2, 6, 3, 4), 1, np.float32, True, (0, 2, 3, 1)),
]


@pytest.mark.parametrize("shape,axis,dtype,affine,memory",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_train_and_inference_match_cpu_and_reference(rng, shape, axis, dtype, affine, memory):
    C = shape[axis]
    x = rand(rng, shape, dtype)
    dy = rand(rng, shape, dtype)
    w = rng.uniform(-1.5, 1.5, C).astype(dtype) if affine else None
    b = rng.uniform(-1.5, 1.5, C).astype(dtype) if affine else None
    rm0 = rng.uniform(-1, 1, C).astype(dtype)
    rv0 = rng.uniform(0.3, 2.5, C).astype(dtype)
    xd = dev(x) if memory is None else dev_permuted(x, memory)
    dyd = dev(dy) if memory is None else dev_permuted(dy, memory)
    rmd, rvd = dev(rm0), dev(rv0)

    # training step
    res = nbnorm.forward(xd, dev(w), dev(b), rmd, rvd, axis=axis, momentum=0.3)
    rm_c, rv_c = rm0.copy(), rv0.copy()
    cpu = nbnorm.forward(x, w, b, rm_c, rv_c, axis=axis, momentum=0.3)
    ref = reference.forward(x, w, b, rm0, rv0, axis=axis, momentum=0.3)
    for name, got, c, r in [("out", res.out, cpu.out, ref.out), ("mean", res.mean, cpu.mean, ref.mean),
                            ("invstd", res.invstd, cpu.invstd, ref.invstd),
                            ("running_mean", rmd, rm_c, ref.running_mean),
                            ("running_var", rvd, rv_c, ref.running_var)]:
        assert cuda.is_cuda_array(got) if not SIM else hasattr(got, "copy_to_host"), name
        close(host(got), c, dtype, f"{name} vs CPU")
        close(host(got), r, dtype, f"{name} vs reference")
    assert host(res.out).dtype == dtype and host(res.mean).dtype == dtype

    g = nbnorm.backward(dyd, xd, res.mean, res.invstd, dev(w), axis=axis)
    gc = nbnorm.backward(dy, x, cpu.mean, cpu.invstd, w, axis=axis)
    gr = reference.backward(dy, x, host(res.mean), host(res.invstd), w, axis=axis)
    for name, got, c, r in zip(g._fields, g, gc, gr):
        close(host(got), c, dtype, f"{name} vs CPU")
        close(host(got), r, dtype, f"{name} vs reference")

    # inference with the updated running statistics
    rm1, rv1 = host(rmd), host(rvd)
    res = nbnorm.forward(xd, dev(w), dev(b), rmd, rvd, axis=axis, training=False)
    ref = reference.forward(x, w, b, rm1, rv1, axis=axis, training=False)
    for name in ("out", "mean", "invstd"):
        close(host(getattr(res, name)), getattr(ref, name), dtype, name)
    assert np.array_equal(host(rmd), rm1) and np.array_equal(host(rvd), rv1)
    g = nbnorm.backward(dyd, xd, res.mean, res.invstd, dev(w), axis=axis, training=False)
    gr = reference.backward(dy, x, host(res.mean), host(res.invstd), w, axis=axis,
                            training=False)
    for name, got, r in zip(g._fields, g, gr):
        close(host(got), r, dtype, name)


def test_mixed_and_strided_parameters(rng):
    """float64 parameters and running stats with float32 data, strided on the device."""
    shape, C = (5, 4, 6), 4
    x = rand(rng, shape, np.float32)
    params = rng.uniform(0.5, 1.5, 2 * C)               # float64, interleaved w/b
    rm0, rv0 = rng.uniform(-1, 1, C), rng.uniform(0.5, 2, C)
    pd, rmd, rvd = dev(params), dev(rm0), dev(rv0)
    res = nbnorm.forward(dev(x), pd[::2], pd[1::2], rmd, rvd)
    rm_c, rv_c = rm0.copy(), rv0.copy()
    cpu = nbnorm.forward(x, params[::2], params[1::2], rm_c, rv_c)
    close(host(res.out), cpu.out, np.float32, "out")
    close(host(rmd), rm_c, np.float64, "running_mean")
    np.testing.assert_allclose(host(rvd), rv_c, rtol=1e-7)
    assert host(res.mean).dtype == np.float32


def test_constant_channel(rng):
    """Zero variance: invstd = 1/sqrt(eps), out = bias."""
    x = rand(rng, (6, 3, 5), np.float64)
    x[:, 1, :] = 3.25
    res = nbnorm.forward(dev(x), None, dev(np.full(3, 0.5)), eps=1e-3)
    ref = reference.forward(x, None, np.full(3, 0.5), eps=1e-3)
    close(host(res.out), ref.out, np.float64, "out")
    assert host(res.invstd)[1] == 1 / np.sqrt(1e-3)


def test_cuda_modules_mirror_cpu_modules():
    from nbnorm.cpu import backward as cb, forward as cf, ops as co, stats as cs
    from nbnorm.cuda import backward as gb, forward as gf, stats as gs
    for cpu_mod, gpu_mod, names in [
            (cs, gs, ["channel_stats_planar", "channel_stats_interleaved"]),
            (cf, gf, ["normalize_planar", "normalize_interleaved"]),
            (cb, gb, ["backward_reduce_planar", "backward_reduce_interleaved",
                      "grad_input_planar", "grad_input_interleaved"]),
            (co, ops, ["empty", "forward_train", "forward_infer", "backward"])]:
        for name in names:
            assert hasattr(cpu_mod, name) and hasattr(gpu_mod, name), name


def test_reductions_split_channels_across_blocks():
    """The shapes above do exercise several blocks per channel and C > block."""
    assert stats.planar_parts(6, 2, 37)[0] == 3
    assert stats.planar_parts(2, 3, 35)[0] == 2
    bx, parts, _ = stats.interleaved_parts(37, 40, config.CUDA_THREADS)
    assert (bx, -(-40 // bx), parts) == (32, 2, 3)
    bx, parts, _ = stats.interleaved_parts(30, 6, config.CUDA_THREADS)
    assert bx == 8 and parts == 6
    assert stats.planar_parts(6, 2, 37) == stats.planar_parts(6, 2, 37)  # shape only


@pytest.mark.parametrize("shape,axis,dtype", [((3, 2, 11), 1, np.float32),
                                              ((17, 5), 1, np.float64)],
                         ids=["planar-f32", "interleaved-f64"])
def test_preallocated_outputs_fully_written_and_returned(rng, shape, axis, dtype):
    C = shape[axis]
    x = rand(rng, shape, dtype)
    dy = rand(rng, shape, dtype)
    xd, dyd = dev(x), dev(dy)
    out = dev(np.full(shape, np.nan, dtype))
    mean, invstd = dev(np.full(C, np.nan, dtype)), dev(np.full(C, np.nan, dtype))
    res = nbnorm.forward(xd, out=out, mean=mean, invstd=invstd, axis=axis)
    assert res.out is out and res.mean is mean and res.invstd is invstd
    ref = reference.forward(x, axis=axis)
    close(host(out), ref.out, dtype, "out")
    close(host(invstd), ref.invstd, dtype, "invstd")
    gi = dev(np.full(shape, np.nan, dtype))
    gw, gb = dev(np.full(C, np.nan, dtype)), dev(np.full(C, np.nan, dtype))
    g = nbnorm.backward(dyd, xd, mean, invstd, grad_input=gi, grad_weight=gw, grad_bias=gb,
                        axis=axis)
    assert g.grad_input is gi and g.grad_weight is gw and g.grad_bias is gb
    gr = reference.backward(dy, x, host(mean), host(invstd), axis=axis)
    for name, got, r in zip(g._fields, g, gr):
        close(host(got), r, dtype, name)


def test_in_place(rng):
    shape, dtype = (5, 3, 7), np.float32
    x = rand(rng, shape, dtype)
    dy = rand(rng, shape, dtype)
    xd, dyd = dev(x), dev(dy)
    res = nbnorm.forward(xd, out=xd)
    assert res.out is xd
    ref = reference.forward(x)
    close(host(xd), ref.out, dtype, "out=x")
    g = nbnorm.backward(dyd, dev(x), res.mean, res.invstd, grad_input=dyd)
    assert g.grad_input is dyd
    gr = reference.backward(dy, x, host(res.mean), host(res.invstd))
    close(host(dyd), gr.grad_input, dtype, "grad_input=grad_out")


@pytest.mark.parametrize("shape,axis", [((4, 2, 50), 1), ((120, 3), 1)],
                         ids=["planar", "interleaved"])
@pytest.mark.parametrize("offset", [1e4, 1e5])
def test_float32_offset_statistics(rng, shape, axis, offset):
    """|mean| >> std: the variance stays exact where E[x^2] - E[x]^2 would not."""
    x = rand(rng, shape, np.float32, loc=offset, scale=1.0)
    res = nbnorm.forward(dev(x), axis=axis, eps=1e-5)
    x64 = np.moveaxis(x.astype(np.float64), axis, 0).reshape(shape[axis], -1)
    var = x64.var(axis=1)
    got = 1.0 / host(res.invstd).astype(np.float64) ** 2 - 1e-5
    np.testing.assert_allclose(got, var, rtol=1e-6)
    np.testing.assert_allclose(host(res.mean), x64.mean(axis=1), rtol=1e-7)


def test_deterministic(rng):
    x = rand(rng, (3, 2, 40), np.float32)
    xd = dev(x)
    a = nbnorm.forward(xd)
    b = nbnorm.forward(xd)
    for name in ("out", "mean", "invstd"):
        assert host(getattr(a, name)).tobytes() == host(getattr(b, name)).tobytes(), name


@pytest.mark.parametrize("policy", ["propagate", "skip", "raise"])
def test_on_nonfinite(rng, policy):
    shape, C = (4, 3, 9), 3
    x = rand(rng, shape, np.float32)
    x[1, 1, 4] = np.nan
    rm0, rv0 = rng.uniform(-1, 1, C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)
    rmd, rvd = dev(rm0), dev(rv0)
    out = dev(np.full(shape, 7.0, np.float32))
    mean, invstd = dev(np.full(C, 7.0, np.float32)), dev(np.full(C, 7.0, np.float32))
    if policy == "raise":
        with pytest.raises(FloatingPointError):
            nbnorm.forward(dev(x), None, None, rmd, rvd, out=out, mean=mean, invstd=invstd,
                           on_nonfinite=policy)
        for a in (out, mean, invstd):
            assert np.all(host(a) == 7.0), "written before raising"
        assert np.array_equal(host(rmd), rm0) and np.array_equal(host(rvd), rv0)
        return
    nbnorm.forward(dev(x), None, None, rmd, rvd, out=out, mean=mean, invstd=invstd,
                   on_nonfinite=policy)
    rm_c, rv_c = rm0.copy(), rv0.copy()
    cpu = nbnorm.forward(x, None, None, rm_c, rv_c, on_nonfinite=policy)
    np.testing.assert_array_equal(np.isnan(host(mean)), np.isnan(cpu.mean))
    np.testing.assert_allclose(host(out), cpu.out, rtol=3e-6, atol=3e-6)  # NaN == NaN here
    np.testing.assert_allclose(host(rmd), rm_c, rtol=3e-6, atol=3e-6)
    np.testing.assert_allclose(host(rvd), rv_c, rtol=3e-6, atol=3e-6)
    if policy == "skip":
        assert host(rmd)[1] == rm0[1] and host(rvd)[1] == rv0[1]
    else:
        assert np.isnan(host(rmd)[1])


def test_stream_argument(rng):
    x = rand(rng, (3, 2, 10), np.float64)
    xd = dev(x)
    s = cuda.stream()
    res = nbnorm.forward(xd, stream=s)
    s.synchronize()
    close(host(res.out), reference.forward(x).out, np.float64, "out on a stream")
    g = nbnorm.backward(xd, xd, res.mean, res.invstd, stream=s)
    s.synchronize()
    close(host(g.grad_bias), x.sum(axis=(0, 2)), np.float64, "grad_bias on a stream")

    class TorchLikeStream:  # the default stream, as torch.cuda.default_stream() exposes it
        cuda_stream = 0

    class CupyLikeStream:
        ptr = 0

    for like in (TorchLikeStream(), CupyLikeStream(), 0, None):
        res = nbnorm.forward(xd, stream=like)
        close(host(res.out), reference.forward(x).out, np.float64, f"stream={like!r}")
    with pytest.raises(TypeError, match="stream"):
        nbnorm.forward(xd, stream="default")


def test_scratch_reused_per_thread_and_stream(rng):
    """Intermediate buffers are kept between calls (no allocation, hence no
    allocator sync, in a training loop), but never shared by two streams or threads."""
    import threading
    s1, s2 = cuda.stream(), cuda.stream()
    a = arrays.scratch("test", (2, 3), s1)
    assert arrays.scratch("test", (2, 3), s1) is a
    assert arrays.scratch("test", (2, 3), s2) is not a
    assert arrays.scratch("test", (3, 3), s1) is not a
    other = []
    t = threading.Thread(target=lambda: other.append(arrays.scratch("test", (2, 3), s1)))
    t.start()
    t.join()
    assert other[0] is not a
    for k in range(arrays._SCRATCH_MAX + 1):  # bounded
        arrays.scratch("test", (1, k + 1), s1)
    assert len(arrays._SCRATCH) <= arrays._SCRATCH_MAX


def test_canonical_views_do_not_copy(rng):
    x = rand(rng, (2, 5, 3, 4), np.float32)
    for memory in (None, (0, 2, 3, 1)):
        xd = dev(x) if memory is None else dev_permuted(x, memory)
        lay = ops.plan(xd, 1)
        assert lay.planar == (memory is None)
        view = ops.input_view(xd, lay)
        assert arrays.address(view) == arrays.address(xd)
        out = ops.empty_like(xd)
        assert tuple(out.strides) == tuple(xd.strides)  # same memory order as x


# ------------------------------------------------------------------- errors

def _snapshot(arrays):
    return [None if a is None else host(a).tobytes() for a in arrays]


def _error_cases(rng):
    x = rand(rng, (4, 3, 5), np.float32)
    xd = dev(x)
    C = 3
    rmd, rvd = dev(np.zeros(C, np.float32)), dev(np.ones(C, np.float32))
    out = dev(np.full(x.shape, 5.0, np.float32))
    mean, invstd = dev(np.full(C, 5.0, np.float32)), dev(np.full(C, 5.0, np.float32))
    watched = [xd, rmd, rvd, out, mean, invstd]
    F = nbnorm.forward
    B = nbnorm.backward
    cases = [
        ("weight on the host", TypeError, "on the host",
         lambda: F(xd, np.ones(C, np.float32), None, rmd, rvd, out=out)),
        ("out on the host", TypeError, "on the host",
         lambda: F(xd, out=np.empty(x.shape, np.float32), mean=mean)),
        ("running stats on the host", TypeError, "on the host",
         lambda: F(xd, None, None, np.zeros(C, np.float32), np.ones(C, np.float32), out=out)),
        ("x on the host, outputs on the device", TypeError, "on the host",
         lambda: F(x, out=out, mean=mean, invstd=invstd)),
        ("backward: grad_out on the host", TypeError, "on the host",
         lambda: B(x, xd, mean, invstd, grad_input=out)),
        ("stream with host arrays", TypeError, "stream",
         lambda: F(x, stream=cuda.stream())),
        ("non-contiguous device x", ValueError, "contiguous",
         lambda: F(xd[:, :, ::2], mean=mean)),
        ("out in another memory order", ValueError, "contiguous",
         lambda: F(xd, out=dev_permuted(np.empty(x.shape, np.float32), (0, 2, 1)),
                   mean=mean, invstd=invstd)),
        ("mean and invstd the same buffer", ValueError, "overlap",
         lambda: F(xd, out=out, mean=mean, invstd=mean)),
        ("grad_input = x", ValueError, "overlap",
         lambda: B(out, xd, mean, invstd, grad_input=xd)),
        ("out of the wrong dtype", TypeError, "dtype",
         lambda: F(xd, out=dev(np.empty(x.shape, np.float64)), mean=mean)),
        ("weight of the wrong shape", ValueError, "shape",
         lambda: F(xd, dev(np.ones(C + 1, np.float32)), out=out)),
        ("one value per channel", ValueError, "more than 1 value per channel",
         lambda: F(dev(x[:1, :, :1]), mean=mean)),
        ("complex", TypeError, "floating",
         lambda: F(dev(x.astype(np.complex64)), mean=mean)),
        ("int", TypeError, "floating", lambda: F(dev(x.astype(np.int32)), mean=mean)),
        ("inference without running stats", ValueError, "running",
         lambda: F(xd, training=False, out=out)),
        ("bad threads per block", ValueError, "CUDA_THREADS",
         lambda: _with_threads(48, lambda: F(xd, None, None, rmd, rvd, out=out, mean=mean,
                                            invstd=invstd))),
    ]
    if SIM:  # a device array that is read-only: only the simulator's can be
        ro = dev(np.empty(x.shape, np.float32))
        ro._ary.setflags(write=False)
        cases.append(("read-only out", ValueError, "read-only", lambda: F(xd, out=ro)))
    return watched, cases


def _with_threads(n, fn):
    old = config.CUDA_THREADS
    config.CUDA_THREADS = n
    try:
        return fn()
    finally:
        config.CUDA_THREADS = old


def test_errors_write_nothing(rng):
    watched, cases = _error_cases(rng)
    before = _snapshot(watched)
    for what, exc, match, call in cases:
        with pytest.raises(exc, match=match):
            call()
        assert _snapshot(watched) == before, f"{what}: something was written"


def _run(code, **env):
    full = {k: v for k, v in os.environ.items() if k not in env}
    full.update({k: v for k, v in env.items() if v is not None})
    full["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


FAKE_DEVICE_ARRAY = """
    class FakeDeviceArray:  # what CuPy / torch.cuda tensors expose
        __cuda_array_interface__ = {"shape": (4, 3), "typestr": "<f4",
                                    "data": (1 << 40, False), "version": 3}
"""


def test_import_and_cpu_without_numba_cuda():
    proc = _run(FAKE_DEVICE_ARRAY + """
    import sys
    sys.modules["numba_cuda"] = None  # as if numba-cuda were not installed
    import numpy as np, nbnorm
    nbnorm.forward(np.ones((4, 3)) + np.arange(4.0)[:, None])
    try:
        nbnorm.forward(FakeDeviceArray())
    except RuntimeError as e:
        print("RuntimeError:", e)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeError:" in proc.stdout and "nbnorm[cuda]" in proc.stdout


@pytest.mark.skipif(os.path.exists("/dev/nvidia0"), reason="a GPU is present")
def test_device_arrays_without_a_gpu_raise_clearly():
    proc = _run(FAKE_DEVICE_ARRAY + """
    import nbnorm
    try:
        nbnorm.forward(FakeDeviceArray())
    except RuntimeError as e:
        print("RuntimeError:", e)
    """, NUMBA_ENABLE_CUDASIM="0")
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeError:" in proc.stdout and "no usable CUDA GPU" in proc.stdout
