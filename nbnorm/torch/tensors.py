"""Tensors as the arrays nbnorm's kernels take, without copies.

This is the one place that knows how a ``torch.Tensor`` reaches nbnorm:

- CPU tensors become NumPy views of their memory (``Tensor.numpy()`` on the
  detached tensor; any strides); bfloat16 tensors go through their int16 bits
  as ``ml_dtypes.bfloat16`` arrays, NumPy's bfloat16 that nbnorm recognizes.
- CUDA tensors are passed as they are (detached): nbnorm imports them through
  ``__cuda_array_interface__`` without copying or synchronizing, and each call
  runs on PyTorch's current stream of the tensor's device (``stream``), so
  kernels are ordered with PyTorch's own work as a PyTorch kernel would be.

``supported`` says which tensors those are; the modules fall back to PyTorch's
own implementation for the others (DESIGN.md §6).
"""

import numpy as np
import torch

from .. import config

#: The CPU dtypes nbnorm takes (bfloat16 also needs ml_dtypes).
_CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: The CUDA array interface has no bfloat16 type, and ``nbnorm.forward`` cannot
#: tell int16 data from bfloat16 bits: device bfloat16 stays with PyTorch.
_CUDA_DTYPES = (torch.float16, torch.float32, torch.float64)

_ml_dtypes = None


def bfloat16():
    """``ml_dtypes.bfloat16``, or None when ml_dtypes is not installed (imported
    here: nbnorm recognizes the dtype once the program has imported it)."""
    global _ml_dtypes
    if _ml_dtypes is None:
        try:
            import ml_dtypes
        except ImportError:
            _ml_dtypes = False
        else:
            _ml_dtypes = ml_dtypes
    return _ml_dtypes.bfloat16 if _ml_dtypes else None


def supported(t):
    """Whether nbnorm's kernels take ``t``'s device and dtype (CPU: float16,
    bfloat16 with ml_dtypes, float32, float64; CUDA: float16, float32, float64,
    with numba-cuda)."""
    kind = t.device.type
    if kind == "cpu":
        return t.dtype in _CPU_DTYPES and (t.dtype is not torch.bfloat16
                                           or bfloat16() is not None)
    if kind == "cuda":
        return t.dtype in _CUDA_DTYPES and _cuda_available()
    return False


_cuda = None


def _cuda_available():
    """Whether numba-cuda can run kernels on a GPU (its simulator cannot take
    PyTorch's device memory)."""
    global _cuda
    if _cuda is None:
        try:
            from numba import config, cuda
            _cuda = not config.ENABLE_CUDASIM and bool(cuda.is_available())
        except ImportError:
            _cuda = False
    return _cuda


def array(t):
    """``t`` as nbnorm takes it: a NumPy view of a CPU tensor, the detached
    CUDA tensor itself (``__cuda_array_interface__``); None stays None."""
    if t is None:
        return None
    t = t.detach()
    if t.device.type != "cpu":
        return t
    if t.dtype is torch.bfloat16:
        return t.view(torch.int16).numpy().view(bfloat16())
    return t.numpy()


def stream(t):
    """``stream=`` for a call on ``t``: PyTorch's current stream of its CUDA
    device as a raw ``cudaStream_t``, None for CPU tensors."""
    if t.device.type != "cuda":
        return None
    return torch.cuda.current_stream(t.device).cuda_stream


def stat_dtype(dtype):
    """The dtype of nbnorm's per-channel results (mean, invstd, grad_weight,
    grad_bias) for data of ``dtype``: float32 for half data (``nbnorm.dtypes``)."""
    return torch.float32 if dtype.itemsize == 2 else dtype


def is_dense(t):
    """Whether ``t``'s elements fill its memory without gaps or overlaps in some
    axis order (C order, ``channels_last``, transposes): then nbnorm reads it
    as it is, and ``empty_like(t)`` has its strides."""
    expected = 1
    for stride, n in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n > 1):
        if stride != expected:
            return False
        expected *= n
    return True


def dense(t):
    """``t``, or a copy in its own axis order where it has gaps or overlaps
    (CUDA data must be dense for nbnorm, which never copies device data)."""
    return t if is_dense(t) else t.clone(memory_format=torch.preserve_format)


def like(t, x):
    """``t`` (of ``x``'s shape) in ``x``'s memory order: itself when the strides
    agree, else a copy.  Both kernels' passes then walk the two arrays alike;
    a gradient that autograd hands over expanded or in another order is copied
    once here."""
    if t is None or t.stride() == x.stride() or not _differ(t, x):
        return t
    return torch.empty_like(x).copy_(t)


def _differ(t, x):
    """Whether strides differ on an axis of more than one element (size-1
    axes' strides mean nothing)."""
    return any(n > 1 and a != b for n, a, b in zip(x.shape, t.stride(), x.stride()))


def empty_like(x, dtype=None):
    """An output like ``x`` with ``x``'s strides (``preserve_format``): what
    the ops and their fakes both return, so that compiled graphs see the
    strides eager mode produces.

    Large CPU outputs are NumPy's memory (``config.TORCH_NUMPY_OUTPUT_BYTES``):
    NumPy asks the kernel for transparent huge pages where they are enabled on
    request (``madvise``), PyTorch's CPU allocator does not, and writing a fresh
    output then costs a page fault per 4 KiB.  Measured: allocating and filling
    a 25.7 MB float32 tensor, 1.8 ms through NumPy against 12-99 ms through
    ``torch.empty`` on the 2-core development machine.  Only plain tensors
    (not the fake ones of compile and export) take that path, with the very
    strides ``torch.empty_like`` would give.
    """
    dtype = x.dtype if dtype is None else dtype
    if (type(x) is torch.Tensor and x.device.type == "cpu"
            and x.numel() * dtype.itemsize >= config.TORCH_NUMPY_OUTPUT_BYTES):
        strides = torch.empty_like(x, dtype=dtype, device="meta",
                                   memory_format=torch.preserve_format).stride()
        bits = torch.int16 if dtype is torch.bfloat16 else dtype  # NumPy has no bfloat16
        buf = torch.from_numpy(np.empty(x.numel(), _NUMPY[bits]))
        return buf.view(dtype).as_strided(x.shape, strides)
    return torch.empty_like(x, dtype=dtype, memory_format=torch.preserve_format)


_NUMPY = {torch.float16: np.float16, torch.int16: np.int16, torch.float32: np.float32,
          torch.float64: np.float64}
