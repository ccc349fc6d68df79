"""``nbnorm.channel``'s per-channel math compiled for the CPU kernels (inlined)."""

from numba import njit

from .. import channel

math = channel.compiled(njit(cache=True))
