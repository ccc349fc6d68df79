"""Making the CPU kernels safe to call from several Python threads at once.

Numba runs ``parallel=True`` kernels on one process-wide *threading layer*, chosen
at the first parallel launch (``numba.threading_layer()``; by default the first of
tbb, omp, workqueue that loads).  ``tbb`` and ``omp`` accept launches from many
Python threads at once.  ``workqueue``, the fallback that is always available, does
not: a second concurrent launch aborts the process ("The workqueue threading layer
is not threadsafe ...").  So every CPU entry point of ``ops`` runs under
``serialized``: one process-wide lock, taken only while the layer is ``workqueue``
or not chosen yet (the very first launches).  Under omp/tbb it costs one global
read per call; under workqueue concurrent calls take turns, each still using all
of Numba's threads.  ``config.SERIALIZE_CPU_CALLS`` forces the lock on or off.

Measured on the 2-core dev machine (numba 0.68, shared and noisy): the guard
costs 0.1-0.3 us per call (the layer check), 0.3 us more when it takes the
uncontended lock; the smallest forward call costs 11-15 us, so the guard is at
most 1-3%, below the run-to-run noise.  See README "Threads".
"""

import functools
import threading

import numba

from .. import config

_lock = threading.RLock()
_safe_layer = False  # True once a thread-safe layer is known to be in use


def _needs_lock():
    global _safe_layer
    if config.SERIALIZE_CPU_CALLS is not None:
        return bool(config.SERIALIZE_CPU_CALLS)
    if _safe_layer:
        return False
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet: the layer is not chosen
        return True
    _safe_layer = layer in ("tbb", "omp")
    return not _safe_layer


def serialized(func):
    """Run ``func`` (an entry point of ``ops``, whose first argument is the batch)
    under the lock when needed.

    Batches of at most ``config.SERIAL_MAX`` elements run serial kernels only
    (``ops``), which never touch the threading layer, so they skip the check:
    before the first parallel launch it costs an exception and the lock, ~1.5 us
    of a ~12 us small call, and a program of small batches never launches one.
    """

    @functools.wraps(func)
    def wrapper(x, *args, **kwargs):
        if x.size > config.SERIAL_MAX and _needs_lock():
            with _lock:
                return func(x, *args, **kwargs)
        return func(x, *args, **kwargs)

    return wrapper
