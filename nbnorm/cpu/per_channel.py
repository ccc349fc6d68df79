"""``nbnorm.channel``'s per-channel math compiled for the CPU kernels (inlined into the kernels)."""

from numba import njit

from .. import channel

math = channel.compiled(njit(cache=True, inline="always"))
