"""Reading and writing every storage dtype as float64, inside the CUDA kernels.

The kernels see four storage dtypes (``nbnorm.dtypes``): float16, float32 and
float64 as native device arrays, and bfloat16 as ``int16`` arrays of its bits
(the CUDA array interface has no bfloat16 type).  ``codec(kind)`` gives the
``(load, store)`` device functions of one storage dtype: ``load(v)`` turns a
stored value into float64, exactly; ``store(v)`` turns a float64 value into
what the array element is assigned, rounded to nearest even once.  Kernel
factories pick the pair when they build a kernel (closures), so every kernel
compiles to straight-line code for its dtype.

- float16/float32/float64: ``load`` is ``float(v)`` (``cvt.f64.f16`` /
  ``cvt.f64.f32``, exact) and ``store`` returns ``v`` itself: the element
  assignment converts, and ``cvt.rn.f16.f64`` / ``cvt.rn.f32.f64`` round the
  float64 value correctly (NumPy's casts do the same on the simulator).
- bfloat16: ``load`` puts the 16 bits on top of a float32.  ``store`` rounds
  through float32 *rounded to odd* (truncated, its last bit set when inexact)
  and then to bfloat16 with round-to-nearest-even: float32 has more than two
  extra bits, so that is the correctly rounded result, bit for bit what
  ``nbnorm.cpu.convert.store`` gives from float64.  NaN keeps the top of its payload
  and is made quiet, as on the CPU.

The bit-level primitives come from libdevice on the GPU; the simulator has no
libdevice, so there they are NumPy views of the same bits.
"""

import math

import numpy as np
from numba import config as numba_config
from numba import cuda

SIMULATOR = bool(numba_config.ENABLE_CUDASIM)

#: Storage kinds (``kind``): the dtype names the kernels are specialized for.
KINDS = ("float16", "bfloat16", "float32", "float64")


def kind(dtype):
    """The storage kind of a data array's dtype: ``int16`` holds bfloat16 bits."""
    dt = np.dtype(dtype)
    if dt == np.int16:
        return "bfloat16"
    if dt.kind != "f" or dt.itemsize not in (2, 4, 8):
        raise TypeError(f"the CUDA kernels take {', '.join(KINDS)} (as int16 bits) data, "
                        f"got dtype {dt}")
    return dt.name


def param_kind(dtype):
    """The kind of a per-channel array: ``"bfloat16"`` (int16 bits) or ``"float"``
    (any native float dtype: the element assignment converts)."""
    return "bfloat16" if np.dtype(dtype) == np.int16 else "float"


def compact(kind):
    """Whether data of this kind take the float32 forms of the elementwise passes
    (``x * scale + offset``, ``k * g + (q * x + r)``), as on the CPU."""
    return kind != "float64"


if SIMULATOR:
    def _f32_rz(v):
        """float64 ``v`` rounded toward zero to float32."""
        with np.errstate(over="ignore"):
            f = np.float32(v)
        if abs(float(f)) > abs(v):  # RNE went away from zero (inf: FLT_MAX)
            f = np.array(np.array(f).view(np.int32) - 1, np.int32).view(np.float32)[()]
        return f

    def _f32_bits(f):
        return int(np.array(f, np.float32).view(np.int32))

    def _bits_f32(i):
        return np.array(i, np.int32).view(np.float32)[()]

    def _f64_bits(v):
        return int(np.array(v, np.float64).view(np.int64))
else:
    from numba.cuda import libdevice

    _f32_rz = libdevice.double2float_rz
    _f32_bits = libdevice.float_as_int
    _bits_f32 = libdevice.int_as_float
    _f64_bits = libdevice.double_as_longlong


@cuda.jit(device=True)
def load_float(v):
    return np.float64(v)


@cuda.jit(device=True)
def store_float(v):
    return v


@cuda.jit(device=True)
def load_bf16(h):
    """bfloat16 bits (int16) -> float64, exact: the upper half of a float32."""
    return np.float64(_bits_f32(np.int32(np.int32(h) << 16)))


@cuda.jit(device=True)
def store_bf16(v):
    """float64 -> bfloat16 bits (int16), correctly rounded to nearest even."""
    if math.isnan(v):
        # quiet, with the top of the payload (what float32 conversion keeps)
        d = _f64_bits(v)
        o = ((d >> 48) & 0x8000) | 0x7FC0 | ((d >> 45) & 0x7F)
    else:
        f = _f32_rz(v)
        b = _f32_bits(f) & 0xFFFFFFFF
        if np.float64(f) != v:
            b |= 1  # round to odd: the sticky bit of what was cut off
        o = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return np.int16(o - ((o & 0x8000) << 1))  # as signed 16 bits


_CODECS = {"bfloat16": (load_bf16, store_bf16)}


def codec(kind):
    """``(load, store)`` device functions for a storage or parameter kind."""
    return _CODECS.get(kind, (load_float, store_float))
