"""The optional operands of the fused epilogues, resolved when a kernel compiles.

A forward kernel computes ``out = act(bn(x) + residual)``; a backward kernel
reads ``g = dy * (forward_out > 0)`` for ``dy`` and may write ``g`` to
``grad_residual``.  Each optional operand (``residual``, ``relu``,
``forward_out``, ``grad_residual``) is either ``None`` or present (an array;
the activation a bool, the ReLU when True, once any forward epilogue is
present), and these ``overload``\\ s branch on its *type*, so a call without
epilogue compiles to exactly the code it had before any existed, and every
combination is its own specialization, compiled the first time it is called.
The streaming-store intrinsics (``streaming``) take the same operands.
"""

from numba import njit, types
from numba.extending import overload

from .. import channel
from .convert import like, store, value
from .stats import widen

#: Called, not inlined into Numba's IR: its branch would be (IR inlining of
#: functions with branches trips Numba's internal checks); LLVM inlines it.
relu = njit(cache=True)(channel.relu)


@njit(cache=True)
def _masked(g, f):
    return like(g if f > 0.0 else 0.0, g)


def _none(t):
    return t is None or isinstance(t, types.NoneType)


def finish(v, residual, i, act):
    """``act(v + residual[i])``: ``residual`` may be None; ``act`` is None (no
    activation) or a bool, the ReLU when True."""


@njit(cache=True)
def _activate(v, act):
    return like(relu(v), v) if act else v


@overload(finish, inline="always")
def _finish(v, residual, i, act):
    # ``act`` is a run-time bool once any epilogue is present, so that the
    # residual add with and without the ReLU is one specialization, not two
    # (fewer kernels to compile; the test is loop-invariant).
    if _none(residual) and _none(act):
        return lambda v, residual, i, act: v
    if _none(residual):
        return lambda v, residual, i, act: _activate(v, act)
    return lambda v, residual, i, act: _activate(v + value(residual[i]), act)


def grad(dy, forward_out, i):
    """``dy[i]`` in its compute type (``convert.value``), zeroed where
    ``forward_out[i] <= 0`` (or NaN) when ``forward_out`` is given: the gradient
    through the fused ReLU."""


@overload(grad, inline="always")
def _grad(dy, forward_out, i):
    if _none(forward_out):
        return lambda dy, forward_out, i: value(dy[i])
    return lambda dy, forward_out, i: _masked(value(dy[i]), value(forward_out[i]))


def put(a, i, v):
    """``a[i] = v`` rounded to ``a``'s dtype, unless ``a`` is None."""


@overload(put, inline="always")
def _put(a, i, v):
    if _none(a):
        return lambda a, i, v: None

    def impl(a, i, v):
        a[i] = store(v, a)
    return impl


def run(a, o, c):
    """``a[o, c]``, or None for None."""


@overload(run, inline="always")
def _run(a, o, c):
    if _none(a):
        return lambda a, o, c: None
    return lambda a, o, c: a[o, c]


def cut(a, o, c, i0, i1):
    """``a[o, c, i0:i1]``, or None for None."""


@overload(cut, inline="always")
def _cut(a, o, c, i0, i1):
    if _none(a):
        return lambda a, o, c, i0, i1: None
    return lambda a, o, c, i0, i1: a[o, c, i0:i1]


def row(a, r):
    """``a[r]``, or None for None."""


@overload(row, inline="always")
def _row(a, r):
    if _none(a):
        return lambda a, r: None
    return lambda a, r: a[r]


def wide(a, w):
    """``a``'s first ``outer // w * w`` rows as rows of ``w * C`` (``stats.widen``), or None."""


@overload(wide, inline="always")
def _wide(a, w):
    if _none(a):
        return lambda a, w: None
    return lambda a, w: widen(a, w)


def flat(a):
    """``a.reshape(-1)``, or None for None."""


@overload(flat, inline="always")
def _flat(a):
    if _none(a):
        return lambda a: None
    return lambda a: a.reshape(-1)
