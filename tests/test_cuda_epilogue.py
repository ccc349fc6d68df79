"""Half precision and the fused epilogues of the CUDA kernels, through
``nbnorm.cuda.ops`` on device arrays.

Every result is checked against a float64 NumPy computation (``nbnorm.reference``
with the residual, ReLU and mask applied in float64) rounded once to the
output dtype: half outputs must be within 1 ulp of it and almost always
exactly it.  bfloat16 travels as int16 bits (``nbnorm.dtypes``).  Conversions
are checked bit for bit against the CPU's (``nbnorm.cpu.convert``), every
float16 and bfloat16 value through an identity normalization, and float32 /
float64 results against the CPU kernels.

On the simulator every thread runs in Python: shapes are tiny and ``config``
is patched to 32 threads per block and small reduction blocks, as in
``test_cuda.py``; the same tests run unchanged on a GPU.
"""

import numpy as np
import pytest

pytest.importorskip("numba_cuda", reason="numba-cuda is not installed: pip install 'nbnorm[cuda]'")
ml_dtypes = pytest.importorskip("ml_dtypes")

from numba import config as numba_config  # noqa: E402
from numba import cuda, njit  # noqa: E402

import nbnorm  # noqa: E402
from nbnorm import config, reference  # noqa: E402

SIM = bool(numba_config.ENABLE_CUDASIM)
if not SIM and not cuda.is_available():
    pytest.skip("no CUDA GPU, and NUMBA_ENABLE_CUDASIM=0 turns the simulator off",
                allow_module_level=True)

from nbnorm.cpu import convert as cpu_convert  # noqa: E402
from nbnorm.cuda import convert, ops  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
DTYPES = [F16, BF16, F32, F64]
IDS = ["float16", "bfloat16", "float32", "float64"]
#: canonical views: planar (outer, C, inner) with 2 blocks per channel, and
#: interleaved (outer, C) with 4 row blocks
SHAPES = {"planar": (6, 2, 13), "interleaved": (37, 5)}


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(config, "CUDA_THREADS", 32)
    monkeypatch.setattr(config, "CUDA_MIN_BLOCK_ELEMENTS", 16)
    monkeypatch.setattr(config, "CUDA_TARGET_BLOCKS", 4)
    monkeypatch.setattr(config, "CUDA_ELEMENTWISE_BLOCKS", 2)
    monkeypatch.setattr(config, "CUDA_UNROLL", 2)


def stat_dtype(dt):
    return F32 if dt.itemsize == 2 else dt


def dev(a):
    """``a`` on the device, bfloat16 as its int16 bits."""
    if a is None:
        return None
    a = np.ascontiguousarray(a)
    return cuda.to_device(a.view(np.int16) if a.dtype == BF16 else a)


def host(d, dtype):
    a = d.copy_to_host()
    return a.view(BF16) if dtype == BF16 else a


def empty(shape, dtype):
    return dev(np.full(shape, np.nan, dtype))


# ----------------------------------------------------------------- rounding

@njit
def _cpu_round(v, out):
    for i in range(v.size):
        out[i] = cpu_convert.store(v[i], out)


def correctly_rounded(v, dtype):
    """float64 ``v`` rounded once to ``dtype``: the CPU's conversion (half), NumPy's
    cast otherwise."""
    v = np.ascontiguousarray(v, dtype=np.float64)
    if dtype.itemsize != 2:
        with np.errstate(over="ignore"):
            return v.astype(dtype)
    out = np.empty(v.shape, np.uint16 if dtype == F16 else np.int16)
    _cpu_round(v.reshape(-1), out.reshape(-1))
    return out.view(dtype)


def _ordered(a):
    """Integers in the order of the float values (-0 and +0 both 0)."""
    u = a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]).astype(np.int64)
    if a.dtype.itemsize == 8:  # keep within int64: compare magnitudes with the sign
        u = a.view(np.int64)
        return np.where(u < 0, -(u & 0x7FFFFFFFFFFFFFFF), u)
    sign = 1 << (8 * a.dtype.itemsize - 1)
    return np.where(u & sign, -(u & (sign - 1)), u)


def assert_rounded(got, exact, dtype, what, exact_share=0.99):
    """``got`` (of ``dtype``) within 1 ulp of float64 ``exact``, and equal to its
    correct rounding for at least ``exact_share`` of the values; NaN where it is.
    float64 results: within 1e-12 (relative) of ``exact``, whose sums were
    ordered differently."""
    got = np.ascontiguousarray(got)
    assert got.dtype == dtype, what
    if dtype == F64:
        np.testing.assert_allclose(got, exact, rtol=1e-12, atol=1e-12, err_msg=what)
        return
    want = correctly_rounded(exact, dtype)
    gnan, wnan = np.isnan(got.astype(np.float64)), np.isnan(want.astype(np.float64))
    np.testing.assert_array_equal(gnan, wnan, err_msg=f"{what}: NaN positions")
    ok = ~gnan
    ulps = np.abs(_ordered(got[ok]) - _ordered(want[ok]))
    assert ulps.max(initial=0) <= 1, (
        f"{what}: {ulps.max()} ulp from the float64 result, e.g. "
        f"{got[ok][ulps.argmax()]!r} for {np.asarray(exact)[ok][ulps.argmax()]!r}")
    assert np.mean(ulps == 0) >= exact_share, f"{what}: {np.mean(ulps == 0):.3f} exact"


def _store_kernel(kind):
    _, store = convert.codec(kind)

    @cuda.jit
    def k(v, out):
        i = cuda.grid(1)
        if i < v.size:
            out[i] = store(v[i])
    return k


def _hard_values(rng, dtype):
    """float64 values around every kind of rounding boundary of ``dtype``."""
    bits = rng.integers(0, 1 << 16, 400).astype(np.uint16)
    base = bits.view(np.float16 if dtype == F16 else BF16).astype(np.float64)
    base = base[np.isfinite(base)]
    nxt = np.nextafter(base.astype(dtype), np.array(np.inf, dtype)).astype(np.float64)
    mid = (base + nxt) / 2  # ties: nearest even
    tiny = np.abs(mid) * 2.0 ** -40
    special = [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e300, -1e300, 5e-324,
               -5e-324, 1e-30, 6e-8, 3e-8, 2.98e-8, 65504.0, 65520.0, 65519.99,
               3.3895e38, 3.39e38, 3.4e38, 3.5e38, 1.0 + 2.0 ** -8, 1.0 + 2.0 ** -11,
               float(np.finfo(np.float32).max), float(np.finfo(np.float32).tiny) / 3]
    return np.concatenate([base, mid, mid + tiny, mid - tiny, nxt, rng.standard_normal(200),
                           rng.standard_normal(200) * 1e-6, special])


#: NaN, inf and overflow on purpose: the simulator's NumPy scalars warn about them
quiet = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@quiet
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])
def test_store_rounds_like_the_cpu_bit_for_bit(rng, dtype):
    v = _hard_values(rng, dtype)
    kind = convert.kind(dtype if dtype == F16 else np.int16)
    out = cuda.device_array(v.size, np.float16 if dtype == F16 else np.int16)
    _store_kernel(kind)[-(-v.size // 32), 32](cuda.to_device(v), out)
    got = out.copy_to_host().view(np.uint16)
    want = correctly_rounded(v, dtype).view(np.uint16)
    nan = np.isnan(v)
    np.testing.assert_array_equal(got[~nan], want[~nan])
    assert np.all(np.isnan(got[nan].view(dtype).astype(np.float64)))
    if dtype == BF16:  # NaN payloads too: quiet, top of the payload, as on the CPU
        np.testing.assert_array_equal(got[nan], want[nan])


#: Zeros, subnormal and normal edges, the largest finite values, inf and NaNs of
#: both formats, with both signs.
_SPECIAL_BITS = [0x0000, 0x0001, 0x03FF, 0x0400, 0x3C00, 0x7BFF, 0x7C00, 0x7C01, 0x7E00,
                 0x7FFF, 0x007F, 0x0080, 0x3F80, 0x7F7F, 0x7F80, 0x7F81, 0x7FC0]


def _patterns(every):
    """Every ``every``-th 16-bit pattern and the special ones, sorted."""
    picked = set(range(0, 1 << 16, every)) | set(_SPECIAL_BITS)
    picked |= {b | 0x8000 for b in picked}
    return np.array(sorted(picked), np.uint16)


@quiet
@pytest.mark.parametrize("every", [
    97, pytest.param(1, marks=pytest.mark.slow, id="all-65536")], ids=str)
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])
def test_every_half_value_survives_an_identity_normalization(dtype, every):
    """mean 0, var 0, eps 1: invstd is exactly 1, so out = x (NaN stays NaN, -0
    may become +0); loads and stores are exact.  All 65536 values run with
    ``-m slow`` (minutes on the simulator, every thread in Python; the CPU
    test ``test_half.py`` takes all of them by default), every 97th and the
    special ones by default."""
    bits = _patterns(every)
    C = 64 if bits.size % 64 == 0 else 1
    bits = bits.reshape(-1, C)
    x = bits.view(dtype)
    xd = dev(x)
    out = empty(x.shape, dtype)
    mean, invstd = empty(C, F32), empty(C, F32)
    zeros = dev(np.zeros(C, F32))
    ops.forward_infer(xd, None, None, 1.0, zeros, zeros, out, mean, invstd)
    got = host(out, dtype)
    assert np.all(host(invstd, F32) == 1.0) and np.all(host(mean, F32) == 0.0)
    x64, g64 = x.astype(np.float64), got.astype(np.float64)
    nan = np.isnan(x64)
    np.testing.assert_array_equal(np.isnan(g64), nan)
    assert np.array_equal(g64[~nan], x64[~nan])  # -0 == +0
    same_bits = got.view(np.uint16) == bits
    assert np.all(same_bits | nan | (x64 == 0))


# -------------------------------------------------------------------- forward

def _data(rng, shape, dtype, loc=0.5, scale=2.0):
    return (rng.standard_normal(shape) * scale + loc).astype(dtype)


def _params(rng, C, dtype):
    w = rng.uniform(-1.5, 1.5, C).astype(dtype)
    b = rng.uniform(-1.5, 1.5, C).astype(dtype)
    rm = rng.uniform(-1, 1, C).astype(dtype)
    rv = rng.uniform(0.3, 2.5, C).astype(dtype)
    return w, b, rm, rv


def _f64(a):
    return None if a is None else np.asarray(a).astype(np.float64)


def _epilogue(y, residual, relu):
    if residual is not None:
        y = y + residual.astype(np.float64)
    return np.where(y <= 0, 0.0, y) if relu else y  # NaN passes


#: (training, residual, relu): each operand alone and with the other, in
#: each mode (the simulator is slow; the PTX test compiles every combination)
FORWARD_CASES = [(True, False, False), (True, True, True), (False, True, False),
                 (False, False, True)]


@pytest.mark.parametrize("pattern", sorted(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_forward_with_epilogue(rng, dtype, pattern):
    shape = SHAPES[pattern]
    C = shape[1]
    sdt = stat_dtype(dtype)
    x = _data(rng, shape, dtype)
    res = _data(rng, shape, dtype, loc=0.0, scale=1.0)
    w, b, rm0, rv0 = _params(rng, C, np.float32 if dtype.itemsize == 2 else dtype)
    xd, resd = dev(x), dev(res)
    for training, residual, relu in FORWARD_CASES:
        what = f"{'train' if training else 'infer'} residual={residual} relu={relu}"
        r = res if residual else None
        rmd, rvd = dev(rm0), dev(rv0)
        out, mean, invstd = empty(shape, dtype), empty(C, sdt), empty(C, sdt)
        args = (xd, dev(w), dev(b), 1e-5)
        if training:
            ops.forward_train(*args, 0.3, rmd, rvd, out, mean, invstd,
                              residual=resd if residual else None, relu=relu)
        else:
            ops.forward_infer(*args, rmd, rvd, out, mean, invstd,
                              residual=resd if residual else None, relu=relu)
        ref = reference.forward(_f64(x), _f64(w), _f64(b), _f64(rm0), _f64(rv0),
                                training=training, momentum=0.3, eps=1e-5)
        assert_rounded(host(out, dtype), _epilogue(ref.out, r, relu), dtype, what + " out")
        assert_rounded(host(mean, sdt), ref.mean, sdt, what + " mean", 0.9)
        assert_rounded(host(invstd, sdt), ref.invstd, sdt, what + " invstd", 0.9)
        if training:
            assert_rounded(host(rmd, rm0.dtype), ref.running_mean, rm0.dtype,
                           what + " running_mean", 0.9)
            assert_rounded(host(rvd, rv0.dtype), ref.running_var, rv0.dtype,
                           what + " running_var", 0.9)
        else:
            assert host(rmd, rm0.dtype).tobytes() == rm0.tobytes()


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])
def test_half_parameters_and_in_place(rng, dtype):
    """Half weight, bias and running statistics (bfloat16 as int16 bits), rounded
    once when updated; ``out`` may be ``x`` and the residual buffer at once."""
    shape, C = SHAPES["planar"], SHAPES["planar"][1]
    x = _data(rng, shape, dtype)
    w, b, rm0, rv0 = _params(rng, C, dtype)
    xd = dev(x)
    rmd, rvd = dev(rm0), dev(rv0)
    mean, invstd = empty(C, F32), empty(C, F32)
    ops.forward_train(xd, dev(w), dev(b), 1e-5, 0.1, rmd, rvd, xd, mean, invstd,
                      residual=xd, relu=True)
    ref = reference.forward(_f64(x), _f64(w), _f64(b), _f64(rm0), _f64(rv0), eps=1e-5)
    assert_rounded(host(xd, dtype), _epilogue(ref.out, x, True), dtype, "out = x = residual")
    assert_rounded(host(rmd, dtype), ref.running_mean, dtype, "running_mean")
    assert_rounded(host(rvd, dtype), ref.running_var, dtype, "running_var")


# ------------------------------------------------------------------- backward

def _forward_out(rng, shape, dtype):
    """A ReLU output: positive, zero and a NaN (masked: NaN > 0 is false)."""
    fo = np.abs(_data(rng, shape, dtype)).astype(np.float64)
    fo[rng.random(shape) < 0.4] = 0.0
    fo.reshape(-1)[[3, 7]] = [np.nan, -0.0]
    return fo.astype(dtype)


#: (training, mask, grad_residual), as ``FORWARD_CASES``; the last one in
#: place (``grad_input = dy``)
BACKWARD_CASES = [(True, False, False), (False, True, False), (False, False, True),
                  (True, True, True)]


@pytest.mark.parametrize("pattern", sorted(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_backward_with_epilogue(rng, dtype, pattern):
    shape = SHAPES[pattern]
    C = shape[1]
    sdt = stat_dtype(dtype)
    x = _data(rng, shape, dtype)
    dy = _data(rng, shape, dtype, loc=0.0, scale=1.0)
    fo = _forward_out(rng, shape, dtype)
    w = rng.uniform(-1.5, 1.5, C).astype(sdt)
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(0, 2) if pattern == "planar" else 0).astype(sdt)
    invstd = (1 / x64.std(axis=(0, 2) if pattern == "planar" else 0)).astype(sdt)
    xd, dyd, fod, wd, md, ivd = dev(x), dev(dy), dev(fo), dev(w), dev(mean), dev(invstd)
    for training, mask, gres in BACKWARD_CASES:
        what = f"{'train' if training else 'infer'} mask={mask} grad_residual={gres}"
        g = dy.astype(np.float64)
        if mask:
            g = np.where(fo.astype(np.float64) > 0, g, 0.0)
        in_place = (training, mask, gres) == BACKWARD_CASES[-1]
        dx = dyd if in_place else empty(shape, dtype)
        gw, gb = empty(C, sdt), empty(C, sdt)
        gr = empty(shape, dtype) if gres else None
        ops.backward(dyd, xd, md, ivd, wd, training, dx, gw, gb,
                     forward_out=fod if mask else None, grad_residual=gr)
        ref = reference.backward(g, x64, _f64(mean), _f64(invstd), _f64(w),
                                 training=training)
        assert_rounded(host(dx, dtype), ref.grad_input, dtype, what + " grad_input")
        assert_rounded(host(gw, sdt), ref.grad_weight, sdt, what + " grad_weight", 0.8)
        assert_rounded(host(gb, sdt), ref.grad_bias, sdt, what + " grad_bias", 0.8)
        if gres:  # g is dy or 0: exact in every dtype
            assert np.array_equal(host(gr, dtype).astype(np.float64), g), what


# ------------------------------------------------------------- against the CPU

@pytest.mark.parametrize("dtype,pattern", [(F32, "planar"), (F64, "interleaved")],
                         ids=["float32-planar", "float64-interleaved"])
def test_plain_calls_match_the_cpu(rng, dtype, pattern):
    """No epilogue, float32/float64: the CPU kernels' results, bit for bit where
    both compute the same expressions from the same inputs (inference), else
    within float64 rounding of differently ordered sums."""
    shape = SHAPES[pattern]
    C = shape[1]
    x = _data(rng, shape, dtype)
    dy = _data(rng, shape, dtype, loc=0.0, scale=1.0)
    w, b, rm0, rv0 = _params(rng, C, dtype)
    xd = dev(x)
    out, mean, invstd = empty(shape, dtype), empty(C, dtype), empty(C, dtype)
    ops.forward_infer(xd, dev(w), dev(b), 1e-5, dev(rm0), dev(rv0), out, mean, invstd)
    cpu = nbnorm.forward(x, w, b, rm0.copy(), rv0.copy(), training=False)
    for name, d in (("out", out), ("mean", mean), ("invstd", invstd)):
        got, want = host(d, dtype), getattr(cpu, name)
        if SIM:  # NVVM may contract a * b + c into one fma: the CPU's bits only here
            assert got.tobytes() == want.tobytes(), f"inference {name}"
        assert_rounded(got, want.astype(np.float64), dtype, f"inference {name}")

    rmd, rvd = dev(rm0), dev(rv0)
    ops.forward_train(xd, dev(w), dev(b), 1e-5, 0.1, rmd, rvd, out, mean, invstd)
    rm_c, rv_c = rm0.copy(), rv0.copy()
    cpu = nbnorm.forward(x, w, b, rm_c, rv_c)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == F64 else dict(rtol=2.4e-7, atol=1e-6)
    for name, got, want in (("out", out, cpu.out), ("mean", mean, cpu.mean),
                            ("invstd", invstd, cpu.invstd), ("running_mean", rmd, rm_c),
                            ("running_var", rvd, rv_c)):
        np.testing.assert_allclose(host(got, dtype), want, err_msg=f"train {name}", **tol)
    gi, gw, gb = empty(shape, dtype), empty(C, dtype), empty(C, dtype)
    ops.backward(dev(dy), xd, dev(cpu.mean), dev(cpu.invstd), dev(w), True, gi, gw, gb)
    cg = nbnorm.backward(dy, x, cpu.mean, cpu.invstd, w)
    for name, got in zip(cg._fields, (gi, gw, gb)):
        np.testing.assert_allclose(host(got, dtype), getattr(cg, name), err_msg=name,
                                   **(dict(rtol=1e-11, atol=1e-11) if dtype == F64
                                      else dict(rtol=1e-6, atol=1e-6)))
