"""``BatchNorm1d``, ``BatchNorm2d``, ``BatchNorm3d``: PyTorch's modules with
nbnorm's kernels, and ``convert``, which puts them into a model.

Each class subclasses its ``torch.nn`` namesake, whose constructor, parameters,
buffers, ``state_dict`` and load hooks, ``reset_parameters``, input checks and
``extra_repr`` it keeps: only ``forward`` is nbnorm's.  So ``isinstance(m,
torch.nn.BatchNorm2d)`` holds, checkpoints load both ways, and
``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` converts them.
"""

import torch

from ..api import _activation
from .ops import batch_norm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert"]


class _BatchNorm:
    """``forward`` of ``torch.nn.BatchNorm*d`` through ``nbnorm.torch.batch_norm``
    (mixed in before the torch class)."""

    def __init__(self, *args, activation=None, **kwargs):
        _activation(activation)
        super().__init__(*args, **kwargs)
        self.activation = activation

    def _batch_norm_arguments(self):
        """PyTorch's bookkeeping of ``_BatchNorm.forward``: count the batch when
        training with tracked statistics, and choose what normalizes.  Returns
        ``(running_mean, running_var, training, momentum, num_batches_tracked)``
        for ``batch_norm`` (statistics of None: not passed)."""
        update = (self.training and self.track_running_stats
                  and self.num_batches_tracked is not None)
        if update:
            self.num_batches_tracked.add_(1)
        momentum = self.momentum
        if momentum is None and not update:
            momentum = 0.0  # nothing is updated: any weight will do
        # batch statistics in training, and in eval mode without buffers
        training = self.training or (self.running_mean is None and self.running_var is None)
        # buffers are read in eval mode, and updated only when tracked
        passed = not self.training or self.track_running_stats
        return (self.running_mean if passed else None, self.running_var if passed else None,
                training, momentum, self.num_batches_tracked if momentum is None else None)

    def forward(self, input, residual=None):
        """Normalize ``input`` as the torch module does.

        Parameters
        ----------
        input : Tensor
            ``(N, C)``/``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)`` as
            the torch class takes; any memory format (``channels_last`` output
            for ``channels_last`` input).
        residual : Tensor like ``input``, optional
            Added to the normalized values in the same pass, before the
            module's ``activation``.

        Returns
        -------
        Tensor
            ``activation(bn(input) + residual)``.
        """
        self._check_input_dim(input)
        running_mean, running_var, training, momentum, counter = self._batch_norm_arguments()
        return batch_norm(input, running_mean, running_var, self.weight, self.bias, training,
                          momentum, self.eps, num_batches_tracked=counter, residual=residual,
                          activation=self.activation)

    def extra_repr(self):
        act = getattr(self, "activation", None)
        return super().extra_repr() + ("" if act is None else f", activation={act!r}")


_DOC = """``torch.nn.{name}`` computed by nbnorm: the same constructor (plus
    ``activation``), parameters, buffers and results.

    Parameters
    ----------
    num_features, eps, momentum, affine, track_running_stats, device, dtype, bias
        As ``torch.nn.{name}`` (``momentum=None``: the cumulative average;
        ``bias=False``: a weight without a bias).
    activation : {{None, "relu"}}
        Fused into the normalizing pass: ``relu(bn(x) + residual)``, the
        backward masked by the output's sign.  ``None`` (the default) is the
        torch module exactly.

    Notes
    -----
    CPU float16, bfloat16 (with ml_dtypes), float32 and float64 tensors and
    CUDA float16, float32 and float64 tensors run nbnorm's kernels through the
    ``torch.ops.nbnorm`` custom ops (autograd, ``torch.compile``,
    ``torch.export``); any other tensor (CUDA bfloat16, other devices) runs
    PyTorch's own batch norm.  There is no second derivative: a backward with
    ``create_graph=True`` raises ``NotImplementedError`` when it reaches the
    layer.
    """


class BatchNorm1d(_BatchNorm, torch.nn.BatchNorm1d):
    __doc__ = _DOC.format(name="BatchNorm1d")


class BatchNorm2d(_BatchNorm, torch.nn.BatchNorm2d):
    __doc__ = _DOC.format(name="BatchNorm2d")


class BatchNorm3d(_BatchNorm, torch.nn.BatchNorm3d):
    __doc__ = _DOC.format(name="BatchNorm3d")


#: torch class -> nbnorm class.  Exact types only: a subclass of a torch
#: module may have its own forward, and SyncBatchNorm its own semantics.
_CONVERSIONS = {torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d,
                torch.nn.BatchNorm3d: BatchNorm3d}


def convert(model):
    """Make every ``torch.nn.BatchNorm1d/2d/3d`` of ``model`` nbnorm's, in place.

    Each module becomes an instance of the nbnorm class of the same name (its
    class is changed, as PyTorch's lazy modules do when they materialize), so
    it keeps its identity, parameters, buffers, hooks, train/eval mode and
    attributes: optimizers, references held elsewhere and checkpoints are
    unaffected.  Subclasses of the torch classes (which may have their own
    ``forward``), ``SyncBatchNorm`` and uninitialized lazy modules are left
    alone.

    Parameters
    ----------
    model : torch.nn.Module
        A model, or a batch-norm module itself.

    Returns
    -------
    torch.nn.Module
        ``model``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"convert takes a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        cls = _CONVERSIONS.get(type(module))
        if cls is not None:
            module.__class__ = cls
            module.activation = None
    return model
