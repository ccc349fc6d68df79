"""The CUDA implementation of forward and backward on canonical device views.

Mirrors ``nbnorm.cpu.ops`` (same functions, same semantics) plus what only
device arrays need: ``asarray`` (a zero-copy Numba view of any
``__cuda_array_interface__`` object), canonical views built from strides
(``plan``, ``input_view``, ``output_view``: contiguous in some axis order, or a
``ValueError`` -- nbnorm never copies behind the caller's back), and ``stream``.

Every launch goes to one stream (``stream=None``: the default stream).  The
per-channel math runs in ``finalize`` kernels, so no call copies anything
between host and device or waits for the device -- except
``on_nonfinite="raise"``, which must know on the host whether to raise: it
copies the O(C) float64 batch moments back and synchronizes the stream.

Scratch: ``partials`` (k x C x parts float64) and ``coef`` (k x C float64),
O(C) each, kept between calls (``_scratch``) so that a training loop does not
allocate and free device memory at every step: Numba's default allocator
batches frees into ``cuMemFree``, which synchronizes the device.
"""

import collections
import threading

import numpy as np
from numba import config as numba_config
from numba import cuda

from .. import guard, layout
from . import backward as bwd
from . import finalize
from . import forward as fwd
from . import stats
from ._device import launch_params

SIMULATOR = bool(numba_config.ENABLE_CUDASIM)

if not SIMULATOR:
    from numba.cuda.cudadrv.devicearray import DeviceNDArray


def check_available():
    """Raise ``RuntimeError`` unless kernels can run (a GPU, or the simulator)."""
    if not SIMULATOR and not cuda.is_available():
        raise RuntimeError(
            "device arrays were passed, but numba-cuda finds no usable CUDA GPU "
            "or driver (set NUMBA_ENABLE_CUDASIM=1 to run on the simulator)")


# --------------------------------------------------------------- device arrays

def asarray(a):
    """A Numba device array viewing ``a``'s memory: no copy and no sync.

    ``__cuda_array_interface__`` objects (CuPy, PyTorch CUDA tensors) are
    imported with ``sync=False``: nbnorm orders its work by the stream it is
    given, not by synchronizing the host with the producer's stream.
    """
    if getattr(type(a), "__cuda_ndarray__", False):  # Numba's (or the simulator's)
        return a
    if SIMULATOR:
        raise TypeError(f"the CUDA simulator only runs on its own device arrays, "
                        f"got {type(a).__name__}")
    return cuda.as_cuda_array(a, sync=False)


def readonly(a):
    """Whether ``a`` (a device array or CUDA array interface object) is read-only."""
    if SIMULATOR:
        return not a.flags.writeable
    iface = getattr(a, "__cuda_array_interface__", None)
    return bool(iface and iface["data"][1])


def _address(a):
    if SIMULATOR:
        return a.__array_interface__["data"][0]
    return a.__cuda_array_interface__["data"][0]


def extent(a):
    """``[lo, hi)``: the bytes that ``a`` (a Numba device array) can touch."""
    lo = hi = _address(a)
    if a.size == 0:
        return lo, lo
    for n, st in zip(a.shape, a.strides):
        if st < 0:
            lo += st * (n - 1)
        else:
            hi += st * (n - 1)
    return lo, hi + a.dtype.itemsize


def overlap(a, b):
    """Whether two device arrays may share memory (their extents intersect)."""
    la, ha = extent(a)
    lb, hb = extent(b)
    return la < hb and lb < ha


def same(a, b):
    return (_address(a) == _address(b) and tuple(a.shape) == tuple(b.shape)
            and tuple(a.strides) == tuple(b.strides) and a.dtype == b.dtype)


def overlaps_itself(a):
    """As ``api._overlaps_itself``: True unless strides give each element its own bytes."""
    if a.size == 0:
        return False
    ext = a.dtype.itemsize
    for st, n in sorted((abs(st), n) for st, n in zip(a.strides, a.shape) if n > 1):
        if st < ext:
            return True
        ext = st * (n - 1) + ext
    return False


def _strided(base, shape, strides):
    """A device array of ``shape``/``strides`` over ``base``'s memory (no copy)."""
    if SIMULATOR:
        return cuda.simulator.cudadrv.devicearray.FakeCUDAArray(
            np.lib.stride_tricks.as_strided(base._ary, shape, strides))
    return DeviceNDArray(tuple(shape), tuple(strides), base.dtype,
                         stream=base.stream, gpu_data=base.gpu_data)


def empty(shape, dtype):
    return cuda.device_array(shape, dtype=dtype)


def _c_strides(shape, itemsize):
    strides = []
    s = itemsize
    for n in reversed(shape):
        strides.append(s)
        s *= n
    return tuple(reversed(strides))


def _contiguous_in(a, order):
    """Whether ``a`` is C-contiguous once its axes are put in ``order``."""
    expected = a.dtype.itemsize
    for ax in reversed(order):
        if a.shape[ax] > 1:
            if a.strides[ax] != expected:
                return False
            expected *= a.shape[ax]
    return True


def _memory_order(a):
    order = tuple(range(a.ndim))
    if _contiguous_in(a, order):
        return order
    return tuple(sorted(range(a.ndim), key=lambda i: -a.strides[i]))


def empty_like(x):
    """An uninitialized array like ``x``, in ``x``'s memory order (so that it has
    the same canonical view)."""
    order = _memory_order(x)
    base = cuda.device_array(tuple(x.shape[i] for i in order), dtype=x.dtype)
    strides = [0] * x.ndim
    for k, ax in enumerate(order):
        strides[ax] = base.strides[k]
    return _strided(base, tuple(x.shape), tuple(strides))


# ------------------------------------------------------------ canonical views

def plan(x, axis):
    """The ``layout.Layout`` of a device array, from its strides alone."""
    order = _memory_order(x)
    shape = [x.shape[i] for i in order]
    caxis = order.index(axis)
    outer = int(np.prod(shape[:caxis], dtype=np.int64))
    inner = int(np.prod(shape[caxis + 1:], dtype=np.int64))
    return layout.make(order, outer, shape[caxis], inner)


def input_view(a, lay, name="an array"):
    """The canonical view of ``a``, or ``ValueError``: device data is never copied."""
    a = asarray(a)
    if not _contiguous_in(a, lay.order):
        raise ValueError(
            f"{name} on the device must be contiguous in some axis order (C order, "
            "channels_last, a transpose of a contiguous array), with x's memory order "
            "for grad_out and outputs; nbnorm does not copy device arrays: pass a "
            "contiguous one (e.g. cupy.ascontiguousarray / tensor.contiguous())")
    kshape = lay.kernel_shape
    return _strided(a, kshape, _c_strides(kshape, a.dtype.itemsize))


def output_view(a, lay, name="an output"):
    """``(view, finish)`` as ``layout.output_view``; ``finish`` has nothing to do."""
    return input_view(a, lay, name), _nothing


def _nothing():
    pass


# ----------------------------------------------------------------- launching

def _stream(stream):
    """A Numba stream for ``stream=``, checked before anything is launched.

    ``None`` or 0: the default stream.  Numba streams as they are.  Objects of
    the CUDA stream protocol (``__cuda_stream__``), CuPy streams (``.ptr``),
    PyTorch streams (``.cuda_stream``) and raw ``cudaStream_t`` integers become
    ``cuda.external_stream`` (a handle of 0 is the default stream).
    """
    if stream is None:
        return cuda.default_stream()
    if isinstance(stream, bool):
        raise TypeError("stream must be a CUDA stream or None, got a bool")
    if isinstance(stream, int):
        handle = stream
    elif type(stream).__module__.startswith("numba"):  # Numba's (or the simulator's)
        return stream
    elif hasattr(stream, "__cuda_stream__"):
        handle = int(stream.__cuda_stream__()[1])
    elif isinstance(getattr(stream, "cuda_stream", None), int):
        handle = stream.cuda_stream
    elif isinstance(getattr(stream, "ptr", None), int):
        handle = stream.ptr
    else:
        raise TypeError(f"stream must be a Numba, CuPy or PyTorch CUDA stream, a "
                        f"cudaStream_t integer or None, got {type(stream).__name__}")
    return cuda.external_stream(handle) if handle else cuda.default_stream()


#: Scratch buffers kept for reuse, least recently used first.
_SCRATCH = collections.OrderedDict()
_SCRATCH_LOCK = threading.Lock()
_SCRATCH_MAX = 32


def _scratch(name, shape, stream):
    """A float64 device buffer for one call's intermediate results, reused.

    Keyed by the calling thread, the device and the stream as well as the
    shape: two calls that share a buffer are queued on one stream by one thread,
    so the second's kernels start after the first's have finished with it.
    """
    if SIMULATOR:
        device, handle = 0, id(stream)
    else:
        device, handle = cuda.get_current_device().id, int(stream)
    key = (name, shape, threading.get_ident(), device, handle)
    with _SCRATCH_LOCK:
        buf = _SCRATCH.pop(key, None)
        if buf is None:
            buf = cuda.device_array(shape, np.float64)
            while len(_SCRATCH) >= _SCRATCH_MAX:
                _SCRATCH.popitem(last=False)
        _SCRATCH[key] = buf
    return buf


def _planar(x):
    return x.ndim == 3


def _per_channel_grid(C, tpb):
    return -(-C // tpb)


def _reduce(x, stream, params, dy=None, mean=None):
    """First pass: ``partials`` of the statistics (``dy is None``) or of the
    backward sums, laid out ``[k, C, parts]``."""
    C = x.shape[1]
    tpb = params[0]
    if _planar(x):
        parts, step = stats.planar_parts(*x.shape)
    else:
        bx, parts, step = stats.interleaved_parts(x.shape[0], C, tpb)
    partials = _scratch("partials", (3 if dy is None else 2, C, parts), stream)
    if dy is None and _planar(x):
        stats.channel_stats_planar(x, partials, parts, step, stream, params)
    elif dy is None:
        stats.channel_stats_interleaved(x, partials, bx, parts, step, stream, params)
    elif _planar(x):
        bwd.backward_reduce_planar(dy, x, mean, partials, parts, step, stream, params)
    else:
        bwd.backward_reduce_interleaved(dy, x, mean, partials, bx, parts, step,
                                        stream, params)
    return partials


def normalize(x, coef, out, stream, params):
    kernel = fwd.normalize_planar if _planar(x) else fwd.normalize_interleaved
    kernel(x, coef, out, stream, params)


def _flags(weight, bias, running=None):
    return ((finalize.HAS_WEIGHT if weight is not None else 0)
            | (finalize.HAS_BIAS if bias is not None else 0)
            | (finalize.HAS_RUNNING if running is not None else 0))


def _or(a, placeholder):
    return placeholder if a is None else asarray(a)


def forward_train(x, weight, bias, eps, momentum, running_mean, running_var,
                  out, mean, invstd, on_nonfinite="propagate", stream=None):
    params = launch_params()
    tpb = params[0]
    s = _stream(stream)
    C = x.shape[1]
    n = x.size // C
    mean, invstd = asarray(mean), asarray(invstd)
    partials = _reduce(x, s, params)
    if on_nonfinite == "raise":  # the one host sync: the caller asked for the answer
        moments = _scratch("moments", (2, C), s)
        finalize.merge_stats[_per_channel_grid(C, tpb), tpb, s](partials, moments)
        host = moments.copy_to_host(stream=s)
        s.synchronize()
        guard.running_update_mask(host[0], host[1], "raise")
    flags = _flags(weight, bias, running_mean)
    if on_nonfinite == "skip":
        flags |= finalize.SKIP_NONFINITE
    coef = _scratch("coef", (3, C), s)
    finalize.finalize_train[_per_channel_grid(C, tpb), tpb, s](
        partials, float(n), eps, momentum, _or(weight, mean), _or(bias, mean),
        _or(running_mean, mean), _or(running_var, mean), flags, mean, invstd, coef)
    normalize(x, coef, out, s, params)


def forward_infer(x, weight, bias, eps, running_mean, running_var, out, mean, invstd,
                  stream=None):
    params = launch_params()
    tpb = params[0]
    s = _stream(stream)
    C = x.shape[1]
    mean, invstd = asarray(mean), asarray(invstd)
    coef = _scratch("coef", (3, C), s)
    finalize.finalize_infer[_per_channel_grid(C, tpb), tpb, s](
        asarray(running_mean), asarray(running_var), eps, _or(weight, mean),
        _or(bias, mean), _flags(weight, bias), mean, invstd, coef)
    normalize(x, coef, out, s, params)


def backward(dy, x, mean, invstd, weight, training, grad_input, grad_weight, grad_bias,
             stream=None):
    params = launch_params()
    tpb = params[0]
    s = _stream(stream)
    C = x.shape[1]
    n = x.size // C
    mean, invstd = asarray(mean), asarray(invstd)
    grad_weight, grad_bias = asarray(grad_weight), asarray(grad_bias)
    partials = _reduce(x, s, params, dy=dy, mean=mean)
    coef = _scratch("coef", (4, C), s)
    flags = _flags(weight, None) | (finalize.TRAINING if training else 0)
    finalize.finalize_backward[_per_channel_grid(C, tpb), tpb, s](
        partials, float(n), mean, invstd, _or(weight, grad_bias), flags,
        grad_weight, grad_bias, coef)
    if training:
        kernel = bwd.grad_input_planar if _planar(x) else bwd.grad_input_interleaved
        kernel(dy, x, coef, grad_input, s, params)
    else:
        normalize(dy, coef, grad_input, s, params)
