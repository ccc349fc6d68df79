"""nbnorm: batch normalization kernels for NumPy (Numba CPU) and CUDA arrays."""

from .api import (BackwardResult, ForwardResult, Moments, backward, backward_sums, forward,
                  merge_moments, moments)
from .fold import fold
from .layer import BatchNorm

__all__ = ["forward", "backward", "ForwardResult", "BackwardResult", "fold", "BatchNorm",
           "moments", "Moments", "merge_moments", "backward_sums"]
__version__ = "0.1.0"
