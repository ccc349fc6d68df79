"""Concurrent calls from many Python threads: no crash, no deadlock, bitwise the
same results as serial calls.

Numba's ``workqueue`` threading layer aborts the process when two threads launch
parallel kernels at once; ``nbnorm.cpu.threads`` serializes the CPU entry points
while that layer is active.  Each check runs in a fresh subprocess (the layer is
process-wide and chosen once) under a timeout, so a deadlock fails the test
instead of hanging the suite.
"""

import os
import subprocess
import sys
import textwrap

import pytest

import nbnorm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(nbnorm.__file__)))

SCRIPT = textwrap.dedent(r"""
    import sys, threading
    import numpy as np
    import numba
    import nbnorm

    THREADS, CALLS = int(sys.argv[1]), int(sys.argv[2])
    rng = np.random.default_rng(12345)
    # planar/interleaved, axis 1 and -1, float32/float64: small shapes (serial
    # kernels), two big enough to split each channel into several parallel
    # parts, and one for the fused per-channel planar kernels
    SPECS = [((8, 3, 5), 1, np.float32), ((16, 4), 1, np.float64),
             ((4, 6, 7, 3), -1, np.float32), ((32, 2, 9), 1, np.float64),
             ((5, 17), 1, np.float32), ((3, 5, 2, 2), 2, np.float64),
             ((2, 3, 50000), 1, np.float32), ((70000, 2), 1, np.float32),
             ((4, 16, 1024), 1, np.float32)]
    DATA = []
    for shape, axis, dt in SPECS:
        C = shape[axis]
        DATA.append(dict(
            x=(rng.standard_normal(shape) * 2 + 1).astype(dt),
            dy=rng.standard_normal(shape).astype(dt),
            w=rng.uniform(0.5, 1.5, C).astype(dt), b=rng.uniform(-1, 1, C).astype(dt),
            rm=rng.uniform(-1, 1, C).astype(dt), rv=rng.uniform(0.5, 2, C).astype(dt),
            axis=axis))

    def call(d, k):
        rm, rv = d["rm"].copy(), d["rv"].copy()
        kw = {}
        if k % 2:  # every other call writes into preallocated buffers
            kw = dict(out=np.empty_like(d["x"]), mean=np.empty_like(d["w"]),
                      invstd=np.empty_like(d["w"]))
        training = k % 3 != 2
        f = nbnorm.forward(d["x"], d["w"], d["b"], rm, rv, training=training,
                           axis=d["axis"], **kw)
        g = nbnorm.backward(d["dy"], d["x"], f.mean, f.invstd, d["w"],
                            training=training, axis=d["axis"])
        return [a.tobytes() for a in (*f, rm, rv, *g)]

    expected = {(i, k % 6): call(DATA[i], k % 6) for i in range(len(DATA)) for k in range(6)}
    errors, done = [], [0] * THREADS

    def work(t):
        try:
            for k in range(CALLS):
                i = (t + k) % len(DATA)
                if call(DATA[i], k % 6) != expected[(i, k % 6)]:
                    errors.append((t, k, i))
                done[t] += 1
        except BaseException as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("layer", numba.threading_layer(), "calls", sum(done), "errors", errors[:5])
    sys.exit(1 if errors or sum(done) != THREADS * CALLS else 0)
""")


def _run(layer, threads=8, calls=200, timeout=240):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    if layer is not None:
        env["NUMBA_THREADING_LAYER"] = layer
    try:
        p = subprocess.run([sys.executable, "-c", SCRIPT, str(threads), str(calls)],
                           env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"deadlock: {threads} threads x {calls} calls did not finish in {timeout} s")
    assert p.returncode == 0, f"rc={p.returncode}\n{p.stdout}\n{p.stderr[-3000:]}"
    return p.stdout


def _available(layer):
    try:
        if layer == "omp":
            from numba.np.ufunc import omppool  # noqa: F401
        elif layer == "tbb":
            from numba.np.ufunc import tbbpool  # noqa: F401
    except ImportError:
        return False
    return True


def test_concurrent_calls_default_layer():
    """8 threads x 200 forward+backward calls under whatever layer Numba picks."""
    out = _run(None)
    assert "calls 1600 errors []" in out


def test_concurrent_calls_workqueue_layer():
    """The unsafe layer: without nbnorm's lock this aborts the process."""
    out = _run("workqueue")
    assert "layer workqueue calls 1600 errors []" in out


@pytest.mark.skipif(not _available("omp"), reason="Numba's OpenMP layer does not load here")
def test_concurrent_calls_omp_layer():
    """A thread-safe layer: no lock taken, kernels of different calls overlap."""
    out = _run("omp")
    assert "layer omp calls 1600 errors []" in out


def test_guard_locks_only_for_workqueue(monkeypatch):
    """The decision itself: lock while the layer is unknown or workqueue, not for
    omp/tbb; ``config.SERIALIZE_CPU_CALLS`` overrides it."""
    from nbnorm import config
    from nbnorm.cpu import threads

    monkeypatch.setattr(threads, "_safe_layer", False)
    for layer, locked in [("workqueue", True), ("omp", False), ("tbb", False)]:
        monkeypatch.setattr(threads, "_safe_layer", False)
        monkeypatch.setattr(threads.numba, "threading_layer", lambda layer=layer: layer)
        assert threads._needs_lock() is locked
    monkeypatch.setattr(threads, "_safe_layer", False)

    def unchosen():
        raise ValueError("Threading layer is not initialized.")

    monkeypatch.setattr(threads.numba, "threading_layer", unchosen)
    assert threads._needs_lock() is True
    monkeypatch.setattr(config, "SERIALIZE_CPU_CALLS", False)
    assert threads._needs_lock() is False
    monkeypatch.setattr(config, "SERIALIZE_CPU_CALLS", True)
    assert threads._needs_lock() is True
