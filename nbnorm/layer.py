"""Stateful layers for hand-written NumPy training loops: ``BatchNorm``, and
``GroupNorm``, ``LayerNorm`` and ``RMSNorm`` on the same footing.

A layer owns what the array functions (``nbnorm.forward``/``backward``,
``nbnorm.group_norm``/...) leave to the caller: the parameters, the running
statistics and their momentum bookkeeping, the train/eval mode, what backward
needs from forward, and the output buffers, which it reuses from step to
step.  The semantics are the ``torch.nn`` modules' of the same names
(constructor options, modes, state-dict keys), so that results and weights
move between a PyTorch model and a NumPy one; the arithmetic is nbnorm's.
``_Layer`` holds what they share (mode, buffers, state dict, the forward's
weight kept for backward); each class says which function it calls.
"""

import math
import operator
from typing import NamedTuple

import numpy as np

from . import dtypes
from . import norms
from .api import (_activation, _axis, _data, _flag, _on_device, _positive_int, _scalar,
                  backward, forward)
from .folding import host_array

_FLOAT_KEYS = ("weight", "bias", "running_mean", "running_var")


class IncompatibleKeys(NamedTuple):
    """What ``load_state_dict`` returns (PyTorch's names)."""

    missing_keys: list
    unexpected_keys: list


class _Pending(NamedTuple):
    """What ``backward`` needs from the forward call it differentiates."""

    x: np.ndarray
    out: np.ndarray       # the forward output: the ReLU's mask
    mean: np.ndarray
    invstd: np.ndarray
    weight: object        # a copy of the weight forward used; None without one
    batch_stats: bool     # normalized with the batch statistics: the full gradient
    axis: int
    activation: object
    residual: bool


class _Layer:
    """The mode, the reused buffers, the state dict and the kept weight of a layer
    (the base of each layer class; ``_state_shapes`` says what its state is)."""

    training = True
    _pending = None

    def _state_shapes(self):
        """``{key: shape}`` of the layer's float state, in state-dict order: the
        parameters (a bias only ever comes with a weight)."""
        return {k: self.weight.shape for k in ("weight", "bias") if getattr(self, k) is not None}

    def _state_keys(self):
        return list(self._state_shapes())

    def _host_input(self, x):
        if type(x) is not np.ndarray and _on_device(x):
            raise TypeError(f"{type(self).__name__} holds its parameters on the host; for "
                            "device arrays call nbnorm's array functions with device "
                            "parameters")
        return _data(x, False)

    def train(self, mode=True):
        """Set training mode (``mode=True``) or eval mode; returns the layer."""
        self.training = _flag(mode, "mode")
        return self

    def eval(self):
        """Set eval mode (``train(False)``); returns the layer."""
        return self.train(False)

    def state_dict(self):
        """The parameters and buffers under PyTorch's keys: the layer's own arrays,
        as PyTorch's ``state_dict`` returns its tensors."""
        return {k: getattr(self, k) for k in self._state_keys()}

    def load_state_dict(self, state_dict, strict=True):
        """Copy parameters and buffers from ``state_dict`` into the layer's arrays.

        Parameters
        ----------
        state_dict : mapping
            PyTorch's keys; values NumPy arrays, array-likes or PyTorch tensors
            (read through ``detach().cpu()``), cast to the layer's dtype.
        strict : bool
            Refuse missing and unexpected keys.  A missing
            ``num_batches_tracked`` keeps its value, as PyTorch does for state
            dicts without version metadata (older checkpoints, other frameworks).

        Returns
        -------
        IncompatibleKeys
            ``(missing_keys, unexpected_keys)``.

        Raises
        ------
        ValueError
            ``strict`` and missing or unexpected keys; a value of the wrong shape
            or a negative ``num_batches_tracked``.
        TypeError
            A non-floating value (an integer one for ``num_batches_tracked``).
            Nothing has been copied when it raises.
        """
        strict = _flag(strict, "strict")
        keys = self._state_keys()
        missing = [k for k in keys if k not in state_dict and k != "num_batches_tracked"]
        unexpected = [k for k in state_dict if k not in keys]
        if strict and (missing or unexpected):
            problems = ([f"missing keys {missing}"] if missing else []) + (
                [f"unexpected keys {unexpected}"] if unexpected else [])
            raise ValueError(f"state_dict does not match {self!r}: {'; '.join(problems)}")
        shapes = self._state_shapes()
        copies = [(getattr(self, k), _state_value(state_dict[k], k, shapes.get(k)))
                  for k in keys if k in state_dict]
        for target, value in copies:  # every value checked first: all or nothing
            np.copyto(target, value, casting="unsafe")
        return IncompatibleKeys(missing, unexpected)

    def _buffer(self, name, key, inputs):
        """The buffer ``name`` if it was made for ``key`` and overlaps none of
        ``inputs`` (then the call would read what it writes); else None, and
        nbnorm allocates a new one."""
        held = self._buffers.get(name)
        if held is None or held[0] != key:
            return None
        buf = held[1]
        for a in inputs:
            if isinstance(a, np.ndarray) and np.may_share_memory(a, buf):
                return None
        return buf

    def _keep(self, key, **arrays):
        for name, a in arrays.items():
            if a is not None:
                self._buffers[name] = (key, a)

    def _forward_weight(self):
        """A copy of the weight for backward, whose weight is forward's whatever the
        training loop does to ``self.weight`` in between (None without one)."""
        if self.weight is None:
            return None
        weight = self._buffer("weight", self.weight.dtype, ())
        if weight is None:
            weight = np.empty_like(self.weight)
        np.copyto(weight, self.weight)
        self._buffers["weight"] = (self.weight.dtype, weight)
        return weight

    @staticmethod
    def _no_pending():
        return RuntimeError("backward() differentiates the last forward call: call the "
                            "layer first (each forward call can be differentiated once)")


class BatchNorm(_Layer):
    """Batch normalization as a layer with state: PyTorch's ``nn.BatchNorm`` for NumPy.

    ``layer(x)`` normalizes in the mode set by ``train()``/``eval()``,
    ``layer.backward(grad_out)`` returns the gradient with respect to ``x`` and
    leaves those of the parameters in ``grad_weight``/``grad_bias``::

        layer = nbnorm.BatchNorm(64)
        y = layer(x)                          # training: batch statistics, running ones updated
        dx = layer.backward(dy)               # and layer.grad_weight, layer.grad_bias
        layer.weight -= lr * layer.grad_weight
        layer.eval()                          # inference: running statistics

    Parameters
    ----------
    num_features : int
        ``C``, the number of channels.
    eps : float > 0
        Added to the variance.
    momentum : float in [0, 1] or None
        The weight of the new batch in the running statistics; ``None`` is the
        cumulative average (the weight is ``1 / num_batches_tracked``, counted
        after the batch), as in PyTorch.
    affine : bool
        Learnable ``weight`` (ones) and ``bias`` (zeros); without, scale 1 and shift 0.
    bias : bool
        With ``affine``: whether there is a ``bias`` (PyTorch's ``bias=False``
        keeps the weight only).
    track_running_stats : bool
        Keep ``running_mean`` (zeros), ``running_var`` (ones) and
        ``num_batches_tracked``; without, batch statistics are used in eval mode too.
    axis : int
        The channel axis of ``x``: 1 for ``(N, C, ...)``, -1 for channels-last.
    dtype : float dtype
        The dtype of the parameters and running statistics.  ``x`` may have any
        dtype that ``nbnorm.forward`` takes (float16/bfloat16 data with float32
        parameters is mixed precision).
    activation : {None, "relu"}
        Fused after the normalization (and the residual add): ``relu(bn(x) + residual)``.

    Attributes
    ----------
    weight, bias : ndarray of shape ``(C,)`` or None
        The parameters (``None`` without ``affine``, ``bias`` also without ``bias``).
    running_mean, running_var : ndarray of shape ``(C,)`` or None
        The running statistics (``None`` without ``track_running_stats``).
    num_batches_tracked : 0-d int64 ndarray or None
        Training steps with tracked statistics so far (PyTorch's buffer).
    training : bool
        The mode; ``train()`` and ``eval()`` set it.
    grad_weight, grad_bias : ndarray of shape ``(C,)`` or None
        The parameters' gradients from the last ``backward``, overwritten by
        the next one (not accumulated as PyTorch's ``.grad``).  Their dtype is
        ``nbnorm.backward``'s: ``x``'s, float32 for half ``x``.
    grad_residual : ndarray like ``x`` or None
        The gradient with respect to the last ``backward``'s forward ``residual``;
        ``None`` when that forward had none.

    Notes
    -----
    **Buffers are reused.**  The output of ``layer(x)`` and the arrays that
    ``backward`` returns or sets (``grad_input``, ``grad_weight``,
    ``grad_bias``, ``grad_residual``) are the layer's own buffers, written
    again by the next call with an ``x`` of the same shape, dtype and strides:
    copy a result that must outlive the next step.  That is what lets a steady
    training loop allocate nothing proportional to ``x`` after its first step.
    (A buffer that shares memory with a call's input is not reused, so
    ``layer(layer(x))`` is safe.)

    ``backward`` differentiates the last forward call (one pending call per
    layer; backward releases it, so a second backward needs a new forward).
    It reads that call's ``x`` and, with ``activation="relu"``, its output
    (whose sign is the mask): do not modify either in place in between.
    After a training-mode forward (or any forward without tracked statistics)
    backward is the full batch-norm gradient; after an eval-mode forward it is
    the gradient of the inference affine map, which is how a frozen layer is
    fine-tuned: ``layer.eval()`` and train the rest.

    ``state_dict()`` returns the layer's own arrays under PyTorch's keys (copy
    them for a snapshot); ``load_state_dict`` copies values into them, from
    NumPy arrays or PyTorch tensors.  The layer runs on the host; for device
    arrays call ``nbnorm.forward``/``nbnorm.backward`` with device parameters.
    A layer is not thread-safe.
    """

    # The array functions the layer calls; nbnorm.distributed.BatchNorm puts
    # its communicator's in their place.
    _forward = staticmethod(forward)
    _backward = staticmethod(backward)

    def __init__(self, num_features, *, eps=1e-5, momentum=0.1, affine=True, bias=True,
                 track_running_stats=True, axis=1, dtype=np.float32, activation=None):
        C = _positive_int(num_features, "num_features")
        axis = _axis_arg(axis)
        try:
            dt = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype!r}") from None
        dtypes.check_data(dt, "dtype")
        affine = _flag(affine, "affine")
        use_bias = affine and _flag(bias, "bias")
        track = _flag(track_running_stats, "track_running_stats")
        _activation(activation)
        self.num_features = C
        self.eps = _scalar(eps, "eps", 0.0, math.inf, low_open=True)
        self.momentum = None if momentum is None else _scalar(momentum, "momentum", 0.0, 1.0,
                                                              low_open=False)
        self.affine = affine
        self.track_running_stats = track
        self.axis = axis
        self.dtype = dt
        self.activation = activation
        self.training = True
        self.weight = np.ones(C, dt) if affine else None
        self.bias = np.zeros(C, dt) if use_bias else None
        self.running_mean = np.zeros(C, dt) if track else None
        self.running_var = np.ones(C, dt) if track else None
        self.num_batches_tracked = np.zeros((), np.int64) if track else None
        self.grad_weight = self.grad_bias = self.grad_residual = None
        self._pending = None
        self._buffers = {}  # name -> (key, array): reused while the key matches

    # ----------------------------------------------------------- mode and state

    def reset_running_stats(self):
        """Running mean 0, running variance 1, ``num_batches_tracked`` 0, in place."""
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked[...] = 0

    def reset_parameters(self):
        """``reset_running_stats()``, weight 1 and bias 0, in place."""
        self.reset_running_stats()
        if self.weight is not None:
            self.weight[...] = 1
        if self.bias is not None:
            self.bias[...] = 0

    def _state_shapes(self):
        return {k: (self.num_features,) for k in _FLOAT_KEYS if getattr(self, k) is not None}

    def _state_keys(self):
        keys = list(self._state_shapes())
        return keys + ["num_batches_tracked"] if self.track_running_stats else keys

    def __repr__(self):
        extra = "".join([
            f", axis={self.axis}" if self.axis != 1 else "",
            f", dtype={self.dtype}" if self.dtype != np.float32 else "",
            f", activation={self.activation!r}" if self.activation is not None else ""])
        return (f"{type(self).__name__}({self.num_features}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, "
                f"bias={self.bias is not None}, "
                f"track_running_stats={self.track_running_stats}{extra})")

    # ----------------------------------------------------------- forward, backward

    def __call__(self, x, residual=None):
        """Normalize ``x`` in the layer's mode.

        Parameters
        ----------
        x : ndarray, ``ndim >= 2``, ``num_features`` channels on ``axis``
            Any dtype and memory order that ``nbnorm.forward`` takes.
        residual : array like ``x``, optional
            Added before the activation: ``act(bn(x) + residual)``.

        Returns
        -------
        ndarray like ``x``
            The layer's output buffer, overwritten by the next call with an ``x``
            of the same shape, dtype and strides.

        Raises
        ------
        TypeError, ValueError
            As ``nbnorm.forward``, and for a channel count other than
            ``num_features``; nothing (running statistics, the counter, the
            pending call) has changed when it raises.
        """
        x = self._host_input(x)
        ax = _axis(self.axis, x.ndim)
        if x.shape[ax] != self.num_features:
            raise ValueError(f"expected {self.num_features} channels on axis {self.axis}, "
                             f"got input of shape {x.shape}")
        batch_stats = self.training or not self.track_running_stats
        update = self.training and self.track_running_stats
        momentum = self.momentum
        if momentum is None:  # the cumulative average: 1/n with n counting this batch
            momentum = 1.0 / (int(self.num_batches_tracked) + 1) if update else 0.0
        key = (x.shape, x.dtype, x.strides)
        inputs = (x, residual)
        res = self._forward(x, self.weight, self.bias, self.running_mean, self.running_var,
                            training=batch_stats, momentum=momentum, eps=self.eps, axis=ax,
                            out=self._buffer("out", key, inputs),
                            mean=self._buffer("mean", key, inputs),
                            invstd=self._buffer("invstd", key, inputs),
                            activation=self.activation, residual=residual)
        if update:
            self.num_batches_tracked += 1
        weight = self._forward_weight()
        self._keep(key, out=res.out, mean=res.mean, invstd=res.invstd)
        self._pending = _Pending(x, res.out, res.mean, res.invstd, weight, batch_stats, ax,
                                 self.activation, residual is not None)
        return res.out

    def backward(self, grad_out):
        """Differentiate the last forward call.

        Parameters
        ----------
        grad_out : array like that call's ``x``
            The gradient of the loss with respect to the layer's output.

        Returns
        -------
        ndarray like ``x``
            ``grad_input``: the layer's buffer, overwritten by the next backward.
            Sets ``grad_weight`` and ``grad_bias`` (``None`` for a parameter the
            layer does not have) and ``grad_residual`` (``None`` when that
            forward had no ``residual``).

        Raises
        ------
        RuntimeError
            No forward call to differentiate (none yet, or already differentiated).
        TypeError, ValueError
            As ``nbnorm.backward`` (``grad_out`` of another shape or dtype than
            ``x``); the gradients and the pending call are unchanged, so
            ``backward`` can be called again with a correct ``grad_out``.
        """
        p = self._pending
        if p is None:
            raise self._no_pending()
        x = p.x
        key = (x.shape, x.dtype, x.strides)
        inputs = (grad_out, x, p.out)
        grad_residual = None
        if p.residual:  # nbnorm.backward writes a grad_residual only where it is given
            grad_residual = self._buffer("grad_residual", key, inputs)
            if grad_residual is None:  # forward's out has the memory order nbnorm gives x
                grad_residual = np.empty_like(p.out)
        g = self._backward(grad_out, x, p.mean, p.invstd, p.weight, training=p.batch_stats,
                           axis=p.axis, grad_input=self._buffer("grad_input", key, inputs),
                           grad_weight=self._buffer("grad_weight", key, inputs),
                           grad_bias=self._buffer("grad_bias", key, inputs),
                           activation=p.activation,
                           forward_out=p.out if p.activation is not None else None,
                           grad_residual=grad_residual)
        self._keep(key, grad_input=g.grad_input, grad_weight=g.grad_weight,
                   grad_bias=g.grad_bias, grad_residual=grad_residual)
        self._pending = None
        self.grad_weight = g.grad_weight if self.weight is not None else None
        self.grad_bias = g.grad_bias if self.bias is not None else None
        self.grad_residual = grad_residual
        return g.grad_input


def _state_value(value, key, shape):
    """A state-dict value checked for the layer's array ``key`` of ``shape``."""
    a = host_array(value, key)
    if key == "num_batches_tracked":
        if a.dtype.kind not in "iu":
            raise TypeError(f"num_batches_tracked must be an integer, got dtype {a.dtype}")
        if a.shape != ():
            raise ValueError(f"num_batches_tracked must be a scalar, got shape {a.shape}")
        if a < 0:
            raise ValueError(f"num_batches_tracked must not be negative, got {int(a)}")
        return a
    if not dtypes.is_float(a.dtype):
        raise TypeError(f"{key} must be a floating-point array, got dtype {a.dtype}")
    if a.shape != shape:
        raise ValueError(f"{key} must have shape {shape}, got {a.shape}")
    return a


class _NormPending(NamedTuple):
    """What a group/layer/RMS norm layer's ``backward`` needs from its forward."""

    x: np.ndarray
    out: np.ndarray
    stats: tuple          # (mean, invstd), or (invrms,) for RMS norm
    weight: object
    activation: object
    residual: bool


class _Norm(_Layer):
    """Group, layer and RMS norm as layers: parameters of ``param_shape``, no
    running statistics, the same computation in both modes (as PyTorch's).
    Subclasses say which array functions they call (``_apply``, ``_apply_backward``)."""

    _stat_names = ("mean", "invstd")

    def __init__(self, param_shape, eps, affine, bias, dtype, activation):
        try:
            dt = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype!r}") from None
        dtypes.check_data(dt, "dtype")
        affine = _flag(affine, "elementwise_affine" if self._rows else "affine")
        use_bias = affine and _flag(bias, "bias")
        _activation(activation)
        self.eps = None if eps is None else _scalar(eps, "eps", 0.0, math.inf, low_open=True)
        self.dtype = dt
        self.activation = activation
        self.training = True
        self.weight = np.ones(param_shape, dt) if affine else None
        self.bias = np.zeros(param_shape, dt) if use_bias else None
        self.grad_weight = self.grad_bias = self.grad_residual = None
        self._pending = None
        self._buffers = {}

    def reset_parameters(self):
        """Weight 1 and bias 0, in place."""
        if self.weight is not None:
            self.weight[...] = 1
        if self.bias is not None:
            self.bias[...] = 0

    def __call__(self, x, residual=None):
        """Normalize ``x`` (the same in training and eval mode).

        Parameters
        ----------
        x : ndarray
            Any dtype and memory order that the array function takes.
        residual : array like ``x``, optional
            Added before the activation: ``act(norm(x) + residual)``.

        Returns
        -------
        ndarray like ``x``
            The layer's output buffer, overwritten by the next call with an ``x``
            of the same shape, dtype and strides.

        Raises
        ------
        TypeError, ValueError
            As the array function, and for ``x`` of another channel count or
            trailing shape than the layer's; the pending call is unchanged.
        """
        x = self._host_input(x)
        self._check_shape(x)
        key = (x.shape, x.dtype, x.strides)
        inputs = (x, residual)
        stats = {n: self._buffer(n, key, inputs) for n in self._stat_names}
        res = self._apply(x, out=self._buffer("out", key, inputs), activation=self.activation,
                          residual=residual, **stats)
        weight = self._forward_weight()
        self._keep(key, out=res[0], **dict(zip(self._stat_names, res[1:])))
        self._pending = _NormPending(x, res[0], tuple(res[1:]), weight, self.activation,
                                     residual is not None)
        return res[0]

    def backward(self, grad_out):
        """Differentiate the last forward call.

        Returns
        -------
        ndarray like ``x``
            ``grad_input``, the layer's buffer; sets ``grad_weight`` and
            ``grad_bias`` (None for a parameter the layer does not have) and
            ``grad_residual`` (None when that forward had no ``residual``).

        Raises
        ------
        RuntimeError
            No forward call to differentiate.
        TypeError, ValueError
            As the array function's backward; nothing has changed.
        """
        p = self._pending
        if p is None:
            raise self._no_pending()
        key = (p.x.shape, p.x.dtype, p.x.strides)
        inputs = (grad_out, p.x, p.out)
        grad_residual = None
        if p.residual:
            grad_residual = self._buffer("grad_residual", key, inputs)
            if grad_residual is None:
                grad_residual = np.empty_like(p.out)
        grads = {"grad_input": self._buffer("grad_input", key, inputs),
                 "grad_weight": self._buffer("grad_weight", key, inputs)}
        if self._has_bias_grad:
            grads["grad_bias"] = self._buffer("grad_bias", key, inputs)
        g = self._apply_backward(grad_out, p.x, *p.stats, p.weight, activation=p.activation,
                                 forward_out=p.out if p.activation is not None else None,
                                 grad_residual=grad_residual, **grads)
        self._keep(key, grad_residual=grad_residual, **g._asdict())
        self._pending = None
        self.grad_weight = g.grad_weight if self.weight is not None else None
        self.grad_bias = (g.grad_bias if self._has_bias_grad and self.bias is not None
                          else None)
        self.grad_residual = grad_residual
        return g.grad_input

    _has_bias_grad = True
    _rows = False


class GroupNorm(_Norm):
    """Group normalization as a layer: ``torch.nn.GroupNorm`` for NumPy.

    Parameters
    ----------
    num_groups : int
        Groups of channels normalized together; must divide ``num_channels``.
    num_channels : int
        ``C``.
    eps : float > 0
    affine : bool
        Learnable per-channel ``weight`` (ones) and ``bias`` (zeros).
    axis : int
        The channel axis: 1 for ``(N, C, ...)``, -1 for channels-last.
    dtype : float dtype
        Of the parameters (``x`` may have any dtype ``nbnorm.group_norm`` takes).
    activation : {None, "relu"}
        Fused: ``relu(gn(x) + residual)``.

    The layer holds ``weight``, ``bias``, ``grad_weight``, ``grad_bias``,
    ``grad_residual`` and reuses its buffers as ``nbnorm.BatchNorm`` does;
    ``state_dict`` has PyTorch's keys (``weight``, ``bias``).
    """

    def __init__(self, num_groups, num_channels, *, eps=1e-5, affine=True, axis=1,
                 dtype=np.float32, activation=None):
        C = _positive_int(num_channels, "num_channels")
        self.num_groups = norms._groups(num_groups, C)
        self.num_channels = C
        self.axis = _axis_arg(axis)
        super().__init__((C,), eps, affine, True, dtype, activation)
        self.affine = self.weight is not None

    def _check_shape(self, x):
        ax = norms._channel_axis(self.axis, x)
        if x.shape[ax] != self.num_channels:
            raise ValueError(f"expected {self.num_channels} channels on axis {self.axis}, "
                             f"got input of shape {x.shape}")

    def _apply(self, x, **kw):
        return norms.group_norm(x, self.num_groups, self.weight, self.bias, self.eps,
                                axis=self.axis, **kw)

    def _apply_backward(self, grad_out, x, mean, invstd, weight, **kw):
        return norms.group_norm_backward(grad_out, x, mean, invstd, weight, axis=self.axis,
                                         **kw)

    def __repr__(self):
        return (f"GroupNorm({self.num_groups}, {self.num_channels}, eps={self.eps}, "
                f"affine={self.weight is not None}"
                + (f", axis={self.axis}" if self.axis != 1 else "")
                + (f", activation={self.activation!r}" if self.activation else "") + ")")


class _RowNorm(_Norm):
    """Layer and RMS norm: over the trailing ``normalized_shape`` axes."""

    _rows = True

    def __init__(self, normalized_shape, eps, elementwise_affine, bias, dtype, activation):
        shape = norms._shape_tuple(normalized_shape)
        if not shape or min(shape) < 1:
            raise ValueError(f"normalized_shape must be positive sizes, got {shape}")
        self.normalized_shape = shape
        super().__init__(shape, eps, elementwise_affine, bias, dtype, activation)
        self.elementwise_affine = self.weight is not None

    def _check_shape(self, x):
        norms._normalized_shape(self.normalized_shape, x)

    def __repr__(self):
        return (f"{type(self).__name__}({self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}"
                + (", bias=False" if self._has_bias_grad and self.elementwise_affine
                   and self.bias is None else "")
                + (f", activation={self.activation!r}" if self.activation else "") + ")")


class LayerNorm(_RowNorm):
    """Layer normalization as a layer: ``torch.nn.LayerNorm`` for NumPy.

    Parameters
    ----------
    normalized_shape : int or sequence of int
        The trailing axes normalized together.
    eps : float > 0
    elementwise_affine : bool
        Learnable ``weight`` (ones) and ``bias`` (zeros) of ``normalized_shape``.
    bias : bool
        With ``elementwise_affine``: whether there is a ``bias``.
    dtype, activation :
        As ``GroupNorm``.
    """

    def __init__(self, normalized_shape, *, eps=1e-5, elementwise_affine=True, bias=True,
                 dtype=np.float32, activation=None):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, dtype, activation)

    def _apply(self, x, **kw):
        return norms.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps,
                                **kw)

    def _apply_backward(self, grad_out, x, mean, invstd, weight, **kw):
        return norms.layer_norm_backward(grad_out, x, mean, invstd, weight, **kw)


class RMSNorm(_RowNorm):
    """RMS normalization as a layer: ``torch.nn.RMSNorm`` for NumPy.

    Parameters
    ----------
    normalized_shape : int or sequence of int
    eps : float > 0 or None
        ``None``: the machine epsilon of ``x``'s dtype, as PyTorch.
    elementwise_affine : bool
        A learnable ``weight`` (ones); RMS norm has no bias.
    dtype, activation :
        As ``GroupNorm``.
    """

    _stat_names = ("invrms",)
    _has_bias_grad = False

    def __init__(self, normalized_shape, *, eps=None, elementwise_affine=True,
                 dtype=np.float32, activation=None):
        super().__init__(normalized_shape, eps, elementwise_affine, False, dtype, activation)

    def _apply(self, x, **kw):
        return norms.rms_norm(x, self.normalized_shape, self.weight, self.eps, **kw)

    def _apply_backward(self, grad_out, x, invrms, weight, **kw):
        return norms.rms_norm_backward(grad_out, x, invrms, weight, **kw)


def _axis_arg(axis):
    """A layer's ``axis`` as an int (checked against ``x.ndim`` at each call)."""
    try:
        return operator.index(axis)
    except TypeError:
        raise TypeError(f"axis must be an integer, got {type(axis).__name__}") from None
