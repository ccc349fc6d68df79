"""``SyncBatchNorm``: synchronized batch norm over ``torch.distributed``
process groups (gloo on the CPU, which PyTorch's own lacks; NCCL on CUDA),
and ``convert_sync_batchnorm``.

The exchange is ``nbnorm.distributed``'s (one header and one ``2C`` payload per
direction, merged in rank order; a bad input on any rank raises on every
rank), over the group's collectives instead of MPI's: ``_GroupCollectives``.

The collective runs inside a ``torch.autograd.Function``, not a
``torch.library.custom_op`` as the local modules' kernels do: a custom op's
arguments are tensors and scalars, so it cannot take the process group (and a
collective inside an opaque op would hide it from ``torch.compile``'s
distributed passes anyway).  PyTorch's ``SyncBatchNorm`` makes the same choice.
"""

import torch
import torch.distributed as dist

from .. import distributed as _exchange
from . import tensors
from .modules import _BatchNorm
from .ops import _momentum, _on_device, batch_norm

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


class _GroupCollectives:
    """``nbnorm.distributed``'s collectives over a process group: float64 host
    buffers sent as tensors on the group's device (CUDA for NCCL)."""

    def __init__(self, group, device):
        self.group = group
        self.size = dist.get_world_size(group)
        self.device = device

    def allgather(self, a):
        mine = torch.from_numpy(a).to(self.device)
        table = torch.empty(self.size * a.size, dtype=torch.float64, device=self.device)
        _all_gather(table, mine, group=self.group)  # gloo: a flat output
        return table.cpu().numpy().reshape(self.size, a.size)

    def allreduce(self, a):
        total = torch.from_numpy(a.copy()).to(self.device)
        dist.all_reduce(total, group=self.group)
        return total.cpu().numpy()


#: torch.distributed's allgather into one tensor, under its newer name where it has one
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _collectives(group, x):
    if dist.get_backend(group) == "nccl":
        device = x.device if isinstance(x, torch.Tensor) and x.is_cuda else torch.device(
            "cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return _GroupCollectives(group, device)


class _SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm of one rank's part of the batch, with the
    whole batch's statistics (``nbnorm.distributed.forward``/``backward``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, coll, relu):
        x = tensors.dense(x)
        C = x.shape[1]
        sdt = tensors.stat_dtype(x.dtype)
        out = tensors.empty_like(x)
        mean = x.new_empty((C,), dtype=sdt)
        invstd = x.new_empty((C,), dtype=sdt)
        a = tensors.array
        with _on_device(x):  # the running statistics are the module's buffers, updated in place
            _exchange.forward(a(x), a(weight), a(bias), a(running_mean), a(running_var),
                              comm=coll, momentum=momentum, eps=eps, axis=1, out=a(out),
                              mean=a(mean), invstd=a(invstd),
                              activation="relu" if relu else None, stream=tensors.stream(x))
        ctx.save_for_backward(x, weight, mean, invstd, out if relu else None)
        ctx.coll = coll
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, invstd, forward_out = ctx.saved_tensors
        grad_out = tensors.like(grad_out, x)
        sdt = tensors.stat_dtype(x.dtype)
        C = x.shape[1]
        grad_input = tensors.empty_like(x)
        grad_weight = x.new_empty((C,), dtype=sdt)
        grad_bias = x.new_empty((C,), dtype=sdt)
        a = tensors.array
        with _on_device(x):
            _exchange.backward(a(grad_out), a(x), a(mean), a(invstd), a(weight), comm=ctx.coll,
                               axis=1, grad_input=a(grad_input), grad_weight=a(grad_weight),
                               grad_bias=a(grad_bias),
                               activation=None if forward_out is None else "relu",
                               forward_out=a(forward_out), stream=tensors.stream(x))
        need = ctx.needs_input_grad
        return (grad_input if need[0] else None,
                grad_weight.to(weight.dtype) if need[1] else None,
                grad_bias.to(ctx.bias_dtype) if need[2] else None,
                None, None, None, None, None, None)


class SyncBatchNorm(_BatchNorm, torch.nn.SyncBatchNorm):
    """``torch.nn.SyncBatchNorm`` computed by nbnorm, on the CPU (gloo) as well
    as on CUDA (NCCL): the same constructor (plus ``activation``), parameters,
    buffers and semantics.

    Parameters
    ----------
    num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype, bias
        As ``torch.nn.SyncBatchNorm`` (``process_group=None``: the default group).
    activation : {None, "relu"}
        Fused into the normalizing pass, as for ``nbnorm.torch.BatchNorm2d``.

    Notes
    -----
    Training mode with more than one process normalizes with the statistics
    of the whole group's batch: per direction a 4-number header and ``2C``
    float64 numbers per rank (``nbnorm.distributed``), exact for uneven batches
    and for ranks without rows (an empty output and zero, not None, parameter
    gradients).  A bad input on one rank raises on every rank, with the
    running statistics unchanged (the counter ``num_batches_tracked`` counts
    the step, as the local modules do on error).  ``grad_weight``/``grad_bias``
    are each rank's own sums: DistributedDataParallel's all-reduce adds them.
    Eval mode, world size 1 and no initialized process group are the local
    ``nbnorm.torch`` batch norm.  Tensors nbnorm does not take (CUDA
    bfloat16, other devices) run ``torch.nn.SyncBatchNorm``'s own forward.
    CUDA tensors: the O(C) statistics are copied to the host for the merge
    (the one synchronization with the device per direction).
    """

    def _sync_group(self):
        """The process group to synchronize over, or None for the local layer."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group or dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input):
        group = self._sync_group() if self.training else None
        if group is not None and not tensors.supported(input):
            return torch.nn.SyncBatchNorm.forward(self, input)
        try:
            self._check_input_dim(input)
            self._check_non_zero_input_channels(input)
        except Exception as e:  # the other ranks are waiting in the collective: tell them
            if group is not None:
                _exchange._report(_collectives(group, input), e, "forward")
            raise
        running_mean, running_var, training, momentum, counter = self._batch_norm_arguments()
        if group is None:
            return batch_norm(input, running_mean, running_var, self.weight, self.bias,
                              training, momentum, self.eps, num_batches_tracked=counter,
                              activation=self.activation)
        momentum = _momentum(momentum, counter) if running_mean is not None else 0.0
        return _SyncBatchNormFunction.apply(
            input, self.weight, self.bias, running_mean, running_var, float(momentum),
            float(self.eps), _collectives(group, input), self.activation is not None)


def convert_sync_batchnorm(module, process_group=None):
    """Replace every batch-norm module of ``module`` by ``SyncBatchNorm``
    (``torch.nn.SyncBatchNorm.convert_sync_batchnorm``'s rules, with nbnorm's
    class): parameters and buffers are shared, mode and ``qconfig`` kept,
    an nbnorm module's ``activation`` too.

    Parameters
    ----------
    module : torch.nn.Module
        A model, or a batch-norm module itself.
    process_group : ProcessGroup, optional
        The group to synchronize over; None: each converted module keeps a
        ``SyncBatchNorm``'s own group, or the default one.

    Returns
    -------
    torch.nn.Module
        ``module`` with its batch norms replaced (a new module when ``module``
        itself is one).
    """
    out = module
    if (isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
            and type(module) is not SyncBatchNorm):
        group = process_group if process_group is not None else getattr(
            module, "process_group", None)
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, group, bias=module.bias is not None,
                            activation=getattr(module, "activation", None))
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out
