"""nbnorm.cuda.norms under the simulator: every norm against the CPU kernels
(which tests/test_norms.py checks against nbnorm.reference) on tiny shapes."""

import numpy as np
import pytest
from numba import cuda

import nbnorm.norms as nn


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
