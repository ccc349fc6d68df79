"""Synchronized batch norm over MPI (``pip install "nbnorm[mpi]"``): the
statistics of a batch spread over every process of a communicator.

``forward(x, ..., comm=comm)`` and ``backward(..., comm=comm)`` take
``nbnorm.forward``'s and ``nbnorm.backward``'s arguments; ``BatchNorm`` is
``nbnorm.BatchNorm`` with a communicator.  Run under ``mpiexec -n P python
train.py`` with ``comm = mpi4py.MPI.COMM_WORLD``.

What travels, per layer and step (float64 numbers; ``P`` processes, ``C``
channels), never anything proportional to the batch:

- forward: an allgather of a 4-number header (status, ``C``, dtype, rows'
  count) and an allgather of this process's ``(mean, M2)``, ``2C`` numbers.
  Every process merges the ``P`` moments in rank order with Chan's formula
  (``nbnorm.merge_moments``), so ``mean``, ``invstd`` and the running
  statistics are bitwise the same on every process, and equal to one
  process's batch norm of the concatenated batch up to rounding.
- backward: an allgather of the header and an allreduce (sum) of this
  process's ``(sum_dy, sum_dy_xmu)``, ``2C`` numbers; the global count is the
  sum of the headers' counts.  ``grad_weight``/``grad_bias`` are this
  process's own sums, as PyTorch's ``SyncBatchNorm`` returns them (the
  training loop's gradient all-reduce adds them).

Why a header before the payload: every process first checks its arguments
locally (``check_only=True``, the rules of ``nbnorm.api``) and sends the
verdict.  A process whose input is bad may not know ``C`` (``x`` is not an
array, say), so it could not size a message of ``2C + 1`` numbers, and MPI
leaves a collective with mismatched sizes undefined (a hang or garbage).  The
fixed-size header lets every process learn that some process failed, or that
the processes disagree on ``C`` or the dtype, and raise, before any message
whose size depends on ``C``.  The cost is one more latency per direction,
measured by ``mpiexec -n P python benchmarks/bench_distributed.py``.

Errors: a bad argument on any process raises on every process (the same
exception type, naming the rank; the failing process raises its own error),
before any output or running statistic is written; so do processes that
disagree on the channel count or dtype, and a global batch with one value per
channel.  ``on_nonfinite`` is decided on the merged statistics, so every
process decides the same.  A process with no rows (N=0) takes part: it returns
an empty ``out``, the global ``mean``/``invstd`` and zero
``grad_weight``/``grad_bias``.  Inference (``training=False``) is local and
sends nothing; every process must call with the same ``training`` (the mode
of one model), since a process that does not enter a collective cannot be
told about.

Device arrays: the O(C) moments and sums are copied to the host for the
collectives and back (the one synchronization with the device per direction).
"""

import math
import zlib

import numpy as np

from . import api
from .api import BackwardResult, ForwardResult, Moments  # noqa: F401 (the results' types)
from .layer import BatchNorm as _LocalBatchNorm

__all__ = ["forward", "backward", "BatchNorm", "MPICollectives", "message_bytes"]

#: Header fields: status (0, or the code of the local error), channels,
#: dtype code, values per channel.
HEADER = 4
_ERROR_CODES = {TypeError: 1, ValueError: 2}
_ERROR_TYPES = {1: TypeError, 2: ValueError, 3: RuntimeError}


class MPICollectives:
    """The two collectives over an mpi4py communicator (float64 NumPy buffers).

    Any object with ``size``, ``allgather(a) -> (size, len(a))`` and
    ``allreduce(a) -> sum`` serves the functions below (``nbnorm.torch.sync``
    passes one over ``torch.distributed``).
    """

    def __init__(self, comm):
        for name in ("Allgather", "Allreduce", "Get_size"):
            if not callable(getattr(comm, name, None)):
                raise TypeError(f"comm must be an mpi4py communicator (with {name}), "
                                f"got {type(comm).__name__}")
        self.comm = comm
        self.size = comm.Get_size()

    def allgather(self, a):
        table = np.empty((self.size, a.size))
        self.comm.Allgather(a, table)
        return table

    def allreduce(self, a):
        total = np.empty_like(a)
        self.comm.Allreduce(a, total)  # MPI.SUM
        return total


def _collectives(comm):
    if isinstance(comm, MPICollectives) or (
            hasattr(comm, "allgather") and hasattr(comm, "allreduce") and hasattr(comm, "size")
            and not hasattr(comm, "Allgather")):
        return comm
    return MPICollectives(comm)


def message_bytes(C, size):
    """Bytes each process sends per direction for ``C`` channels among ``size``
    processes: ``(forward, backward)``.  The header and the payload, float64;
    independent of the batch.  (An allgather delivers ``size`` times as much
    to each process; what the network carries depends on the MPI's algorithm.)"""
    del size  # what one process sends does not depend on how many receive it
    return 8 * (HEADER + 2 * C), 8 * (HEADER + 2 * C)


# --------------------------------------------------------------- the exchange

def _dtype_code(dtype):
    """A number naming ``dtype`` the same way in every process (NumPy's type
    numbers of user dtypes such as bfloat16 depend on import order)."""
    return float(zlib.crc32(str(dtype).removeprefix("torch.").encode()))


def _header(error, C=-1, dtype=None, count=0):
    code = 0
    if error is not None:
        code = next((c for t, c in _ERROR_CODES.items() if isinstance(error, t)), 3)
    return np.array([code, C, -1.0 if dtype is None else _dtype_code(dtype), count], np.float64)


def _agree(coll, header, error, what):
    """Allgather the headers; raise on every process when any process failed or
    the processes disagree.  Returns the ``(size, HEADER)`` table."""
    table = coll.allgather(header)
    failed = [r for r in range(table.shape[0]) if table[r, 0] != 0]
    if error is not None:
        raise error
    if failed:
        r = failed[0]
        kind = _ERROR_TYPES.get(int(table[r, 0]), RuntimeError)
        raise kind(f"nbnorm.distributed.{what}: rank {r} refused its arguments "
                   f"({kind.__name__}; its own error says why); nothing was written")
    for column, name in ((1, "the channel count"), (2, "the dtype")):
        values = table[:, column]
        if (values != values[0]).any():
            shown = values.astype(np.int64).tolist() if column == 1 else "differs"
            raise ValueError(f"nbnorm.distributed.{what}: the processes disagree on {name} "
                             f"({shown}); nothing was written")
    return table


def _report(coll, error, what):
    """Join the header collective for a failure found before the exchange
    (by a caller such as ``BatchNorm``), then raise ``error``."""
    _agree(coll, _header(error), error, what)


def _enough(total, size, what):
    if total <= 1:
        raise ValueError(f"expected more than 1 value per channel when training, got "
                         f"{total} over {size} processes (nbnorm.distributed.{what})")


def _host(a, stream):
    """An O(C) result as a float64 host array (device arrays are copied,
    waiting for ``stream``)."""
    if isinstance(a, np.ndarray):
        return a
    from .cuda import arrays
    s = arrays.as_stream(stream)
    h = a.copy_to_host(stream=s)
    s.synchronize()
    return h


def _like(a, x, stream):
    """Host ``a`` on ``x``'s side: a device copy for device ``x``."""
    if type(x) is np.ndarray or not api._on_device(x):
        return a
    from numba import cuda
    from .cuda import arrays
    return cuda.to_device(np.ascontiguousarray(a), stream=arrays.as_stream(stream))


def _values_per_channel(x, axis):
    shape = tuple(x.shape)
    ax = api._axis(axis, len(shape))
    return math.prod(shape) // shape[ax] if shape[ax] else 0


def _training(training):
    """The mode, or (True, the error) for a bad flag: a process with a bad
    flag joins the collective to report it."""
    try:
        return api._flag(training, "training"), None
    except (TypeError, ValueError) as e:
        return True, e


def _refuse(options, names):
    for name in names:
        if name in options:
            raise TypeError(f"nbnorm.distributed computes {name}= itself; it is not an "
                            f"argument here")


# ---------------------------------------------------------------- public

def forward(x, weight=None, bias=None, running_mean=None, running_var=None, *, comm,
            training=True, axis=1, stream=None, **options):
    """``nbnorm.forward`` with the batch statistics of every process of ``comm``.

    Parameters
    ----------
    x, weight, bias, running_mean, running_var, training, axis, stream
        As ``nbnorm.forward``; ``x`` may have no rows.
    comm : mpi4py communicator
        Every process of it calls with its part of the batch (the same
        channel count, dtype and ``training``).
    **options
        ``nbnorm.forward``'s other keyword arguments (``momentum``,
        ``unbiased``, ``eps``, ``out``, ``mean``, ``invstd``,
        ``on_nonfinite``, ``activation``, ``residual``); not ``moments`` or
        ``check_only``.

    Returns
    -------
    ForwardResult
        ``(out, mean, invstd)``: ``out`` this process's rows, ``mean`` and
        ``invstd`` the whole batch's, bitwise the same on every process.
        The running statistics are updated with the whole batch's moments.

    Raises
    ------
    TypeError, ValueError
        On every process when any process's arguments are refused, the
        processes disagree on the channel count or dtype, or the whole batch
        has one value per channel; nothing has been written.
    FloatingPointError
        ``on_nonfinite="raise"`` and a merged mean or variance is not finite,
        on every process.
    """
    coll = _collectives(comm)
    training, error = _training(training)
    if not training:
        return api.forward(x, weight, bias, running_mean, running_var, training=False,
                           axis=axis, stream=stream, **options)
    local = None
    if error is None:
        try:
            _refuse(options, ("moments", "check_only"))
            local = api.moments(x, axis=axis, stream=stream)
            api.forward(x, weight, bias, running_mean, running_var, axis=axis, stream=stream,
                        moments=(2, local.mean, local.m2), check_only=True, **options)
        except Exception as e:  # any local failure must reach the other processes
            error = e
    if error is None:
        header = _header(None, local.mean.shape[0], x.dtype, local.count)
    else:
        header = _header(error)
    table = _agree(coll, header, error, "forward")
    C = local.mean.shape[0]
    payload = np.concatenate((_host(local.mean, stream), _host(local.m2, stream)))
    gathered = coll.allgather(payload)
    merged = api.merge_moments([(int(table[r, 3]), gathered[r, :C], gathered[r, C:])
                                for r in range(coll.size)])
    _enough(merged.count, coll.size, "forward")
    merged = Moments(merged.count, _like(merged.mean, x, stream), _like(merged.m2, x, stream))
    return api.forward(x, weight, bias, running_mean, running_var, axis=axis, stream=stream,
                       moments=merged, **options)


def backward(grad_out, x, mean, invstd, weight=None, *, comm, training=True, axis=1,
             stream=None, **options):
    """``nbnorm.backward`` of ``forward``: ``grad_input`` from the sums of every
    process of ``comm``.

    Parameters
    ----------
    grad_out, x, mean, invstd, weight, training, axis, stream
        As ``nbnorm.backward``; ``mean`` and ``invstd`` are what ``forward``
        returned (the whole batch's).  ``x`` may have no rows.
    comm : mpi4py communicator
        The communicator of the forward call.
    **options
        ``nbnorm.backward``'s other keyword arguments (``grad_input``,
        ``grad_weight``, ``grad_bias``, ``activation``, ``forward_out``,
        ``grad_residual``); not ``sums``, ``count``, ``local_sums`` or
        ``check_only``.

    Returns
    -------
    BackwardResult
        ``grad_input`` for this process's rows; ``grad_weight`` and
        ``grad_bias`` this process's own sums (zeros without rows): their sum
        over processes is the whole batch's gradient.

    Raises
    ------
    TypeError, ValueError
        As for ``forward``, on every process; nothing has been written.
    """
    coll = _collectives(comm)
    training, error = _training(training)
    if not training:
        return api.backward(grad_out, x, mean, invstd, weight, training=False, axis=axis,
                            stream=stream, **options)
    local = None
    if error is None:
        try:
            _refuse(options, ("sums", "count", "local_sums", "check_only"))
            local = api.backward_sums(grad_out, x, mean, invstd, axis=axis,
                                      activation=options.get("activation"),
                                      forward_out=options.get("forward_out"), stream=stream)
            api.backward(grad_out, x, mean, invstd, weight, axis=axis, stream=stream,
                         sums=local, count=2, local_sums=local, check_only=True, **options)
        except Exception as e:
            error = e
    if error is None:
        header = _header(None, local[0].shape[0], x.dtype, _values_per_channel(x, axis))
    else:
        header = _header(error)
    table = _agree(coll, header, error, "backward")
    C = local[0].shape[0]
    total = coll.allreduce(np.concatenate((_host(local[0], stream), _host(local[1], stream))))
    count = int(table[:, 3].sum())
    _enough(count, coll.size, "backward")
    sums = (_like(total[:C], x, stream), _like(total[C:], x, stream))
    return api.backward(grad_out, x, mean, invstd, weight, axis=axis, stream=stream,
                        sums=sums, count=count, local_sums=local, **options)


class BatchNorm(_LocalBatchNorm):
    """``nbnorm.BatchNorm`` whose training steps normalize with the statistics
    of every process of ``comm`` (PyTorch's ``SyncBatchNorm`` for NumPy).

    Parameters
    ----------
    num_features, eps, momentum, affine, bias, track_running_stats, axis, dtype, activation
        As ``nbnorm.BatchNorm``.
    comm : mpi4py communicator
        Every process holds its own copy of the layer and calls it with its
        part of the batch.

    Notes
    -----
    Training mode exchanges ``forward``'s and ``backward``'s messages; eval
    mode is the local layer and sends nothing (so every process must be in
    the same mode).  ``grad_weight``/``grad_bias`` are this process's own
    sums: all-reduce them with the other parameters' gradients.  A bad input
    on one process raises on all of them with nothing changed (running
    statistics, ``num_batches_tracked``, the pending call).
    """

    def __init__(self, num_features, *, comm, **kwargs):
        self.comm = comm
        self._coll = _collectives(comm)
        super().__init__(num_features, **kwargs)
        self._pending_synced = False  # whether the pending forward call was synchronized
        self._sync = False            # whether the call in progress is
        self._joined = False          # whether it has reached the collective

    def _forward(self, *args, **kwargs):
        if not self._sync:
            return api.forward(*args, **kwargs)
        self._joined = True
        return forward(*args, comm=self._coll, **kwargs)

    def _backward(self, *args, **kwargs):
        if not self._sync:
            return api.backward(*args, **kwargs)
        self._joined = True
        return backward(*args, comm=self._coll, **kwargs)

    def _call(self, sync, method, what, *args):
        """``method(*args)``, synchronized or not; a failure before the
        collective is reported to the other processes, which wait in it."""
        self._sync, self._joined = sync, False
        try:
            return method(*args)
        except Exception as e:
            if sync and not self._joined:
                _report(self._coll, e, what)
            raise
        finally:
            self._sync = False

    def __call__(self, x, residual=None):
        sync = self.training
        out = self._call(sync, super().__call__, "forward", x, residual)
        self._pending_synced = sync
        return out

    def backward(self, grad_out):
        # without a pending call the other processes may be waiting for this one's
        # gradient: they learn about the RuntimeError too, in training mode
        sync = self._pending_synced if self._pending is not None else self.training
        return self._call(sync, super().backward, "backward", grad_out)
