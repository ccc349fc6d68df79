"""Tunables of the kernels, in one place.

Kernels never hard-code these; tests patch them (for example the CUDA block size
down to 32 threads on the simulator) and benchmarks sweep them.
"""

import glob
import os

#: Elements reduced as one two-pass cache block (sum, then squared deviations
#: from the block mean) before it is Chan-merged into its part: 32 Ki elements
#: are 128 KiB of float32 (256 KiB of float64), so the second pass reads from
#: L2, not memory.  Measured against 16 Ki (NC 8192x1024 float32 statistics
#: pass, x copy time): 0.84-0.90 -> 0.67-0.80; 64 Ki was no better.
BLOCK = 32768

#: The number of parts a reduction is split into is a function of the shape
#: only (never of the thread count), so that results are bitwise identical for
#: any ``NUMBA_NUM_THREADS``.  Aim for this many independent tasks...
TARGET_TASKS = 64
#: ...but never make a part smaller than this many elements.
MIN_PART = 32768

#: Interleaved kernels (NC, NHWC) view groups of rows of fewer channels as one
#: row of at least this many elements (``cpu.stats.wide_rows``): short rows
#: spend their time in per-row loop setup, not in the data.
WIDE_ROW = 256

#: Interleaved row loops (``cpu.stats._rows_sum``) update their per-channel
#: accumulators once per four rows for rows of at least this many values:
#: their loads and stores, not the adds, were the cost (C=1024, a block in L2,
#: one core: 0.09 -> 0.054 ns/element); shorter rows one row at a time (NHWC,
#: C=64, whole statistics pass: 0.76 -> 0.88 copy-times unrolled).
ROWS_UNROLL_MIN_C = 256
#: ...except the first statistics pass (the plain sum, which reads its block
#: from memory) of data narrower than this itemsize: float32 streams one row at
#: a time better (NC 8192x1024 statistics pass 0.90/0.88 -> 0.80/0.77).
ROWS_SUM_UNROLL_MIN_ITEMSIZE = 8

#: Tasks of the parallel elementwise passes (``cpu.forward.task_split``)...
TASKS = 256
#: ...each writing at least this many values where the batch allows: a smaller
#: task costs more to hand out than its work (NC 512x100 float32 normalizing
#: pass, 2 threads: 3.7 -> 2.6 copy-times, 256 tasks of 200 values -> 12).
TASK_MIN_VALUES = 4096

#: LLVM fast-math flags for reductions: reassociation lets the float64 sums
#: vectorize.  Never ``nnan``/``ninf``: NaN and inf must propagate.  Compiled
#: into the kernels: read once, when ``nbnorm.cpu`` is first imported (a change
#: afterwards needs a new process and ``NUMBA_CACHE_DIR`` cleared).
FASTMATH = frozenset({"reassoc", "contract", "nsz"})

#: Batches of at most this many elements run on the calling thread, one serial
#: kernel per call: a parallel launch costs more than the work.
SERIAL_MAX = 32768

#: A planar kernel reduces a channel and normalizes it (or computes its
#: gradient) in one task, while the channel is still in cache, when there are at
#: least FUSE_MIN_C channels to spread over the threads...
FUSE_MIN_C = 8
#: ...and a channel's task reads at most this many bytes (x; dy and x for backward)...
FUSE_MAX_BYTES = 4 << 20
#: ...in runs (``inner`` values of x, one channel of one batch row) of at least
#: this many bytes: a channel task pays a fixed cost per run in each of its
#: passes, while the unfused reductions read groups of short runs as one
#: (``cpu.stats.planar_group``).  Measured (x copy time, same process, Zen 3,
#: fused -> unfused; two processes): 64x256x14x14 float32 (784-byte runs)
#: forward-train 2.26/2.30 -> 1.80/1.88, backward 2.76/2.98 -> 2.25/2.13;
#: 128x256x14x14 float32 forward 1.96/1.52 -> 1.80/1.31; but float64 14x14
#: (1568 bytes) 1.28 -> 1.42 and 28x28 float32 (3136 bytes) 0.98/0.87 ->
#: 1.13/1.11 stay fused.  Shorter runs also normalize as rows
#: (PLANAR_ROWS_MAX_RUN_BYTES).
FUSE_MIN_RUN_BYTES = 1024

#: A planar normalizing or ``grad_input`` pass whose runs (``inner`` values, one
#: channel of one batch row) are shorter than this many bytes, and whose batch
#: rows hold at most PLANAR_ROWS_MAX_VALUES values, runs as an interleaved pass
#: over rows of ``C * inner`` values with per-value coefficients
#: (``cpu.ops._planar_rows``): a run's fixed cost is most of a 7x7 map's time.
#: Measured (normalizing pass, x copy time, same process, Zen 3): 256x512x7x7
#: float32 1.94 -> 0.73, float64 1.15 -> 0.65; 1024x64x4x4 float32 5.86 ->
#: 1.14; but 64x256x14x14 float32 (784-byte runs) 0.79 -> 1.32.  Rows of up
#: to 131072 values still win with short runs, although their coefficient
#: tables outgrow L2 (whole steps, 32768 -> 131072: 128x1024x7x7 float32
#: forward-train 3.17 -> 1.74, inference 2.21 -> 0.76, backward 3.89 -> 2.21;
#: float64 1.72 -> 1.26, 1.08 -> 0.58, 2.23 -> 1.81).  The limit bounds the
#: tables, the pass's only extra memory: at most four of 131072 float64
#: values (4 MiB), whatever the batch size.
PLANAR_ROWS_MAX_RUN_BYTES = 512
PLANAR_ROWS_MAX_VALUES = 131072

#: A parallel planar reduction gives each task a group of adjacent channels
#: that reads at least this many bytes of each batch row (``cpu.stats.planar_group``):
#: short runs read one by one pay a run's fixed cost and a jump each...
PLANAR_GROUP_BYTES = 8192
#: ...but it keeps at least this many tasks where there are that many channels.
PLANAR_GROUP_MIN_TASKS = 4

def _parse_cache_size(text):
    """Bytes of a sysfs cache size such as ``"32768K"`` or ``"1M"``; None if unreadable."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    digits = text[:-1] if text[-1:] in "KMG" else text
    return int(digits) * scale if digits.isdigit() else None


def _last_level_cache_bytes(root="/sys/devices/system/cpu/cpu0/cache"):
    """The size of the largest CPU cache (L3 on most machines), from Linux sysfs;
    None where it cannot be read (other systems)."""
    sizes = []
    for entry in sorted(glob.glob(os.path.join(root, "index*"))):
        try:
            with open(os.path.join(entry, "size")) as f:
                size = _parse_cache_size(f.read())
        except OSError:
            continue
        if size:
            sizes.append(size)
    return max(sizes) if sizes else None


#: Parallel passes write outputs of at least this many bytes with streaming
#: (non-temporal) stores, ``cpu/streaming.py``: an output this large cannot stay
#: in cache for its reader, so its lines go straight to memory instead of being
#: read first.  Smaller outputs keep ordinary stores and stay cached.  Default:
#: three quarters of the last-level cache, at least 16 MiB (24 MiB on the
#: development machine, whose 32 MiB L3 is shared with other guests).
STREAM_MIN_BYTES = max(16 << 20, 3 * (_last_level_cache_bytes() or 0) // 4)

#: Serialize nbnorm's CPU calls behind one process-wide lock (``cpu/threads.py``).
#: None: only while Numba's threading layer is ``workqueue``, which aborts the
#: process on concurrent launches, or not chosen yet.  True: always (e.g. many
#: Python threads under omp/tbb: one call at a time instead of oversubscribed
#: cores).  False: never.  Results are the same either way.
SERIALIZE_CPU_CALLS = None

# --------------------------------------------------------------------- CUDA
# nbnorm.cuda reads these at every launch; tests patch CUDA_THREADS down to 32
# (the simulator runs each thread in Python) and CUDA_MIN_BLOCK_ELEMENTS down
# to force several blocks per channel on tiny arrays.

#: nbnorm.torch's CPU outputs of at least this many bytes are allocated by
#: NumPy (``torch/tensors.empty_like``), which requests transparent huge pages;
#: PyTorch's allocator faults them in 4 KiB at a time.  NumPy's own threshold
#: for the request is 4 MiB.
TORCH_NUMPY_OUTPUT_BYTES = 4 << 20

#: Threads per block of every CUDA kernel: a power of two in [32, 1024].
CUDA_THREADS = 256
#: Values each thread reduces as one register block (sum, then squared
#: deviations from the block mean) before a Chan merge: one division per block.
CUDA_UNROLL = 8
#: A reduction splits channels across blocks until it has about this many
#: blocks (~8 per SM of a 132-SM H100), so that the GPU fills even when C is small...
CUDA_TARGET_BLOCKS = 1024
#: ...but never gives a block fewer than this many elements.
CUDA_MIN_BLOCK_ELEMENTS = 8192
#: Most blocks of an elementwise (grid-stride) kernel.
CUDA_ELEMENTWISE_BLOCKS = 4096
#: Block reductions by warp shuffles (True) or shared memory only (False);
#: None: shuffles, except on the simulator (NUMBA_ENABLE_CUDASIM=1), which has none.
CUDA_WARP_SHUFFLE = None
