"""nbnorm: batch normalization kernels for NumPy (Numba CPU) and CUDA arrays."""

from .api import BackwardResult, ForwardResult, backward, forward

__all__ = ["forward", "backward", "ForwardResult", "BackwardResult"]
__version__ = "0.1.0"
