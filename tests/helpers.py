"""Test helpers: data, layouts, tolerances and the PyTorch oracle.

Imported by the test modules as ``helpers`` (pytest puts ``tests/`` on the path).
"""

import numpy as np

DTYPES = [np.float32, np.float64]

#: Against ``nbnorm.reference`` on the *same* data: both compute in float64, so
#: only the final rounding to the output dtype and summation order differ.
REF_TOL = {np.dtype(np.float32): dict(rtol=2e-6, atol=2e-6),
           np.dtype(np.float64): dict(rtol=1e-11, atol=1e-11)}

#: Against PyTorch, which accumulates float32 data in float32 on the CPU.
TORCH_TOL = {np.dtype(np.float32): dict(rtol=1e-4, atol=1e-4),
             np.dtype(np.float64): dict(rtol=1e-10, atol=1e-10)}

#: (id, shape, axis): the layouts of DESIGN.md, middle and negative axes, odd sizes.
LAYOUTS = [
    ("NC", (16, 5), 1),
    ("NCL", (4, 3, 7), 1),
    ("NCHW", (3, 4, 5, 6), 1),
    ("NCDHW", (2, 3, 4, 3, 5), 1),
    ("NHWC", (3, 5, 4, 6), -1),
    ("mid-axis2of4", (3, 4, 5, 6), 2),
    ("axis0", (6, 9), 0),
    ("axis-2", (4, 5, 3), -2),
    ("C1-planar", (8, 1, 5), 1),
    ("C1-NC", (9, 1), 1),
    ("primes", (7, 13, 11), 1),
    ("outer2", (2, 7, 13), 1),
    ("inner1", (13, 7, 1), 1),
    ("outer1", (1, 5, 9), 1),
    ("wide-C-NC", (3, 257), 1),
    ("wide-C-planar", (2, 300, 3), 1),
]
LAYOUT_IDS = [name for name, _, _ in LAYOUTS]
LAYOUT_PARAMS = [(shape, axis) for _, shape, axis in LAYOUTS]


def data(rng, shape, dtype, loc=None, scale=None):
    """Random, never-zero test data with a random offset and spread."""
    loc = rng.uniform(-2.0, 2.0) if loc is None else loc
    scale = rng.uniform(0.5, 3.0) if scale is None else scale
    return (rng.standard_normal(shape) * scale + loc).astype(dtype)


def channel(rng, C, dtype, low=-1.5, high=1.5):
    """A random per-channel vector (weight, bias, running mean)."""
    return rng.uniform(low, high, C).astype(dtype)


def positive(rng, C, dtype):
    """A random positive per-channel vector (running variance)."""
    return rng.uniform(0.3, 2.5, C).astype(dtype)


def n_channels(shape, axis):
    return shape[axis]


def assert_close(actual, expected, tol, what=""):
    actual = np.asarray(actual)
    np.testing.assert_allclose(actual.astype(np.float64), np.asarray(expected, np.float64),
                               err_msg=what, **tol)


def assert_same(a, b, what=""):
    """Bitwise equality (NaNs included) of two arrays of the same dtype."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes(), what


# ------------------------------------------------------------- kernel paths

#: ``nbnorm.cpu.ops`` picks a kernel family by shape (``nbnorm.config``): one
#: serial kernel for small batches, a fused reduce+finish task per planar
#: channel, or a parallel reduction then a parallel elementwise pass, which for
#: planar batches of short runs normalizes rows of ``C * inner`` values
#: ("rows").  These settings force each path on any shape, so small test arrays
#: reach them all (an interleaved batch runs "rows" as "parallel").
_NO_ROWS = dict(PLANAR_ROWS_MAX_RUN_BYTES=0)
KERNEL_PATHS = {
    "serial": dict(SERIAL_MAX=1 << 62),
    "fused": dict(SERIAL_MAX=0, FUSE_MIN_C=1, FUSE_MAX_BYTES=1 << 62, FUSE_MIN_RUN_BYTES=0,
                  **_NO_ROWS),
    "parallel": dict(SERIAL_MAX=0, FUSE_MIN_C=1 << 62, **_NO_ROWS),
    "rows": dict(SERIAL_MAX=0, FUSE_MIN_C=1 << 62, PLANAR_ROWS_MAX_RUN_BYTES=1 << 62,
                 PLANAR_ROWS_MAX_VALUES=1 << 62),
}


def use_path(monkeypatch, path):
    """Force the CPU kernel path ``path`` (a key of ``KERNEL_PATHS``) for one test."""
    from nbnorm import config

    for name, value in KERNEL_PATHS[path].items():
        monkeypatch.setattr(config, name, value)  # raises if a tunable was renamed


# ------------------------------------------------------------------- layouts

MEMORY_KINDS = ["fortran", "channels_last", "stepped", "reversed", "transposed"]
#: Layouts that keep C order's element order (only the strides differ): the
#: shape-only partition makes their results bitwise those of a contiguous copy.
#: The others permute the axes in memory, so sums run in another order.
SAME_ORDER_KINDS = {"stepped", "reversed"}


def as_memory(a, kind, axis):
    """The same values as ``a`` in another memory layout (a view where possible).

    ``fortran``: Fortran order.  ``channels_last``: a transposed view of an array
    whose channel axis is last in memory (PyTorch's ``channels_last``).
    ``stepped``: a view with step 2 into a larger buffer (not contiguous in any
    order).  ``reversed``: negative strides.  ``transposed``: a view of a
    contiguous array with its axes in reverse order.
    """
    if kind == "fortran":
        return np.asfortranarray(a)
    if kind == "channels_last":
        moved = np.ascontiguousarray(np.moveaxis(a, axis, -1))
        return np.moveaxis(moved, -1, axis)
    if kind == "stepped":
        buf = np.full(tuple(2 * s + 1 for s in a.shape), np.nan, dtype=a.dtype)
        view = buf[tuple(slice(1, None, 2) for _ in a.shape)]
        view[...] = a
        return view
    if kind == "reversed":
        return np.ascontiguousarray(a[::-1, ..., ::-1])[::-1, ..., ::-1]
    if kind == "transposed":
        return np.ascontiguousarray(a.T).T
    raise ValueError(kind)


# ------------------------------------------------------------------- PyTorch

def _to_torch(a, axis):
    import torch

    return None if a is None else torch.from_numpy(
        np.ascontiguousarray(np.moveaxis(a, axis, 1)))


def _from_torch(t, axis):
    return np.moveaxis(t.detach().numpy(), 1, axis)


def torch_forward(x, weight, bias, running_mean, running_var, *, training, momentum,
                  eps, axis):
    """PyTorch's ``(out, mean, invstd, running_mean, running_var)`` as NumPy arrays.

    ``out`` and the running statistics (copies, updated the way PyTorch updates
    them) come from ``torch.nn.functional.batch_norm``; ``mean``/``invstd``, the
    batch statistics, from ``native_batch_norm`` when training (None otherwise:
    PyTorch does not return them in inference).
    """
    import torch

    axis = axis % x.ndim
    t = _to_torch(x, axis)
    w = None if weight is None else torch.from_numpy(weight.copy())
    b = None if bias is None else torch.from_numpy(bias.copy())
    rm = None if running_mean is None else torch.from_numpy(running_mean.copy())
    rv = None if running_var is None else torch.from_numpy(running_var.copy())
    out = torch.nn.functional.batch_norm(t, rm, rv, w, b, training=training,
                                         momentum=momentum, eps=eps)
    mean = invstd = None
    if training:
        _, mean, invstd = torch.ops.aten.native_batch_norm(t, w, b, None, None, True,
                                                           momentum, eps)
        mean, invstd = mean.numpy(), invstd.numpy()
    return (_from_torch(out, axis), mean, invstd,
            None if rm is None else rm.numpy(),
            None if rv is None else rv.numpy())


def torch_backward(grad_out, x, weight, bias, running_mean, running_var, *, training,
                   eps, axis):
    """PyTorch autograd's ``(grad_input, grad_weight, grad_bias)`` of
    ``sum(batch_norm(x) * grad_out)``; weight and bias default to 1 and 0."""
    import torch

    axis = axis % x.ndim
    C = x.shape[axis]
    t = _to_torch(x, axis).requires_grad_(True)
    w = torch.ones(C, dtype=t.dtype) if weight is None else torch.from_numpy(weight.copy())
    b = torch.zeros(C, dtype=t.dtype) if bias is None else torch.from_numpy(bias.copy())
    w.requires_grad_(True)
    b.requires_grad_(True)
    rm = None if running_mean is None else torch.from_numpy(running_mean.copy())
    rv = None if running_var is None else torch.from_numpy(running_var.copy())
    out = torch.nn.functional.batch_norm(t, rm, rv, w, b, training=training,
                                         momentum=0.1, eps=eps)
    (out * _to_torch(grad_out, axis)).sum().backward()
    return _from_torch(t.grad, axis), w.grad.numpy(), b.grad.numpy()
