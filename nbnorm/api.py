"""``forward`` and ``backward``: validation, dispatch and allocation.

This is the only place that looks at user input.  Everything is checked before
anything is written, so a call that raises has changed no output and no running
statistic.  The kernels behind it (``nbnorm.cpu.ops``, ``nbnorm.cuda.ops``) take
canonical views and scalars only.
"""

import math
import operator
from typing import NamedTuple

import numpy as np

from . import guard, layout


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


# ----------------------------------------------------------------- validation

def _stat_dtype(dtype):
    """The dtype of per-channel results for data of ``dtype``."""
    return np.dtype(np.float32) if dtype.itemsize < 4 else dtype


# Device follows the data: arrays on a CUDA device (``__cuda_array_interface__``:
# Numba device arrays, CuPy, PyTorch CUDA tensors; or device arrays of Numba's
# CUDA simulator, which lack the interface) run ``nbnorm.cuda.ops``, NumPy
# arrays ``nbnorm.cpu.ops``.  The validation below is the same for both; where
# a check needs memory (addresses, read-only flags) it asks ``cuda.ops``.
#
# The device is decided once per call (``_backend``) and passed down as ``dev``:
# probing an array costs ~0.3 us, and a small call used to probe ~19 times.
# Exact ``numpy.ndarray``s (``type(a) is np.ndarray``, ~50 ns) are host arrays
# and take the short paths below; everything else goes the general way.

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


def _check_data_dtype(a, name):
    dt = a.dtype
    if dt.kind != "f":
        raise TypeError(f"{name} must be a floating-point array, got dtype {dt}")
    if dt.itemsize == 2:
        raise TypeError(f"{name}: float16 is not supported by the CPU kernels; "
                        "pass float32 or float64")
    if dt.itemsize > 8:
        raise TypeError(f"{name}: dtype {dt} is not supported; pass float32 or float64")


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


def _channel_input(a, name, C, dev):
    """An optional per-channel input (weight, bias, mean, invstd)."""
    if a is None:
        return None
    if type(a) is np.ndarray and a.shape == (C,) and a.dtype.kind == "f" and a.dtype.isnative:
        flags = a.flags  # one flags object (~70 ns each) for both checks
        if flags.aligned and flags.c_contiguous:  # the usual case: as it is
            return a
    a = _input(a, name, dev)
    if a.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array, got dtype {a.dtype}")
    if a.shape != (C,):
        raise ValueError(f"{name} must have shape ({C},) (one value per channel), "
                         f"got {a.shape}")
    if dev or a.flags.c_contiguous:  # device: the per-channel kernels take any strides
        return a
    return np.ascontiguousarray(a)  # O(C); one kernel signature for every caller


def _writable(a, name, shape, dtype, dev):
    """A caller-owned output or running statistic, checked for an in-place write."""
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
    if not flags.forc and _overlaps_itself(a):  # C or Fortran contiguous: no overlap
        raise ValueError(f"{name} has overlapping elements (zero or overlapping strides)")
    return a


def _check_out_dtype(dt, name, dtype):
    """An output's dtype ``dt``: ``dtype`` exactly, or any float where ``dtype`` is None."""
    if dtype is None:
        if dt.kind != "f":
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


def _overlaps_itself(a):
    """True unless ``a``'s strides provably give every element its own memory.

    Axes sorted by stride must each step over the whole extent of the smaller
    ones: true of every layout that ``np.empty`` and slicing produce, false for
    broadcasts and most ``as_strided`` tricks.
    """
    if a.size == 0:
        return False
    extent = a.itemsize
    for stride, n in sorted((abs(st), n) for st, n in zip(a.strides, a.shape) if n > 1):
        if stride < extent:
            return True
        extent = stride * (n - 1) + extent
    return False


def _output(a, name, shape, dtype, dev):
    """A preallocated output, checked; ``None`` (allocate later) stays ``None``."""
    return None if a is None else _writable(a, name, shape, dtype, dev)


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
    if x.flags.c_contiguous or lay.order == tuple(range(x.ndim)):
        return np.empty(x.shape, x.dtype)
    # x is contiguous in the axis order lay.order: empty_like's order="K" makes
    # the same strides (its subok=False: a plain ndarray, as np.empty gives).
    return np.empty_like(x, subok=False)


def _axis(axis, ndim):
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


def _separate(*arrays):
    """True when the given host arrays (``None``: not given) are distinct objects
    that each own their data: separate allocations, so none overlaps another and
    ``_check_aliasing`` has nothing to find (~0.4 us for five arrays, against
    ~1.1 us for building its argument tuples and running it)."""
    ids = set()
    n = 0
    for a in arrays:
        if a is not None:
            if not a.flags.owndata:
                return False
            ids.add(id(a))
            n += 1
    return len(ids) == n


def _check_aliasing(outputs, inputs, may_be, dev):
    """Refuse outputs that overlap each other or an input.

    ``outputs`` and ``inputs`` are sequences of ``(name, array or None)``.
    ``may_be`` is ``(output, input)``: the one output that may be exactly the
    one input (an elementwise kernel reads each element before writing it):
    ``out=x``.  Outputs that nbnorm allocates are ``None`` here: nothing to check.

    On the host, two distinct arrays that each own their data (``OWNDATA``:
    never a view) are separate allocations and cannot overlap; that flag
    (~0.07 us an array) saves ``np.may_share_memory`` (~0.2 us a pair) for the
    usual case of freshly allocated weights, statistics and batches.
    """
    outs = [kv for kv in outputs if kv[1] is not None]
    if not outs:
        return
    ins = [kv for kv in inputs if kv[1] is not None]
    # ids of the arrays that own their data; all distinct and owning: done (~0.6 us)
    own = set() if dev else {id(v) for _, v in outs + ins if v.flags.owndata}
    if len(own) == len(outs) + len(ins):
        return
    for i, (na, a) in enumerate(outs):
        own_a = id(a) in own
        for nb, b in outs[i + 1:]:
            if not (own_a and id(b) in own and a is not b) and _overlap(a, b, dev):
                raise ValueError(f"{na} and {nb} overlap in memory")
        for nb, b in ins:
            if (own_a and id(b) in own and a is not b) or not _overlap(a, b, dev):
                continue
            if (na, nb) == may_be and _same(a, b, dev):
                continue
            raise ValueError(f"{na} overlaps the input {nb} in memory")


def _batch_count(x, axis, training):
    if x.size == 0:
        raise ValueError(f"expected a non-empty input, got shape {x.shape}")
    n = x.size // x.shape[axis]
    if training and n <= 1:
        raise ValueError("expected more than 1 value per channel when training, "
                         f"got input size {x.shape}")
    return n


def _data(x, dev):
    x = _input(x, "x", dev)
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions (batch, channels, ...), "
                         f"got shape {x.shape}")
    _check_data_dtype(x, "x")
    return x


# ------------------------------------------------------------ the plain case
# A small call's whole budget is ~10 us, and the validation above costs ~8 us of
# Python helpers.  Most calls are *plain*: exact ``numpy.ndarray``s of float32 or
# float64 in native order, C-contiguous and aligned, per-channel arrays of shape
# ``(C,)``, Python floats and ints for the scalars, nothing on a device.  The
# ``_plain_*`` functions recognize such a call with a few attribute reads, then do
# exactly what the general path does for it (the same views, allocations and
# kernel call).  They never raise: anything else, every bad input included, takes
# the general path, which raises its specific error.  tests/test_api_plain.py runs
# the same calls both ways.  Measured ((32, 64) float32, medians of 3 fresh
# processes): forward-train 19.0 -> 14.0 us, inference 13.1 -> 10.0, backward
# 14.4 -> 11.5 (PyTorch 17.8, 8.2, 15.5).

_PLAIN_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _plain(a, shape, dtype, write):
    """Whether ``a`` is a plain array of ``shape``: ``dtype`` (None: float32 or
    float64), C-contiguous and aligned, writeable if ``write``."""
    if type(a) is not np.ndarray or a.shape != shape:
        return False
    dt = a.dtype
    if dt is not dtype and (dtype is not None
                            or (dt is not _PLAIN_DTYPES[0] and dt is not _PLAIN_DTYPES[1])):
        return False
    flags = a.flags
    # CARRAY (C-contiguous, aligned, writeable): one attribute read for the usual case
    return flags.carray or (not write and flags.c_contiguous and flags.aligned)


def _plain_batch(x, axis, training):
    """``(C, axis % ndim)`` when ``x`` is a plain batch (as ``_plain``) that the
    general path accepts with this ``axis`` and ``training``; else None."""
    if type(x) is not np.ndarray or type(axis) is not int:
        return None
    if not (training is True or training is False):
        return None
    dt = x.dtype
    ndim = x.ndim
    if not ((dt is _PLAIN_DTYPES[0] or dt is _PLAIN_DTYPES[1]) and ndim >= 2
            and -ndim <= axis < ndim):
        return None
    flags = x.flags
    size = x.size
    if not ((flags.carray or (flags.c_contiguous and flags.aligned)) and size):
        return None
    C = x.shape[axis]
    if training and size // C <= 1:
        return None
    return C, axis % ndim


def _plain_outputs(x, shape_c, like_x, c1, c2):
    """Whether a call's outputs are plain where given: ``like_x`` of ``x``'s shape,
    ``c1`` and ``c2`` of ``shape_c``, all of ``x``'s dtype and writeable."""
    dt = x.dtype
    return ((like_x is None or _plain(like_x, x.shape, dt, True))
            and (c1 is None or _plain(c1, shape_c, dt, True))
            and (c2 is None or _plain(c2, shape_c, dt, True)))


def _plain_allocate(x, shape_c, like_x, c1, c2):
    """The outputs of ``_plain_outputs``, each allocated where None."""
    dt = x.dtype
    return (np.empty(x.shape, dt) if like_x is None else like_x,
            np.empty(shape_c, dt) if c1 is None else c1,
            np.empty(shape_c, dt) if c2 is None else c2)


def _plain_forward(x, weight, bias, running_mean, running_var, training, momentum, eps,
                   axis, out, mean, invstd, on_nonfinite):
    """``forward`` of a plain host call, or None where it is not one."""
    if not (type(momentum) is float and 0.0 <= momentum <= 1.0
            and type(eps) is float and 0.0 < eps < math.inf
            and type(on_nonfinite) is str and on_nonfinite in guard.POLICIES):
        return None
    batch = _plain_batch(x, axis, training)
    if batch is None:
        return None
    C, ax = batch
    shape_c = (C,)
    for a in (weight, bias):
        if a is not None and not _plain(a, shape_c, None, False):
            return None
    if (running_mean is None) != (running_var is None):
        return None
    if running_mean is None:
        if not training:
            return None
    elif not (_plain(running_mean, shape_c, None, training)
              and _plain(running_var, shape_c, None, training)):
        return None
    if not _plain_outputs(x, shape_c, out, mean, invstd):
        return None
    if ((training and running_mean is not None)
            or out is not None or mean is not None or invstd is not None) and not _separate(
                x, weight, bias, running_mean, running_var, out, mean, invstd):
        return None
    ops = (_host or _host_backend()).ops
    lay = layout.plan(x, ax)
    out, mean, invstd = _plain_allocate(x, shape_c, out, mean, invstd)
    x3 = layout.c_view(x, lay)
    out3 = layout.c_view(out, lay)
    if training:
        ops.forward_train(x3, weight, bias, eps, momentum, running_mean, running_var,
                          out3, mean, invstd, on_nonfinite=on_nonfinite)
    else:
        ops.forward_infer(x3, weight, bias, eps, running_mean, running_var, out3, mean,
                          invstd)
    return ForwardResult(out, mean, invstd)


def _plain_backward(grad_out, x, mean, invstd, weight, training, axis, grad_input,
                    grad_weight, grad_bias):
    """``backward`` of a plain host call, or None where it is not one."""
    batch = _plain_batch(x, axis, training)
    if batch is None:
        return None
    C, ax = batch
    shape_c = (C,)
    dt = x.dtype
    if not _plain(grad_out, x.shape, dt, False):
        return None
    for a in (mean, invstd):
        if not _plain(a, shape_c, None, False):
            return None
    if weight is not None and not _plain(weight, shape_c, None, False):
        return None
    if not _plain_outputs(x, shape_c, grad_input, grad_weight, grad_bias):
        return None
    if (grad_input is not None or grad_weight is not None or grad_bias is not None) and not (
            _separate(grad_out, x, mean, invstd, weight, grad_input, grad_weight, grad_bias)):
        return None
    ops = (_host or _host_backend()).ops
    lay = layout.plan(x, ax)
    grad_input, grad_weight, grad_bias = _plain_allocate(x, shape_c, grad_input, grad_weight,
                                                         grad_bias)
    ops.backward(layout.c_view(grad_out, lay), layout.c_view(x, lay), mean, invstd, weight,
                 training, layout.c_view(grad_input, lay), grad_weight, grad_bias)
    return BackwardResult(grad_input, grad_weight, grad_bias)


# ------------------------------------------------------------------- public

_FORWARD_ARRAYS = ("x", "weight", "bias", "running_mean", "running_var", "out", "mean",
                   "invstd")
_BACKWARD_ARRAYS = ("grad_out", "x", "mean", "invstd", "weight", "grad_input",
                    "grad_weight", "grad_bias")


def forward(x, weight=None, bias=None, running_mean=None, running_var=None, *,
            training=True, momentum=0.1, eps=1e-5, axis=1,
            out=None, mean=None, invstd=None, on_nonfinite="propagate", stream=None):
    """Batch normalization of ``x`` over every axis but the channel ``axis``.

    Parameters
    ----------
    x : array, floating point, ``ndim >= 2``
        The batch.  Any memory order is read without a copy as long as it is
        contiguous in some axis order (C order, ``channels_last``, transposes).
    weight, bias : array of shape ``(C,)``, optional
        The affine parameters; ``None`` means scale 1 and shift 0.
    running_mean, running_var : ndarray of shape ``(C,)``, optional
        Running statistics, both or neither.  Updated in place when training:
        ``running = (1 - momentum) * running + momentum * batch``, with the
        unbiased batch variance.  Required for inference.
    training : bool
        Normalize with the batch statistics (True) or the running ones.
    momentum : float in [0, 1]
        The weight of the new batch (PyTorch's convention; Keras' ``m`` is ``1 - m``).
    eps : float > 0
        Added to the variance: ``invstd = 1 / sqrt(var + eps)``.
    axis : int
        The channel axis; negative values count from the end.
    out, mean, invstd : ndarray, optional
        Preallocated outputs: ``out`` like ``x`` (``out=x`` normalizes in place),
        ``mean`` and ``invstd`` of shape ``(C,)`` and ``x``'s dtype.  An ``out``
        that nbnorm allocates has ``x``'s memory order (Fortran, ``channels_last``,
        transposes: PyTorch's ``preserve_format``); C order when ``x`` is not
        contiguous in any axis order (gaps, negative strides).
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
    stream : CUDA stream, optional
        Device arrays only: the stream every kernel is launched on (a Numba
        stream, a CuPy or PyTorch stream, or a raw ``cudaStream_t``); ``None``
        is the default stream.  The call returns without waiting for the device.
        With host arrays it is a ``TypeError``.

    Returns
    -------
    ForwardResult
        ``(out, mean, invstd)``: the batch mean and ``1/sqrt(var_biased + eps)``
        when training, the running mean and ``1/sqrt(running_var + eps)`` otherwise.

    Raises
    ------
    TypeError
        Non-floating or unsupported dtypes, outputs of the wrong dtype or type.
    ValueError
        Shape or axis mismatches, training with one value per channel, inference
        without running statistics, read-only or overlapping outputs, ``eps`` or
        ``momentum`` out of range, an unknown ``on_nonfinite``.  Nothing has been
        written when it raises.
    FloatingPointError
        ``on_nonfinite="raise"`` and a batch mean or variance is not finite;
        nothing has been written.
    """
    if stream is None:
        done = _plain_forward(x, weight, bias, running_mean, running_var, training, momentum,
                              eps, axis, out, mean, invstd, on_nonfinite)
        if done is not None:
            return done
    be = _backend(_FORWARD_ARRAYS,
                  (x, weight, bias, running_mean, running_var, out, mean, invstd), stream)
    dev = be.device
    x = _data(x, dev)
    ax = _axis(axis, x.ndim)
    C = x.shape[ax]
    training = _flag(training, "training")
    on_nonfinite = guard.check_policy(on_nonfinite)
    _batch_count(x, ax, training)
    momentum = _scalar(momentum, "momentum", 0.0, 1.0, low_open=False)
    eps = _scalar(eps, "eps", 0.0, math.inf, low_open=True)
    weight = _channel_input(weight, "weight", C, dev)
    bias = _channel_input(bias, "bias", C, dev)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if running_mean is not None and training:  # updated in place
        _writable(running_mean, "running_mean", (C,), None, dev)
        _writable(running_var, "running_var", (C,), None, dev)
    elif running_mean is not None:  # inference only reads them: read-only is fine
        running_mean = _channel_input(running_mean, "running_mean", C, dev)
        running_var = _channel_input(running_var, "running_var", C, dev)
    elif not training:
        raise ValueError("inference (training=False) needs running_mean and running_var")
    sdt = _stat_dtype(x.dtype)
    out = _output(out, "out", x.shape, x.dtype, dev)
    mean = _output(mean, "mean", (C,), sdt, dev)
    invstd = _output(invstd, "invstd", (C,), sdt, dev)
    if ((out is not None or mean is not None or invstd is not None
         or (training and running_mean is not None))  # else no output to check
            and (dev or not _separate(x, weight, bias, running_mean, running_var,
                                      out, mean, invstd))):
        running = (("running_mean", running_mean), ("running_var", running_var))
        _check_aliasing(
            (("out", out), ("mean", mean), ("invstd", invstd), *(running if training else ())),
            (("x", x), ("weight", weight), ("bias", bias), *(() if training else running)),
            ("out", "x"), dev)

    ops = be.ops
    lay = be.views.plan(x, ax)
    if out is None:  # in x's memory order, so that the kernel writes it directly
        out = _empty_like(x, lay, be)
    empty = ops.empty if dev else np.empty
    if mean is None:
        mean = empty((C,), sdt)
    if invstd is None:
        invstd = empty((C,), sdt)
    x3 = be.views.input_view(x, lay)
    out3, finish = be.views.output_view(out, lay)
    if training:
        ops.forward_train(x3, weight, bias, eps, momentum, running_mean, running_var,
                          out3, mean, invstd, on_nonfinite=on_nonfinite, **be.kw)
    else:
        ops.forward_infer(x3, weight, bias, eps, running_mean, running_var,
                          out3, mean, invstd, **be.kw)
    finish()
    return ForwardResult(out, mean, invstd)


def backward(grad_out, x, mean, invstd, weight=None, *, training=True, axis=1,
             grad_input=None, grad_weight=None, grad_bias=None, stream=None):
    """Gradients of ``forward`` with respect to ``x``, ``weight`` and ``bias``.

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
        depend on ``x``.  False: the gradient of the affine map alone.
    axis : int
        The channel axis.
    grad_input, grad_weight, grad_bias : ndarray, optional
        Preallocated outputs (``grad_input`` like ``x``, the others ``(C,)``).
        ``grad_input=grad_out`` computes in place.  A ``grad_input`` that nbnorm
        allocates has ``x``'s memory order, as ``forward``'s ``out``.
    stream : CUDA stream, optional
        Device arrays only, as for ``forward``.

    Returns
    -------
    BackwardResult
        ``(grad_input, grad_weight, grad_bias)`` with ``grad_weight =
        sum(grad_out * (x - mean) * invstd)`` and ``grad_bias = sum(grad_out)``
        over every axis but ``axis``, returned whether or not ``weight`` is given.

    Raises
    ------
    TypeError, ValueError
        As for ``forward``; nothing has been written when it raises.
    """
    if stream is None:
        done = _plain_backward(grad_out, x, mean, invstd, weight, training, axis, grad_input,
                               grad_weight, grad_bias)
        if done is not None:
            return done
    be = _backend(_BACKWARD_ARRAYS,
                  (grad_out, x, mean, invstd, weight, grad_input, grad_weight, grad_bias),
                  stream)
    dev = be.device
    x = _data(x, dev)
    ax = _axis(axis, x.ndim)
    C = x.shape[ax]
    training = _flag(training, "training")
    _batch_count(x, ax, training)
    grad_out = _input(grad_out, "grad_out", dev)
    if grad_out.shape != x.shape:
        raise ValueError(f"grad_out must have x's shape {x.shape}, got {grad_out.shape}")
    if grad_out.dtype != x.dtype:
        raise TypeError(f"grad_out must have x's dtype {x.dtype}, got {grad_out.dtype}")
    if mean is None or invstd is None:
        raise ValueError("backward needs the mean and invstd that forward returned")
    mean = _channel_input(mean, "mean", C, dev)
    invstd = _channel_input(invstd, "invstd", C, dev)
    weight = _channel_input(weight, "weight", C, dev)
    sdt = _stat_dtype(x.dtype)
    grad_input = _output(grad_input, "grad_input", x.shape, x.dtype, dev)
    grad_weight = _output(grad_weight, "grad_weight", (C,), sdt, dev)
    grad_bias = _output(grad_bias, "grad_bias", (C,), sdt, dev)
    if ((grad_input is not None or grad_weight is not None or grad_bias is not None)
            and (dev or not _separate(grad_out, x, mean, invstd, weight, grad_input,
                                      grad_weight, grad_bias))):
        _check_aliasing(
            (("grad_input", grad_input), ("grad_weight", grad_weight),
             ("grad_bias", grad_bias)),
            (("grad_out", grad_out), ("x", x), ("mean", mean), ("invstd", invstd),
             ("weight", weight)),
            ("grad_input", "grad_out"), dev)

    lay = be.views.plan(x, ax)
    if grad_input is None:  # in x's memory order, so that the kernel writes it directly
        grad_input = _empty_like(x, lay, be)
    empty = be.ops.empty if dev else np.empty
    if grad_weight is None:
        grad_weight = empty((C,), sdt)
    if grad_bias is None:
        grad_bias = empty((C,), sdt)
    x3 = be.views.input_view(x, lay)
    dy3 = be.views.input_view(grad_out, lay)
    dx3, finish = be.views.output_view(grad_input, lay)
    be.ops.backward(dy3, x3, mean, invstd, weight, training, dx3, grad_weight, grad_bias,
                    **be.kw)
    finish()
    return BackwardResult(grad_input, grad_weight, grad_bias)
