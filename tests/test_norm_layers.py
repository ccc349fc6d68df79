"""nbnorm.GroupNorm, LayerNorm and RMSNorm, the NumPy layers, against the torch
modules of the same names: steps of training with the same parameters, the
fused epilogue, state dicts both ways, reused buffers, and bad input that
changes nothing."""

import tracemalloc

import numpy as np
import pytest

import nbnorm

torch = pytest.importorskip("torch")

F64 = dict(rtol=1e-10, atol=1e-12)
F32 = dict(rtol=2e-5, atol=2e-5)

#: (make the nbnorm layer, make the torch module, input shape, channels-last view)
CASES = {
    "group": (lambda dt: nbnorm.GroupNorm(4, 8, dtype=dt),
              lambda dt: torch.nn.GroupNorm(4, 8, dtype=dt), (3, 8, 5, 4)),
    "group-noaffine": (lambda dt: nbnorm.GroupNorm(2, 8, affine=False, dtype=dt),
                       lambda dt: torch.nn.GroupNorm(2, 8, affine=False, dtype=dt), (3, 8, 6)),
    "layer": (lambda dt: nbnorm.LayerNorm((5, 4), dtype=dt),
              lambda dt: torch.nn.LayerNorm((5, 4), dtype=dt), (3, 6, 5, 4)),
    "layer-nobias": (lambda dt: nbnorm.LayerNorm(7, bias=False, dtype=dt),
                     lambda dt: torch.nn.LayerNorm(7, bias=False, dtype=dt), (6, 7)),
    "rms": (lambda dt: nbnorm.RMSNorm(16, dtype=dt),
            lambda dt: torch.nn.RMSNorm(16, dtype=dt), (5, 3, 16)),
    "rms-eps-noaffine": (lambda dt: nbnorm.RMSNorm(16, eps=1e-3, elementwise_affine=False,
                                                   dtype=dt),
                         lambda dt: torch.nn.RMSNorm(16, eps=1e-3, elementwise_affine=False,
                                                     dtype=dt), (4, 16)),
}
DTYPES = [(np.float64, torch.float64, F64), (np.float32, torch.float32, F32)]


def _randomize(module, rng):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.from_numpy(rng.standard_normal(p.shape)).to(p.dtype))


@pytest.mark.parametrize("dtypes", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("case", list(CASES))
def test_training_steps_match_torch(case, dtypes):
    """Three SGD steps on fresh data: outputs, every gradient and the updated
    parameters equal the torch module's (torch is also trained by hand)."""
    np_dt, t_dt, tol = dtypes
    make, make_torch, shape = CASES[case]
    rng = np.random.default_rng(0)
    ref = make_torch(t_dt)
    _randomize(ref, rng)
    layer = make(np_dt)
    layer.load_state_dict(ref.state_dict())
    for step in range(3):
        x = (rng.standard_normal(shape) * 2 + 1).astype(np_dt)
        dy = rng.standard_normal(shape).astype(np_dt)
        xt = torch.from_numpy(x.copy()).requires_grad_()
        yt = ref(xt)
        yt.backward(torch.from_numpy(dy))
        y = layer(x)
        dx = layer.backward(dy)
        np.testing.assert_allclose(y, yt.detach().numpy(), **tol)
        np.testing.assert_allclose(dx, xt.grad.numpy(), **tol)
        for name in ("weight", "bias"):
            p = getattr(ref, name, None)
            grad = getattr(layer, "grad_" + name)
            if p is None:
                assert grad is None and getattr(layer, name) is None
                continue
            np.testing.assert_allclose(grad, p.grad.numpy(), **tol)
            getattr(layer, name)[...] -= 0.1 * grad
            with torch.no_grad():
                p -= 0.1 * p.grad
            p.grad = None
    for k, v in ref.state_dict().items():
        np.testing.assert_allclose(layer.state_dict()[k], v.numpy(), **tol)
    assert set(layer.state_dict()) == set(ref.state_dict())


def test_group_norm_channels_last_and_eval_mode():
    """``axis=-1`` on a channels-last copy gives the NCHW result; eval mode is
    the same computation (no running statistics)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 8, 3, 5))
    a = nbnorm.GroupNorm(4, 8, dtype=np.float64)
    b = nbnorm.GroupNorm(4, 8, axis=-1, dtype=np.float64)
    ya = a(x).copy()
    yb = b(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(yb.transpose(0, 3, 1, 2), ya, **F64)
    a.eval()
    np.testing.assert_array_equal(a(x), ya)


@pytest.mark.parametrize("case", ["group", "layer", "rms"])
def test_fused_relu_residual(case):
    """``activation="relu"`` with a residual is ``relu(norm(x) + r)`` through
    autograd, ``grad_residual`` included."""
    make, make_torch, shape = CASES[case]
    rng = np.random.default_rng(2)
    ref = make_torch(torch.float64)
    _randomize(ref, rng)
    layer = type(make(np.float64))(*_ctor_args(case), dtype=np.float64, activation="relu")
    layer.load_state_dict(ref.state_dict())
    x, r, dy = (rng.standard_normal(shape) for _ in range(3))
    xt = torch.from_numpy(x).requires_grad_()
    rt = torch.from_numpy(r).requires_grad_()
    yt = torch.relu(ref(xt) + rt)
    yt.backward(torch.from_numpy(dy))
    y = layer(x, residual=r)
    dx = layer.backward(dy)
    np.testing.assert_allclose(y, yt.detach().numpy(), **F64)
    np.testing.assert_allclose(dx, xt.grad.numpy(), **F64)
    np.testing.assert_allclose(layer.grad_residual, rt.grad.numpy(), **F64)
    np.testing.assert_allclose(layer.grad_weight, ref.weight.grad.numpy(), **F64)


def _ctor_args(case):
    return {"group": (4, 8), "layer": ((5, 4),), "rms": (16,)}[case]


def test_state_dict_into_torch():
    """Weights trained in the NumPy layer load into the torch module."""
    rng = np.random.default_rng(3)
    layer = nbnorm.LayerNorm(6, dtype=np.float64)
    x = rng.standard_normal((4, 6))
    layer(x)
    layer.backward(rng.standard_normal((4, 6)))
    layer.weight -= layer.grad_weight
    layer.bias -= layer.grad_bias
    ref = torch.nn.LayerNorm(6, dtype=torch.float64)
    ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in layer.state_dict().items()})
    np.testing.assert_allclose(ref(torch.from_numpy(x)).detach().numpy(), layer(x), **F64)


def test_buffers_are_reused_and_nothing_proportional_to_x_is_allocated():
    rng = np.random.default_rng(4)
    layer = nbnorm.GroupNorm(4, 32)
    x = rng.standard_normal((8, 32, 16, 16)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y1, d1 = layer(x), layer.backward(dy)
    tracemalloc.start()
    try:
        y2, d2 = layer(x), layer.backward(dy)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert y2 is y1 and d2 is d1
    assert peak < x.nbytes // 8, peak


def test_bad_input_changes_nothing():
    rng = np.random.default_rng(5)
    layer = nbnorm.GroupNorm(2, 4, dtype=np.float64)
    with pytest.raises(RuntimeError, match="forward"):
        layer.backward(np.ones((2, 4, 3)))
    x = rng.standard_normal((2, 4, 3))
    y = layer(x).copy()
    with pytest.raises(ValueError, match="channels"):
        layer(rng.standard_normal((2, 6, 3)))
    with pytest.raises(ValueError):  # grad_out of another shape: the pending call survives
        layer.backward(np.ones((2, 4, 4)))
    layer.backward(np.ones_like(x))
    before = {k: v.copy() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="shape"):
        layer.load_state_dict({"weight": np.full(4, 2.0), "bias": np.zeros(5)})
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    np.testing.assert_array_equal(layer(x), y)
    with pytest.raises(ValueError, match="divisor"):
        nbnorm.GroupNorm(3, 4)
    with pytest.raises(ValueError, match="trailing"):
        nbnorm.LayerNorm(5)(np.ones((2, 4)))
    with pytest.raises(TypeError):
        nbnorm.RMSNorm("8")
