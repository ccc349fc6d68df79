"""Shared data for the asv suite: seeded batches per (layout, dtype, size).

The thread count is pinned (``NUMBA_NUM_THREADS``, default 2: the reference
machine's cores) before Numba is imported, so results of different commits and
runs are comparable.  ``NBNORM_ASV_SIZES=small`` restricts the suite to the
small shapes (the smoke test in ``tests/test_benchmarks.py`` uses it).
"""

import functools
import importlib.util
import os

os.environ.setdefault("NUMBA_NUM_THREADS", "2")

import numpy as np  # noqa: E402

SEED = 20240603

#: The issue-3 batches ("large": 51 MB in float32, NC 34 MB) and small ones
#: where per-call overhead dominates.
SHAPES = {
    ("NCHW", "large"): ((64, 64, 56, 56), 1),
    ("NHWC", "large"): ((64, 56, 56, 64), -1),
    ("NC", "large"): ((8192, 1024), 1),
    ("NCHW", "small"): ((8, 16, 14, 14), 1),
    ("NHWC", "small"): ((8, 14, 14, 16), -1),
    ("NC", "small"): ((32, 64), 1),
}

#: NCHW batches of small feature maps (the later stages of a ResNet), whose
#: short runs take kernel paths of their own (docs/performance.md, "Small feature maps");
#: "small": the same maps and channels with a batch of 4.
MAPS = {"7x7": (256, 512, 7, 7), "4x4": (1024, 64, 4, 4), "14x14": (64, 256, 14, 14)}

LAYOUTS = ["NCHW", "NHWC", "NC"]
#: Half dtypes' ratios are to the copy of the 2-byte array; bfloat16 needs ml_dtypes.
HALF_DTYPES = ["float16"] + (["bfloat16"] if importlib.util.find_spec("ml_dtypes") else [])
DTYPES = ["float32", "float64"] + HALF_DTYPES
FULL_DTYPES = ["float32", "float64"]
SIZES = [s for s in ("small", "large")
         if s in os.environ.get("NBNORM_ASV_SIZES", "small,large").split(",")]


class Batch:
    """A batch with its parameters and every output preallocated."""

    def __init__(self, shape, axis, dtype):
        dtype = as_dtype(dtype)
        pdt = np.dtype(np.float32) if dtype.itemsize == 2 else dtype  # parameters, statistics
        rng = np.random.default_rng(SEED)
        C = shape[axis]
        self.axis = axis
        self.x = (rng.standard_normal(shape, dtype=np.float32) * 2.0 + 3.0).astype(dtype)
        self.dy = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
        self.residual = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
        self.weight = rng.uniform(0.5, 1.5, C).astype(pdt)
        self.bias = rng.uniform(-1.0, 1.0, C).astype(pdt)
        self.running_mean = rng.uniform(2.0, 4.0, C).astype(pdt)
        self.running_var = rng.uniform(3.0, 5.0, C).astype(pdt)
        self.out = np.zeros_like(self.x)          # touched: no page faults in the timings
        self.grad_input = np.zeros_like(self.x)
        self.mean = np.empty(C, pdt)
        self.invstd = np.empty(C, pdt)
        self.grad_weight = np.empty(C, pdt)
        self.grad_bias = np.empty(C, pdt)
        # the ReLU's forward output (its mask) and the residual's gradient
        self.forward_out = np.maximum(self.x.astype(np.float32) - 3.0, 0).astype(dtype)
        self.grad_residual = np.zeros_like(self.x)


def as_dtype(name):
    """A dtype by name (``bfloat16``: ml_dtypes')."""
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


@functools.lru_cache(maxsize=2)
def batch(layout, dtype, size):
    """The (cached) batch for one parameter combination."""
    return Batch(*SHAPES[layout, size], dtype)


@functools.lru_cache(maxsize=2)
def map_batch(name, dtype, size):
    """The (cached) NCHW batch of the feature maps ``name`` (a key of ``MAPS``)."""
    shape = MAPS[name]
    return Batch(shape if size == "large" else (4,) + shape[1:], 1, dtype)
