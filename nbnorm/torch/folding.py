"""Inference batch norms folded into the convolution or linear layer before
them: ``fuse_conv_bn_eval`` for one pair, ``fold_model`` for a whole model.

The arithmetic is ``nbnorm.fold``'s (float64, rounded once to the weights'
dtype; grouped transposed convolutions right, where PyTorch's
``fuse_conv_bn_weights`` is not: pytorch#180995).  This module only maps
modules onto its arguments and its results back onto modules.
"""

import copy

import numpy as np
import torch
from torch import fx

import nbnorm

from . import tensors

__all__ = ["fuse_conv_bn_eval", "fold_model"]

_BatchNorm = torch.nn.modules.batchnorm._BatchNorm
_ConvNd = torch.nn.modules.conv._ConvNd
_ConvTransposeNd = torch.nn.modules.conv._ConvTransposeNd


def _tensor(a, like):
    """A NumPy result of ``nbnorm.fold`` as a tensor on ``like``'s device
    (bfloat16 through its bits, as ``tensors.array`` reads it)."""
    if a.dtype.name == "bfloat16":
        t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(a)
    return t.to(like.device)


def _check_pair(conv, bn):
    if not isinstance(conv, (_ConvNd, torch.nn.Linear)):
        raise TypeError(f"conv must be a convolution (Conv1d/2d/3d, ConvTranspose1d/2d/3d) "
                        f"or a Linear module, got {type(conv).__name__}")
    if not isinstance(bn, _BatchNorm):
        raise TypeError(f"bn must be a batch-norm module, got {type(bn).__name__}")
    if bn.training:
        raise ValueError("bn is in training mode, where it normalizes with batch statistics "
                         "that no weight can hold: call model.eval() first")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("bn has no running statistics (track_running_stats=False): it "
                         "normalizes with batch statistics even in eval mode")
    if getattr(bn, "activation", None) is not None:
        raise ValueError(f"bn applies activation={bn.activation!r} after normalizing, "
                         "which a convolution's weights cannot hold")


def fuse_conv_bn_eval(conv, bn):
    """A convolution or linear layer that computes ``bn(conv(x))`` for an
    inference-mode ``bn``.

    Parameters
    ----------
    conv : Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear
        Grouped, transposed and bias-free layers included; any float dtype
        (``nbnorm.fold``'s).  Not modified.
    bn : a batch-norm module in eval mode, with running statistics
        ``torch.nn.BatchNorm*d``, ``SyncBatchNorm`` or nbnorm's, with
        ``conv``'s output channels as its ``num_features``.

    Returns
    -------
    torch.nn.Module
        A copy of ``conv`` (same class, options and mode) whose ``weight`` and
        ``bias`` (added where ``conv`` had none) are new parameters holding
        the folded values, in ``conv``'s weight dtype and device, with its
        ``requires_grad``.

    Raises
    ------
    TypeError
        Modules of other kinds.
    ValueError
        ``bn`` in training mode, without running statistics or with a fused
        activation; channel counts that do not match (``nbnorm.fold``).
    """
    _check_pair(conv, bn)
    transposed = isinstance(conv, _ConvTransposeNd)
    if isinstance(conv.weight, torch.nn.parameter.UninitializedParameter):
        raise ValueError("conv is a lazy module that has not seen an input yet")
    tensors.bfloat16()  # imports ml_dtypes, through which nbnorm.fold reads bfloat16 tensors
    weight, bias = nbnorm.fold(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                               bn.running_var, bn.eps, axis=1 if transposed else 0,
                               groups=getattr(conv, "groups", 1))
    fused = copy.deepcopy(conv)
    grad = conv.weight.requires_grad
    fused.weight = torch.nn.Parameter(_tensor(weight, conv.weight), requires_grad=grad)
    fused.bias = torch.nn.Parameter(_tensor(bias, conv.weight), requires_grad=grad)
    return fused


#: The prefix of the modules that define nbnorm.torch's classes.
_NBNORM_TORCH = __name__.rpartition(".")[0] + "."


class _Tracer(fx.Tracer):
    """``fx.Tracer`` that keeps nbnorm's modules whole, as it keeps torch.nn's
    (their ``forward`` checks the input's rank, which a proxy cannot answer):
    every instance of a class of nbnorm.torch (batch, group, layer, instance
    and RMS norm) or of a subclass of one."""

    def is_leaf_module(self, m, module_qualified_name):
        return (any(c.__module__.startswith(_NBNORM_TORCH) for c in type(m).__mro__)
                or super().is_leaf_module(m, module_qualified_name))


def _foldable(node, modules, calls):
    """The ``(conv node, conv, bn)`` of a batch-norm call that can be folded
    into the call before it, else None."""
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return None  # not a module call, or nbnorm's forward(x, residual)
    bn = modules[node.target]
    prev = node.args[0]
    if not isinstance(bn, _BatchNorm) or not isinstance(prev, fx.Node):
        return None
    if prev.op != "call_module" or len(prev.users) != 1 or calls[prev.target] != 1:
        return None  # the layer's output is used elsewhere, or the layer is shared
    conv = modules[prev.target]
    if not isinstance(conv, (_ConvNd, torch.nn.Linear)):
        return None
    if bn.running_mean is None or getattr(bn, "activation", None) is not None:
        return None  # batch statistics in eval mode, or a ReLU the weights cannot hold
    if isinstance(conv, torch.nn.Linear) and conv.out_features != bn.num_features:
        return None  # BatchNorm1d over another axis of a (N, L, features) output
    return prev, conv, bn


def fold_model(model):
    """Fold every inference batch norm that directly follows a convolution or
    linear layer into that layer.

    Parameters
    ----------
    model : torch.nn.Module
        A model whose ``forward`` ``torch.fx`` can trace symbolically (no
        control flow on tensor values); its batch norms in eval mode.  Not
        modified.

    Returns
    -------
    torch.fx.GraphModule
        The traced model with each folded pair replaced by one layer
        (``fuse_conv_bn_eval``); the rest as traced, over a copy of
        ``model``'s modules.

    Notes
    -----
    A pair is folded when the batch norm's only input is the output of a
    Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear call that nothing else
    uses, and that layer is called only there; batch norms without running
    statistics, with nbnorm's fused ``activation`` or ``residual``, and the
    rest (after a pooling, an addition, a functional ``F.conv2d``) are left
    as they are.  A Linear followed by a BatchNorm1d of as many features is
    folded as on ``(N, features)`` batches: if the model instead normalizes a
    3-D ``(N, L, features)`` output along ``L`` with ``L == features``, the
    fold is wrong (the trace does not know the shapes).  For models that fx
    cannot trace, fold their pairs one by one with ``fuse_conv_bn_eval``.

    Raises
    ------
    ValueError
        A foldable pair whose batch norm is in training mode.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fold_model takes a torch.nn.Module, got {type(model).__name__}")
    model = copy.deepcopy(model)  # the graph module's containers may be model's own
    tracer = _Tracer()
    graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    modules = dict(gm.named_modules())
    calls = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        pair = _foldable(node, modules, calls)
        if pair is None:
            continue
        prev, conv, bn = pair
        parent_name, _, name = prev.target.rpartition(".")
        setattr(gm.get_submodule(parent_name), name, fuse_conv_bn_eval(conv, bn))
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
