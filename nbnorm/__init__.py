"""nbnorm: batch normalization kernels for NumPy (Numba CPU) and CUDA arrays."""

from .api import BackwardResult, ForwardResult, backward, forward
from .fold import fold

__all__ = ["forward", "backward", "ForwardResult", "BackwardResult", "fold"]
__version__ = "0.1.0"
