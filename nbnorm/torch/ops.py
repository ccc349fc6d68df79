"""nbnorm's forward and backward as PyTorch operators, and ``batch_norm``, the
functional form the modules call.

Two custom ops (``torch.library.custom_op``), both functional:

- ``torch.ops.nbnorm.batch_norm(x, weight, bias, running_mean, running_var,
  num_batches_tracked, training, momentum, eps, residual, relu)`` returns
  ``(out, mean, invstd, new_running_mean, new_running_var)``.  An op that
  mutates its inputs cannot carry autograd, so the running statistics are
  updated in fresh copies that the op returns (O(C)); ``batch_norm`` copies
  them into the buffers.
- ``torch.ops.nbnorm.batch_norm_backward(grad_out, x, mean, invstd, weight,
  training, forward_out, grad_residual)`` returns ``(grad_input,
  grad_weight, grad_bias, grad_residual)``: the op that the forward op's
  autograd formula (``register_autograd``) calls, so compiled and exported
  graphs hold it as one node.

Each op allocates its outputs with PyTorch (its caching allocator, on the
data's device), hands them to ``nbnorm.forward``/``nbnorm.backward`` as views
(``tensors.array``) and returns them; its fake (``register_fake``) makes the
same outputs from the same function (``_forward_outputs``,
``_backward_outputs``), so compiled graphs see eager mode's shapes, dtypes
and strides: outputs like ``x`` have ``x``'s (``preserve_format``).

Outputs: ``mean``/``invstd`` (``grad_weight``/``grad_bias``) have nbnorm's
statistics dtype, ``x``'s or float32 for half ``x``; the new running
statistics the buffers' dtype, or shape ``(0,)`` when the call updates none
(inference, no running statistics); ``grad_residual`` shape ``(0,)`` unless
asked for.  A batch with no values (N=0) follows PyTorch: an empty output,
running statistics unchanged, zero parameter gradients.
"""

import contextlib
from typing import Optional

import torch
from torch import Tensor

import nbnorm

from ..api import _activation
from . import tensors

__all__ = ["batch_norm"]


def _forward_outputs(x, running_mean, running_var, training):
    """The forward op's outputs, uninitialized (eager and fake alike)."""
    sdt = tensors.stat_dtype(x.dtype)
    C = x.shape[1]
    out = tensors.empty_like(x)
    mean = x.new_empty((C,), dtype=sdt)
    invstd = x.new_empty((C,), dtype=sdt)
    if training and running_mean is not None:
        return out, mean, invstd, torch.empty_like(running_mean), torch.empty_like(running_var)
    return out, mean, invstd, x.new_empty((0,), dtype=sdt), x.new_empty((0,), dtype=sdt)


def _backward_outputs(x, grad_residual):
    """The backward op's outputs, uninitialized (eager and fake alike)."""
    sdt = tensors.stat_dtype(x.dtype)
    C = x.shape[1]
    return (tensors.empty_like(x), x.new_empty((C,), dtype=sdt), x.new_empty((C,), dtype=sdt),
            tensors.empty_like(x) if grad_residual else x.new_empty((0,)))


def _on_device(x):
    """The context of a call on ``x``: its CUDA device made current (Numba
    launches on the current device's context)."""
    if x.device.type == "cuda":
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _momentum(momentum, num_batches_tracked):
    """The weight of this batch in the running statistics: ``momentum``, or
    with ``momentum=None`` the cumulative average's ``1 / num_batches_tracked``
    (PyTorch's: the counter already counts this batch)."""
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        raise ValueError("momentum=None (the cumulative average) needs num_batches_tracked")
    n = int(num_batches_tracked)
    if n < 1:
        raise ValueError(f"momentum=None: num_batches_tracked must count this batch "
                         f"(at least 1), got {n}")
    return 1.0 / n


def _batch_norm_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                  running_mean: Optional[Tensor], running_var: Optional[Tensor],
                  num_batches_tracked: Optional[Tensor], training: bool,
                  momentum: Optional[float], eps: float, residual: Optional[Tensor],
                  relu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``nbnorm.forward`` on ``x`` (channels on axis 1) as a functional op.

    ``training``: normalize with the batch statistics (and, given running
    statistics, return them updated with ``momentum``; ``None`` is the
    cumulative average over ``num_batches_tracked`` batches, this one
    included); else with the running ones.  ``residual`` and ``relu``: the
    fused epilogue ``relu(bn(x) + residual)``.
    """
    x = tensors.dense(x)
    residual = tensors.like(residual, x)
    out, mean, invstd, new_mean, new_var = _forward_outputs(x, running_mean, running_var,
                                                            training)
    update = training and running_mean is not None
    if update:
        new_mean.copy_(running_mean)
        new_var.copy_(running_var)
    if x.numel() == 0:  # PyTorch: nothing to normalize, running statistics unchanged
        mean.zero_()
        invstd.zero_()
        return out, mean, invstd, new_mean, new_var
    a = tensors.array
    with _on_device(x):
        nbnorm.forward(a(x), a(weight), a(bias), a(new_mean if update else running_mean),
                       a(new_var if update else running_var), training=training,
                       momentum=_momentum(momentum, num_batches_tracked) if update else 0.0,
                       eps=eps, axis=1, out=a(out), mean=a(mean), invstd=a(invstd),
                       activation="relu" if relu else None, residual=a(residual),
                       stream=tensors.stream(x))
    return out, mean, invstd, new_mean, new_var


batch_norm_op = torch.library.custom_op("nbnorm::batch_norm", mutates_args=())(_batch_norm_impl)


@batch_norm_op.register_fake
def _batch_norm_fake(x, weight, bias, running_mean, running_var, num_batches_tracked,
                     training, momentum, eps, residual, relu):
    return _forward_outputs(x, running_mean, running_var, training)


def _batch_norm_backward_impl(grad_out: Tensor, x: Tensor, mean: Tensor, invstd: Tensor,
                           weight: Optional[Tensor], training: bool,
                           forward_out: Optional[Tensor],
                           grad_residual: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``nbnorm.backward``: the gradients of ``batch_norm_op`` with respect to
    ``x``, ``weight`` and ``bias`` from its ``mean`` and ``invstd``.

    ``training``: the full batch-norm gradient (the forward call used batch
    statistics); else the affine map's (a frozen layer).  ``forward_out``:
    the forward op's ``out`` when it had ``relu`` (its sign is the mask);
    ``grad_residual``: also return the masked ``grad_out``, the gradient with
    respect to the forward's ``residual``.
    """
    x = tensors.dense(x)
    grad_out = tensors.like(grad_out, x)
    forward_out = tensors.like(forward_out, x)
    grad_input, grad_weight, grad_bias, grad_res = _backward_outputs(x, grad_residual)
    if x.numel() == 0:
        grad_weight.zero_()
        grad_bias.zero_()
        return grad_input, grad_weight, grad_bias, grad_res
    a = tensors.array
    with _on_device(x):
        nbnorm.backward(a(grad_out), a(x), a(mean), a(invstd), a(weight), training=training,
                        axis=1, grad_input=a(grad_input), grad_weight=a(grad_weight),
                        grad_bias=a(grad_bias),
                        activation="relu" if forward_out is not None else None,
                        forward_out=a(forward_out),
                        grad_residual=a(grad_res) if grad_residual else None,
                        stream=tensors.stream(x))
    return grad_input, grad_weight, grad_bias, grad_res


batch_norm_backward_op = torch.library.custom_op("nbnorm::batch_norm_backward",
                                                 mutates_args=())(_batch_norm_backward_impl)


@batch_norm_backward_op.register_fake
def _batch_norm_backward_fake(grad_out, x, mean, invstd, weight, training, forward_out,
                              grad_residual):
    return _backward_outputs(x, grad_residual)


def _setup_context(ctx, inputs, output):
    x, weight, bias, _, _, _, training, _, _, residual, relu = inputs
    out, mean, invstd, new_mean, new_var = output
    ctx.save_for_backward(x, weight, mean, invstd, out if relu else None)
    ctx.training = training
    ctx.relu = relu
    ctx.residual = residual is not None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(mean, invstd, new_mean, new_var)


def _backward(ctx, grad_out, _mean, _invstd, _new_mean, _new_var):
    x, weight, mean, invstd, forward_out = ctx.saved_tensors
    # the op in traced graphs (one node) and where the backward is itself
    # differentiated (create_graph=True: the op's formula raises); else its
    # implementation, without the dispatch
    eager = getattr(ctx, "eager", False) and not torch.is_grad_enabled()
    backward_op = _batch_norm_backward_impl if eager else batch_norm_backward_op
    grad_input, grad_weight, grad_bias, grad_res = backward_op(
        grad_out, x, mean, invstd, weight, ctx.training, forward_out, ctx.relu and ctx.residual)
    need = ctx.needs_input_grad
    # autograd wants each gradient in its input's dtype (float32 sums of half
    # data for half parameters): O(C) casts, no-ops otherwise
    grad_weight = grad_weight.to(weight.dtype) if need[1] else None
    grad_bias = grad_bias.to(ctx.bias_dtype) if need[2] else None
    if need[9]:  # d out / d residual: the (masked) grad_out
        grad_res = grad_res if ctx.relu else grad_out
    else:
        grad_res = None
    return (grad_input if need[0] else None, grad_weight, grad_bias,
            None, None, None, None, None, None, grad_res, None)


batch_norm_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerBatchNorm(torch.autograd.Function):
    """The two ops' implementations and autograd formula, called in eager mode
    without the custom-op dispatch (argument normalization, schema and alias
    checks in Python on every call), which cost more than the kernels on
    small batches: a (32, 64) BatchNorm1d forward+backward took 0.57-0.91 ms
    through the ops against PyTorch's 0.13-0.22 ms.  Traced code (compile,
    export, fake tensors) takes the ops, so graphs hold one node per op."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _batch_norm_impl(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.eager = True
        return output

    @staticmethod
    def backward(ctx, *grads):
        return _backward(ctx, *grads)


def _eager(x):
    """Whether a call on ``x`` runs eagerly on real data (a plain tensor, not a
    fake or functional one, outside Dynamo's tracing)."""
    return type(x) is torch.Tensor and not torch.compiler.is_compiling()


def _double_backward(ctx, *grads):
    raise NotImplementedError(
        "nbnorm's batch norm has no second derivative (create_graph=True through "
        "its backward): use torch.nn.BatchNorm*d for gradient penalties and "
        "other double-backward uses")


batch_norm_backward_op.register_autograd(_double_backward,
                                         setup_context=lambda ctx, inputs, output: None)


def _torch_batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                      eps, num_batches_tracked, residual, relu):
    """PyTorch's own batch norm (and epilogue) for what nbnorm does not take."""
    F = torch.nn.functional
    if momentum is None:
        momentum = _momentum(None, num_batches_tracked) if (
            training and running_mean is not None) else 0.0
    out = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, num_batches_tracked=None, residual=None,
               activation=None):
    """``torch.nn.functional.batch_norm`` computed by nbnorm, with autograd.

    Parameters
    ----------
    input : Tensor, ``(N, C, ...)``
        CPU float16, bfloat16 (with ml_dtypes), float32 or float64; CUDA
        float16, float32 or float64 (with numba-cuda).  Any other tensor is
        computed by PyTorch's ``F.batch_norm`` instead, with the same results.
    running_mean, running_var : Tensor of shape ``(C,)`` or None
        Both or neither.  With ``training`` they are updated in place (under
        ``no_grad``) from the op's returned copies; otherwise they normalize.
    weight, bias : Tensor of shape ``(C,)``, optional
        The affine parameters; ``None`` means scale 1 and shift 0.
    training : bool
        Normalize with the batch statistics.
    momentum : float in [0, 1] or None
        The weight of the batch in the running statistics; ``None`` is the
        cumulative average over ``num_batches_tracked`` batches (this one
        included), as ``nn.BatchNorm`` with ``momentum=None``.
    eps : float > 0
        Added to the variance.
    num_batches_tracked : Tensor, optional
        The batch counter for ``momentum=None`` (read, not changed).
    residual : Tensor like ``input``, optional
        Added after the normalization, in the same pass (ResNet's shortcut).
    activation : {None, "relu"}
        Applied last, in the same pass: ``relu(bn(x) + residual)``.

    Returns
    -------
    Tensor
        Like ``input``, with its memory format (``channels_last`` stays so).
    """
    relu = _activation(activation)
    if not tensors.supported(input):
        return _torch_batch_norm(input, running_mean, running_var, weight, bias, training,
                                 momentum, eps, num_batches_tracked, residual, relu)
    update = training and running_mean is not None
    op = _EagerBatchNorm.apply if _eager(input) else batch_norm_op
    out, _, _, new_mean, new_var = op(
        input, weight, bias, running_mean, running_var,
        num_batches_tracked if update and momentum is None else None,
        bool(training), None if momentum is None else float(momentum), float(eps),
        residual, relu)
    if update:
        with torch.no_grad():
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
    return out
