"""Non-temporal ("streaming") stores for outputs larger than the caches.

An ordinary store first reads the line it writes (read-for-ownership) and
leaves it in cache, evicting data that is still to be read; a non-temporal
store writes whole lines straight to memory.  For an output that cannot stay
in cache anyway, that removes a third of an elementwise pass's traffic (read
x, write y instead of read x, read y, write y).  ``ops`` streams outputs of at
least ``config.STREAM_MIN_BYTES``.

LLVM emits vector non-temporal stores only when it knows the address is
aligned; Numba's loops promise no alignment, so a ``!nontemporal`` hint on
their stores became scalar ``movntss`` and the loops stopped vectorizing
(measured: forward-train NCHW float32 1.56 -> 2.10 copy-times).  So the
aligned middle of each run is written here, by intrinsics that build the loop
themselves: 64-byte vectors of the output dtype, computed in its compute type
(``convert.compute_type``: float32 for half data, else float64), stored with
``!nontemporal`` at 64-byte alignment.  The unaligned head and the tail are
the caller's ordinary scalar loop (``span`` says where they are), written with
the same expressions in the same types, so streamed and ordinary results are
the same bits.  A writer of streamed lines calls ``fence`` before its task ends:
non-temporal stores are not ordered with other stores until a fence.

Every storage dtype streams (``convert.Convert``: float16 and bfloat16
bits are converted in vectors with the scalar code's expressions), and so do the
fused epilogues (the last two operands of every intrinsic: the residual and
the ReLU forward, the ReLU mask and ``grad_residual`` backward; None when
absent, which compiles to the plain loop).

The ``*_lines`` intrinsics write one run (a planar channel's ``inner``
values, with scalar coefficients); the ``*_cols`` intrinsics write many rows
of an interleaved batch laid end to end, with per-channel coefficients read at
each value's column (``_cols``), and can store ordinarily too.

Measured (NC 8192x1024, normalizing pass, x copy time, 2 threads, 18 medians
of 15 rounds in 6 processes, every one in favour): float64 1.02 -> 0.83,
float32 1.10 -> 0.98.  Computing into a cache-resident buffer and streaming that
instead (one intrinsic for every kernel) was 3-7x slower: the buffer's loads
wait on the pending streamed stores.
"""

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .convert import Convert, compute_empty, compute_type

#: Bytes of a cache line, and of one streamed vector.
LINE = 64


@njit(cache=True, inline="always")
def span(y):
    """``(h, e)``: ``y[h:e]`` is the whole 64-byte lines of the 1-D contiguous ``y``
    that the intrinsics stream; ``y[:h]`` and ``y[e:]`` are the caller's."""
    n = y.size
    isz = y.itemsize
    addr = y.ctypes.data
    if addr % isz:  # not even element-aligned: nothing streams
        return n, n
    per_line = LINE // isz
    h = min(n, ((LINE - addr % LINE) % LINE) // isz)
    return h, h + (n - h) // per_line * per_line


@njit(cache=True, inline="always")
def cols_span(y, stream):
    """``(h, e)`` for a ``_cols`` intrinsic writing the 1-D contiguous ``y``:
    ``span(y)`` when it streams; else ``(0, e)``, the whole vectors from the start."""
    if stream:
        return span(y)
    per_vector = LINE // y.itemsize
    return 0, y.size // per_vector * per_vector


_X86 = llvm.get_process_triple().split("-")[0] in ("x86_64", "i386", "i686")


@intrinsic
def fence(typingctx):
    """Orders the streamed stores before any later store: ``sfence`` on x86 (LLVM's
    ``fence seq_cst`` there is a ``lock or``, which x86 does not promise to order
    non-temporal stores with), a full fence elsewhere."""
    def codegen(context, builder, signature, args):
        if _X86:
            fnty = ir.FunctionType(ir.VoidType(), [])
            builder.call(cgutils.get_or_insert_function(builder.module, fnty,
                                                        "llvm.x86.sse.sfence"), [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()
    return types.void(), codegen


def _lines(expr, tail, y, i0, i1, *operands):
    """The typing and code of an intrinsic ``f(y, i0, i1, *operands)`` writing
    ``y[i] = expr(operands at i)`` for ``i`` in ``[i0, i1)`` with streamed vector
    stores, where ``y[i0]`` is 64-byte aligned and ``i1 - i0`` a multiple of a
    line.  The first operands (``_DATA[tail]`` of them: ``x``, or ``dy`` and
    ``x``) and the epilogue's arrays are data: 1-D contiguous arrays of any
    storage dtype of ``convert`` (float32, float64, float16 or bfloat16 bits),
    read at ``i`` into the compute type (``convert.compute_type``, the wider of
    ``y``'s and theirs).  The others are coefficients, kept in their type: 1-D
    float32 or float64 arrays read at ``i``, or scalars, broadcast (float32
    ones as float32, others as float64).  ``expr`` takes these vectors and
    returns one of the compute type, through an ``_Ops``, whose ``coef`` casts a
    coefficient to the compute type as the scalar code's ``convert.coef`` does.
    The last two operands are the epilogue's (``tail``: ``_FORWARD`` or
    ``_BACKWARD``), each None or present."""
    return types.void(y, i0, i1, *operands), _codegen(expr, False, tail)


def _cols(expr, tail, y, i0, i1, c0, period, stream, *operands):
    """``_lines`` for rows of ``period`` columns laid end to end (a C-contiguous
    ``(rows, C)`` array as 1-D): ``f(y, i0, i1, c0, period, stream, *operands)``.
    The data are read at ``i``, like ``y``; the coefficient arrays per column
    (float64, or the compute type) at the column ``c`` of ``i`` (``c0`` at
    ``i0``), so they must hold ``periodic`` values: a vector starting in the
    last columns of a row reads on past ``period``.  A task then streams all its rows in one run, and only its own
    two ends are not whole lines: per-row runs of an output at 16 bytes past a
    line (where glibc puts a large ``malloc``) leave a part line at every row
    boundary.  ``stream`` False stores ordinarily and unaligned, for any
    ``y[i0]`` and ``i1 - i0`` a multiple of a vector."""
    sig = types.void(y, i0, i1, c0, period, stream, *operands)
    return sig, _codegen(expr, True, tail)


@njit(cache=True)
def periodic(a, y, repeat=1):
    """``a`` extended periodically, in the compute type of ``y``
    (``convert.compute_type``: each value rounded once, for half data), for the
    coefficients of a ``_cols`` intrinsic writing ``y``, each value of ``a``
    serving ``repeat`` consecutive columns: ``a.size * repeat + LINE //
    y.itemsize`` values, the ``j``-th ``a[j // repeat % a.size]``."""
    period = a.size * repeat
    p = compute_empty(period + LINE // y.itemsize, y)
    # No division per value: for a 7x7 map's 25088-value rows, two integer
    # divisions a value cost ~1 ms for four tables, a quarter of a copy of x.
    j = 0
    for c in range(a.size):
        for _ in range(repeat):
            p[j] = a[c]
            j += 1
    for j in range(period, p.size):
        p[j] = p[j - period]
    return p


#: The epilogue operands that end every intrinsic's operand list (``epilogue``):
#: forward ``(residual, act)``: ``act(expr + residual)``, ``act`` None or a
#: bool, the ReLU when true; backward ``(forward_out, grad_residual)``: the
#: first operand (``dy``) masked by ``forward_out > 0``, and written to
#: ``grad_residual``.
_FORWARD, _BACKWARD = "forward", "backward"
#: How many leading operands are data (``_lines``): ``x``; ``dy`` and ``x``.
_DATA = {_FORWARD: 1, _BACKWARD: 2}


def _codegen(expr, columns, tail):
    flat = _DATA[tail]

    def codegen(context, builder, signature, args):
        yty = signature.args[0]
        first = 6 if columns else 3  # where the operands begin
        i64 = ir.IntType(64)
        i32 = ir.IntType(32)
        width = LINE * 8 // yty.dtype.bitwidth
        data = [yty] + [t for t in signature.args[first:first + flat] + signature.args[-2:]
                        if isinstance(t, types.Array)]
        compute = max((compute_type(t.dtype) for t in data), key=lambda t: t.bitwidth)
        conv = Convert(builder, width, compute)
        zero = ir.Constant(conv.compute(), [0.0] * width)
        a = context.cast(builder, args[1], signature.args[1], types.int64)
        b = context.cast(builder, args[2], signature.args[2], types.int64)
        nontemporal = builder.module.add_metadata([ir.Constant(i32, 1)])

        def pointer(ty, arr, i):
            p = cgutils.get_item_pointer(context, builder, ty, arr, [i], wraparound=False)
            vty = ir.VectorType(context.get_data_type(ty.dtype), width)
            return builder.bitcast(p, vty.as_pointer())

        def put(ty, arr, i, v, streamed):
            r = conv.stored(v, ty.dtype)
            esize = context.get_abi_sizeof(context.get_data_type(ty.dtype))
            st = builder.store(r, pointer(ty, arr, i), align=LINE if streamed else esize)
            if streamed:
                st.set_metadata("nontemporal", nontemporal)

        def splat(v):
            undef = ir.Constant(ir.VectorType(v.type, width), ir.Undefined)
            v = builder.insert_element(undef, v, ir.Constant(i32, 0))
            return builder.shuffle_vector(v, undef, ir.Constant(ir.VectorType(i32, width),
                                                                [0] * width))

        # Scalars are broadcast once, outside the loop; arrays are loaded in it,
        # at i (data, and every operand of ``_lines``) or at the column.
        optypes = signature.args[first:]
        body, (t1, t2) = list(zip(optypes[:-2], args[first:-2])), optypes[-2:]
        loaders = []
        for k, (ty, val) in enumerate(body):
            if isinstance(ty, types.Array):
                loaders.append((ty, context.make_array(ty)(context, builder, val),
                                k < flat or not columns))
            else:
                sty = ty if ty in (types.float32, types.float64) else types.float64
                loaders.append(splat(context.cast(builder, val, ty, sty)))
        e1 = e2 = None  # the epilogue's operands, when present
        if isinstance(t1, types.Array):
            e1 = context.make_array(t1)(context, builder, args[-2])
        if tail == _FORWARD and isinstance(t2, types.Boolean):
            act = context.cast(builder, args[-1], t2, types.boolean)
            e2 = splat(act)
        elif tail == _BACKWARD and isinstance(t2, types.Array):
            e2 = context.make_array(t2)(context, builder, args[-1])
        y_arr = context.make_array(yty)(context, builder, args[0])

        step = ir.Constant(i64, width)
        if columns:
            period = context.cast(builder, args[4], signature.args[4], types.int64)
            # The column advances by a vector a step: width mod period, then wraps
            # (both terms are below period, so one subtraction is enough).
            inc = builder.urem(step, period)
            stream = context.cast(builder, args[5], signature.args[5], types.boolean)

        def loop(streamed, streamed_gres):
            ops = _Ops(builder, conv)
            if columns:
                col = cgutils.alloca_once_value(
                    builder, context.cast(builder, args[3], signature.args[3], types.int64))
            with cgutils.for_range_slice(builder, a, b, step, inc=True) as (i, _):
                c = builder.load(col) if columns else i
                vals = []
                for ld in loaders:
                    if isinstance(ld, tuple):
                        ty, arr, at_i = ld
                        vals.append(conv.loaded(builder.load(
                            pointer(ty, arr, i if at_i else c),
                            align=context.get_abi_sizeof(context.get_data_type(ty.dtype))),
                            ty.dtype))
                    else:
                        vals.append(ld)

                def operand(ty, arr):
                    return conv.loaded(builder.load(pointer(ty, arr, i), align=1), ty.dtype)

                if tail == _BACKWARD:
                    if e1 is not None:  # epilogue.grad: dy where forward_out > 0, else 0
                        keep = builder.fcmp_ordered(">", operand(t1, e1), zero)
                        vals[0] = builder.select(keep, vals[0], zero)
                    if e2 is not None:
                        put(t2, e2, i, vals[0], streamed_gres)
                r = expr(ops, *vals)
                if tail == _FORWARD:  # epilogue.finish
                    if e1 is not None:
                        r = builder.fadd(r, operand(t1, e1))
                    if e2 is not None:  # channel.relu: 0 where r <= 0 (not NaN)
                        cut = builder.and_(e2, builder.fcmp_ordered("<=", r, zero))
                        r = builder.select(cut, zero, r)
                put(yty, y_arr, i, r, streamed)
                if columns:
                    nxt = builder.add(c, inc)
                    wrapped = builder.icmp_signed(">=", nxt, period)
                    builder.store(builder.select(wrapped, builder.sub(nxt, period), nxt), col)

        def streamed_loop():
            if tail == _BACKWARD and e2 is not None:
                # grad_residual streams too where its lines fall on y's (in place
                # on grad_out, or another large allocation): else ordinary stores.
                p0 = builder.ptrtoint(pointer(t2, e2, a), i64)
                aligned = builder.icmp_unsigned("==", builder.urem(p0, ir.Constant(i64, LINE)),
                                                ir.Constant(i64, 0))
                with builder.if_else(aligned) as (then, otherwise):
                    with then:
                        loop(True, True)
                    with otherwise:
                        loop(True, False)
            else:
                loop(True, False)

        if columns:
            with builder.if_else(stream) as (then, otherwise):
                with then:
                    streamed_loop()
                with otherwise:
                    loop(False, False)
        else:
            streamed_loop()
        return context.get_dummy_value()

    return codegen


class _Ops:
    """Plain IEEE vector arithmetic (no fast-math flags, no contraction), as Numba
    compiles the scalar expressions the callers use for head and tail; ``coef``
    is ``convert.coef``: a coefficient in the compute type; ``centre``,
    ``convert.centre``."""

    def __init__(self, builder, conv):
        self._b = builder
        self._conv = conv

    def coef(self, v):
        return self._conv.narrowed(v)

    def centre(self, c, s, t):
        """``convert.centre`` of float64 coefficients."""
        return self._conv.centred(c, s, t)

    def add(self, u, v):
        return self._b.fadd(u, v)

    def sub(self, u, v):
        return self._b.fsub(u, v)

    def mul(self, u, v):
        return self._b.fmul(u, v)


def _affine(f, x, center, scale, shift):
    """``(x - center) * scale + shift``: ``forward`` normalizing."""
    return f.add(f.mul(f.sub(x, f.coef(center)), f.coef(scale)), f.coef(shift))


def _scale_offset(f, x, scale, offset):
    """``x * scale + offset``: ``forward`` normalizing compact data."""
    return f.add(f.mul(x, f.coef(scale)), f.coef(offset))


def _grad(f, dy, x, mean, a, b, k):
    """``k * (dy - a - (x - mean) * b)``: ``backward``'s centred ``grad_input``."""
    return f.mul(f.coef(k), f.sub(f.sub(dy, f.coef(a)),
                                  f.mul(f.sub(x, f.coef(mean)), f.coef(b))))


def _grad_affine(f, dy, x, k, q, r):
    """``k * dy + (q * x + r)``: ``backward``'s compact ``grad_input``."""
    return f.add(f.mul(f.coef(k), dy), f.add(f.mul(f.coef(q), x), f.coef(r)))


# Intrinsics take no *args: one explicit signature per expression.  The last two
# operands are the epilogue's (``_FORWARD``, ``_BACKWARD``), None when absent.

@intrinsic
def affine_lines(typingctx, y, i0, i1, x, center, scale, shift, res, act):
    """Streams ``y[i0:i1] = act((x - center) * scale + shift + res)`` (see ``_lines``)."""
    return _lines(_affine, _FORWARD, y, i0, i1, x, center, scale, shift, res, act)


@intrinsic
def scale_offset_lines(typingctx, y, i0, i1, x, scale, offset, res, act):
    """Streams ``y[i0:i1] = act(x * scale + offset + res)`` (see ``_lines``)."""
    return _lines(_scale_offset, _FORWARD, y, i0, i1, x, scale, offset, res, act)


@intrinsic
def grad_lines(typingctx, y, i0, i1, dy, x, mean, a, b, k, fo, gres):
    """Streams ``y[i0:i1] = k * (g - a - (x - mean) * b)``, ``g`` = ``dy`` through
    the mask of ``fo``, also written to ``gres`` (see ``_lines``)."""
    return _lines(_grad, _BACKWARD, y, i0, i1, dy, x, mean, a, b, k, fo, gres)


@intrinsic
def grad_affine_lines(typingctx, y, i0, i1, dy, x, k, q, r, fo, gres):
    """Streams ``y[i0:i1] = k * g + (q * x + r)``, ``g`` as in ``grad_lines``."""
    return _lines(_grad_affine, _BACKWARD, y, i0, i1, dy, x, k, q, r, fo, gres)


@intrinsic
def affine_cols(typingctx, y, i0, i1, c0, period, stream, x, center, scale, shift, res, act):
    """``affine_lines`` over rows of ``period`` columns (see ``_cols``)."""
    return _cols(_affine, _FORWARD, y, i0, i1, c0, period, stream, x, center, scale, shift,
                 res, act)


@intrinsic
def scale_offset_cols(typingctx, y, i0, i1, c0, period, stream, x, scale, offset, res, act):
    """``scale_offset_lines`` over rows of ``period`` columns (see ``_cols``)."""
    return _cols(_scale_offset, _FORWARD, y, i0, i1, c0, period, stream, x, scale, offset,
                 res, act)


@intrinsic
def grad_cols(typingctx, y, i0, i1, c0, period, stream, dy, x, mean, a, b, k, fo, gres):
    """``grad_lines`` over rows of ``period`` columns (see ``_cols``)."""
    return _cols(_grad, _BACKWARD, y, i0, i1, c0, period, stream, dy, x, mean, a, b, k,
                 fo, gres)


@intrinsic
def grad_affine_cols(typingctx, y, i0, i1, c0, period, stream, dy, x, k, q, r, fo, gres):
    """``grad_affine_lines`` over rows of ``period`` columns (see ``_cols``)."""
    return _cols(_grad_affine, _BACKWARD, y, i0, i1, c0, period, stream, dy, x, k, q, r,
                 fo, gres)
