"""The dtype policy: which dtypes nbnorm takes, and how each is stored,
computed and reported.  Every dtype decision of the library is made here.

=============  ==============  ===========  ===============================
data dtype     kernels see     arithmetic   mean, invstd, grad_weight/bias
=============  ==============  ===========  ===============================
float64        float64         float64      float64
float32        float32         float64      float32
float16        uint16 bits     float64      float32
bfloat16       int16 bits      float64      float32
=============  ==============  ===========  ===============================

"Data" is ``x``, ``grad_out``, ``residual``, ``forward_out``, ``out``,
``grad_input`` and ``grad_residual``: they all have ``x``'s dtype.  bfloat16
is ``ml_dtypes.bfloat16``, the NumPy dtype of JAX and TensorFlow; nbnorm never
imports ``ml_dtypes`` itself, it recognizes the dtype when the caller's
program has.  Numba's CPU target has no 2-byte float arrays, so the CPU
kernels read and write half data as 2-byte integers (the integer dtype is a
tag telling the formats apart: ``cpu.convert``); CUDA kernels take float16
arrays as they are and bfloat16 as the same int16 bits.  Statistics are
accumulated in float64 for every dtype; per-channel parameters (weight, bias,
running statistics) may have any float dtype, independently of the data.
"""

import sys

import numpy as np

F32 = np.dtype(np.float32)

#: What the kernels see for each half dtype (by name: ``bfloat16`` needs ml_dtypes).
_HALF_STORAGE = {"float16": np.dtype(np.uint16), "bfloat16": np.dtype(np.int16)}

SUPPORTED = "float16, bfloat16 (ml_dtypes), float32 or float64"


def bfloat16():
    """``ml_dtypes.bfloat16`` as a dtype if the program has imported ml_dtypes, else None."""
    ml = sys.modules.get("ml_dtypes")
    return None if ml is None else np.dtype(ml.bfloat16)


def is_float(dt):
    """Whether ``dt`` is a floating-point dtype (bfloat16 included)."""
    return dt.kind == "f" or _is_bfloat16(dt)


def _is_bfloat16(dt):
    return dt.kind == "V" and dt.name == "bfloat16" and dt == bfloat16()


def check_data(dt, name):
    """``TypeError`` unless ``dt`` is one of the data dtypes above."""
    if not is_float(dt):
        raise TypeError(f"{name} must be a floating-point array ({SUPPORTED}), got dtype {dt}")
    if dt.itemsize > 8:
        raise TypeError(f"{name}: dtype {dt} is not supported; pass {SUPPORTED}")


def stat_dtype(dt):
    """The dtype of the per-channel results (mean, invstd, grad_weight, grad_bias)."""
    return F32 if dt.itemsize == 2 else dt


def kernel_view(a):
    """``a`` as the CPU kernels take it: half data as its integer bits (a view)."""
    return a.view(_HALF_STORAGE[a.dtype.name]) if a.dtype.itemsize == 2 else a
