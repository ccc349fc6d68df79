"""float16 and bfloat16 data on the CPU.

nbnorm reads half values exactly, accumulates the statistics in float64 and
computes the elementwise passes in float32 (``nbnorm.cpu.convert``: centred
on a float32 value near the mean, so a large mean costs nothing), rounding
every output once, to nearest even.  Each output is within one unit in the
last place of the float64 result plus a few float32 roundings of the terms it
is the sum of (``TERMS``: visible only where it cancels them, a bias or a
residual, to far below them), and correctly rounded for all but a small
fraction of the elements (``SLIVER``; measured on 800k values of random
data: 3e-4 float16, 1.5e-4 bfloat16 forward, below 1e-4 backward; offset
data, mean 100 to 1000 standard deviations: below 5e-4).  ``mean``,
``invstd``, ``grad_weight`` and ``grad_bias`` are float32.
"""

import numpy as np
import pytest

import nbnorm
from nbnorm import reference
from helpers import KERNEL_PATHS, LAYOUTS, channel, data, positive, use_path

ml_dtypes = pytest.importorskip("ml_dtypes")

F16 = np.dtype(np.float16)
BF16 = np.dtype(ml_dtypes.bfloat16)
HALF = [F16, BF16]
HALF_IDS = ["float16", "bfloat16"]
#: (mantissa bits with the implicit one, least normal exponent) of each format
FORMAT = {F16: (11, -14), BF16: (8, -126)}
#: The fraction of elements allowed not to be correctly rounded (arrays of a
#: few hundred values: one element is 0.1-0.5%).
SLIVER = 1e-2
#: The float32 arithmetic's error beyond the unit in the last place, relative to
#: the magnitude of the terms (2^-24 a rounding, a few roundings).
TERMS = 2.0 ** -21

LAYOUT_SUBSET = [lay for lay in LAYOUTS if lay[0] in {
    "NC", "NCL", "NCHW", "NHWC", "C1-planar", "primes", "wide-C-NC", "axis0"}]
LAYOUT_IDS = [name for name, _, _ in LAYOUT_SUBSET]
LAYOUT_PARAMS = [(shape, axis) for _, shape, axis in LAYOUT_SUBSET]


def ulp(v, dt):
    """The unit in the last place of ``dt`` at the float64 values ``v``."""
    p, emin = FORMAT[dt]
    mag = np.abs(np.asarray(v, np.float64))
    e = np.floor(np.log2(np.where(mag > 0, mag, 1.0)))
    return 2.0 ** (np.maximum(e, emin) - (p - 1))


def check_half(got, exact, what, sliver=SLIVER, terms=None):
    """``got`` (half) is within 1 ulp of float64 ``exact`` plus ``TERMS * terms``
    everywhere (``terms``: the magnitude of the terms the outputs are sums of;
    default: of the outputs), and its correctly rounded value but for a fraction
    ``sliver`` of the elements."""
    dt = got.dtype
    exact = np.asarray(exact, np.float64)
    g = got.astype(np.float64)
    assert np.array_equal(np.isnan(g), np.isnan(exact)), f"{what}: NaN positions"
    fin = np.isfinite(exact)
    if terms is None:
        terms = np.abs(exact[fin]).max(initial=0)
    err = (np.abs(g[fin] - exact[fin]) - TERMS * terms) / ulp(exact[fin], dt)
    assert err.max(initial=0) <= 1.0, f"{what}: {err.max()} ulp beyond the terms' rounding"
    correct = g == reference.rounded(exact, dt).astype(np.float64)
    assert correct[fin].mean() >= 1 - sliver, f"{what}: {1 - correct[fin].mean():.2%} not RNE"


def half_data(rng, shape, dt, loc=None, scale=None):
    return data(rng, shape, np.float64, loc, scale).astype(dt)


def _all_patterns(dt, shape):
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(dt).reshape(shape)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # inf patterns
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN ones
@pytest.mark.parametrize("path", ["serial", "parallel", "rows"])
@pytest.mark.parametrize("shape", [(256, 256), (16, 64, 64)], ids=["interleaved", "planar"])
@pytest.mark.parametrize("dt", HALF, ids=HALF_IDS)
def test_every_bit_pattern_through_identity(monkeypatch, dt, shape, path):
    """Inference with mean 0 and invstd exactly 1 (var 0, eps 1) gives back every
    one of the 65536 values (NaN stays NaN; -0.0 may become +0.0, equal), and so
    does inference-mode backward (``grad_input = grad_out * invstd``)."""
    use_path(monkeypatch, path)
    x = _all_patterns(dt, shape)
    C = shape[1]
    zeros = np.zeros(C, np.float32)
    r = nbnorm.forward(x, None, None, zeros, zeros, training=False, eps=1.0)
    assert r.out.dtype == dt and r.mean.dtype == np.float32
    assert np.all(r.invstd == 1.0)
    xf, of = x.astype(np.float64), r.out.astype(np.float64)
    nan = np.isnan(xf)
    assert np.array_equal(np.isnan(of), nan)
    assert np.array_equal(of[~nan], xf[~nan])
    g = nbnorm.backward(x, x, r.mean, r.invstd, training=False)
    gf = g.grad_input.astype(np.float64)
    assert np.array_equal(np.isnan(gf), nan)
    assert np.array_equal(gf[~nan], xf[~nan])


MODES = ["train", "train+running", "infer"]


@pytest.mark.parametrize("path", list(KERNEL_PATHS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,axis", LAYOUT_PARAMS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dt", HALF, ids=HALF_IDS)
def test_forward_matches_reference(rng, monkeypatch, dt, shape, axis, mode, path):
    use_path(monkeypatch, path)
    C = shape[axis]
    x = half_data(rng, shape, dt)
    w, b = channel(rng, C, np.float32), channel(rng, C, np.float32)
    training = mode != "infer"
    rm0 = rv0 = None
    if mode != "train":
        rm0, rv0 = channel(rng, C, np.float32), positive(rng, C, np.float32)
    rm = None if rm0 is None else rm0.copy()
    rv = None if rv0 is None else rv0.copy()
    res = nbnorm.forward(x, w, b, rm, rv, training=training, axis=axis, momentum=0.2)
    ref = reference.forward(x, w, b, rm0, rv0, training=training, axis=axis, momentum=0.2)
    assert res.out.dtype == dt and res.mean.dtype == np.float32 == res.invstd.dtype
    check_half(res.out, ref.out, "out", terms=np.abs(ref.out).max() + np.abs(b).max())
    np.testing.assert_allclose(res.mean, ref.mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(res.invstd, ref.invstd, rtol=1e-6)
    if mode == "train+running":
        np.testing.assert_allclose(rm, ref.running_mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(rv, ref.running_var, rtol=1e-6)


@pytest.mark.parametrize("path", list(KERNEL_PATHS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("shape,axis", LAYOUT_PARAMS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dt", HALF, ids=HALF_IDS)
def test_backward_matches_reference(rng, monkeypatch, dt, shape, axis, training, path):
    use_path(monkeypatch, path)
    C = shape[axis]
    x = half_data(rng, shape, dt)
    dy = half_data(rng, shape, dt, 0.0, 1.0)
    w = channel(rng, C, np.float32)
    f = nbnorm.forward(x, w, axis=axis)
    g = nbnorm.backward(dy, x, f.mean, f.invstd, w, training=training, axis=axis)
    ref = reference.backward(dy, x, f.mean, f.invstd, w, training=training, axis=axis)
    assert g.grad_input.dtype == dt and g.grad_weight.dtype == np.float32
    # grad_input sums cancel: compare at the scale of its terms, not of its value
    scale = np.abs(reference.backward(np.abs(dy), x, f.mean, f.invstd, np.abs(w),
                                      training=False, axis=axis).grad_input)
    check_half(g.grad_input, ref.grad_input, "grad_input",
               sliver=SLIVER if not training else 5e-2, terms=scale.max())
    np.testing.assert_allclose(g.grad_weight, ref.grad_weight, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g.grad_bias, ref.grad_bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pdt", [np.float16, "bfloat16", np.float64], ids=str)
@pytest.mark.parametrize("dt", HALF, ids=HALF_IDS)
def test_parameters_of_any_float_dtype(rng, dt, pdt):
    """weight, bias and running statistics need not share the data's dtype."""
    pdt = BF16 if pdt == "bfloat16" else np.dtype(pdt)
    shape, C = (6, 5, 7), 5
    x = half_data(rng, shape, dt)
    w, b = channel(rng, C, pdt), channel(rng, C, pdt)
    rm0, rv0 = channel(rng, C, pdt), positive(rng, C, pdt)
    rm, rv = rm0.copy(), rv0.copy()
    res = nbnorm.forward(x, w, b, rm, rv, momentum=0.3)
    ref = reference.forward(x, w, b, rm0, rv0, momentum=0.3)
    terms = np.abs(ref.out).max() + np.abs(b.astype(np.float64)).max()
    check_half(res.out, ref.out, "out", terms=terms)
    assert rm.dtype == pdt
    tol = {F16: 2.0 ** -10, BF16: 2.0 ** -7}.get(pdt, 1e-12)  # one rounding in pdt
    np.testing.assert_allclose(rm.astype(np.float64), ref.running_mean, rtol=tol, atol=tol)
    np.testing.assert_allclose(rv.astype(np.float64), ref.running_var, rtol=tol)
    inf = nbnorm.forward(x, w, b, rm, rv, training=False)
    check_half(inf.out, reference.forward(x, w, b, rm, rv, training=False).out, "inference",
               terms=terms)


@pytest.mark.parametrize("dt", HALF, ids=HALF_IDS)
def test_statistics_of_offset_data_are_exact(rng, dt):
    """Half values far from zero with a small spread: the float64 statistics are
    those of the half values, where E[x^2] - E[x]^2 in float32 would lose them;
    and the float32 elementwise pass, centred on a float32 value next to the
    mean, loses nothing to it either (``x * scale + offset`` in float32 left
    2.6% of float16 outputs of mean 100 std misrounded, up to 5 ulp)."""
    x = (256.0 + rng.integers(-8, 9, (64, 3, 50))).astype(dt)  # exact in both formats
    res = nbnorm.forward(x)
    ref = reference.forward(x)
    np.testing.assert_allclose(res.mean, ref.mean, rtol=1e-7)
    np.testing.assert_allclose(res.invstd, ref.invstd, rtol=1e-6)
    check_half(res.out, ref.out, "out", sliver=1e-3)
    x = half_data(rng, (64, 3, 50), dt, 1000.0, 1.0)
    check_half(nbnorm.forward(x).out, reference.forward(x).out, "mean 1000 std", sliver=1e-3)


def test_outputs_preallocated_and_poisoned(rng):
    """Every element of every preallocated half output is written."""
    x = half_data(rng, (5, 4, 9), F16)
    dy = half_data(rng, (5, 4, 9), F16)
    out = np.full(x.shape, np.nan, F16)
    mean, invstd = np.full(4, np.nan, np.float32), np.full(4, np.nan, np.float32)
    r = nbnorm.forward(x, out=out, mean=mean, invstd=invstd)
    assert r.out is out and not np.isnan(out.astype(np.float32)).any()
    assert not np.isnan(mean).any() and not np.isnan(invstd).any()
    gi = np.full(x.shape, np.nan, F16)
    gw, gb = np.full(4, np.nan, np.float32), np.full(4, np.nan, np.float32)
    g = nbnorm.backward(dy, x, mean, invstd, grad_input=gi, grad_weight=gw, grad_bias=gb)
    assert g.grad_input is gi and not np.isnan(gi.astype(np.float32)).any()
    assert not np.isnan(gw).any() and not np.isnan(gb).any()


@pytest.mark.parametrize("dt", HALF, ids=HALF_IDS)
def test_half_outputs_of_wrong_dtype_are_refused(rng, dt):
    """mean/invstd of half data are float32; out has x's dtype."""
    x = half_data(rng, (5, 4), dt)
    with pytest.raises(TypeError, match="float32"):
        nbnorm.forward(x, mean=np.empty(4, dt))
    with pytest.raises(TypeError, match="dtype"):
        nbnorm.forward(x, out=np.empty((5, 4), np.float32))
    with pytest.raises(TypeError, match="x's dtype"):
        nbnorm.backward(np.ones((5, 4), np.float32), x, np.zeros(4), np.ones(4))


# ------------------------------------------------------------------- PyTorch

def _torch_dtype(dt):
    torch = pytest.importorskip("torch")
    return torch.float16 if dt == F16 else torch.bfloat16


def _to_torch(a, dt):
    import torch

    return torch.from_numpy(a.astype(np.float32)).to(_torch_dtype(dt))


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("shape", [(8, 6, 5, 7), (64, 16)], ids=["NCHW", "NC"])
@pytest.mark.parametrize("dt", HALF, ids=HALF_IDS)
def test_matches_torch_cpu_half_batch_norm(rng, dt, shape, training):
    """PyTorch's CPU half batch norm (float32 arithmetic inside) agrees within
    its own rounding: two units in the last place, forward and backward."""
    torch = pytest.importorskip("torch")
    C = shape[1]
    x = half_data(rng, shape, dt)
    dy = half_data(rng, shape, dt, 0.0, 1.0)
    w, b = channel(rng, C, np.float32), channel(rng, C, np.float32)
    rm, rv = channel(rng, C, np.float32), positive(rng, C, np.float32)
    t = _to_torch(x, dt).requires_grad_(True)
    tw = torch.from_numpy(w.copy()).requires_grad_(True)
    tb = torch.from_numpy(b.copy()).requires_grad_(True)
    trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    y = torch.nn.functional.batch_norm(t, trm, trv, tw, tb, training=training, momentum=0.1)
    y.backward(_to_torch(dy, dt))
    rm1, rv1 = rm.copy(), rv.copy()
    res = nbnorm.forward(x, w, b, rm1, rv1, training=training)
    ty = y.detach().float().numpy()
    assert np.all(np.abs(res.out.astype(np.float64) - ty) <= 2 * ulp(ty, dt))
    np.testing.assert_allclose(rm1, trm.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rv1, trv.numpy(), rtol=1e-4)
    g = nbnorm.backward(dy, x, res.mean, res.invstd, w, training=training)
    tg = t.grad.float().numpy()
    scale = np.abs(tg).max()
    assert np.all(np.abs(g.grad_input.astype(np.float64) - tg) <= 2 * ulp(tg, dt) + 2e-3 * scale)
    np.testing.assert_allclose(g.grad_weight, tw.grad.numpy(), rtol=2e-3, atol=2e-3 * scale)
    np.testing.assert_allclose(g.grad_bias, tb.grad.numpy(), rtol=2e-3, atol=2e-3 * scale)
