"""Other frameworks' batch-norm conventions as nbnorm arguments (docs/conventions.md,
"Other frameworks' conventions").

Each framework's published update is written out below in float64 NumPy from
its source or specification (cited at each), and a few training steps of
``nbnorm.forward`` with the table's arguments must reproduce its outputs and
running statistics, then its inference output.  The frameworks themselves are
not needed.
"""

import numpy as np
import pytest

import nbnorm
from helpers import use_path

AXES = {"channels_first": 1, "channels_last": -1}


def _stats(x, axis):
    """Batch mean and the biased and unbiased variances per channel, float64."""
    x2 = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
    mean = x2.mean(axis=1)
    var = ((x2 - mean[:, None]) ** 2).mean(axis=1)
    n = x2.shape[1]
    return mean, var, var * n / (n - 1)


def _per_channel(v, x, axis):
    shape = [1] * x.ndim
    shape[axis] = -1
    return v.reshape(shape)


def _normalized(x, mean, var, eps, gamma, beta, axis):
    """``(x - mean) / sqrt(var + eps) * gamma + beta``: every framework's output."""
    return ((x - _per_channel(mean, x, axis)) / np.sqrt(_per_channel(var, x, axis) + eps)
            * _per_channel(gamma, x, axis) + _per_channel(beta, x, axis))


def keras3(x, state, step, m=0.99, eps=1e-3, axis=-1):
    """keras/src/layers/normalization/batch_normalization.py (Keras 3),
    ``BatchNormalization.call`` with ``training=True``: ``mean, variance =
    ops.moments(inputs, axes=reduction_axes)`` (the population variance), then
    ``moving_mean * momentum + mean * (1.0 - momentum)`` and
    ``moving_variance * momentum + variance * (1.0 - momentum)``; the output
    uses the batch ``mean``/``variance`` and ``epsilon`` (default 1e-3)."""
    mean, var, _ = _stats(x, axis)
    rm, rv = state
    return mean, var, (rm * m + mean * (1.0 - m), rv * m + var * (1.0 - m))


def onnx15(x, state, step, m=0.9, eps=1e-5, axis=1):
    """ONNX operator BatchNormalization-15, ``training_mode=1``:
    ``running_mean = input_mean * momentum + current_mean * (1 - momentum)``,
    ``running_var = input_var * momentum + current_var * (1 - momentum)``,
    ``Y = (X - current_mean) / sqrt(current_var + epsilon) * scale + B`` with
    ``current_var = ReduceVar(X)``, "the population variance ...
    sum(sqrd(x_i - x_avg)) / N"."""
    mean, var, _ = _stats(x, axis)
    rm, rv = state
    return mean, var, (rm * m + mean * (1 - m), rv * m + var * (1 - m))


def cudnn_cumulative(x, state, step, eps=1e-5, axis=1):
    """cuDNN ``cudnnBatchNormalizationForwardTraining`` (cudnn.h): "Use a
    factor=1/(1+n) at N-th call to the function to get Cumulative Moving
    Average (CMA) behavior", ``runningMean = newMean*factor +
    runningMean*(1-factor)``, the variance averaged "in the same way"; the
    variance it averages has Bessel's correction (as TensorFlow's Keras 2 layer
    notes, "the variance computed by fused batch norm is with Bessel's
    correction", and as PyTorch's cuDNN path keeps its unbiased running_var)."""
    mean, var, unbiased = _stats(x, axis)
    f = 1.0 / (1 + step)
    rm, rv = state
    return mean, var, (mean * f + rm * (1 - f), unbiased * f + rv * (1 - f))


def flax_linen(x, state, step, m=0.99, eps=1e-5, axis=-1):
    """flax/linen/normalization.py, ``BatchNorm.__call__`` with
    ``use_running_average=False``: ``mean, var = _compute_stats(x, ...)``
    (``E[x**2] - E[x]**2`` clipped at 0, or ``mean(|x - mean|**2)``: the
    population variance either way), ``ra_mean = momentum * ra_mean + (1 -
    momentum) * mean``, ``ra_var = momentum * ra_var + (1 - momentum) * var``;
    ``epsilon`` default 1e-5, ``axis`` -1."""
    mean, var, _ = _stats(x, axis)
    rm, rv = state
    return mean, var, (m * rm + (1 - m) * mean, m * rv + (1 - m) * var)


#: framework -> (its update, the nbnorm arguments of docs/conventions.md's table, given
#: the framework's momentum ``m``, its epsilon and the step number ``n``, from 0).
CONVENTIONS = {
    "keras3": (keras3, dict(m=0.99, eps=1e-3, axis=-1),
               lambda m, n: dict(momentum=1 - m, unbiased=False)),
    "onnx": (onnx15, dict(m=0.9, eps=1e-5, axis=1),
             lambda m, n: dict(momentum=1 - m, unbiased=False)),
    "cudnn-cumulative": (cudnn_cumulative, dict(eps=1e-5, axis=1),
                         lambda m, n: dict(momentum=1 / (1 + n), unbiased=True)),
    "flax": (flax_linen, dict(m=0.99, eps=1e-5, axis=-1),
             lambda m, n: dict(momentum=1 - m, unbiased=False)),
}


@pytest.mark.parametrize("momentum", [None, 0.7])
@pytest.mark.parametrize("name", list(CONVENTIONS))
def test_nbnorm_arguments_reproduce_the_framework(rng, name, momentum):
    """Four training steps, then inference: outputs and running statistics as the
    framework computes them (its default momentum, and another one)."""
    update, defaults, arguments = CONVENTIONS[name]
    kw = dict(defaults)
    if momentum is not None and "m" in kw:
        kw["m"] = momentum
    axis, eps, m = kw["axis"], kw["eps"], kw.get("m")
    shape = (5, 3, 4, 6) if axis == 1 else (5, 4, 6, 3)
    C = shape[axis]
    gamma, beta = rng.uniform(0.5, 1.5, C), rng.uniform(-1, 1, C)
    state = (rng.uniform(-1, 1, C), rng.uniform(0.5, 2, C))  # any starting statistics
    running_mean, running_var = state[0].copy(), state[1].copy()
    means = []
    for step in range(4):
        x = rng.standard_normal(shape) * rng.uniform(0.5, 3) + rng.uniform(-3, 3)
        mean, var, state = update(x, state, step, **kw)
        means.append(mean)
        res = nbnorm.forward(x, gamma, beta, running_mean, running_var, eps=eps, axis=axis,
                             **arguments(m, step))
        np.testing.assert_allclose(res.out, _normalized(x, mean, var, eps, gamma, beta, axis),
                                   rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(running_mean, state[0], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(running_var, state[1], rtol=1e-12)
    out = nbnorm.forward(x, gamma, beta, running_mean, running_var, eps=eps, axis=axis,
                         training=False).out
    np.testing.assert_allclose(out, _normalized(x, *state, eps, gamma, beta, axis),
                               rtol=1e-12, atol=1e-12)
    if name == "cudnn-cumulative":  # the cumulative average of every batch so far
        np.testing.assert_allclose(running_mean, np.mean(means, axis=0), rtol=1e-12)


def test_pytorch_is_the_default(rng):
    """The default arguments are PyTorch's (``momentum=m``, the unbiased running
    variance), ``momentum=None`` its cumulative ``1 / num_batches_tracked``."""
    torch = pytest.importorskip("torch")
    C = 3
    for m in (0.1, None):
        bn = torch.nn.BatchNorm2d(C, momentum=m, dtype=torch.float64)
        rm, rv = np.zeros(C), np.ones(C)
        for step in range(3):
            x = rng.standard_normal((4, C, 3, 5)) * 2 + 1
            bn(torch.from_numpy(x))
            nbnorm.forward(x, None, None, rm, rv, momentum=0.1 if m else 1 / (1 + step))
            np.testing.assert_allclose(rm, bn.running_mean.numpy(), rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(rv, bn.running_var.numpy(), rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("path", ["serial", "fused", "parallel"])
def test_unbiased_false_on_every_training_path(rng, monkeypatch, path, dtype):
    """``unbiased`` is one argument of the one running update: serial, fused and
    parallel paths, and float16 running statistics (updated by NumPy)."""
    use_path(monkeypatch, path)
    shape = (5, 3, 7) if path == "fused" else (9, 3)
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    _, var, unbiased = _stats(x.astype(np.float64), 1)
    for flag, expected in ((False, var), (True, unbiased)):
        for rdt in (dtype, np.float16):
            rm, rv = np.zeros(3, rdt), np.ones(3, rdt)
            nbnorm.forward(x, None, None, rm, rv, momentum=1.0, unbiased=flag)
            rtol = 1e-3 if rdt == np.float16 else (1e-6 if dtype == np.float32 else 1e-12)
            np.testing.assert_allclose(rv, expected, rtol=rtol)
