"""Making the CPU kernels safe to call from several Python threads at once.

Numba runs ``parallel=True`` kernels on one process-wide *threading layer*, chosen
at the first parallel launch (``numba.threading_layer()``; by default the first of
tbb, omp, workqueue that loads).  ``tbb`` and ``omp`` accept launches from many
Python threads at once.  ``workqueue``, the fallback that is always available, does
not: a second concurrent launch aborts the process ("The workqueue threading layer
is not threadsafe ...").  So every parallel launch of ``ops`` runs under
``launching()``: one process-wide lock, taken only while the layer is ``workqueue``
or not chosen yet (the very first launches).  Under omp/tbb it costs one global
read per launching call; under workqueue concurrent calls take turns, each still
using all of Numba's threads.  ``config.SERIALIZE_CPU_CALLS`` forces the lock on
or off.  Calls of serial kernels only (batches of at most ``config.SERIAL_MAX``
elements) never enter it.

Measured on the 2-core dev machine (numba 0.68, shared and noisy): the guard
costs 0.1-0.3 us per parallel call (the layer check), 0.3 us more when it takes
the uncontended lock, against tens of microseconds of work.  See docs/threads.md.
"""

import contextlib
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


#: What a parallel launch runs under when no lock is needed (reusable: it holds nothing).
_UNLOCKED = contextlib.nullcontext()


def launching():
    """The context of a parallel launch: the lock while ``_needs_lock()``, else nothing.

    ``ops`` enters it around its parallel kernels only.  Small batches (at most
    ``config.SERIAL_MAX`` elements) run serial kernels, which never touch the
    threading layer, so they skip it: before the first parallel launch the
    check costs an exception and the lock, and a program of small batches never
    launches one.  (It used to be a decorator of the whole entry point, whose
    argument packing cost a small call ~0.5 us.)
    """
    return _lock if _needs_lock() else _UNLOCKED
