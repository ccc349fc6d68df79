"""``GroupNorm``, ``LayerNorm``, ``InstanceNorm1d/2d/3d``, ``RMSNorm``: PyTorch's
modules computed by ``nbnorm.group_norm``, ``layer_norm``, ``instance_norm`` and
``rms_norm``, through two functional custom ops.

- ``torch.ops.nbnorm.norm(kind, x, weight, bias, running_mean, running_var,
  arg, use_input_stats, momentum, eps)`` returns ``(out, mean, invstd,
  new_running_mean, new_running_var)``; ``kind`` is ``"group"`` (``arg =
  [num_groups]``), ``"instance"``, ``"layer"`` or ``"rms"`` (``arg =
  normalized_shape``).  ``mean`` has shape ``(0,)`` for RMS (``invstd`` is then
  ``invrms``), the new running statistics ``(0,)`` unless instance norm updates
  them: as for ``torch.ops.nbnorm.batch_norm`` (``ops``), an op that carries
  autograd cannot mutate its inputs, so the updated statistics are returned
  and the caller copies them into the buffers.
- ``torch.ops.nbnorm.norm_backward(kind, grad_out, x, mean, invstd, weight,
  arg, use_input_stats)`` returns ``(grad_input, grad_weight, grad_bias)``
  (``grad_bias`` of shape ``(0,)`` for RMS): the op the forward's autograd
  formula calls.

Each class subclasses its ``torch.nn`` namesake and replaces only the call of
the functional form, so constructor, parameters, buffers, ``state_dict``,
input checks and unbatched-input handling are PyTorch's.  Tensors nbnorm does
not take (``tensors.supported``) run PyTorch's own code.
"""

import math
from typing import List, Optional

import torch
from torch import Tensor

import nbnorm

from . import modules, tensors
from .ops import _on_device

__all__ = ["GroupNorm", "LayerNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
           "RMSNorm", "group_norm", "layer_norm", "instance_norm", "rms_norm"]

_KINDS = ("group", "instance", "layer", "rms")


def _stat_shape(kind, x, arg):
    if kind == "group":
        return (x.shape[0], arg[0])
    if kind == "instance":
        return (x.shape[0], x.shape[1])
    return tuple(x.shape[:x.dim() - len(arg)])


def _param_shape(kind, x, arg):
    return (x.shape[1],) if kind in ("group", "instance") else tuple(arg)


def _forward_outputs(kind, x, arg, running_mean, use_input_stats):
    """The forward op's outputs, uninitialized (eager and fake alike)."""
    sdt = tensors.stat_dtype(x.dtype)
    shape = _stat_shape(kind, x, arg)
    out = tensors.empty_like(x)
    mean = x.new_empty((0,) if kind == "rms" else shape, dtype=sdt)
    invstd = x.new_empty(shape, dtype=sdt)
    if kind == "instance" and use_input_stats and running_mean is not None:
        return out, mean, invstd, torch.empty_like(running_mean), torch.empty_like(running_mean)
    return out, mean, invstd, x.new_empty((0,), dtype=sdt), x.new_empty((0,), dtype=sdt)


def _backward_outputs(kind, x, arg):
    sdt = tensors.stat_dtype(x.dtype)
    ps = _param_shape(kind, x, arg)
    return (tensors.empty_like(x), x.new_empty(ps, dtype=sdt),
            x.new_empty((0,) if kind == "rms" else ps, dtype=sdt))


@torch.library.custom_op("nbnorm::norm", mutates_args=())
def norm_op(kind: str, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
            running_mean: Optional[Tensor], running_var: Optional[Tensor], arg: List[int],
            use_input_stats: bool, momentum: float,
            eps: Optional[float]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Group, instance, layer or RMS normalization by nbnorm (channels on axis 1
    for group and instance norm)."""
    x = tensors.dense(x)
    out, mean, invstd, new_mean, new_var = _forward_outputs(kind, x, arg, running_mean,
                                                            use_input_stats)
    a = tensors.array
    kw = dict(out=a(out), invstd=a(invstd), stream=tensors.stream(x))
    with _on_device(x):
        if kind == "group":
            nbnorm.group_norm(a(x), arg[0], a(weight), a(bias), eps, mean=a(mean), **kw)
        elif kind == "instance":
            update = use_input_stats and running_mean is not None
            if update:
                new_mean.copy_(running_mean)
                new_var.copy_(running_var)
            nbnorm.instance_norm(a(x), a(weight), a(bias),
                                 a(new_mean if update else running_mean),
                                 a(new_var if update else running_var),
                                 use_input_stats=use_input_stats, momentum=momentum, eps=eps,
                                 mean=a(mean), **kw)
        elif kind == "layer":
            nbnorm.layer_norm(a(x), tuple(arg), a(weight), a(bias), eps, mean=a(mean), **kw)
        else:
            kw["invrms"] = kw.pop("invstd")
            nbnorm.rms_norm(a(x), tuple(arg), a(weight), eps, **kw)
    return out, mean, invstd, new_mean, new_var


@norm_op.register_fake
def _norm_fake(kind, x, weight, bias, running_mean, running_var, arg, use_input_stats,
               momentum, eps):
    return _forward_outputs(kind, x, arg, running_mean, use_input_stats)


@torch.library.custom_op("nbnorm::norm_backward", mutates_args=())
def norm_backward_op(kind: str, grad_out: Tensor, x: Tensor, mean: Tensor, invstd: Tensor,
                     weight: Optional[Tensor], arg: List[int],
                     use_input_stats: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of ``norm_op`` with respect to ``x``, ``weight``, ``bias``."""
    x = tensors.dense(x)
    grad_out = tensors.like(grad_out, x)
    grad_input, grad_weight, grad_bias = _backward_outputs(kind, x, arg)
    a = tensors.array
    kw = dict(grad_input=a(grad_input), grad_weight=a(grad_weight), stream=tensors.stream(x))
    with _on_device(x):
        if kind == "group":
            nbnorm.group_norm_backward(a(grad_out), a(x), a(mean), a(invstd), a(weight),
                                       grad_bias=a(grad_bias), **kw)
        elif kind == "instance":
            nbnorm.instance_norm_backward(a(grad_out), a(x), a(mean), a(invstd), a(weight),
                                          use_input_stats=use_input_stats,
                                          grad_bias=a(grad_bias), **kw)
        elif kind == "layer":
            nbnorm.layer_norm_backward(a(grad_out), a(x), a(mean), a(invstd), a(weight),
                                       grad_bias=a(grad_bias), **kw)
        else:
            nbnorm.rms_norm_backward(a(grad_out), a(x), a(invstd), a(weight), **kw)
    return grad_input, grad_weight, grad_bias


@norm_backward_op.register_fake
def _norm_backward_fake(kind, grad_out, x, mean, invstd, weight, arg, use_input_stats):
    return _backward_outputs(kind, x, arg)


def _setup_context(ctx, inputs, output):
    kind, x, weight, bias, _, _, arg, use_input_stats, _, _ = inputs
    _, mean, invstd, new_mean, new_var = output
    ctx.save_for_backward(x, weight, mean, invstd)
    ctx.kind, ctx.arg, ctx.use_input_stats = kind, arg, use_input_stats
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(mean, invstd, new_mean, new_var)


def _backward(ctx, grad_out, _mean, _invstd, _new_mean, _new_var):
    x, weight, mean, invstd = ctx.saved_tensors
    grad_input, grad_weight, grad_bias = norm_backward_op(
        ctx.kind, grad_out, x, mean, invstd, weight, ctx.arg, ctx.use_input_stats)
    need = ctx.needs_input_grad
    # each gradient in its input's dtype (float32 sums of half data): O(C) casts
    grad_weight = grad_weight.to(weight.dtype) if need[2] else None
    grad_bias = grad_bias.to(ctx.bias_dtype) if need[3] else None
    return (None, grad_input if need[1] else None, grad_weight, grad_bias,
            None, None, None, None, None, None)


norm_op.register_autograd(_backward, setup_context=_setup_context)


def _double_backward(ctx, *grads):
    raise NotImplementedError(
        "nbnorm's normalizations have no second derivative (create_graph=True through "
        "their backward): use the torch.nn modules for double-backward uses")


norm_backward_op.register_autograd(_double_backward,
                                   setup_context=lambda ctx, inputs, output: None)


# ---------------------------------------------------------- functional forms

def _takes(x, *params):
    """Whether nbnorm computes this call: a supported, non-empty tensor, with
    parameters on its device."""
    return (tensors.supported(x) and x.numel() > 0
            and all(p is None or p.device == x.device for p in params))


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.group_norm`` computed by nbnorm, with autograd."""
    if not _takes(input, weight, bias) or input.dim() < 2:
        return torch.nn.functional.group_norm(input, num_groups, weight, bias, eps)
    return norm_op("group", input, weight, bias, None, None, [int(num_groups)], True, 0.0,
                   float(eps))[0]


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.layer_norm`` computed by nbnorm, with autograd."""
    shape = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    if not _takes(input, weight, bias):
        return torch.nn.functional.layer_norm(input, shape, weight, bias, eps)
    return norm_op("layer", input, weight, bias, None, None, shape, True, 0.0, float(eps))[0]


def rms_norm(input, normalized_shape, weight=None, eps=None):
    """``torch.nn.functional.rms_norm`` computed by nbnorm, with autograd
    (``eps=None``: the machine epsilon of ``input``'s dtype)."""
    shape = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    if not _takes(input, weight):
        return torch.nn.functional.rms_norm(input, shape, weight, eps)
    return norm_op("rms", input, weight, None, None, None, shape, True, 0.0,
                   None if eps is None else float(eps))[0]


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5):
    """``torch.nn.functional.instance_norm`` computed by nbnorm, with autograd:
    the running statistics, when given with ``use_input_stats``, are updated in
    place (under ``no_grad``) from the op's returned copies."""
    C = input.shape[1] if input.dim() >= 2 else -1
    if (not _takes(input, weight, bias, running_mean, running_var) or input.dim() < 3
            or (running_mean is not None and running_mean.shape != (C,))
            or (running_mean is None) != (running_var is None)
            or math.prod(input.shape[2:]) <= 1):
        return torch.nn.functional.instance_norm(input, running_mean, running_var, weight,
                                                 bias, use_input_stats, momentum, eps)
    out, _, _, new_mean, new_var = norm_op("instance", input, weight, bias, running_mean,
                                           running_var, [], bool(use_input_stats),
                                           float(momentum), float(eps))
    if use_input_stats and running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
    return out


# ------------------------------------------------------------------- modules

_DOC = """``torch.nn.{name}`` computed by nbnorm: the same constructor, parameters,
    buffers and results (``nbnorm.{fn}`` through ``torch.ops.nbnorm.norm``, with
    autograd, ``torch.compile`` and ``torch.export``).  CPU float16, bfloat16
    (with ml_dtypes), float32 and float64 tensors and CUDA float16, float32 and
    float64 tensors run nbnorm's kernels; others run PyTorch's own code.  There
    is no second derivative."""


class GroupNorm(torch.nn.GroupNorm):
    __doc__ = _DOC.format(name="GroupNorm", fn="group_norm")

    def forward(self, input):
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


class LayerNorm(torch.nn.LayerNorm):
    __doc__ = _DOC.format(name="LayerNorm", fn="layer_norm")

    def forward(self, input):
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    __doc__ = _DOC.format(name="RMSNorm", fn="rms_norm")

    def forward(self, x):
        return rms_norm(x, self.normalized_shape, self.weight, self.eps)


class _InstanceNorm:
    """``_apply_instance_norm`` of ``torch.nn.InstanceNorm*d`` through
    ``instance_norm`` (mixed in before the torch class, which keeps its input
    checks and unbatched-input handling)."""

    def _apply_instance_norm(self, input):
        return instance_norm(input, self.running_mean, self.running_var, self.weight,
                             self.bias, self.training or not self.track_running_stats,
                             self.momentum if self.momentum is not None else 0.0, self.eps)


class InstanceNorm1d(_InstanceNorm, torch.nn.InstanceNorm1d):
    __doc__ = _DOC.format(name="InstanceNorm1d", fn="instance_norm")


class InstanceNorm2d(_InstanceNorm, torch.nn.InstanceNorm2d):
    __doc__ = _DOC.format(name="InstanceNorm2d", fn="instance_norm")


class InstanceNorm3d(_InstanceNorm, torch.nn.InstanceNorm3d):
    __doc__ = _DOC.format(name="InstanceNorm3d", fn="instance_norm")


def _register_conversions():
    """``nbnorm.torch.convert`` swaps these classes too: their torch namesakes
    (exact types) added to its table."""
    modules._CONVERSIONS.update({
        torch.nn.GroupNorm: GroupNorm, torch.nn.LayerNorm: LayerNorm,
        torch.nn.RMSNorm: RMSNorm, torch.nn.InstanceNorm1d: InstanceNorm1d,
        torch.nn.InstanceNorm2d: InstanceNorm2d, torch.nn.InstanceNorm3d: InstanceNorm3d})


_register_conversions()
