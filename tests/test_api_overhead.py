"""``nbnorm.api``'s per-call work: what it allocates and how it dispatches.

- ``out`` / ``grad_input`` that nbnorm allocates take ``x``'s memory order
  (PyTorch's ``preserve_format``), so the kernels write them through a view, and
  the values are bitwise those written into a C-order buffer through a temporary.
- A call with plain ``numpy.ndarray`` arguments decides "host" once, without
  probing every array for ``__cuda_array_interface__`` (the per-call overhead of
  small batches; timings are in docs/performance.md, not asserted here: the test machine
  is shared).
"""

import numpy as np
import pytest

import nbnorm
from nbnorm import api, layout
from helpers import as_memory, assert_same, channel, data, positive

PERMUTED_KINDS = ["fortran", "channels_last", "transposed"]
SHAPES = [((4, 3, 5, 6), 1), ((5, 6, 4, 3), -1), ((7, 5), 1), ((3, 4, 5, 6), 2),
          ((4, 3, 5), 1)]
SHAPE_IDS = ["NCHW", "NHWC", "NC", "mid-axis", "NCL"]


def _memory_order(a):
    """The axes of length > 1 from the largest stride to the smallest."""
    axes = [i for i in range(a.ndim) if a.shape[i] > 1]
    return sorted(axes, key=lambda i: -abs(a.strides[i]))


def _calls(x, axis, rng):
    """(name, allocated output, the same call writing a preallocated C-order buffer)."""
    C = x.shape[axis]
    dt = x.dtype
    w, b = channel(rng, C, dt), channel(rng, C, dt)
    rm, rv = channel(rng, C, dt), positive(rng, C, dt)
    dy = as_memory(data(rng, x.shape, dt), "fortran", axis)  # another order than x's
    fwd = nbnorm.forward(x, w, b, rm.copy(), rv.copy(), axis=axis)
    c_out = np.empty(x.shape, dt)
    nbnorm.forward(x, w, b, rm.copy(), rv.copy(), axis=axis, out=c_out)
    yield "forward", fwd.out, c_out
    inf = nbnorm.forward(x, w, b, rm, rv, training=False, axis=axis)
    c_out = np.empty(x.shape, dt)
    nbnorm.forward(x, w, b, rm, rv, training=False, axis=axis, out=c_out)
    yield "inference", inf.out, c_out
    for training in (True, False):
        g = nbnorm.backward(dy, x, fwd.mean, fwd.invstd, w, training=training, axis=axis)
        c_out = np.empty(x.shape, dt)
        nbnorm.backward(dy, x, fwd.mean, fwd.invstd, w, training=training, axis=axis,
                        grad_input=c_out)
        yield f"backward(training={training})", g.grad_input, c_out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", PERMUTED_KINDS)
@pytest.mark.parametrize("shape,axis", SHAPES, ids=SHAPE_IDS)
def test_allocated_outputs_keep_x_memory_order(rng, shape, axis, kind, dtype):
    x = as_memory(data(rng, shape, dtype), kind, axis)
    for name, out, c_out in _calls(x, axis, rng):
        assert type(out) is np.ndarray and out.dtype == x.dtype, name
        assert _memory_order(out) == _memory_order(x), f"{name}: {out.strides} vs {x.strides}"
        lay = layout.plan(x, axis % x.ndim)
        assert layout.output_view(out, lay)[1] is layout._nothing, f"{name}: a temporary"
        assert_same(out, c_out, name)


@pytest.mark.parametrize("kind", ["stepped", "reversed"])
@pytest.mark.parametrize("shape,axis", SHAPES, ids=SHAPE_IDS)
def test_allocated_outputs_of_strided_x_are_c_order(rng, shape, axis, kind):
    """x with gaps or negative strides is read through a C-order copy: the output
    is allocated in C order, the order of that canonical view."""
    x = as_memory(data(rng, shape, np.float32), kind, axis)
    for name, out, c_out in _calls(x, axis, rng):
        assert out.flags.c_contiguous, name
        assert_same(out, c_out, name)


@pytest.mark.parametrize("kind", PERMUTED_KINDS)
def test_allocated_out_strides_match_torch_preserve_format(rng, kind):
    torch = pytest.importorskip("torch")
    for shape, axis in SHAPES:
        x = as_memory(data(rng, shape, np.float32), kind, axis)
        t = torch.empty_like(torch.from_numpy(x))  # memory_format=torch.preserve_format
        expected = tuple(s * x.itemsize for s in t.stride())
        assert nbnorm.forward(x, axis=axis).out.strides == expected
        r = nbnorm.forward(x, axis=axis)
        assert nbnorm.backward(x, x, r.mean, r.invstd, axis=axis).grad_input.strides == expected


def test_host_arrays_are_not_probed_for_a_device(rng, monkeypatch):
    """Plain ndarrays are host arrays without a ``__cuda_array_interface__`` probe
    (the device is decided once per call, not by every helper for every array)."""
    probes = []
    on_device = api._on_device

    def counting(a):
        probes.append(type(a).__name__)
        return on_device(a)

    monkeypatch.setattr(api, "_on_device", counting)
    x = data(rng, (8, 4), np.float32)
    w, b, rm, rv = (channel(rng, 4, np.float32) for _ in range(4))
    rv = np.abs(rv) + 0.5
    r = nbnorm.forward(x, w, b, rm, rv)
    nbnorm.forward(x, w, b, rm, rv, training=False)
    nbnorm.forward(x, out=np.empty_like(x), mean=np.empty(4, np.float32),
                   invstd=np.empty(4, np.float32))
    nbnorm.backward(x, x, r.mean, r.invstd, w)
    assert probes == []
    # Anything else is probed (once per array, by the backend choice), then runs
    # on the host as before.
    res = nbnorm.forward(x.tolist(), w.tolist())
    assert probes == ["list", "list"]
    assert_same(res.out, nbnorm.forward(x.astype(np.float64), w.astype(np.float64)).out)
