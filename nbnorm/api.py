"""``forward`` and ``backward``, and the mergeable statistics of synchronized
batch norm (``moments``, ``merge_moments``, ``backward_sums``; ``forward``'s
``moments=`` and ``backward``'s ``sums=``): validation, dispatch and allocation.

This is the only place that looks at user input.  Everything is checked before
anything is written, so a call that raises has changed no output and no running
statistic.  The kernels behind it (``nbnorm.cpu.ops``, ``nbnorm.cuda.ops``) take
canonical views and scalars only.

Each rule is one function below (``_axis``, ``_scalar``, ``_channel_input``,
``_writable``, ...): it returns the accepted value or raises the rule's error,
and it begins with a test that accepts the usual case in a few attribute reads
(an exact ``numpy.ndarray`` of the right shape and dtype, a Python float in
range), so a small call pays ~100 ns a rule instead of the general checks.
Every public function applies every rule to every call; there is no second
path that restates them.
"""

import math
import operator
from typing import NamedTuple

import numpy as np

from . import dtypes, guard, layout


class ForwardResult(NamedTuple):
    """What ``forward`` returns; each field is the caller's buffer where one was given."""

    out: object
    mean: object
    invstd: object


class BackwardResult(NamedTuple):
    """What ``backward`` returns; each field is the caller's buffer where one was given."""

    grad_input: object
    grad_weight: object
    grad_bias: object


class Moments(NamedTuple):
    """The mergeable statistics of a batch, per channel: ``count`` values (an
    int, the same for every channel), their float64 ``mean`` and ``m2``, the
    sum of squared deviations from that mean (``var = m2 / count``)."""

    count: int
    mean: object
    m2: object


# ---------------------------------------------------------------- the device
# Device follows the data: arrays on a CUDA device (``__cuda_array_interface__``:
# Numba device arrays, CuPy, PyTorch CUDA tensors; or device arrays of Numba's
# CUDA simulator, which lack the interface) run ``nbnorm.cuda.ops``, NumPy
# arrays ``nbnorm.cpu.ops``.  The validation below is the same for both; where
# a check needs memory (addresses, read-only flags) it asks ``cuda.ops``.  The
# device is decided once per call (``_backend``) and passed down as ``dev``:
# probing an array costs ~0.3 us.

def _on_device(a):
    return bool(getattr(type(a), "__cuda_ndarray__", False)
                or hasattr(a, "__cuda_array_interface__"))


class _Backend(NamedTuple):
    device: bool
    ops: object    # nbnorm.cpu.ops or nbnorm.cuda.ops: the kernels
    views: object  # nbnorm.layout, or nbnorm.cuda.ops (views without copies)
    kw: dict       # extra arguments for ops: the device's stream


_host = None  # the host _Backend, made on first use (importing cpu.ops loads the kernels)


def _host_backend():
    global _host
    if _host is None:
        from .cpu import ops
        _host = _Backend(False, ops, layout, {})
    return _host


def _backend(names, arrays, stream):
    """The backend of one call's arrays; mixing host and device is a ``TypeError``.

    ``names`` and ``arrays`` are parallel tuples (``None``: not given).
    ``stream`` is for device arrays only: with host arrays it is refused, since
    a stream passed with host data most likely means data left on the host.
    """
    for v in arrays:
        if v is not None and type(v) is not np.ndarray and _on_device(v):
            break
    else:  # no array on a device
        if stream is not None:
            raise TypeError("stream= is for arrays on a CUDA device, but the arrays "
                            "are host (NumPy) arrays")
        return _host or _host_backend()
    given = [(k, v) for k, v in zip(names, arrays) if v is not None]
    on_dev = [k for k, v in given if _on_device(v)]
    on_host = [k for k, v in given if k not in on_dev]
    if on_host:
        raise TypeError(
            f"{', '.join(on_dev)} on a CUDA device but {', '.join(on_host)} on the host: "
            "nbnorm never copies between host and device, pass all arrays on one side")
    try:
        from .cuda import ops
    except ImportError as e:
        raise RuntimeError(f"arrays on a CUDA device: {e}") from e
    ops.check_available()
    return _Backend(True, ops, ops, {"stream": stream})


def _dev_ops():
    from .cuda import ops  # imported (and checked) by _backend already
    return ops


# --------------------------------------------------------------- the rules

def _input(a, name, dev):
    """An input as an aligned, native-byte-order ndarray (array-likes are converted).

    Inputs are converted (a copy for big-endian or unaligned data, so that the
    kernels see one kind of array); outputs are refused instead (``_writable``).
    Device arrays (``dev``: the call's backend is the device) become Numba
    device arrays viewing the same memory (``cuda.ops.asarray``), never copies.
    """
    if type(a) is np.ndarray:
        if a.dtype.isnative and a.flags.aligned:  # the common case, as it is
            return a
    elif dev:
        return _dev_ops().asarray(a)
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(f"{name} is a masked array, whose mask nbnorm would ignore; "
                        f"pass {name}.filled(...) or a plain ndarray")
    if not isinstance(a, np.ndarray):
        a = np.asarray(a)
        if a.dtype.kind in "iub":  # a list of Python numbers
            raise TypeError(f"{name} must hold floating-point values, got dtype {a.dtype}")
    if a.dtype.kind == "f" and not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    if not a.flags.aligned:
        a = a.copy(order="K")
    return a


def _data(x, dev):
    """``x``: a floating-point batch of at least 2 dimensions."""
    if type(x) is np.ndarray and x.ndim >= 2 and x.dtype.kind == "f" and x.itemsize <= 8 and (
            x.dtype.isnative and x.flags.aligned):
        return x  # the usual case
    x = _input(x, "x", dev)
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions (batch, channels, ...), "
                         f"got shape {x.shape}")
    dtypes.check_data(x.dtype, "x")
    return x


def _like_x(a, name, x, dev, required=False):
    """An input with ``x``'s shape and dtype (``grad_out``, ``residual``,
    ``forward_out``); ``None`` stays ``None`` unless ``required``."""
    if a is None and not required:
        return None
    if type(a) is np.ndarray and a.shape == x.shape and a.dtype is x.dtype and a.flags.aligned:
        return a  # the usual case: as it is
    a = _input(a, name, dev)
    if tuple(a.shape) != tuple(x.shape):
        raise ValueError(f"{name} must have x's shape {tuple(x.shape)}, got {tuple(a.shape)}")
    if a.dtype != x.dtype:
        raise TypeError(f"{name} must have x's dtype {x.dtype}, got {a.dtype}")
    return a


def _channel_input(a, name, C, dev):
    """An optional per-channel input (weight, bias, mean, invstd) of any float dtype."""
    if a is None:
        return None
    if type(a) is np.ndarray and a.shape == (C,) and a.dtype.kind == "f" and a.dtype.isnative:
        flags = a.flags  # one flags object (~70 ns each) for both checks
        if flags.aligned and flags.c_contiguous:  # the usual case: as it is
            return a
    a = _input(a, name, dev)
    if not dtypes.is_float(a.dtype):
        raise TypeError(f"{name} must be a floating-point array, got dtype {a.dtype}")
    if a.shape != (C,):
        raise ValueError(f"{name} must have shape ({C},) (one value per channel), "
                         f"got {a.shape}")
    if dev or a.flags.c_contiguous:  # device: the per-channel kernels take any strides
        return a
    return np.ascontiguousarray(a)  # O(C); one kernel signature for every caller


def _writable(a, name, shape, dtype, dev):
    """A caller-owned output or running statistic, checked for an in-place write:
    ``dtype`` exactly, or (None) any float dtype."""
    if type(a) is np.ndarray and a.shape == shape and (a.dtype is dtype or (
            dtype is None and a.dtype.kind == "f" and a.dtype.isnative)):
        flags = a.flags
        if flags.carray:  # C-contiguous, aligned and writeable: the usual case
            return a
    if dev:
        return _writable_device(a, name, shape, dtype)
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray to be written in place, "
                        f"got {type(a).__name__}")
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    if not a.dtype.isnative:  # before the dtype: '>f4' is not "the wrong dtype"
        raise TypeError(f"{name} must be in native byte order, got dtype {a.dtype.str}")
    _check_out_dtype(a.dtype, name, dtype)
    flags = a.flags
    if not flags.writeable:
        raise ValueError(f"{name} is read-only")
    if not flags.aligned:
        raise ValueError(f"{name} is not aligned to its dtype; pass an aligned array")
    if not flags.forc and layout.overlaps_itself(a.shape, a.strides, a.itemsize):
        raise ValueError(f"{name} has overlapping elements (zero or overlapping strides)")
    return a


def _check_out_dtype(dt, name, dtype):
    """An output's dtype ``dt``: ``dtype`` exactly, or any float where ``dtype`` is None."""
    if dtype is None:
        if not dtypes.is_float(dt):
            raise TypeError(f"{name} must be a floating-point array, got dtype {dt}")
    elif dt != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {dt}")


def _writable_device(a, name, shape, dtype):
    """``_writable`` for a device array; returns the caller's object."""
    ops = _dev_ops()
    d = ops.asarray(a)
    if tuple(d.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(d.shape)}")
    _check_out_dtype(d.dtype, name, dtype)
    if ops.readonly(a):
        raise ValueError(f"{name} is read-only")
    if ops.overlaps_itself(d):
        raise ValueError(f"{name} has overlapping elements (zero or overlapping strides)")
    return a


def _axis(axis, ndim):
    if type(axis) is int and -ndim <= axis < ndim:  # the usual case
        return axis % ndim
    try:
        axis = operator.index(axis)
    except TypeError:
        raise TypeError(f"axis must be an integer, got {type(axis).__name__}") from None
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of bounds for an array of dimension {ndim}")
    return axis % ndim


def _scalar(value, name, low, high, low_open):
    if type(value) is float:  # the usual case: no conversion
        v = value
    else:
        try:
            if isinstance(value, (str, bytes)):  # float("0.1") would parse it
                raise TypeError
            v = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a real number, got {value!r}") from None
    ok = (low < v if low_open else low <= v) and v <= high
    if not ok or not math.isfinite(v):
        lo = "(" if low_open else "["
        hi = f"{high}]" if math.isfinite(high) else "inf)"
        raise ValueError(f"{name} must be a finite number in {lo}{low}, {hi}, got {value!r}")
    return v


def _positive_int(value, name):
    """``value`` as an int of at least 1 (a count of features, channels, groups)."""
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if n < 1:
        raise ValueError(f"{name} must be at least 1, got {n}")
    return n


def _flag(value, name):
    """A bool argument: bools and the integers 0 and 1, nothing truthy by accident."""
    if value is True or value is False:
        return value
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a bool, got {value!r}") from None
    if v not in (0, 1):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return bool(v)


#: The fused activations, by name.
ACTIVATIONS = ("relu",)


def _activation(value):
    """``activation``: None or "relu"; whether the ReLU is applied."""
    if value is None:
        return False
    if isinstance(value, str) and value in ACTIVATIONS:
        return True
    raise ValueError(f"activation must be None or one of {', '.join(map(repr, ACTIVATIONS))}, "
                     f"got {value!r}")


def _batch_count(x, axis, training):
    """Values per channel; training needs more than one."""
    if x.size == 0:
        raise ValueError(f"expected a non-empty input, got shape {tuple(x.shape)}")
    n = x.size // x.shape[axis]
    if training and n <= 1:
        _too_few(f"input size {tuple(x.shape)}")
    return n


def _too_few(what):
    """Training normalizes by a variance, which needs more than one value per
    channel (``what``: the input size or the count, for the message)."""
    raise ValueError(f"expected more than 1 value per channel when training, got {what}")


def _count(value, name, training):
    """A count of values per channel (``moments.count``, ``backward``'s ``count``):
    an int >= 0, more than 1 when ``training``."""
    if type(value) is int and value > 1:  # the usual case
        return value
    if isinstance(value, (bool, np.bool_)):  # an int to Python, never a count
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    if training and v <= 1:
        _too_few(f"{name}={v}")
    return v


def _items(value, name, fields):
    """The items of ``value``, a sequence of ``len(fields)`` (a ``Moments``, a
    pair of sums), unchecked; ``fields`` names them in the message."""
    if type(value) is Moments or (type(value) is tuple and len(value) == len(fields)):
        return value  # the usual case
    try:
        items = tuple(value)
    except TypeError:
        items = ()
    if len(items) != len(fields) or isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a sequence ({', '.join(fields)}), got "
                        f"{type(value).__name__}")
    return items


def _required_channels(a, name, C, dev):
    """A per-channel float array that must be given (``moments``' mean and m2,
    ``sums``): ``_channel_input``, for which None means "not given"."""
    if a is None:
        raise TypeError(f"{name} must be an array of shape ({C},), got None")
    return _channel_input(a, name, C, dev)


def _sum_pair(s_dy, s_xmu, name, C, dev):
    """``sums``/``local_sums`` (unpacked by ``_items``): two per-channel arrays."""
    return (_required_channels(s_dy, f"{name}[0] ({_SUMS[0]})", C, dev),
            _required_channels(s_xmu, f"{name}[1] ({_SUMS[1]})", C, dev))


def _forward_out(forward_out, relu, x, dev):
    """``forward_out``: required with ``activation="relu"`` (its sign is the
    mask), refused without it."""
    if forward_out is None:
        if relu:
            raise ValueError("activation='relu' needs forward_out (forward's out), whose "
                             "sign is the ReLU's mask")
        return None
    if not relu:
        raise ValueError("forward_out is only read with activation='relu'")
    return _like_x(forward_out, "forward_out", x, dev)


def _running(running_mean, running_var, C, training, dev):
    """Running statistics: both or neither, written in place when training
    (so writable), only read in inference (read-only is fine), required there."""
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if running_mean is None:
        if not training:
            raise ValueError("inference (training=False) needs running_mean and running_var")
        return None, None
    if training:  # updated in place
        return (_writable(running_mean, "running_mean", (C,), None, dev),
                _writable(running_var, "running_var", (C,), None, dev))
    return (_channel_input(running_mean, "running_mean", C, dev),
            _channel_input(running_var, "running_var", C, dev))


# ---------------------------------------------------------------- aliasing

_TooHard = getattr(np, "exceptions", np).TooHardError


def _overlap(a, b, dev):
    """Whether ``a`` and ``b`` share memory: exact for the common cases
    (interleaved views of one buffer do not overlap), "yes" when in doubt.
    Device arrays: whether their address ranges intersect."""
    if dev:
        ops = _dev_ops()
        return ops.overlap(ops.asarray(a), ops.asarray(b))
    if not np.may_share_memory(a, b):  # memory bounds only: ~0.2 us
        return False
    try:
        return np.shares_memory(a, b, max_work=10_000)
    except _TooHard:
        return True


def _same(a, b, dev):
    if dev:
        ops = _dev_ops()
        return ops.same(ops.asarray(a), ops.asarray(b))
    if a is b:  # out=x itself: skip __array_interface__ (~1.7 us an array)
        return True
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.shape == b.shape and a.strides == b.strides and a.dtype == b.dtype)


def _separate(arrays):
    """True when the given host arrays (``None``: not given) are distinct objects
    that each own their data: separate allocations, so none overlaps another
    (~0.4 us for eight arrays, against ~1.5 us for ``_check_aliasing``'s tuples)."""
    ids = set()
    n = 0
    for a in arrays:
        if a is not None:
            if a.base is not None:  # a view (``base`` is OWNDATA's opposite, ~5x cheaper)
                return False
            ids.add(id(a))
            n += 1
    return len(ids) == n


def _check_aliasing(outputs, inputs, may_be, dev):
    """Refuse outputs that overlap each other or an input.

    ``outputs`` and ``inputs`` are sequences of ``(name, array or None)``.
    ``may_be`` holds the ``(output, input)`` pairs where the output may be
    exactly that input (an elementwise pass reads each element before writing
    it): ``out=x``, ``grad_input=grad_out``.  Outputs that nbnorm allocates
    are ``None`` here: nothing to check.

    On the host, two distinct arrays that each own their data (``OWNDATA``:
    never a view) are separate allocations and cannot overlap; that flag
    (~0.07 us an array) saves ``np.may_share_memory`` (~0.2 us a pair) for the
    usual case of freshly allocated weights, statistics and batches.
    """
    outs = [kv for kv in outputs if kv[1] is not None]
    if not outs:
        return
    ins = [kv for kv in inputs if kv[1] is not None]
    own = set() if dev else {id(v) for _, v in outs + ins if v.flags.owndata}
    if len(own) == len(outs) + len(ins):  # separate allocations: nothing can overlap
        return
    for i, (na, a) in enumerate(outs):
        own_a = id(a) in own
        for nb, b in outs[i + 1:]:
            if not (own_a and id(b) in own and a is not b) and _overlap(a, b, dev):
                raise ValueError(f"{na} and {nb} overlap in memory")
        for nb, b in ins:
            if (own_a and id(b) in own and a is not b) or not _overlap(a, b, dev):
                continue
            if (na, nb) in may_be and _same(a, b, dev):
                continue
            raise ValueError(f"{na} overlaps the input {nb} in memory")


# ---------------------------------------------------------------- dispatch

def _empty_like(x, lay, be):
    """An output like ``x`` (``out``, ``grad_input``) in the memory order of
    ``x``'s canonical view ``lay``, so that the kernel writes it directly.

    On the host that is ``x``'s own memory order whenever ``x`` is contiguous
    in some axis order (Fortran, ``channels_last``, transposes: the strides
    PyTorch's ``preserve_format`` gives), and C order otherwise (``x`` with gaps
    or negative strides is read through a C-order copy).  Device arrays: the
    device's ``empty_like``.
    """
    if be.device:
        return be.ops.empty_like(x)
    if lay.identity or x.flags.c_contiguous:
        return np.empty(x.shape, x.dtype)
    # x is contiguous in the axis order lay.order: empty_like's order="K" makes
    # the same strides (its subok=False: a plain ndarray, as np.empty gives).
    return np.empty_like(x, subok=False)


def _allocate(x, lay, be, C, sdt, like_x, c1, c2):
    """A call's three outputs (one like ``x``, two per-channel ones of ``sdt``),
    each the caller's buffer or a new one."""
    if like_x is None:
        like_x = _empty_like(x, lay, be)
    empty = be.ops.empty if be.device else np.empty
    return (like_x, empty((C,), sdt) if c1 is None else c1,
            empty((C,), sdt) if c2 is None else c2)


def _kernel_input(a, lay, be):
    """The canonical view of an input like ``x`` as the kernels take it
    (host half data as integer bits: ``dtypes.kernel_view``); None stays None."""
    if a is None:
        return None
    if lay.identity and type(a) is np.ndarray and a.flags.c_contiguous:  # the usual case
        v = a if a.shape == lay.kernel_shape else a.reshape(lay.kernel_shape)
    else:
        v = be.views.input_view(a, lay)
    return v if be.device or v.itemsize > 2 else dtypes.kernel_view(v)


def _kernel_output(a, lay, be):
    """``(view, finish)`` of an output like ``x`` (``layout.output_view``); None stays None."""
    if a is None:
        return None, _nothing
    if lay.identity and type(a) is np.ndarray and a.flags.c_contiguous:  # the usual case
        v, finish = (a if a.shape == lay.kernel_shape else a.reshape(lay.kernel_shape)), _nothing
    else:
        v, finish = be.views.output_view(a, lay)
    return (v if be.device or v.itemsize > 2 else dtypes.kernel_view(v)), finish


def _nothing():
    pass


# ------------------------------------------------------------------- public

_FORWARD_ARRAYS = ("x", "weight", "bias", "running_mean", "running_var", "out", "mean",
                   "invstd", "residual", "moments.mean", "moments.m2")
_BACKWARD_ARRAYS = ("grad_out", "x", "mean", "invstd", "weight", "grad_input",
                    "grad_weight", "grad_bias", "forward_out", "grad_residual",
                    "sums[0]", "sums[1]", "local_sums[0]", "local_sums[1]")
_SUMS = ("sum_dy", "sum_dy_xmu")
_FORWARD_MAY_BE = frozenset({("out", "x"), ("out", "residual")})
_BACKWARD_MAY_BE = frozenset({("grad_input", "grad_out"), ("grad_residual", "grad_out")})


def forward(x, weight=None, bias=None, running_mean=None, running_var=None, *,
            training=True, momentum=0.1, unbiased=True, eps=1e-5, axis=1,
            out=None, mean=None, invstd=None, moments=None, on_nonfinite="propagate",
            activation=None, residual=None, stream=None, check_only=False):
    """Batch normalization of ``x`` over every axis but the channel ``axis``.

    Parameters
    ----------
    x : array, floating point, ``ndim >= 2``
        The batch: float16, bfloat16 (``ml_dtypes``), float32 or float64.  Any
        memory order is read without a copy as long as it is contiguous in some
        axis order (C order, ``channels_last``, transposes).
    weight, bias : array of shape ``(C,)``, optional
        The affine parameters, any float dtype; ``None`` means scale 1 and shift 0.
    running_mean, running_var : ndarray of shape ``(C,)``, optional
        Running statistics (any float dtype), both or neither.  Updated in place
        when training: ``running = (1 - momentum) * running + momentum * batch``,
        with the unbiased batch variance (``unbiased``).  Required for inference.
    training : bool
        Normalize with the batch statistics (True) or the running ones.
    momentum : float in [0, 1]
        The weight of the new batch (PyTorch's convention; Keras' ``m`` is ``1 - m``).
    unbiased : bool
        ``running_var`` takes the unbiased batch variance ``M2 / (n - 1)``
        (True: PyTorch, cuDNN) or the biased one ``M2 / n`` (False: Keras 3,
        Flax, ONNX).  The normalization itself always uses the biased one.
    eps : float > 0
        Added to the variance: ``invstd = 1 / sqrt(var + eps)``.
    axis : int
        The channel axis; negative values count from the end.
    out, mean, invstd : ndarray, optional
        Preallocated outputs: ``out`` like ``x`` (``out=x`` or ``out=residual``
        computes in place), ``mean`` and ``invstd`` of shape ``(C,)`` and
        ``x``'s dtype (float32 for half ``x``).  An ``out`` that nbnorm
        allocates has ``x``'s memory order (Fortran, ``channels_last``,
        transposes: PyTorch's ``preserve_format``); C order when ``x`` is not
        contiguous in any axis order (gaps, negative strides).
    moments : Moments, optional
        Training only: normalize with these statistics instead of ``x``'s own
        (``moments``/``merge_moments``: those of a batch spread over several
        processes), and update the running statistics with them and their
        count.  ``x`` may then have no rows.  ``on_nonfinite`` and "more than
        1 value per channel" are decided on ``moments``, so every process that
        passes the same merged moments decides the same.  Any
        ``(count, mean, m2)``: ``count`` an int, ``mean`` and ``m2`` of shape
        ``(C,)``, any float dtype, on ``x``'s device.
    on_nonfinite : {"propagate", "skip", "raise"}
        What a training step does when a channel's batch mean or variance is not
        finite (NaN/inf in ``x``).  ``"propagate"`` (PyTorch's behaviour): NaN/inf
        reach the outputs and the running statistics.  ``"skip"``: the outputs are
        the same, but those channels' running statistics keep their old values;
        they are the channels where the returned ``mean`` or ``invstd`` is not
        finite (or ``invstd`` is 0: float64 data beyond ~1e154, whose variance
        overflows).  ``"raise"``: ``FloatingPointError`` before anything is
        written.  The check is O(C).  Inference ignores it.  On the GPU,
        ``"raise"`` is the one setting that waits for the device (it copies
        the O(C) batch moments to the host to decide).
    activation : {None, "relu"}
        Applied after the affine map and the residual add, in the same pass:
        ``out = relu(bn(x) + residual)``.  ReLU keeps NaN.
    residual : array like ``x``, optional
        Added to the normalized values before the activation (ResNet's
        shortcut); ``x``'s shape and dtype, any memory order.
    stream : CUDA stream, optional
        Device arrays only: the stream every kernel is launched on (a Numba
        stream, a CuPy or PyTorch stream, or a raw ``cudaStream_t``); ``None``
        is the default stream.  The call returns without waiting for the device.
        With host arrays it is a ``TypeError``.
    check_only : bool
        Check every argument as the call would, then return None without
        computing or writing anything: what a process runs before a collective
        (``nbnorm.distributed``), so that its bad argument is known before the
        other processes wait for its statistics.

    Returns
    -------
    ForwardResult
        ``(out, mean, invstd)``: the batch mean and ``1/sqrt(var_biased + eps)``
        when training, the running mean and ``1/sqrt(running_var + eps)`` otherwise.

    Raises
    ------
    TypeError
        Non-floating or unsupported dtypes, outputs of the wrong dtype or type,
        a ``residual`` of another dtype.
    ValueError
        Shape or axis mismatches, training with one value per channel, inference
        without running statistics, read-only or overlapping outputs, ``eps`` or
        ``momentum`` out of range, an unknown ``on_nonfinite`` or ``activation``,
        ``moments`` in inference or with a negative count.  Nothing has been
        written when it raises.
    FloatingPointError
        ``on_nonfinite="raise"`` and a batch mean or variance is not finite;
        nothing has been written.
    """
    given = m_mean = m_m2 = None
    if moments is not None:
        given = _items(moments, "moments", Moments._fields)
        m_mean, m_m2 = given[1], given[2]
    be = _backend(_FORWARD_ARRAYS,
                  (x, weight, bias, running_mean, running_var, out, mean, invstd, residual,
                   m_mean, m_m2), stream)
    dev = be.device
    x = _data(x, dev)
    ax = _axis(axis, x.ndim)
    C = x.shape[ax]
    training = _flag(training, "training")
    unbiased = _flag(unbiased, "unbiased")
    on_nonfinite = guard.check_policy(on_nonfinite)
    relu = _activation(activation)
    if given is None:
        _batch_count(x, ax, training)
    elif not training:
        raise ValueError("moments= is for training: inference normalizes with the running "
                         "statistics")
    else:
        m_mean = _required_channels(m_mean, "moments.mean", C, dev)
        m_m2 = _required_channels(m_m2, "moments.m2", C, dev)
        given = (_count(given[0], "moments.count", training), m_mean, m_m2)
    momentum = _scalar(momentum, "momentum", 0.0, 1.0, low_open=False)
    eps = _scalar(eps, "eps", 0.0, math.inf, low_open=True)
    weight = _channel_input(weight, "weight", C, dev)
    bias = _channel_input(bias, "bias", C, dev)
    running_mean, running_var = _running(running_mean, running_var, C, training, dev)
    if residual is not None:
        residual = _like_x(residual, "residual", x, dev)
    sdt = dtypes.stat_dtype(x.dtype)
    if out is not None:
        out = _writable(out, "out", x.shape, x.dtype, dev)
    if mean is not None:
        mean = _writable(mean, "mean", (C,), sdt, dev)
    if invstd is not None:
        invstd = _writable(invstd, "invstd", (C,), sdt, dev)
    if ((out is not None or mean is not None or invstd is not None
         or (training and running_mean is not None))  # else no output to check
            and (dev or not _separate((x, weight, bias, running_mean, running_var, out, mean,
                                       invstd, residual, m_mean, m_m2)))):
        running = (("running_mean", running_mean), ("running_var", running_var))
        _check_aliasing(
            (("out", out), ("mean", mean), ("invstd", invstd), *(running if training else ())),
            (("x", x), ("weight", weight), ("bias", bias), ("residual", residual),
             ("moments.mean", m_mean), ("moments.m2", m_m2), *(() if training else running)),
            _FORWARD_MAY_BE, dev)

    if check_only:
        return None
    lay = be.views.plan(x, ax)
    out, mean, invstd = _allocate(x, lay, be, C, sdt, out, mean, invstd)
    x3 = _kernel_input(x, lay, be)
    out3, finish = _kernel_output(out, lay, be)
    kw = be.kw
    if residual is not None or relu:
        kw = dict(kw, residual=_kernel_input(residual, lay, be), relu=relu)
    if given is not None or not unbiased:
        kw = dict(kw, correction=1.0 if unbiased else 0.0, moments=given)
    if training:
        be.ops.forward_train(x3, weight, bias, eps, momentum, running_mean, running_var,
                             out3, mean, invstd, on_nonfinite, **kw)
    else:
        be.ops.forward_infer(x3, weight, bias, eps, running_mean, running_var,
                             out3, mean, invstd, **kw)
    finish()
    return ForwardResult(out, mean, invstd)


def backward(grad_out, x, mean, invstd, weight=None, *, training=True, axis=1,
             grad_input=None, grad_weight=None, grad_bias=None, activation=None,
             forward_out=None, grad_residual=None, sums=None, count=None, local_sums=None,
             stream=None, check_only=False):
    """Gradients of ``forward`` with respect to ``x``, ``weight`` and ``bias``
    (and ``residual``).

    Parameters
    ----------
    grad_out : array like ``x``
        The gradient of the loss with respect to ``forward``'s ``out``.
    x : array
        The input that ``forward`` normalized.
    mean, invstd : array of shape ``(C,)``
        What ``forward`` returned for ``x`` (batch statistics when training).
    weight : array of shape ``(C,)``, optional
        The scale used in ``forward``; ``None`` means 1.
    training : bool
        True: the full batch-norm gradient, in which the batch statistics
        depend on ``x``.  False: the gradient of the affine map alone (a frozen
        layer being fine-tuned).
    axis : int
        The channel axis.
    grad_input, grad_weight, grad_bias : ndarray, optional
        Preallocated outputs (``grad_input`` like ``x``, the others ``(C,)`` of
        ``forward``'s ``mean`` dtype).  ``grad_input=grad_out`` computes in
        place.  A ``grad_input`` that nbnorm allocates has ``x``'s memory order,
        as ``forward``'s ``out``.
    activation : {None, "relu"}
        The ``activation`` of the forward call.  With "relu" the gradient is
        masked by ``forward_out > 0`` (cuDNN's convention: the mask comes from
        the output, which is all a fused layer keeps).
    forward_out : array like ``x``, optional
        ``forward``'s ``out``; required with ``activation="relu"``, refused without.
    grad_residual : ndarray like ``x``, optional
        Receives the gradient with respect to ``forward``'s ``residual``: the
        masked ``grad_out`` (``grad_out`` itself without an activation), in the
        same pass.  ``grad_residual=grad_out`` is allowed.
    sums : pair of arrays of shape ``(C,)``, optional
        Training only: the ``(sum_dy, sum_dy_xmu)`` of ``backward_sums`` added
        over every process's batch, that ``grad_input`` uses instead of this
        batch's own (synchronized batch norm); requires ``count``.  ``x`` may
        then have no rows.  Only the elementwise pass runs when ``local_sums``
        is given too.
    count : int, optional
        With ``sums``: the number of values per channel they are summed over
        (the merged ``Moments.count``), more than 1.
    local_sums : pair of arrays of shape ``(C,)``, optional
        With ``sums``: this batch's own ``backward_sums``, from which
        ``grad_weight`` and ``grad_bias`` are computed; without it they are
        reduced here (one more pass over ``grad_out`` and ``x``).
    stream : CUDA stream, optional
        Device arrays only, as for ``forward``.
    check_only : bool
        Check every argument, then return None without computing or writing
        anything, as for ``forward``.

    Returns
    -------
    BackwardResult
        ``(grad_input, grad_weight, grad_bias)`` with ``grad_weight =
        sum(g * (x - mean) * invstd)`` and ``grad_bias = sum(g)`` over every
        axis but ``axis``, ``g`` the (masked) ``grad_out``; returned whether or
        not ``weight`` is given.  With ``sums`` they are still this batch's
        own sums (PyTorch's ``SyncBatchNorm``: the training loop's gradient
        all-reduce adds them), zeros for a batch without rows.

    Raises
    ------
    TypeError, ValueError
        As for ``forward``, and ``activation="relu"`` without ``forward_out``;
        ``sums`` in inference, without ``count`` (or ``count``/``local_sums``
        without ``sums``), a ``count`` of 1 or less; nothing has been written
        when it raises.
    """
    s_dy = s_xmu = l_dy = l_xmu = None  # sums and local_sums
    if sums is not None:
        s_dy, s_xmu = _items(sums, "sums", _SUMS)
        if local_sums is not None:
            l_dy, l_xmu = _items(local_sums, "local_sums", _SUMS)
    elif count is not None or local_sums is not None:
        raise ValueError("count= and local_sums= go with sums=")
    be = _backend(_BACKWARD_ARRAYS,
                  (grad_out, x, mean, invstd, weight, grad_input, grad_weight, grad_bias,
                   forward_out, grad_residual, s_dy, s_xmu, l_dy, l_xmu), stream)
    dev = be.device
    x = _data(x, dev)
    ax = _axis(axis, x.ndim)
    C = x.shape[ax]
    training = _flag(training, "training")
    relu = _activation(activation)
    if sums is None:
        _batch_count(x, ax, training)
    elif not training:
        raise ValueError("sums= is for training: the inference-mode gradient has no sums")
    else:
        if count is None:
            raise ValueError("sums= needs count=, the number of values they sum per channel")
        count = _count(count, "count", training)
        s_dy, s_xmu = _sum_pair(s_dy, s_xmu, "sums", C, dev)
        if local_sums is not None:
            l_dy, l_xmu = _sum_pair(l_dy, l_xmu, "local_sums", C, dev)
    grad_out = _like_x(grad_out, "grad_out", x, dev, required=True)
    if mean is None or invstd is None:
        raise ValueError("backward needs the mean and invstd that forward returned")
    mean = _channel_input(mean, "mean", C, dev)
    invstd = _channel_input(invstd, "invstd", C, dev)
    weight = _channel_input(weight, "weight", C, dev)
    forward_out = _forward_out(forward_out, relu, x, dev)
    sdt = dtypes.stat_dtype(x.dtype)
    if grad_input is not None:
        grad_input = _writable(grad_input, "grad_input", x.shape, x.dtype, dev)
    if grad_weight is not None:
        grad_weight = _writable(grad_weight, "grad_weight", (C,), sdt, dev)
    if grad_bias is not None:
        grad_bias = _writable(grad_bias, "grad_bias", (C,), sdt, dev)
    if grad_residual is not None:
        grad_residual = _writable(grad_residual, "grad_residual", x.shape, x.dtype, dev)
    if ((grad_input is not None or grad_weight is not None or grad_bias is not None
         or grad_residual is not None)
            and (dev or not _separate((grad_out, x, mean, invstd, weight, forward_out,
                                       grad_input, grad_weight, grad_bias, grad_residual,
                                       s_dy, s_xmu, l_dy, l_xmu)))):
        _check_aliasing(
            (("grad_input", grad_input), ("grad_weight", grad_weight),
             ("grad_bias", grad_bias), ("grad_residual", grad_residual)),
            (("grad_out", grad_out), ("x", x), ("mean", mean), ("invstd", invstd),
             ("weight", weight), ("forward_out", forward_out),
             ("sums[0]", s_dy), ("sums[1]", s_xmu), ("local_sums[0]", l_dy),
             ("local_sums[1]", l_xmu)),
            _BACKWARD_MAY_BE, dev)

    if check_only:
        return None
    lay = be.views.plan(x, ax)
    grad_input, grad_weight, grad_bias = _allocate(x, lay, be, C, sdt, grad_input,
                                                   grad_weight, grad_bias)
    x3 = _kernel_input(x, lay, be)
    dy3 = _kernel_input(grad_out, lay, be)
    dx3, finish = _kernel_output(grad_input, lay, be)
    kw = be.kw
    finish_residual = _nothing
    if relu or grad_residual is not None:
        gr3, finish_residual = _kernel_output(grad_residual, lay, be)
        kw = dict(kw, forward_out=_kernel_input(forward_out, lay, be), grad_residual=gr3)
    if sums is not None:
        kw = dict(kw, sums=(s_dy, s_xmu), count=count,
                  local_sums=None if l_dy is None else (l_dy, l_xmu))
    be.ops.backward(dy3, x3, mean, invstd, weight, training, dx3, grad_weight, grad_bias,
                    **kw)
    finish()
    finish_residual()
    return BackwardResult(grad_input, grad_weight, grad_bias)


def moments(x, *, axis=1, stream=None):
    """The mergeable statistics of ``x`` per channel: what a training step
    normalizes with, as numbers that merge exactly across batches.

    Parameters
    ----------
    x : array, floating point, ``ndim >= 2``
        A batch as ``forward`` takes it (any dtype and memory order it reads).
        It may have no rows (N=0): its count is then 0.
    axis : int
        The channel axis.
    stream : CUDA stream, optional
        Device arrays only, as for ``forward``.

    Returns
    -------
    Moments
        ``(count, mean, m2)``: ``count`` the values per channel (a Python int),
        ``mean`` and ``m2`` (the sum of squared deviations from ``mean``)
        float64 arrays of shape ``(C,)``, zeros for a batch without values.
        Bitwise the statistics ``forward(x)`` normalizes with (blocked
        two-pass sums, Chan-merged: no ``E[x^2] - E[x]^2``).  For ``x`` on a
        CUDA device they are device arrays, computed on ``stream`` without
        waiting for it (copy them to the host to send them over MPI: 2C + 1
        numbers).

    Raises
    ------
    TypeError, ValueError
        As for ``forward``'s ``x`` and ``axis``.
    """
    be = _backend(("x",), (x,), stream)
    x = _data(x, be.device)
    ax = _axis(axis, x.ndim)
    C = x.shape[ax]
    count = math.prod(x.shape[:ax]) * math.prod(x.shape[ax + 1:])
    lay = be.views.plan(x, ax)
    mean, m2 = be.ops.moments(_kernel_input(x, lay, be), **be.kw)
    return Moments(count, mean, m2)


def merge_moments(seq, *, stream=None):
    """The ``Moments`` of the union of batches, merged in the given order.

    Chan's formula (``n = na + nb``, ``mean = ma + d * nb / n``, ``m2 = m2a +
    m2b + d * d * na * nb / n``, ``d = mb - ma``) folded left to right: every
    process that merges the same list in the same order gets the same bits.

    Parameters
    ----------
    seq : sequence of Moments
        At least one; each a ``Moments`` or any ``(count, mean, m2)`` with
        ``count`` an int >= 0 and ``mean``, ``m2`` of one shape ``(C,)`` for
        all, any float dtype (computed in float64), all on the host or all on
        one CUDA device.  An entry of count 0 (a process without rows) changes
        nothing, whatever its ``mean`` and ``m2``; merging a single entry
        returns its values.
    stream : CUDA stream, optional
        Device arrays only, as for ``forward``.

    Returns
    -------
    Moments
        New float64 arrays (on the entries' device); count 0 and zeros when
        every entry is empty.

    Raises
    ------
    TypeError
        A non-sequence entry, a non-integer count, non-float arrays.
    ValueError
        An empty ``seq``, a negative count, arrays of different lengths or not
        1-dimensional.
    """
    entries = [_items(m, f"seq[{i}]", Moments._fields) for i, m in enumerate(seq)]
    if not entries:
        raise ValueError("merge_moments needs at least one Moments")
    names = [f"seq[{i}].{f}" for i in range(len(entries)) for f in ("mean", "m2")]
    be = _backend(names, [a for e in entries for a in e[1:]], stream)
    dev = be.device
    first = entries[0][1]
    if first is None:
        raise TypeError("seq[0].mean must be an array of one value per channel, got None")
    shape = tuple(first.shape) if dev else np.shape(first)
    if len(shape) != 1:
        raise ValueError(f"seq[0].mean must be 1-dimensional (one value per channel), "
                         f"got shape {shape}")
    C = shape[0]
    checked = [(_count(n, f"seq[{i}].count", False),
                _required_channels(m, f"seq[{i}].mean", C, dev),
                _required_channels(q, f"seq[{i}].m2", C, dev))
               for i, (n, m, q) in enumerate(entries)]
    return Moments(*be.ops.merge_moments(checked, C, **be.kw))


def backward_sums(grad_out, x, mean, invstd=None, *, axis=1, activation=None,
                  forward_out=None, stream=None):
    """The reductions of training-mode ``backward``: ``(sum_dy, sum_dy_xmu)``.

    ``sum_dy = sum(g)`` and ``sum_dy_xmu = sum(g * (x - mean))`` per channel
    over every axis but ``axis``, ``g`` the (masked) ``grad_out``: what
    synchronized batch norm adds over processes (one all-reduce of 2C values)
    before ``backward(..., sums=, count=)``.  One pass over ``grad_out`` and
    ``x``, the one ``backward`` makes, with its bits.

    Parameters
    ----------
    grad_out, x, mean : as for ``backward``
        ``x`` may have no rows (its sums are then 0).
    invstd : array of shape ``(C,)``, optional
        Not needed by the sums; accepted (and checked) so that the call takes
        ``backward``'s leading arguments.
    axis : int
        The channel axis.
    activation, forward_out : as for ``backward``
        With ``activation="relu"`` the sums are of ``grad_out`` masked by
        ``forward_out > 0``.
    stream : CUDA stream, optional
        Device arrays only, as for ``forward``.

    Returns
    -------
    tuple
        ``(sum_dy, sum_dy_xmu)``: float64 arrays of shape ``(C,)``, device
        arrays for device input.  This batch's ``grad_bias`` is ``sum_dy`` and
        its ``grad_weight`` ``sum_dy_xmu * invstd``.

    Raises
    ------
    TypeError, ValueError
        As for ``backward``; nothing is written.
    """
    be = _backend(("grad_out", "x", "mean", "invstd", "forward_out"),
                  (grad_out, x, mean, invstd, forward_out), stream)
    dev = be.device
    x = _data(x, dev)
    ax = _axis(axis, x.ndim)
    C = x.shape[ax]
    relu = _activation(activation)
    grad_out = _like_x(grad_out, "grad_out", x, dev, required=True)
    if mean is None:
        raise ValueError("backward_sums needs the mean that forward returned")
    mean = _channel_input(mean, "mean", C, dev)
    _channel_input(invstd, "invstd", C, dev)
    forward_out = _forward_out(forward_out, relu, x, dev)
    lay = be.views.plan(x, ax)
    return tuple(be.ops.backward_sums(_kernel_input(grad_out, lay, be), _kernel_input(x, lay, be),
                                      mean, _kernel_input(forward_out, lay, be), **be.kw))
