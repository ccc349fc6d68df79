"""No leaks: 10,000 forward+backward calls keep the process' RSS flat.

Runs in a subprocess (a clean process, nothing else allocating) on small shapes,
so the 10,000 calls take seconds.  The calls cover every path: planar and
interleaved, allocated and preallocated outputs, in place, inference, the
on_nonfinite policies (a raised FloatingPointError included) and a refused
call.  RSS is sampled after a warm-up of 1,000 calls and at the end; the bound
is generous (8 MiB, i.e. ~800 bytes per call), far below what a leaked
buffer per call would cost, far above allocator noise.
"""

import os
import subprocess
import sys
import textwrap

import pytest

import nbnorm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(nbnorm.__file__)))

SCRIPT = textwrap.dedent(r"""
    import gc, resource, sys
    import numpy as np
    import nbnorm

    def rss():
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * resource.getpagesize()
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(s).astype(dt) for s, dt in
          [((8, 3, 5), np.float32), ((16, 4), np.float64), ((4, 6, 3, 3), np.float32)]]
    bad = xs[0].copy(); bad[0, 0, 0] = np.nan

    def step(k):
        x = xs[k % 3]
        C = x.shape[1]
        rm, rv = np.zeros(C, x.dtype), np.ones(C, x.dtype)
        if k % 4 == 0:
            out = np.empty_like(x); m = np.empty(C, x.dtype); s = np.empty(C, x.dtype)
            f = nbnorm.forward(x, None, None, rm, rv, out=out, mean=m, invstd=s)
        elif k % 4 == 1:
            f = nbnorm.forward(x.copy(), np.ones(C, x.dtype), None, rm, rv, out=None)
        elif k % 4 == 2:
            f = nbnorm.forward(x, None, None, rm, rv, training=False)
        else:
            y = x.copy()
            f = nbnorm.forward(y, None, None, rm, rv, out=y, on_nonfinite="skip")
        g = nbnorm.backward(x, x, f.mean, f.invstd, training=k % 4 != 2)
        if k % 50 == 0:
            try:
                nbnorm.forward(bad, on_nonfinite="raise")
            except FloatingPointError:
                pass
            try:
                nbnorm.forward(x, out=np.empty(3))
            except ValueError:
                pass
        return g

    for k in range(1000):
        step(k)
    gc.collect()
    before = rss()
    for k in range(1000, 10000):
        step(k)
    gc.collect()
    after = rss()
    print("rss_before", before, "rss_after", after, "growth", after - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux") and os.name != "posix",
                    reason="RSS is read with the resource module (POSIX)")
def test_rss_flat_over_10000_calls():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    fields = p.stdout.split()
    growth = int(fields[fields.index("growth") + 1])
    assert growth < 8 * 2**20, p.stdout
