"""nbnorm: batch normalization kernels for NumPy (Numba CPU) and CUDA arrays."""

from .api import BackwardResult, ForwardResult, backward, forward
from .fold import fold
from .layer import BatchNorm

__all__ = ["forward", "backward", "ForwardResult", "BackwardResult", "fold", "BatchNorm"]
__version__ = "0.1.0"
