"""The normalizing pass: ``out = (x - center[c]) * scale[c] + shift[c]``.

``scale`` folds ``invstd * weight`` and the arithmetic is float64, so the
subtraction of a large mean keeps its precision for float32 data.  Elementwise,
so ``out`` may be ``x`` itself.  Backward in inference mode reuses it with
``center = 0`` and ``shift = 0``.
"""

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True)
def normalize_planar(x, center, scale, shift, out):
    outer, C, inner = x.shape
    for t in prange(outer * C):
        o, c = divmod(np.int64(t), C)
        m = center[c]
        s = scale[c]
        b = shift[c]
        xr = x[o, c]
        yr = out[o, c]
        for i in range(inner):
            yr[i] = (np.float64(xr[i]) - m) * s + b


@njit(parallel=True, cache=True)
def normalize_interleaved(x, center, scale, shift, out):
    outer, C = x.shape
    for r in prange(outer):
        xr = x[r]
        yr = out[r]
        for c in range(C):
            yr[c] = (np.float64(xr[c]) - center[c]) * scale[c] + shift[c]
