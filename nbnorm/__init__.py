"""nbnorm: batch normalization kernels for NumPy (Numba CPU) and CUDA arrays."""

from .api import (BackwardResult, ForwardResult, Moments, backward, backward_sums, forward,
                  merge_moments, moments)
from .folding import fold
from .layer import BatchNorm, GroupNorm, LayerNorm, RMSNorm
from .norms import (RMSNormBackwardResult, RMSNormResult, group_norm, group_norm_backward,
                    instance_norm, instance_norm_backward, layer_norm, layer_norm_backward,
                    rms_norm, rms_norm_backward)

__all__ = ["forward", "backward", "ForwardResult", "BackwardResult", "fold",
           "BatchNorm", "GroupNorm", "LayerNorm", "RMSNorm",
           "moments", "Moments", "merge_moments", "backward_sums",
           "group_norm", "group_norm_backward", "layer_norm", "layer_norm_backward",
           "instance_norm", "instance_norm_backward", "rms_norm", "rms_norm_backward",
           "RMSNormResult", "RMSNormBackwardResult"]
__version__ = "0.1.0"
