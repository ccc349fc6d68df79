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

Importing ``nbnorm`` never imports torch; importing ``nbnorm.torch`` does.
"""

from .folding import fold_model, fuse_conv_bn_eval
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, convert
from .ops import batch_norm
from .sync import SyncBatchNorm, convert_sync_batchnorm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert", "batch_norm",
           "fuse_conv_bn_eval", "fold_model", "SyncBatchNorm", "convert_sync_batchnorm"]
