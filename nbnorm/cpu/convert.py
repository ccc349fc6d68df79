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

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload


@intrinsic
def _f32(typingctx, bits):
    """The float32 whose bits are the uint32 ``bits``."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@intrinsic
def _bits(typingctx, f):
    """The uint32 bits of the float32 ``f``."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


_U = np.uint32


@njit(cache=True)
def f16_to_f64(h):
    """float16 bits (uint16) -> float64, exact: subnormals, inf, NaN payloads.

    The exponent is rebiased by an integer add; a subnormal is renormalized by
    one float32 subtraction (F. Giesen's branch-free form, all selects).
    """
    u = _U(h)
    o = (u & _U(0x7FFF)) << _U(13)
    e = o & _U(0x0F800000)
    o += _U(112 << 23)
    if e == _U(0x0F800000):  # inf, NaN: exponent 255
        o += _U(112 << 23)
    elif e == _U(0):  # zero, subnormal
        o = _bits(_f32(o + _U(1 << 23)) - _f32(_U(113 << 23)))
    return np.float64(_f32(o | ((u & _U(0x8000)) << _U(16))))


@njit(cache=True)
def bf16_to_f64(h):
    """bfloat16 bits (int16) -> float64, exact: the upper half of a float32."""
    return np.float64(_f32(_U(np.uint16(h)) << _U(16)))


@njit(cache=True)
def _odd_f32_bits(v):
    """The bits of float64 ``v`` rounded to float32 *to odd*: truncated, with the
    last bit set when anything was cut off (NaN and exact values as they are)."""
    f = np.float32(v)
    b = _bits(f)
    if np.float64(f) != v and v == v and not (b & _U(1)):
        # f is the even neighbour of v; the odd one is the other side of v
        if abs(np.float64(f)) > abs(v):
            b -= _U(1)
        else:
            b += _U(1)
    return b


@njit(cache=True)
def f64_to_f16(v):
    """float64 -> float16 bits (uint16), correctly rounded to nearest even."""
    b = _odd_f32_bits(v)
    sign = b & _U(0x80000000)
    b ^= sign
    if b >= _U((127 + 16) << 23):  # overflow, inf, NaN
        if b > _U(255 << 23):
            o = _U(0x7E00) | ((b >> _U(13)) & _U(0x3FF))  # quiet NaN, payload's top bits
        else:
            o = _U(0x7C00)
    elif b < _U(113 << 23):  # a float16 subnormal or zero: let float32 addition round
        magic = _U(((127 - 15) + (23 - 10) + 1) << 23)
        o = _bits(_f32(b) + _f32(magic)) - magic
    else:
        o = (b + _U(((15 - 127) << 23) + 0xFFF) + ((b >> _U(13)) & _U(1))) >> _U(13)
    return np.uint16(o | (sign >> _U(16)))


@njit(cache=True)
def f64_to_bf16(v):
    """float64 -> bfloat16 bits (int16), correctly rounded to nearest even."""
    b = _odd_f32_bits(v)
    if (b & _U(0x7FFFFFFF)) > _U(0x7F800000):  # NaN: quiet, keep the payload's top bits
        o = (b >> _U(16)) | _U(0x40)
    else:
        o = (b + _U(0x7FFF) + ((b >> _U(16)) & _U(1))) >> _U(16)
    return np.int16(np.uint16(o))


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
    if v == types.uint16:
        return lambda v: f16_to_f64(v)
    if v == types.int16:
        return lambda v: bf16_to_f64(v)
    if isinstance(v, types.Float):
        return lambda v: np.float64(v)
    return None


@overload(store, inline="always")
def _store(v, a):
    dt = a.dtype
    if dt == types.uint16:
        return lambda v, a: f64_to_f16(v)
    if dt == types.int16:
        return lambda v, a: f64_to_bf16(v)
    if dt in (types.float32, types.float64):
        return lambda v, a: v  # the element assignment rounds float64 to float32 (RNE)
    return None


@overload(compact, inline="always")
def _compact(a):
    value = a.dtype.bitwidth <= 32
    return lambda a: value
