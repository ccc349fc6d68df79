"""Reading and writing every storage dtype inside the CPU kernels.

The kernels see four storage dtypes (``nbnorm.dtypes``): float32 and float64
as themselves, IEEE float16 as ``uint16`` bits and bfloat16 as ``int16`` bits
(Numba's CPU target has no 2-byte float arrays; the integer dtype is only a
tag that tells the two formats apart at compile time).

Each storage dtype has a *compute type*, the type its elementwise passes
compute in (``compute_type``): float32 for the half formats, float64 for
float32 and float64 data.  ``value(v)`` turns a stored value into its compute
type, exactly; ``coef(c, a)`` turns a coefficient (float64) into the compute
type of array ``a``'s values (rounded to nearest even once, for half data:
the kernels cast each coefficient once per call or per table); ``store(v,
a)`` turns a value of either compute type into ``a``'s storage dtype, rounded
to nearest even once.  ``load(v)`` is the stored value as float64, exactly,
for the statistics, which accumulate in float64 for every dtype.  All are
``overload``\\ s resolved by type, so a kernel written with them compiles to
straight-line code for each dtype it is called with, and ``compact(a)`` says
at compile time whether ``a``'s values take the compact forms of the
normalizing and gradient passes (``forward``, ``backward``): float32 data,
whose float64 arithmetic makes the compact forms' cancellation harmless.

Half data compute in float32 because their passes would otherwise be
compute-bound: a float16 inference pass in float64 arithmetic, rounded
through float32-to-odd (below), took 1.36 ns a value against 0.51 for
float32 data (single thread, cache-resident).  They take the centred forms,
``(x - center) * scale + shift``, with the center moved to a float32 value
and the shift moved to compensate, in float64, once per channel
(``centre``): a half value near the mean minus that center is exact in
float32 (Sterbenz), so a large mean costs no digits, where the compact form
in float32 lost ~2^-24 |mean| / std of a value's magnitude (float16 data of
mean 100 std: 2.6% of the outputs misrounded, up to 5 units in the last
place).  float32 has 13 (float16) and 16 (bfloat16) bits more than the
formats, so the few roundings leave an output within one unit in the last
place of the float64 computation plus about 2^-23 of its terms' magnitudes
(only outputs that cancel their terms, e.g. a bias, to far below them go
beyond the unit), and correctly rounded but for the values whose float64
result lies within those roundings of a rounding boundary
(``tests/test_half.py`` measures and bounds the fraction).

A float64 value is stored to a half format through float32 *rounded to
odd*: rounded to float32 with its sticky bit kept in the last place, then to
the 2-byte format with round-to-nearest-even.  float32 has more than two
extra bits over either format, so the result is the correctly rounded one
(never the double-rounding error of RNE twice), and the same bits NumPy's
``astype(np.float16)`` gives from float64.  A float32 value is rounded to the
format directly, once.
"""

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload
from numba.np import numpy_support

#: The Numba types of the half formats' bits.
_HALF_BITS = (types.uint16, types.int16)


def compute_type(dtype):
    """The Numba type the elementwise passes compute values of the storage
    ``dtype`` (a Numba type) in: float32 for half data, else float64."""
    return types.float32 if dtype in _HALF_BITS else types.float64


def compute_dtype(dtype):
    """``compute_type`` of a NumPy storage dtype, as a NumPy dtype: for the
    coefficient tables a caller allocates."""
    return numpy_support.as_dtype(compute_type(numpy_support.from_dtype(np.dtype(dtype))))


def compact_type(dtype):
    """Whether values of the storage ``dtype`` (a Numba type) take the compact
    forms (``compact``): float32 data only."""
    return dtype == types.float32


def compact_dtype(dtype):
    """``compact_type`` of a NumPy storage dtype: for the callers that size tables."""
    return compact_type(numpy_support.from_dtype(np.dtype(dtype)))


def _ir_float(ty):
    return ir.FloatType() if ty == types.float32 else ir.DoubleType()


class Convert:
    """The conversions of every storage dtype to and from a compute type
    (``compute``: float32 or float64), as LLVM IR, for scalars (``width``
    None: ``value``, ``load``, ``store``) and for the vectors of the streaming
    intrinsics (``streaming``): one definition, so both write the same bits.
    float16 goes through the hardware's conversions (LLVM's ``fpext``/
    ``fptrunc`` of ``half``: F16C's ``vcvtph2ps``/``vcvtps2ph`` on x86, exact,
    and round-to-nearest-even, which a loop vectorizes; measured: the integer
    bit manipulation they replace made a float16 pass 5-14 copy-times), after
    the float32 rounding to odd from float64; bfloat16 is the upper half of a
    float32.
    """

    def __init__(self, builder, width=None, compute=types.float64):
        self._b = builder
        self._w = width
        self._wide = compute == types.float64

    def _ty(self, ty):
        return ty if self._w is None else ir.VectorType(ty, self._w)

    def _const(self, ty, v):
        return ir.Constant(self._ty(ty), v if self._w is None else [v] * self._w)

    def compute(self):
        """The (vector) LLVM type of the compute type."""
        return self._ty(ir.DoubleType() if self._wide else ir.FloatType())

    def loaded(self, v, dtype):
        """Stored ``v`` (of the Numba ``dtype``) in the compute type, exactly;
        float64 ``v`` stays float64 (a coefficient: no narrower type holds it)."""
        b = self._b
        f32 = self._ty(ir.FloatType())
        if dtype == types.float64:
            return v
        if dtype == types.float32:
            f = v
        elif dtype == types.uint16:  # float16 bits
            f = b.fpext(b.bitcast(v, self._ty(ir.HalfType())), f32)
        elif dtype == types.int16:  # bfloat16 bits
            i32 = ir.IntType(32)
            f = b.bitcast(b.shl(b.zext(v, self._ty(i32)), self._const(i32, 16)), f32)
        else:
            raise TypeError(f"no conversion from {dtype}")
        return b.fpext(f, self.compute()) if self._wide else f

    def narrowed(self, v):
        """A float32 or float64 (vector) ``v`` in the compute type: a coefficient,
        rounded to nearest even once where it is narrowed (``coef``)."""
        t = self.compute()
        if v.type == t:
            return v
        if self._wide:
            return self._b.fpext(v, t)
        return self._b.fptrunc(v, t)

    def centred(self, c, s, t):
        """``centre`` of float64 vectors: ``(c', t')``, float64."""
        if self._wide:
            return c, t
        b = self._b
        c2 = b.fpext(b.fptrunc(c, self._ty(ir.FloatType())), c.type)
        return c2, b.fadd(t, b.fmul(b.fsub(c2, c), s))

    def _odd_f32_bits(self, v):
        """The bits of float64 ``v`` rounded to float32 *to odd*: the rounding to
        nearest even, moved to the odd neighbour where it was inexact and even
        (``one`` is ordered: NaN stays as it is)."""
        b = self._b
        i32 = ir.IntType(32)
        f = b.fptrunc(v, self._ty(ir.FloatType()))
        back = b.fpext(f, v.type)
        bits = b.bitcast(f, self._ty(i32))
        even = b.icmp_unsigned("==", b.and_(bits, self._const(i32, 1)), self._const(i32, 0))
        move = b.and_(b.fcmp_ordered("!=", back, v), even)
        # |back| > |v|: back lies beyond v, seen from 0 (v is not 0 where it moves)
        zero = self._const(ir.DoubleType(), 0.0)
        away = b.select(b.fcmp_ordered(">", v, zero), b.fcmp_ordered(">", back, v),
                        b.fcmp_ordered("<", back, v))
        step = b.select(away, self._const(i32, -1), self._const(i32, 1))
        return b.select(move, b.add(bits, step), bits)

    def stored(self, v, dtype):
        """``v`` of the compute type as a value of the Numba ``dtype``, rounded to
        nearest even once (float16, bfloat16: NaN quiet, keeping the top of its
        payload)."""
        b = self._b
        if dtype in (types.float32, types.float64):
            t = self._ty(_ir_float(dtype))
            if v.type == t:
                return v
            return b.fptrunc(v, t) if self._wide else b.fpext(v, t)
        i32 = ir.IntType(32)
        i16 = self._ty(ir.IntType(16))
        if self._wide:
            bits = self._odd_f32_bits(v)
        else:
            bits = b.bitcast(v, self._ty(i32))
        if dtype == types.uint16:
            f = b.bitcast(bits, self._ty(ir.FloatType()))
            return b.bitcast(b.fptrunc(f, self._ty(ir.HalfType())), i16)
        if dtype == types.int16:
            top = b.lshr(bits, self._const(i32, 16))
            nan = b.icmp_unsigned(">", b.and_(bits, self._const(i32, 0x7FFFFFFF)),
                                  self._const(i32, 0x7F800000))
            rounded = b.lshr(b.add(b.add(bits, self._const(i32, 0x7FFF)),
                                   b.and_(top, self._const(i32, 1))), self._const(i32, 16))
            return b.trunc(b.select(nan, b.or_(top, self._const(i32, 0x40)), rounded), i16)
        raise TypeError(f"no conversion to {dtype}")


def _half_loader(compute):
    """An intrinsic: half bits -> ``compute`` (None: the bits' compute type), exact."""
    @intrinsic
    def converted(typingctx, h):
        ty = compute or compute_type(h)

        def codegen(context, builder, sig, args):
            return Convert(builder, compute=sig.return_type).loaded(args[0], sig.args[0])
        return ty(h), codegen
    return converted


_half_to_f64 = _half_loader(types.float64)
_half_value = _half_loader(None)


@intrinsic
def _to_half(typingctx, v, a):
    """float32 or float64 ``v`` -> the bits of array ``a``'s half format (uint16:
    float16, int16: bfloat16), correctly rounded to nearest even."""
    wide = v if v in (types.float32, types.float64) else types.float64

    def codegen(context, builder, sig, args):
        return Convert(builder, compute=wide).stored(
            context.cast(builder, args[0], sig.args[0], wide), sig.return_type)
    return a.dtype(v, a), codegen


def load(v):
    """A stored value as float64, exactly (see the module docstring)."""
    raise NotImplementedError("nbnorm.cpu.convert.load runs inside Numba kernels only")


def value(v):
    """A stored value in its compute type, exactly (see the module docstring)."""
    raise NotImplementedError("nbnorm.cpu.convert.value runs inside Numba kernels only")


def coef(c, a):
    """Coefficient ``c`` in the compute type of array ``a`` (see the module docstring)."""
    raise NotImplementedError("nbnorm.cpu.convert.coef runs inside Numba kernels only")


def like(r, v):
    """``r`` in ``v``'s float type: the result of a float64 function of ``v``
    that is exact in ``v``'s type (``epilogue``'s ReLU and mask)."""
    raise NotImplementedError("nbnorm.cpu.convert.like runs inside Numba kernels only")


def compute_empty(n, a):
    """``np.empty(n)`` of array ``a``'s compute type: a coefficient table."""
    raise NotImplementedError("nbnorm.cpu.convert.compute_empty runs inside Numba kernels only")


def store(v, a):
    """``v`` (float32 or float64) as a value of ``a``'s storage dtype (see the
    module docstring)."""
    raise NotImplementedError("nbnorm.cpu.convert.store runs inside Numba kernels only")


def centre(c, s, t, a):
    """``(c', t')``, float64: the centred form ``(x - c) * s + t`` as ``(x - c') * s +
    t'`` with ``c'`` a value of array ``a``'s compute type (``c`` rounded to
    float32, for half data; ``c`` itself otherwise) and ``t' = t + (c' - c) * s``
    (``t`` itself otherwise); see the module docstring."""
    raise NotImplementedError("nbnorm.cpu.convert.centre runs inside Numba kernels only")


def compact(a):
    """Whether the values of array ``a`` take the compact forms (``compact_type``)."""
    raise NotImplementedError("nbnorm.cpu.convert.compact runs inside Numba kernels only")


_NP_FLOAT = {types.float32: np.float32, types.float64: np.float64}


def _overload_loading(fn, from_half):
    """``fn(v)``: half bits through the intrinsic ``from_half``; float32 and
    float64 as float64 (their compute type)."""
    @overload(fn, inline="always")
    def loading(v):
        if v in _HALF_BITS:
            return lambda v: from_half(v)
        if isinstance(v, types.Float):
            return lambda v: np.float64(v)
        return None
    return loading


_overload_loading(load, _half_to_f64)
_overload_loading(value, _half_value)


@overload(coef, inline="always")
def _coef(c, a):
    cast = _NP_FLOAT[compute_type(a.dtype)]
    return lambda c, a: cast(c)


@overload(like, inline="always")
def _like(r, v):
    cast = _NP_FLOAT.get(v)
    if cast is None:
        return None
    return lambda r, v: cast(r)


@overload(compute_empty, inline="always")
def _compute_empty(n, a):
    dt = _NP_FLOAT[compute_type(a.dtype)]
    return lambda n, a: np.empty(n, dt)


@overload(store, inline="always")
def _store(v, a):
    dt = a.dtype
    if dt in _HALF_BITS:
        return lambda v, a: _to_half(v, a)
    if dt in (types.float32, types.float64):
        return lambda v, a: v  # the element assignment rounds float64 to float32 (RNE)
    return None


@overload(centre, inline="always")
def _centre(c, s, t, a):
    if compute_type(a.dtype) == types.float64:
        return lambda c, s, t, a: (np.float64(c), np.float64(t))

    def narrowed(c, s, t, a):
        c2 = np.float64(np.float32(c))
        return c2, t + (c2 - c) * s
    return narrowed


@overload(compact, inline="always")
def _compact(a):
    value = compact_type(a.dtype)
    return lambda a: value
