"""Canonical ``(outer, C, inner)`` views of an array with a channel axis.

Any array whose memory is contiguous in *some* axis order (C order, Fortran
order, PyTorch's ``channels_last``, any transpose of a contiguous array) is
viewed without a copy: its axes are permuted into memory order first, then the
axes before the channel axis merge into ``outer`` and those after it into
``inner``.  ``inner == 1`` is the *interleaved* pattern (NC, NHWC), ``inner > 1``
the *planar* one (NCL, NCHW).  Only arrays with gaps or negative strides are
copied, and only when they are inputs.
"""

import math
from typing import NamedTuple

import numpy as np


class Layout(NamedTuple):
    order: tuple  # axis permutation that puts x's axes in memory order
    shape: tuple  # (outer, C, inner)
    kernel_shape: tuple  # what the kernels take: shape, or (outer, C) when inner == 1
    identity: bool  # order keeps the axes as they are (a C-contiguous x)

    @property
    def planar(self):
        return self.shape[2] != 1


def make(order, outer, C, inner):
    """The ``Layout`` of a canonical ``(outer, C, inner)`` view in axis ``order``."""
    shape = (outer, C, inner)
    # inner == 0 (an empty H or W) stays 3-d: its (outer, C) would claim values.
    return Layout(order, shape, shape if inner != 1 else shape[:2],
                  tuple(order) == _identity(len(order)))


def _memory_order(a):
    """Axes sorted by decreasing stride; ties keep their logical order."""
    return tuple(sorted(range(a.ndim), key=lambda i: -a.strides[i]))


_IDENTITY = [tuple(range(n)) for n in range(33)]  # NumPy's most dimensions: 32 (2.x: 64)


def _identity(ndim):
    return _IDENTITY[ndim] if ndim < len(_IDENTITY) else tuple(range(ndim))




#: Layouts of C-contiguous arrays by ``(shape, axis)``: a small call's whole
#: budget is ~10 us, and a training loop passes the same shapes again and again
#: (plan 1.15 -> 0.15 us).  Cleared when it grows past ``_PLANS_MAX``.
_PLANS = {}
_PLANS_MAX = 1024


def plan(x, axis):
    """The layout of ``x`` (``axis`` already normalized to ``0 <= axis < ndim``)."""
    shape = x.shape
    if x.flags.c_contiguous:
        key = (shape, axis)
        lay = _PLANS.get(key)
        if lay is None:
            if len(_PLANS) >= _PLANS_MAX:
                _PLANS.clear()
            lay = _PLANS[key] = _plan(shape, _identity(len(shape)), axis)
        return lay
    order = _identity(x.ndim)
    candidate = _memory_order(x)
    if x.transpose(candidate).flags.c_contiguous:
        order = candidate
    return _plan(tuple(shape[i] for i in order), order, order.index(axis))


def _plan(shape, order, caxis):
    """The Layout of axes ``shape`` (already in memory ``order``) with the channel
    axis at ``caxis`` of them."""
    # math.prod: ~0.1 us against ~3 us for np.prod on a tuple.
    outer = math.prod(shape[:caxis])
    inner = math.prod(shape[caxis + 1:])
    return make(order, outer, shape[caxis], inner)


def c_view(a, lay):
    """The canonical view of a C-contiguous ``a`` whose layout is ``lay``."""
    # NC batches are their own view: no reshape (~0.15 us of a ~10 us call)
    return a if a.shape == lay.kernel_shape else a.reshape(lay.kernel_shape)


def _view(a, lay):
    """The canonical view of ``a``, or None where it would need a copy."""
    if a.flags.c_contiguous and lay.order is _identity(a.ndim):
        return c_view(a, lay)
    t = a.transpose(lay.order)
    return t.reshape(lay.kernel_shape) if t.flags.c_contiguous else None


def input_view(a, lay):
    """Canonical view of an input; a contiguous copy only where no view exists."""
    v = _view(a, lay)
    if v is None:
        v = np.ascontiguousarray(a.transpose(lay.order)).reshape(lay.kernel_shape)
    return v


def output_view(a, lay):
    """``(view, finish)``: the kernel writes ``view``; ``finish()`` makes ``a`` hold it.

    Where ``a`` has no canonical view, the kernel writes a temporary that
    ``finish`` copies into ``a``.
    """
    v = _view(a, lay)
    if v is not None:
        return v, _nothing
    tmp = np.empty(lay.kernel_shape, dtype=a.dtype)

    def finish():
        np.copyto(a.transpose(lay.order), tmp.reshape([a.shape[i] for i in lay.order]))

    return tmp, finish


def _nothing():
    pass


def overlaps_itself(shape, strides, itemsize):
    """True unless ``strides`` provably give every element of an array of
    ``shape`` its own ``itemsize`` bytes (host and device arrays alike).

    Axes sorted by stride must each step over the whole extent of the smaller
    ones: true of every layout that ``np.empty`` and slicing produce, false for
    broadcasts and most ``as_strided`` tricks.
    """
    if 0 in shape:
        return False
    extent = itemsize
    for stride, n in sorted((abs(st), n) for st, n in zip(strides, shape) if n > 1):
        if stride < extent:
            return True
        extent = stride * (n - 1) + extent
    return False
