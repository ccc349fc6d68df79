"""Device arrays for the CUDA kernels: adapters, canonical views, streams, scratch.

``asarray`` makes a zero-copy Numba view of any ``__cuda_array_interface__``
object; ``plan``, ``input_view`` and ``output_view`` build canonical views
from strides alone (contiguous in some axis order, or a ``ValueError``:
nbnorm never copies device data behind the caller's back); ``stream`` parses
``stream=``; ``scratch`` keeps the O(C) intermediate buffers between calls.
Nothing here launches a kernel, copies between host and device, or waits for
the device.

Scratch: ``partials`` (k x C x parts float64) and ``coef`` (k x C float64)
are kept between calls so that a training loop does not allocate and free
device memory at every step: Numba's default allocator batches frees into
``cuMemFree``, which synchronizes the device.
"""

import collections
import threading

import numpy as np
from numba import config as numba_config
from numba import cuda

from .. import layout

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


def address(a):
    if SIMULATOR:
        return a.__array_interface__["data"][0]
    return a.__cuda_array_interface__["data"][0]


def extent(a):
    """``[lo, hi)``: the bytes that ``a`` (a Numba device array) can touch."""
    lo = hi = address(a)
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
    return (address(a) == address(b) and tuple(a.shape) == tuple(b.shape)
            and tuple(a.strides) == tuple(b.strides) and a.dtype == b.dtype)


def overlaps_itself(a):
    """Whether a device array's strides may give two elements the same bytes
    (``layout.overlaps_itself``)."""
    return layout.overlaps_itself(tuple(a.shape), tuple(a.strides), a.dtype.itemsize)


def strided(base, shape, strides):
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
    """Whether ``a`` is C-contiguous once its axes are put in ``order`` (an
    array without elements is, whatever strides its library gives it)."""
    if a.size == 0:
        return True
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
    return strided(base, tuple(x.shape), tuple(strides))


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
    return strided(a, kshape, _c_strides(kshape, a.dtype.itemsize))


def output_view(a, lay, name="an output"):
    """``(view, finish)`` as ``layout.output_view``; ``finish`` has nothing to do."""
    return input_view(a, lay, name), _nothing


def _nothing():
    pass


# ----------------------------------------------------------- streams, scratch

def as_stream(stream):
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


def scratch(name, shape, stream):
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
