"""CUDA kernels: the GPU twin of ``nbnorm.cpu``, same modules and function names.

``stats``, ``forward`` and ``backward`` hold the kernels for the two memory
patterns (planar ``(outer, C, inner)`` and interleaved ``(outer, C)``),
``finalize`` the O(C) per-channel kernels (invstd, scale/shift, running-stat
update: the per-channel math never leaves the device, and is ``nbnorm.channel``'s,
compiled in ``per_channel``), ``convert`` the loads and stores of each storage
dtype (float16, bfloat16 as int16 bits, float32, float64), ``arrays`` the device
arrays (views, streams, scratch), and ``ops`` runs the kernels for ``nbnorm.api``.
Kernels come from factories cached by configuration, storage dtype and fused
epilogue, and compile the first time a combination is launched.

Importing this package needs the ``numba-cuda`` package (``pip install
"nbnorm[cuda]"``); ``nbnorm`` itself imports it only when an array on the
device reaches ``forward``/``backward``.  Under ``NUMBA_ENABLE_CUDASIM=1`` the
kernels run in Numba's simulator, which has no warp shuffles: the block
reductions then take their shared-memory path (``config.CUDA_WARP_SHUFFLE``).
"""

try:
    import numba_cuda  # noqa: F401  (the NVIDIA-maintained CUDA target)
    from numba import cuda  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "nbnorm's CUDA kernels need the numba-cuda package: "
        "pip install 'nbnorm[cuda]' (or 'numba-cuda[cu13]')") from e
