"""Group, layer, instance and RMS normalization on the GPU: the entry points of
``nbnorm.cpu.norms`` (same semantics) over the group view ``x[N, S, G, K, R]``.

One block per unit ``u = n * G + g`` (statistics over its ``S * K * R`` values),
threads striding over the unit's flat index ``j = (s * K + k) * R + r``: for
``S == 1`` (planar) consecutive threads read consecutive addresses.  Sums are
float64 for every dtype (``convert.codec`` loads half data exactly) and merged
by ``_device.reducers``' block tree (warp shuffles where available, shared
memory on the simulator).  Statistics are two-pass (mean, then squared
deviations from it), never ``E[x^2] - E[x]^2``.  No float atomics and a fixed
merge order: the results are the same on every run.
"""

import functools
import math

import numpy as np
from numba import cuda, float64

from . import convert
from .per_channel import math as pcm
from ._device import launch_params, reducers
from .arrays import as_stream


# Bound to globals: a kernel compiled for a GPU resolves device functions by
# global name (attributes of a namespace are not typed; the simulator, which
# runs Python, would not notice).
_invrms = pcm.invrms
_invstd = pcm.invstd
_relu = pcm.relu
_running_update = pcm.running_update

@cuda.jit(device=True)
def _everyone(a, b, t, sa, sb):
    """Thread 0's ``(a, b)`` (a block sum, valid there) in every thread."""
    cuda.syncthreads()
    if t == 0:
        sa[0] = a
        sb[0] = b
    cuda.syncthreads()
    a = sa[0]
    b = sb[0]
    cuda.syncthreads()
    return a, b


@cuda.jit(device=True)
def _unit(x):
    """This block's unit of the group view ``x[N, S, G, K, R]``: ``(n, g)``, the
    unit's size ``L = S * K * R`` and ``K * R``."""
    N, S, G, K, R = x.shape
    u = cuda.blockIdx.x
    n = u // G
    return n, u - n * G, S * K * R, K * R


@cuda.jit(device=True)
def _at(j, KR, R):
    """``(s, k, r)`` of a unit's flat index ``j = (s * K + k) * R + r``."""
    s = j // KR
    q = j - s * KR
    k = q // R
    return s, k, q - k * R


def _kind(a):
    return None if a is None else convert.kind(a.dtype)


@functools.lru_cache(maxsize=None)
def _forward_kernel(tpb, shuffle, xk, ok, rk, pk, has_w, has_b, has_res, relu, given, rms):
    """The forward kernel for one configuration (storage kinds of x, out, residual,
    parameters; flags)."""
    _, block_sum2 = reducers(tpb, shuffle)
    load_x = convert.codec(xk)[0]
    store_o = convert.codec(ok)[1]
    load_r = convert.codec(rk or "float64")[0]
    load_p = convert.codec(pk)[0]

    @cuda.jit
    def kernel(x, w, b, res, gm, gv, eps, out, mu_out, m2_out, inv_out):
        n, g, L, KR = _unit(x)
        K = x.shape[3]
        R = x.shape[4]
        t = cuda.threadIdx.x
        sa = cuda.shared.array(tpb, float64)
        sb = cuda.shared.array(tpb, float64)
        if given:
            mu = float64(gm[g])
            inv = _invstd(float64(gv[g]), 1.0, eps)
        else:
            acc = 0.0
            for j in range(t, L, tpb):
                s, k, r = _at(j, KR, R)
                acc += load_x(x[n, s, g, k, r])
            tot, _ = block_sum2(acc, 0.0, t, 1, sa, sb)
            tot, _ = _everyone(tot, 0.0, t, sa, sb)
            m = tot / L
            acc = 0.0
            for j in range(t, L, tpb):
                s, k, r = _at(j, KR, R)
                d = load_x(x[n, s, g, k, r]) - m
                acc += d * d
            m2, _ = block_sum2(acc, 0.0, t, 1, sa, sb)
            m2, _ = _everyone(m2, 0.0, t, sa, sb)
            if rms:
                inv = _invrms(m, m2, L, eps)
                mu = 0.0
            else:
                inv = _invstd(m2, L, eps)
                mu = m
            if t == 0:
                mu_out[n, g] = m
                m2_out[n, g] = m2
        if t == 0:
            inv_out[n, g] = inv
        for j in range(t, L, tpb):
            s, k, r = _at(j, KR, R)
            c = g * K + k
            sc = inv * load_p(w[c]) if has_w else inv
            v = (load_x(x[n, s, g, k, r]) - mu) * sc
            if has_b:
                v += load_p(b[c])
            if has_res:
                v += load_r(res[n, s, g, k, r])
            if relu:
                v = _relu(v)
            out[n, s, g, k, r] = store_o(v)

    return kernel


@functools.lru_cache(maxsize=None)
def _backward_kernels(tpb, shuffle, xk, gk, pk, has_w, has_mask, has_gres, rms, training,
                      has_gw):
    """``(grad_input, grad_params)`` kernels for one configuration."""
    _, block_sum2 = reducers(tpb, shuffle)
    load_x = convert.codec(xk)[0]
    store_x = convert.codec(xk)[1]
    load_p = convert.codec(pk)[0]

    @cuda.jit(device=True)
    def masked(dy, fo, n, s, g, k, r):
        d = load_x(dy[n, s, g, k, r])
        if has_mask and not load_x(fo[n, s, g, k, r]) > 0.0:
            d = 0.0
        return d

    @cuda.jit
    def grad_input(dy, fo, x, mean, invstd, w, dx, gres):
        n, g, L, KR = _unit(x)
        K = x.shape[3]
        R = x.shape[4]
        t = cuda.threadIdx.x
        sa = cuda.shared.array(tpb, float64)
        sb = cuda.shared.array(tpb, float64)
        mu = 0.0 if rms else float64(mean[n, g])
        inv = float64(invstd[n, g])
        a = 0.0
        bb = 0.0
        if training:
            s1 = 0.0
            s2 = 0.0
            for j in range(t, L, tpb):
                s, k, r = _at(j, KR, R)
                gv = masked(dy, fo, n, s, g, k, r)
                if has_w:
                    gv *= load_p(w[g * K + k])
                s1 += gv
                s2 += gv * (load_x(x[n, s, g, k, r]) - mu) * inv
            s1, s2 = block_sum2(s1, s2, t, 1, sa, sb)
            s1, s2 = _everyone(s1, s2, t, sa, sb)
            a = 0.0 if rms else s1 / L
            bb = s2 / L
        for j in range(t, L, tpb):
            s, k, r = _at(j, KR, R)
            d = masked(dy, fo, n, s, g, k, r)
            if has_gres:
                gres[n, s, g, k, r] = store_x(d)
            gv = d * load_p(w[g * K + k]) if has_w else d
            dx[n, s, g, k, r] = store_x(
                inv * (gv - a - (load_x(x[n, s, g, k, r]) - mu) * inv * bb))

    @cuda.jit
    def grad_params(dy, fo, x, mean, invstd, gw, gb):
        # one block per channel c = g * K + k, over its N * S * R values
        N, S, G, K, R = x.shape
        c = cuda.blockIdx.x
        g = c // K
        k = c - g * K
        t = cuda.threadIdx.x
        SR = S * R
        sa = cuda.shared.array(tpb, float64)
        sb = cuda.shared.array(tpb, float64)
        s1 = 0.0
        s2 = 0.0
        for j in range(t, N * SR, tpb):
            n = j // SR
            q = j - n * SR
            s = q // R
            r = q - s * R
            d = masked(dy, fo, n, s, g, k, r)
            mu = 0.0 if rms else float64(mean[n, g])
            s1 += d
            s2 += d * (load_x(x[n, s, g, k, r]) - mu) * float64(invstd[n, g])
        s1, s2 = block_sum2(s1, s2, t, 1, sa, sb)
        if t == 0:
            gw[c] = s2
            if has_gw:
                gb[c] = s1

    return grad_input, grad_params


def _dummy(stream):
    return cuda.device_array(1, np.float64, stream=stream)


def forward(x, weight, bias, eps, rms, out, mean, invstd, residual=None, relu=False,
            given=None, stream=None):
    """``nbnorm.cpu.norms.forward`` on device arrays: returns device float64
    ``(mean, M2)`` of shape ``(N, G)`` (None with ``given``)."""
    st = as_stream(stream)
    tpb, shuffle, _ = launch_params()
    N, S, G, K, R = x.shape
    pk = convert.param_kind((weight if weight is not None else bias).dtype) if (
        weight is not None or bias is not None) else "float"
    kern = _forward_kernel(tpb, shuffle, _kind(x), _kind(out), _kind(residual), pk,
                           weight is not None, bias is not None, residual is not None,
                           bool(relu), given is not None, bool(rms))
    d = _dummy(st)
    mu = cuda.device_array((N, G), np.float64, stream=st)
    m2 = cuda.device_array((N, G), np.float64, stream=st)
    gm, gv = given if given is not None else (d, d)
    inv = invstd
    kern[N * G, tpb, st](x, d if weight is None else weight, d if bias is None else bias,
                         d if residual is None else residual, gm, gv, float(eps), out,
                         mu, m2, inv)
    if mean is not None:
        if given is not None:
            _fill_mean[G * N, 1, st](gm, mean)
        else:
            _copy2[N, 1, st](mu, mean)
    return None if given is not None else (mu, m2)


@cuda.jit
def _copy2(a, b):
    n = cuda.blockIdx.x
    for g in range(a.shape[1]):
        b[n, g] = a[n, g]


@cuda.jit
def _fill_mean(gm, mean):
    u = cuda.blockIdx.x
    G = mean.shape[1]
    n = u // G
    mean[n, u - n * G] = gm[u - n * G]


@cuda.jit
def _running(mu, m2, n, momentum, rm, rv):
    """Per group: the batch averages of the instances' means and unbiased variances."""
    g = cuda.blockIdx.x
    N = mu.shape[0]
    sm = 0.0
    sv = 0.0
    for i in range(N):
        sm += mu[i, g]
        sv += m2[i, g]
    new_mean, new_var = _running_update(float64(rm[g]), float64(rv[g]), momentum, sm / N,
                                           sv / N, n, 1.0)
    rm[g] = new_mean
    rv[g] = new_var


def running_update(moments, n, momentum, running_mean, running_var, stream=None):
    """``nbnorm.cpu.norms.running_update`` on device arrays."""
    mu, m2 = moments
    _running[mu.shape[1], 1, as_stream(stream)](mu, m2, float(n), float(momentum),
                                                running_mean, running_var)


def backward(dy, x, mean, invstd, weight, rms, training, grad_input, grad_weight, grad_bias,
             forward_out=None, grad_residual=None, stream=None):
    """``nbnorm.cpu.norms.backward`` on device arrays."""
    st = as_stream(stream)
    tpb, shuffle, _ = launch_params()
    N, S, G, K, R = x.shape
    pk = "float" if weight is None else convert.param_kind(weight.dtype)
    gi, gp = _backward_kernels(tpb, shuffle, _kind(x), _kind(dy), pk, weight is not None,
                               forward_out is not None, grad_residual is not None, bool(rms),
                               bool(training), grad_bias is not None)
    d = _dummy(st)
    d2 = cuda.device_array((1, 1), np.float64, stream=st)
    mean = d2 if mean is None else mean
    fo = x if forward_out is None else forward_out
    if grad_weight is not None:
        gp[G * K, tpb, st](dy, fo, x, mean, invstd, grad_weight.reshape(G * K),
                           d if grad_bias is None else grad_bias.reshape(G * K))
    gi[N * G, tpb, st](dy, fo, x, mean, invstd, d if weight is None else weight.reshape(G * K),
                       grad_input, x if grad_residual is None else grad_residual)
