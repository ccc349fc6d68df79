"""Reading and writing every storage dtype as float64, inside the CPU kernels.

The kernels see four storage dtypes (``nbnorm.dtypes``): float32 and float64
as themselves, IEEE float16 as ``uint16`` bits and bfloat16 as ``int16`` bits
(Numba's CPU target has no 2-byte float arrays; the integer dtype is only a
tag that tells the two formats apart at compile time).  ``load(v)`` turns a
stored value into float64, exactly; ``store(v, a)`` turns a float64 value
into ``a``'s storage dtype, rounded to nearest even once (``np.float32(v)``
for float32).  Both are ``overload``\\ s resolved by type, so a kernel written
with them compiles to straight-line code for each dtype it is called with,
and ``compact(a)`` says at compile time whether ``a``'s values take the
float32 forms of the normalizing and gradient passes (``forward``,
``backward``).

Half formats are rounded through float32 *rounded to odd*: a float64 value
is first rounded to float32 with its sticky bit kept in the last place, then
to the 2-byte format with round-to-nearest-even.  float32 has more than two
extra bits over either format, so the result is the correctly rounded one
(never the double-rounding error of RNE twice), and the same bits NumPy's
``astype(np.float16)`` gives from float64.
"""

import numpy as np  # noqa: F401  (np.float64 in the overloads)
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload


class Convert:
    """The conversions of the half formats to and from float64, as LLVM IR, for
    scalars (``width`` None: ``load``, ``store``) and for the vectors of the
    streaming intrinsics (``streaming``): one definition, so both write the
    same bits.  float16 goes through the hardware's conversions (LLVM's
    ``fpext``/``fptrunc`` of ``half``: F16C's ``vcvtph2ps``/``vcvtps2ph`` on x86,
    exact, and round-to-nearest-even, which a loop vectorizes; measured: the
    integer bit manipulation they replace made a float16 pass 5-14 copy-times),
    after the float32 rounding to odd; bfloat16 is the upper half of a float32.
    """

    def __init__(self, builder, width=None):
        self._b = builder
        self._w = width

    def _ty(self, ty):
        return ty if self._w is None else ir.VectorType(ty, self._w)

    def _const(self, ty, v):
        return ir.Constant(self._ty(ty), v if self._w is None else [v] * self._w)

    def loaded(self, v, dtype):
        """Stored ``v`` (of the Numba ``dtype``) as float64, exactly."""
        b = self._b
        f64 = self._ty(ir.DoubleType())
        if dtype == types.float64:
            return v
        if dtype == types.float32:
            return b.fpext(v, f64)
        if dtype == types.uint16:  # float16 bits
            return b.fpext(b.fpext(b.bitcast(v, self._ty(ir.HalfType())),
                                   self._ty(ir.FloatType())), f64)
        if dtype == types.int16:  # bfloat16 bits
            i32 = ir.IntType(32)
            u = b.shl(b.zext(v, self._ty(i32)), self._const(i32, 16))
            return b.fpext(b.bitcast(u, self._ty(ir.FloatType())), f64)
        raise TypeError(f"no conversion from {dtype}")

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
        """float64 ``v`` as a value of the Numba ``dtype``, rounded to nearest even
        once (float16, bfloat16: NaN quiet, keeping the top of its payload)."""
        b = self._b
        if dtype == types.float64:
            return v
        if dtype == types.float32:
            return b.fptrunc(v, self._ty(ir.FloatType()))
        i32 = ir.IntType(32)
        i16 = self._ty(ir.IntType(16))
        bits = self._odd_f32_bits(v)
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


@intrinsic
def _half_to_f64(typingctx, h):
    """float16 (uint16) or bfloat16 (int16) bits -> float64, exact."""
    def codegen(context, builder, sig, args):
        return Convert(builder).loaded(args[0], sig.args[0])
    return types.float64(h), codegen


@intrinsic
def _f64_to_half(typingctx, v, a):
    """float64 -> the bits of array ``a``'s half format (uint16: float16, int16:
    bfloat16), correctly rounded to nearest even."""
    def codegen(context, builder, sig, args):
        return Convert(builder).stored(context.cast(builder, args[0], sig.args[0],
                                                    types.float64), sig.return_type)
    return a.dtype(v, a), codegen


def load(v):
    """A stored value as float64 (see the module docstring)."""
    raise NotImplementedError("nbnorm.cpu.convert.load runs inside Numba kernels only")


def store(v, a):
    """float64 ``v`` as a value of ``a``'s storage dtype (see the module docstring)."""
    raise NotImplementedError("nbnorm.cpu.convert.store runs inside Numba kernels only")


def compact(a):
    """Whether the values of array ``a`` take the float32 forms (4 bytes or fewer)."""
    raise NotImplementedError("nbnorm.cpu.convert.compact runs inside Numba kernels only")


@overload(load, inline="always")
def _load(v):
    if v in (types.uint16, types.int16):
        return lambda v: _half_to_f64(v)
    if isinstance(v, types.Float):
        return lambda v: np.float64(v)
    return None


@overload(store, inline="always")
def _store(v, a):
    dt = a.dtype
    if dt in (types.uint16, types.int16):
        return lambda v, a: _f64_to_half(v, a)
    if dt in (types.float32, types.float64):
        return lambda v, a: v  # the element assignment rounds float64 to float32 (RNE)
    return None


@overload(compact, inline="always")
def _compact(a):
    value = a.dtype.bitwidth <= 32
    return lambda a: value
