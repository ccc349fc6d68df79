"""``nbnorm.channel``'s per-channel math compiled as CUDA device functions.

The same Python source as the CPU's ``nbnorm.cpu.per_channel``: one formula
for Chan's merge, ``invstd``, the running-statistic update and the backward
coefficients on both devices.  Under the simulator the "device functions"
run as the Python functions themselves.
"""

from numba import cuda

from .. import channel

math = channel.compiled(cuda.jit(device=True))
