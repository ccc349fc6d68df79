"""Test helpers: data, valid calls, layouts, tolerances and the PyTorch oracle.

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
    assert bits(a) == bits(b), what


def bits(a):
    """The bytes of ``a`` in C order (element pointers for object arrays): equal
    bits means bitwise the same values, NaN payloads and signed zeros included."""
    return np.ascontiguousarray(a).tobytes()


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


def as_memory(a, kind, axis=None, perm=None):
    """The same values as ``a`` in another memory layout: a new array, or a view
    of one, never ``a``'s own memory (writing it leaves ``a`` alone), except
    ``broadcast``, a read-only view.

    ``C``: C order.  ``fortran`` (or ``F``): Fortran order.  ``channels_last``:
    a transposed view of an array whose channel ``axis`` is last in memory
    (PyTorch's ``channels_last``).  ``permuted``: a transposed view of an array
    whose axes lie in memory in the order ``perm`` (a permutation of
    ``range(a.ndim)``, outermost first).  ``stepped``: a view with step 2 into a
    larger NaN-filled buffer (not contiguous in any order).  ``reversed``:
    negative strides.  ``transposed``: a view of a contiguous array with its
    axes in reverse order.  ``broadcast``: ``a[:1]`` with stride 0 along the
    first axis (read-only); ``a`` must repeat its first row along that axis
    (ValueError otherwise).
    """
    if kind == "C":
        return np.array(a, order="C")
    if kind in ("fortran", "F"):
        return np.array(a, order="F")
    if kind == "channels_last":
        return np.moveaxis(np.array(np.moveaxis(a, axis, -1), order="C"), -1, axis)
    if kind == "permuted":
        if perm is None or sorted(perm) != list(range(a.ndim)):
            raise ValueError(f"permuted: perm must be a permutation of range({a.ndim}), "
                             f"got {perm!r}")
        return np.array(a.transpose(perm), order="C").transpose(np.argsort(perm))
    if kind == "stepped":
        buf = np.full(tuple(2 * s + 1 for s in a.shape), np.nan, dtype=a.dtype)
        view = buf[tuple(slice(1, None, 2) for _ in a.shape)]
        view[...] = a
        return view
    if kind == "reversed":
        return np.array(a[::-1, ..., ::-1], order="C")[::-1, ..., ::-1]
    if kind == "transposed":
        return np.array(a.T, order="C").T
    if kind == "broadcast":
        view = np.broadcast_to(a[:1], a.shape)
        if not np.array_equal(view, a, equal_nan=True):
            raise ValueError("broadcast: a does not repeat its first row along axis 0")
        return view
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


# --------------------------------------------------------------- valid calls

def _junk(rng, shape, dtype, fill, make):
    return make(rng, shape, dtype) if fill is None else np.full(shape, fill, dtype)


def forward_call(rng, shape, dtype=np.float32, axis=1, training=True, affine=True,
                 running=True, outputs=True, fill=None, loc=None, scale=None):
    """The keyword arguments of a valid ``nbnorm.forward(**kwargs)`` call.

    ``x`` is ``data(rng, shape, dtype, loc, scale)``; ``weight``, ``bias`` and
    ``running_mean`` are ``channel`` vectors and ``running_var`` is ``positive``
    (weight and bias None unless ``affine``, the running statistics None unless
    ``running``); ``training`` and ``axis`` as given.  With ``outputs``, ``out``,
    ``mean`` and ``invstd`` are preallocated with junk: ``fill`` everywhere, or
    without one random values (``data``, ``channel``, ``positive``).
    """
    C = shape[axis]
    kwargs = dict(x=data(rng, shape, dtype, loc, scale),
                  weight=channel(rng, C, dtype) if affine else None,
                  bias=channel(rng, C, dtype) if affine else None,
                  running_mean=channel(rng, C, dtype) if running else None,
                  running_var=positive(rng, C, dtype) if running else None,
                  training=training, axis=axis)
    if outputs:
        kwargs.update(out=_junk(rng, shape, dtype, fill, data),
                      mean=_junk(rng, C, dtype, fill, channel),
                      invstd=_junk(rng, C, dtype, fill, positive))
    return kwargs


def backward_call(rng, shape, dtype=np.float32, axis=1, training=True, affine=True,
                  outputs=True, fill=None, loc=None, scale=None):
    """The keyword arguments of a valid ``nbnorm.backward(**kwargs)`` call.

    ``grad_out`` is ``data``, ``x`` is ``data(rng, shape, dtype, loc, scale)``;
    ``mean`` (``channel``) and ``invstd`` (``positive``) are random, not x's
    statistics: a valid call, not the backward of a forward (take those from
    ``nbnorm.forward`` where it matters, e.g. against PyTorch).  ``weight`` is a
    ``channel`` vector (None unless ``affine``).  With ``outputs``,
    ``grad_input``, ``grad_weight`` and ``grad_bias`` are preallocated with
    junk: ``fill`` everywhere, or without one random values.
    """
    C = shape[axis]
    kwargs = dict(grad_out=data(rng, shape, dtype), x=data(rng, shape, dtype, loc, scale),
                  mean=channel(rng, C, dtype), invstd=positive(rng, C, dtype),
                  weight=channel(rng, C, dtype) if affine else None,
                  training=training, axis=axis)
    if outputs:
        kwargs.update(grad_input=_junk(rng, shape, dtype, fill, data),
                      grad_weight=_junk(rng, C, dtype, fill, channel),
                      grad_bias=_junk(rng, C, dtype, fill, channel))
    return kwargs


# -------------------------------------------------------- calls that raise

def _arrays(value):
    """Every ndarray reachable from a call argument, views' bases included."""
    found = []
    while isinstance(value, np.ndarray):
        found.append(value)
        value = value.base
    return found


def snapshot(kwargs):
    """``(array, copy)`` of every ndarray argument of a call and of the buffers
    behind views, for ``assert_unchanged``."""
    return [(a, a.copy()) for v in kwargs.values() for a in _arrays(v)]


def assert_unchanged(snap):
    """Nothing in ``snapshot``'s arrays changed (NaNs and object identities included)."""
    for a, before in snap:
        assert a.shape == before.shape
        if a.dtype.kind == "O":
            assert all(p is q for p, q in zip(a.ravel(), before.ravel()))
        else:
            assert_same(a, before, "an argument changed on a raising call")


def refused(func, exc, match, **kwargs):
    """``func(**kwargs)`` raises ``exc`` matching ``match`` and writes nothing."""
    import pytest

    snap = snapshot(kwargs)
    with pytest.raises(exc, match=match):
        func(**kwargs)
    assert_unchanged(snap)
