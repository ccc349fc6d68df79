"""Tunables of the kernels, in one place.

Kernels never hard-code these; tests patch them (for example the CUDA block size
down to 32 threads on the simulator) and benchmarks sweep them.
"""

#: Elements reduced as one two-pass cache block (sum, then squared deviations
#: from the block mean) before it is Chan-merged into its part: 16 Ki elements
#: are 64 KiB of float32, so the second pass reads from L1/L2, not memory.
BLOCK = 16384

#: The number of parts a reduction is split into is a function of the shape
#: only (never of the thread count), so that results are bitwise identical for
#: any ``NUMBA_NUM_THREADS``.  Aim for this many independent tasks...
TARGET_TASKS = 64
#: ...but never make a part smaller than this many elements.
MIN_PART = 32768

#: LLVM fast-math flags for reductions: reassociation lets the float64 sums
#: vectorize.  Never ``nnan``/``ninf``: NaN and inf must propagate.
FASTMATH = frozenset({"reassoc", "contract", "nsz"})
