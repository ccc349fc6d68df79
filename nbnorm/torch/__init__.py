"""nbnorm for PyTorch (``pip install "nbnorm[torch]"``): drop-in batch-norm
modules, the custom ops behind them, and folding into convolutions.

- ``BatchNorm1d``, ``BatchNorm2d``, ``BatchNorm3d``: subclasses of PyTorch's,
  computed by nbnorm (``modules``); ``convert(model)`` swaps a model's.
- ``batch_norm``: the functional form, over the ops ``torch.ops.nbnorm.batch_norm``
  and ``torch.ops.nbnorm.batch_norm_backward`` (``ops``).
- ``fuse_conv_bn_eval``, ``fold_model``: inference batch norms folded into the
  convolution or linear layer before them (``folding``).
- ``SyncBatchNorm``, ``convert_sync_batchnorm``: batch norm with the statistics
  of a ``torch.distributed`` process group, gloo or NCCL (``sync``).
- ``GroupNorm``, ``LayerNorm``, ``InstanceNorm1d/2d/3d``, ``RMSNorm`` and the
  functional ``group_norm``, ``layer_norm``, ``instance_norm``, ``rms_norm``
  over the ops ``torch.ops.nbnorm.norm``/``norm_backward`` (``norms``);
  ``convert`` swaps them too.

Importing ``nbnorm`` never imports torch; importing ``nbnorm.torch`` does.
"""

from .folding import fold_model, fuse_conv_bn_eval
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, convert
from .norms import (GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, LayerNorm,
                    RMSNorm, group_norm, instance_norm, layer_norm, rms_norm)
from .ops import batch_norm
from .sync import SyncBatchNorm, convert_sync_batchnorm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert", "batch_norm",
           "fuse_conv_bn_eval", "fold_model", "SyncBatchNorm", "convert_sync_batchnorm",
           "GroupNorm", "LayerNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
           "RMSNorm", "group_norm", "layer_norm", "instance_norm", "rms_norm"]
