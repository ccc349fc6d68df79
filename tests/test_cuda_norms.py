"""nbnorm.cuda.norms under the simulator: every norm against the CPU kernels
(which tests/test_norms.py checks against nbnorm.reference) on tiny shapes."""

import numpy as np
import pytest
from numba import cuda

import nbnorm.norms as nn
from nbnorm import config


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """32 threads a block: the simulator runs each thread as a Python thread
    (256 made these tests take minutes), and a unit of more than 32 values
    still spans several threads' strides and the block reduction."""
    monkeypatch.setattr(config, "CUDA_THREADS", 32)


def _host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


def _close(dev, cpu, tol=1e-12):
    np.testing.assert_allclose(_host(dev), np.asarray(cpu), rtol=tol, atol=tol)


@pytest.mark.parametrize("axis, shape", [(1, (2, 6, 3, 2)), (-1, (2, 3, 2, 6))])
def test_group_norm_matches_cpu(rng, axis, shape):
    x = rng.standard_normal(shape) + 3
    w, b = rng.standard_normal(6), rng.standard_normal(6)
    c = nn.group_norm(x, 3, w, b, axis=axis)
    d = nn.group_norm(cuda.to_device(x), 3, cuda.to_device(w), cuda.to_device(b), axis=axis)
    for f in ("out", "mean", "invstd"):
        _close(getattr(d, f), getattr(c, f))
    dy = rng.standard_normal(shape)
    cb = nn.group_norm_backward(dy, x, c.mean, c.invstd, w, axis=axis)
    db = nn.group_norm_backward(cuda.to_device(dy), cuda.to_device(x), d.mean, d.invstd,
                                cuda.to_device(w), axis=axis)
    for f in cb._fields:
        _close(getattr(db, f), getattr(cb, f))


def test_layer_and_rms_norm_match_cpu(rng):
    x = rng.standard_normal((3, 4, 5))
    w, b = rng.standard_normal(5), rng.standard_normal(5)
    c = nn.layer_norm(x, (5,), w, b)
    d = nn.layer_norm(cuda.to_device(x), (5,), cuda.to_device(w), cuda.to_device(b))
    _close(d.out, c.out)
    c = nn.rms_norm(x, (5,), w)
    d = nn.rms_norm(cuda.to_device(x), (5,), cuda.to_device(w))
    _close(d.out, c.out)
    dy = rng.standard_normal(x.shape)
    cb = nn.rms_norm_backward(dy, x, c.invrms, w)
    db = nn.rms_norm_backward(cuda.to_device(dy), cuda.to_device(x), d.invrms, cuda.to_device(w))
    for f in cb._fields:
        _close(getattr(db, f), getattr(cb, f))


def test_instance_norm_running_stats_match_cpu(rng):
    x = rng.standard_normal((2, 3, 4, 4))
    rm, rv = np.zeros(3), np.ones(3)
    c = nn.instance_norm(x, running_mean=rm, running_var=rv, use_input_stats=True)
    drm, drv = cuda.to_device(np.zeros(3)), cuda.to_device(np.ones(3))
    d = nn.instance_norm(cuda.to_device(x), running_mean=drm, running_var=drv,
                         use_input_stats=True)
    _close(d.out, c.out)
    _close(drm, rm)
    _close(drv, rv)


def test_half_data_with_fused_relu_residual_match_cpu(rng):
    """float16 data, ``relu(gn(x) + r)`` forward and the masked backward with
    ``grad_residual``: the device and the CPU agree to the half format's rounding
    (each rounds once from its own arithmetic, so a value may differ by an ulp)."""
    shape = (2, 4, 3, 2)
    x, r, dy = (rng.standard_normal(shape).astype(np.float16) for _ in range(3))
    w, b = rng.standard_normal(4).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    c = nn.group_norm(x, 2, w, b, activation="relu", residual=r)
    d = nn.group_norm(cuda.to_device(x), 2, cuda.to_device(w), cuda.to_device(b),
                      activation="relu", residual=cuda.to_device(r))
    assert _host(d.out).dtype == np.float16 and _host(d.mean).dtype == np.float32
    _close(d.out.copy_to_host().astype(np.float64), c.out.astype(np.float64), 2e-3)
    _close(d.invstd, c.invstd, 1e-6)
    gres_c, gres_d = np.empty_like(x), cuda.device_array(shape, np.float16)
    cb = nn.group_norm_backward(dy, x, c.mean, c.invstd, w, activation="relu",
                                forward_out=c.out, grad_residual=gres_c)
    db = nn.group_norm_backward(cuda.to_device(dy), cuda.to_device(x), d.mean, d.invstd,
                                cuda.to_device(w), activation="relu", forward_out=d.out,
                                grad_residual=gres_d)
    mask_agrees = (c.out > 0) == (_host(d.out) > 0)
    assert mask_agrees.mean() > 0.9
    np.testing.assert_array_equal(_host(gres_d)[mask_agrees], gres_c[mask_agrees])
    if mask_agrees.all():
        _close(db.grad_input.copy_to_host().astype(np.float64),
               cb.grad_input.astype(np.float64), 1e-2)
        _close(db.grad_weight, cb.grad_weight, 1e-3)


def test_bad_input_on_the_device_writes_nothing(rng):
    x = rng.standard_normal((2, 4, 3))
    out = cuda.to_device(np.full(x.shape, 7.0))
    dx = cuda.to_device(x)
    with pytest.raises(TypeError):  # a residual of another dtype
        nn.layer_norm(dx, 3, out=out, residual=cuda.to_device(x.astype(np.float32)))
    with pytest.raises(TypeError):  # host and device arrays in one call
        nn.layer_norm(dx, 3, np.ones(3), out=out)
    with pytest.raises(ValueError):  # num_groups that does not divide C
        nn.group_norm(dx, 3, out=out)
    with pytest.raises(ValueError):  # an unknown activation
        nn.rms_norm(dx, 3, activation="gelu", out=out)
    np.testing.assert_array_equal(out.copy_to_host(), 7.0)
