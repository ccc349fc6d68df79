"""Streaming (non-temporal) stores: ``nbnorm.cpu.streaming`` and the passes that use it.

A streamed output must be the same bits as an ordinary one, whatever the
alignment of the output, the length of its runs or rows and the kernel path;
the intrinsics must compute the same expressions, in the same compute type
(float64; float32 for half data), as the scalar code
around them, and really emit non-temporal vector stores.
"""

import platform
import re

import inspect

import numpy as np
import pytest
from numba import njit

import nbnorm
from nbnorm import config
from nbnorm.cpu import backward as bwd
from nbnorm.cpu import forward as fwd
from nbnorm.cpu import convert, streaming

from helpers import DTYPES, REF_TOL, as_memory, assert_close, assert_same, use_path
from nbnorm import reference

X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def _offset_view(shape, dtype, offset, fill=np.nan):
    """A C-contiguous array of ``shape`` that starts ``offset`` elements into its buffer."""
    n = int(np.prod(shape))
    return np.full(n + offset, fill, dtype)[offset:].reshape(shape)


# ---------------------------------------------------------------------- span

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 5, 15, 16, 17, 40, 257])
@pytest.mark.parametrize("offset", range(9))
def test_span_is_the_whole_aligned_lines(dtype, n, offset):
    y = _offset_view((n,), dtype, offset)
    h, e = streaming.span(y)
    isz = y.itemsize
    per_line = streaming.LINE // isz
    addr = y.ctypes.data
    assert 0 <= h <= e <= n
    assert (e - h) % per_line == 0
    if e > h:
        assert (addr + h * isz) % streaming.LINE == 0
    assert h < per_line or h == n  # the head is less than a line...
    assert n - e < per_line or h == n  # ...and so is the tail


def test_span_of_an_unaligned_array_streams_nothing():
    buf = np.zeros(8 * 40 + 1, np.uint8)
    y = buf[1:].view(np.float64)  # 1 byte off an element boundary
    assert y.ctypes.data % 8 != 0
    assert streaming.span(y) == (y.size, y.size)


# ---------------------------------------------------------------- intrinsics

@njit
def _affine_arrays(x, y, c, s, b):
    h, e = streaming.span(y)
    streaming.affine_lines(y, h, e, x, c, s, b, None, None)
    streaming.fence()
    return h, e


@njit
def _affine_scalars(x, y, c, s, b):
    h, e = streaming.span(y)
    streaming.affine_lines(y, h, e, x, c, s, b, None, None)
    return h, e


@njit
def _scale_offset(x, y, s, t):
    h, e = streaming.span(y)
    streaming.scale_offset_lines(y, h, e, x, s, t, None, None)
    return h, e


@njit
def _grad(dy, x, y, m, a, b, k):
    h, e = streaming.span(y)
    streaming.grad_lines(y, h, e, dy, x, m, a, b, k, None, None)
    return h, e


@njit
def _grad_affine(dy, x, y, k, q, r):
    h, e = streaming.span(y)
    streaming.grad_affine_lines(y, h, e, dy, x, k, q, r, None, None)
    return h, e


def _check_lines(y, expected, h, e):
    """``y[h:e]`` is ``expected`` bit for bit; the rest (NaN-poisoned) is untouched."""
    assert e > h  # the case streams something
    assert_same(y[h:e], expected[h:e].astype(y.dtype))
    assert np.isnan(y[:h]).all() and np.isnan(y[e:]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_intrinsics_compute_the_scalar_expressions(rng, dtype, offset):
    """Each intrinsic gives NumPy's float64 result of its expression, rounded once,
    and writes nothing outside its lines."""
    n = 203
    x = (rng.standard_normal(n) * 3 + 1e4).astype(dtype)
    dy = rng.standard_normal(n).astype(dtype)
    c, s, b, a, k = rng.standard_normal((5, n))
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)

    y = _offset_view((n,), dtype, offset)
    _check_lines(y, (x64 - c) * s + b, *_affine_arrays(x, y, c, s, b))
    y = _offset_view((n,), dtype, offset)
    _check_lines(y, (x64 - 1e4) * 0.25 + -1.5, *_affine_scalars(x, y, 1e4, 0.25, -1.5))
    y = _offset_view((n,), dtype, offset)
    _check_lines(y, x64 * s + b, *_scale_offset(x, y, s, b))
    y = _offset_view((n,), dtype, offset)
    _check_lines(y, x64 * 0.25 + -1.5, *_scale_offset(x, y, 0.25, -1.5))
    y = _offset_view((n,), dtype, offset)
    _check_lines(y, k * (dy64 - a - (x64 - c) * b), *_grad(dy, x, y, c, a, b, k))
    y = _offset_view((n,), dtype, offset)
    _check_lines(y, k[0] * (dy64 - a[0] - (x64 - c[0]) * b[0]),
                 *_grad(dy, x, y, c[0], a[0], b[0], k[0]))
    y = _offset_view((n,), dtype, offset)
    _check_lines(y, k * dy64 + (s * x64 + b), *_grad_affine(dy, x, y, k, s, b))


@njit
def _cols(kind, y, c0, C, stream, dy, x, u, v, w, z):
    """A column intrinsic over ``y[h:e]`` (``cols_span``), column ``c0`` at ``h``."""
    h, e = streaming.cols_span(y, stream)
    if kind == 0:
        streaming.affine_cols(y, h, e, (c0 + h) % C, C, stream, x, u, v, w, None, None)
    elif kind == 1:
        streaming.scale_offset_cols(y, h, e, (c0 + h) % C, C, stream, x, u, v, None, None)
    elif kind == 2:
        streaming.grad_cols(y, h, e, (c0 + h) % C, C, stream, dy, x, u, v, w, z, None,
                            None)
    else:
        streaming.grad_affine_cols(y, h, e, (c0 + h) % C, C, stream, dy, x, u, v, w, None,
                                   None)
    return h, e


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "ordinary"])
@pytest.mark.parametrize("C", [1, 3, 16, 17, 64, 131])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 3])
def test_column_intrinsics_compute_the_scalar_expressions(rng, dtype, offset, C, stream):
    """The column intrinsics read per-column coefficients at ``i``'s column, also
    for rows shorter than a vector and vectors that cross a row: NumPy's float64
    result over the whole rows, rounded once, and nothing written outside."""
    rows, c0 = 13, 2 % C  # the run starts at column c0 of its first row
    n = rows * C - c0
    x = (rng.standard_normal(n) * 3 + 1e4).astype(dtype)
    dy = rng.standard_normal(n).astype(dtype)
    u, v, w, z = rng.standard_normal((4, C))
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    col = (c0 + np.arange(n)) % C
    U, V, W, Z = u[col], v[col], w[col], z[col]
    isz = np.dtype(dtype).itemsize
    P = [streaming.periodic(a, x) for a in (u, v, w, z)]
    expected = [(x64 - U) * V + W, x64 * U + V, Z * (dy64 - V - (x64 - U) * W),
                U * dy64 + (V * x64 + W)]
    for kind, exp in enumerate(expected):
        y = _offset_view((n,), dtype, offset)
        h, e = _cols(kind, y, c0, C, stream, dy, x, *P)
        if not stream:
            assert h == 0
        assert e - h >= 64 // isz or n < 2 * 64 // isz
        assert_same(y[h:e], exp[h:e].astype(dtype))
        assert np.isnan(y[:h]).all() and np.isnan(y[e:]).all()


def test_periodic_extends_the_coefficients_by_a_vector():
    a = np.arange(5.0)
    f32, f64 = np.empty(0, np.float32), np.empty(0, np.float64)  # the written dtype
    assert_same(streaming.periodic(a, f32), np.resize(a, 5 + 16))
    assert_same(streaming.periodic(a[:1], f64), np.zeros(9))
    assert_same(streaming.periodic(a, f64, 3), np.resize(np.repeat(a, 3), 15 + 8))


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "ordinary"])
@pytest.mark.parametrize("shape", [(9000, 1), (3001, 3), (611, 17), (100, 131)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 3])
def test_interleaved_passes_are_the_row_kernels_bits(rng, dtype, shape, offset, stream):
    """The parallel interleaved passes, whose tasks write their rows as one run
    (several tasks here), give the bits of the serial row-by-row kernels for every
    output alignment, row length and column at a vector's start."""
    outer, C = shape
    x = (rng.standard_normal(shape) * 3 + 1e4).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    m, s, b, a, k = rng.standard_normal((5, C))
    m += 1e4
    expected = np.empty(shape, dtype)
    tasks = fwd.task_split(outer, C)
    fwd._normalize_rows(x, 0, outer, m, s, b, fwd.offsets(m, s, b), expected, None, None)
    out = _offset_view(shape, dtype, offset)
    fwd.normalize_interleaved(x, m, s, b, out, stream, *tasks, None, None)
    assert_same(out, expected)
    q, r = bwd._affine_coeffs(m, a, b, k)
    bwd._grad_rows(dy, None, x, 0, outer, m, a, b, k, q, r, expected, None)
    out = _offset_view(shape, dtype, offset)
    bwd.grad_input_interleaved(dy, None, x, m, a, b, k, out, None, stream, *tasks)
    assert_same(out, expected)


@pytest.mark.skipif(not X86, reason="x86 instruction names")
@pytest.mark.parametrize("dtype", DTYPES)
def test_intrinsics_emit_nontemporal_vector_stores_and_sfence(dtype):
    n = 64
    x = np.ones(n, dtype)
    y = np.empty(n, dtype)
    c = np.zeros(n)
    _affine_arrays(x, y, c, c, c)
    _scale_offset(x, y, c, c)
    _grad(x, x, y, c, c, c, c)
    _grad_affine(x, x, y, c, c, c)

    def asm(f):
        """The assembly of every compiled signature of ``f`` writing ``dtype``."""
        y_at = 1 if f in (_affine_arrays, _scale_offset) else 2
        sigs = [s for s in f.signatures if str(s[y_at].dtype) == np.dtype(dtype).name]
        assert sigs
        return [f.inspect_asm(s) for s in sigs]

    for f in (_affine_arrays, _scale_offset, _grad, _grad_affine):
        for code in asm(f):
            # Packed non-temporal stores, not scalar movnts[sd].  Which packed
            # form is the backend's choice of domain, not the data's: on AVX2
            # (Zen 3) LLVM writes float32 vectors with vmovntpd.
            assert re.search(r"\bv?movntp[sd]\b", code), f
            assert not re.search(r"\bv?movnts[sd]\b", code), f
    assert all("sfence" in code for code in asm(_affine_arrays))
    P = streaming.periodic(c[:3], x)
    for kind in range(4):
        _cols(kind, y, 0, 3, True, x, x, P, P, P, P)
    for sig in _cols.signatures:
        if str(sig[1].dtype) == np.dtype(dtype).name:
            code = _cols.inspect_asm(sig)
            assert re.search(r"\bv?movntp[sd]\b", code)
            assert not re.search(r"\bv?movnts[sd]\b", code)


# ------------------------------------------------------------------- kernels

#: (id, shape, axis), each larger than config.SERIAL_MAX so that the parallel
#: passes run: wide rows with leftover rows (NHWC, C=70: 4 rows a wide row),
#: long NC rows, short planar runs, C below FUSE_MIN_C (unfused planar), and
#: 7x7 maps, whose runs are short enough to normalize as rows of C*H*W values.
CASES = [
    ("NC", (300, 131), 1),
    ("NHWC", (5, 10, 11, 70), -1),
    ("NCHW", (4, 9, 31, 37), 1),
    ("NCHW-C3", (16, 3, 29, 31), 1),
    ("NCHW-7x7", (90, 8, 7, 7), 1),
]


def _stream_all(monkeypatch, on):
    monkeypatch.setattr(config, "STREAM_MIN_BYTES", 0 if on else 1 << 62)


def _case(rng, shape, axis, dtype):
    C = shape[axis]
    x = (rng.standard_normal(shape) * 2 + 50).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 1.5, C).astype(dtype)
    b = rng.uniform(-1, 1, C).astype(dtype)
    return x, dy, w, b


@pytest.mark.parametrize("offset", [0, 3], ids=["aligned", "offset3"])
@pytest.mark.parametrize("path", ["fused", "parallel", "rows"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,shape,axis", CASES, ids=[c[0] for c in CASES])
def test_streamed_passes_write_the_ordinary_bits(rng, monkeypatch, name, shape, axis, dtype,
                                                 path, offset):
    """Forward (training and inference) and backward (training and inference) with
    streamed outputs, poisoned with NaN and starting ``offset`` elements off a line,
    give the bits of ordinary stores, and match the reference."""
    use_path(monkeypatch, path)
    x, dy, w, b = _case(rng, shape, axis, dtype)
    C = shape[axis]
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    tol = REF_TOL[np.dtype(dtype)]

    def run(on):
        _stream_all(monkeypatch, on)
        out = _offset_view(shape, dtype, offset)
        f = nbnorm.forward(x, w, b, axis=axis, out=out)
        inf_out = _offset_view(shape, dtype, offset)
        nbnorm.forward(x, w, b, rm, rv, training=False, axis=axis, out=inf_out)
        gi = _offset_view(shape, dtype, offset)
        g = nbnorm.backward(dy, x, f.mean, f.invstd, w, axis=axis, grad_input=gi)
        gi_inf = _offset_view(shape, dtype, offset)
        nbnorm.backward(dy, x, f.mean, f.invstd, w, training=False, axis=axis,
                        grad_input=gi_inf)
        return out, inf_out, gi, g.grad_weight, g.grad_bias, gi_inf

    streamed = run(True)
    for s, o in zip(streamed, run(False)):
        assert_same(s, o)
    exp = reference.forward(x, w, b, axis=axis)
    assert_close(streamed[0], exp.out, tol)
    exp_inf = reference.forward(x, w, b, rm, rv, training=False, axis=axis)
    assert_close(streamed[1], exp_inf.out, tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,shape,axis", CASES, ids=[c[0] for c in CASES])
def test_streamed_in_place(rng, monkeypatch, name, shape, axis, dtype):
    """``out=x`` and ``grad_input=grad_out`` stream over their own input."""
    use_path(monkeypatch, "parallel")
    x, dy, w, b = _case(rng, shape, axis, dtype)
    _stream_all(monkeypatch, False)
    f = nbnorm.forward(x, w, b, axis=axis)
    g = nbnorm.backward(dy, x, f.mean, f.invstd, w, axis=axis)
    _stream_all(monkeypatch, True)
    xi, dyi = x.copy(), dy.copy()
    nbnorm.forward(xi, w, b, axis=axis, out=xi)
    nbnorm.backward(dyi, x, f.mean, f.invstd, w, axis=axis, grad_input=dyi)
    assert_same(xi, f.out)
    assert_same(dyi, g.grad_input)


def test_streamed_channels_last_output(rng, monkeypatch):
    """An NCHW batch written into a channels-last ``out`` (another memory order)."""
    use_path(monkeypatch, "parallel")
    shape, axis = (4, 9, 31, 37), 1
    x, dy, w, b = _case(rng, shape, axis, np.float32)
    exp = reference.forward(x, w, b, axis=axis)
    _stream_all(monkeypatch, True)
    out = as_memory(np.full(shape, np.nan, np.float32), "channels_last", axis)
    nbnorm.forward(x, w, b, axis=axis, out=out)
    assert_close(out, exp.out, REF_TOL[np.dtype(np.float32)])


@pytest.mark.parametrize("threshold,expected", [(0, True), (1 << 62, False)])
def test_outputs_stream_from_the_configured_size(monkeypatch, threshold, expected):
    """``ops`` asks every parallel pass to stream exactly when the output has at
    least ``config.STREAM_MIN_BYTES`` bytes."""
    monkeypatch.setattr(config, "SERIAL_MAX", 0)
    monkeypatch.setattr(config, "STREAM_MIN_BYTES", threshold)
    monkeypatch.setattr(config, "PLANAR_ROWS_MAX_RUN_BYTES", 0)  # the planar kernels too
    monkeypatch.setattr(config, "FUSE_MIN_RUN_BYTES", 0)  # and the fused ones
    seen = {}

    def spy(module, name):
        kernel = getattr(module, name)

        def wrapper(*args):
            bound = inspect.signature(kernel.py_func).bind(*args)
            seen[module.__name__, name] = bound.arguments["stream"]
            return kernel(*args)
        monkeypatch.setattr(module, name, wrapper)

    for module, name in [(fwd, "normalize_planar"), (fwd, "normalize_interleaved"),
                         (fwd, "train_planar"), (bwd, "train_planar"),
                         (bwd, "grad_input_planar"), (bwd, "grad_input_interleaved")]:
        spy(module, name)
    rng = np.random.default_rng(0)
    for shape, axis in [((40, 8, 9), 1), ((40, 2, 9), 1), ((70, 9), 1)]:
        x = rng.standard_normal(shape)
        f = nbnorm.forward(x, axis=axis)
        nbnorm.forward(x, None, None, np.zeros(shape[axis]), np.ones(shape[axis]),
                       training=False, axis=axis)
        nbnorm.backward(x, x, f.mean, f.invstd, axis=axis)
    monkeypatch.setattr(config, "FUSE_MIN_C", 1 << 62)
    nbnorm.backward(x.reshape(70, 9, 1), x.reshape(70, 9, 1), f.mean, f.invstd)
    assert seen == {key: expected for key in seen} and len(seen) == 6


# ------------------------------------------------------------------ threshold

def _fake_sysfs(root, sizes):
    for i, size in enumerate(sizes):
        d = root / f"index{i}"
        d.mkdir()
        (d / "size").write_text(size + "\n")
    return str(root)


def test_last_level_cache_from_sysfs(tmp_path):
    """The largest cache listed (L3 here), in bytes, whatever the unit."""
    root = _fake_sysfs(tmp_path, ["48K", "32K", "1024K", "32768K"])
    assert config._last_level_cache_bytes(root) == 32 << 20
    other = tmp_path / "other"
    other.mkdir()
    assert config._last_level_cache_bytes(_fake_sysfs(other, ["2M", "garbage", "1G"])) == 1 << 30


def test_no_sysfs_means_no_cache_size(tmp_path):
    assert config._last_level_cache_bytes(str(tmp_path / "missing")) is None


def test_default_threshold_is_three_quarters_of_the_cache_at_least_16_mib():
    llc = config._last_level_cache_bytes()
    assert config.STREAM_MIN_BYTES == max(16 << 20, 3 * (llc or 0) // 4)
    assert config.STREAM_MIN_BYTES >= 16 << 20


# ------------------------------------------- half data and epilogues, streamed

@njit
def _scalar_affine(x, y, s, t):
    """``x * s + t`` in ``x``'s compute type (``convert``: float32 for half ``x``)."""
    sc, tc = convert.coef(s, x), convert.coef(t, x)
    for i in range(y.size):
        y[i] = convert.store(convert.value(x[i]) * sc + tc, y)


@njit
def _vector_affine(x, y, s, t):
    """``_scalar_affine`` with the whole lines streamed."""
    h, e = streaming.span(y)
    sc, tc = convert.coef(s, x), convert.coef(t, x)
    for i in range(h):
        y[i] = convert.store(convert.value(x[i]) * sc + tc, y)
    streaming.scale_offset_lines(y, h, e, x, sc, tc, None, None)
    for i in range(e, y.size):
        y[i] = convert.store(convert.value(x[i]) * sc + tc, y)
    return h, e


@pytest.mark.parametrize("bits_dtype", [np.uint16, np.int16], ids=["float16", "bfloat16"])
def test_vector_conversions_are_the_scalar_bits(rng, bits_dtype):
    """The intrinsics' vector conversions of half data (hardware float16; from
    float64 after a float32 rounding to odd) give ``convert``'s scalar bits:
    every bit pattern read and computed on in float32, and float64 values of
    every magnitude (subnormal, overflowing, ties, NaN, inf) rounded."""
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(bits_dtype)
    ties = np.ldexp(1.0 + (2 * np.arange(64) + 1) * 2.0 ** -11, rng.integers(-24, 16, 64))
    values = np.concatenate([
        rng.standard_normal(20000) * 10.0 ** rng.integers(-12, 7, 20000), ties, -ties,
        [np.inf, -np.inf, np.nan, -np.nan, 65504.0, 65519.99, 65520.0, 2.0 ** -25,
         2.0 ** -24 * 1.5, 3.4e38, 3.5e38, 1e-300, 0.0, -0.0]])
    for src, s, t in ((every, 1.0, 0.0), (every, -0.75, 0.25), (values, 1.0, 0.0)):
        expected = np.empty(src.size, bits_dtype)
        got = np.empty(src.size, bits_dtype)
        _scalar_affine(src, expected, s, t)
        h, e = _vector_affine(src, got, s, t)
        assert e - h > src.size // 2
        assert_same(got.view(np.uint16), expected.view(np.uint16))


def _half_dtype(name):
    if name == "bfloat16":
        return pytest.importorskip("ml_dtypes").bfloat16
    return np.dtype(name)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("path", ["fused", "parallel", "rows"])
@pytest.mark.parametrize("name,shape,axis", CASES[:3], ids=[c[0] for c in CASES[:3]])
def test_streamed_epilogues_write_the_ordinary_bits(rng, monkeypatch, name, shape, axis,
                                                    path, dtype):
    """Half data and the fused epilogues stream too: ``relu(bn(x) + residual)``
    (training and inference) and the masked backward writing ``grad_residual``
    give, streamed at an offset from a line, the bits of ordinary stores."""
    use_path(monkeypatch, path)
    dt = _half_dtype(dtype)
    x, dy, w, b = (a.astype(dt) for a in _case(rng, shape, axis, np.float64))
    res = rng.standard_normal(shape).astype(dt)
    C = shape[axis]
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)

    def run(on):
        _stream_all(monkeypatch, on)
        out = _offset_view(shape, dt, 3)
        f = nbnorm.forward(x, w, b, axis=axis, out=out, activation="relu", residual=res)
        inf_out = _offset_view(shape, dt, 3)
        nbnorm.forward(x, w, b, rm, rv, training=False, axis=axis, out=inf_out,
                       activation="relu", residual=res)
        gi, gr = _offset_view(shape, dt, 3), _offset_view(shape, dt, 5)
        g = nbnorm.backward(dy, x, f.mean, f.invstd, w, axis=axis, grad_input=gi,
                            activation="relu", forward_out=out, grad_residual=gr)
        return out, inf_out, gi, gr, g.grad_weight, g.grad_bias

    for s, o in zip(run(True), run(False)):
        assert_same(s.view(np.uint8), o.view(np.uint8))
