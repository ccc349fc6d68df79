"""Every CUDA kernel compiles to real PTX, for every dtype and memory pattern.

The simulator runs kernels as Python: it misses typing errors and has no warp
shuffles, so the shuffle path it never runs is compiled here with NVVM
(``cuda.compile_ptx(..., cc=(8, 0))``, no GPU needed) -- in a subprocess
without ``NUMBA_ENABLE_CUDASIM``, since the test session may have the
simulator on.  Both reduction paths (shuffle and shared memory) are compiled,
and the test fails if a kernel exists that it has no signature for.

Skipped, with the reason, only where numba-cuda[cu13] (NVVM) is absent.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(r'''
    import json, sys
    from numba import cuda, types
    from nbnorm.cuda import backward, finalize, forward, stats

    f64 = types.float64
    i64 = types.int64
    P3 = types.Array(f64, 3, "C")        # partials [k, C, parts]
    M2 = types.Array(f64, 2, "C")        # coef / moments [k, C]

    def sigs(name, dt):
        sdt = dt                          # per-channel results: x's dtype (float32/64)
        A3 = types.Array(dt, 3, "C")      # planar canonical view
        A2 = types.Array(dt, 2, "C")      # interleaved canonical view
        V = types.Array(sdt, 1, "C")      # per-channel arrays
        VA = types.Array(sdt, 1, "A")     # ... strided (e.g. a slice of a parameter buffer)
        table = {
            "channel_stats_planar": [(A3, i64, i64, P3)],
            "channel_stats_interleaved": [(A2, i64, i64, i64, P3)],
            "normalize_planar": [(A3, M2, A3)],
            "normalize_interleaved": [(A2, M2, A2)],
            "backward_reduce_planar": [(A3, A3, V, i64, i64, P3)],
            "backward_reduce_interleaved": [(A2, A2, V, i64, i64, i64, P3)],
            "grad_input_planar": [(A3, A3, M2, A3)],
            "grad_input_interleaved": [(A2, A2, M2, A2)],
            "merge_stats": [(P3, M2)],
            "finalize_train": [(P3, f64, f64, f64, V, V, V, V, i64, V, V, M2),
                               (P3, f64, f64, f64, VA, VA, VA, VA, i64, V, V, M2)],
            "finalize_infer": [(V, V, f64, V, V, i64, V, V, M2),
                               (VA, VA, f64, VA, VA, i64, V, V, M2)],
            "finalize_backward": [(P3, f64, V, V, V, i64, V, V, M2),
                                  (P3, f64, VA, VA, VA, i64, V, V, M2)],
        }
        return table[name]

    # Device functions (Chan's merge, the block reductions) are compiled for
    # "the current device" when a kernel calling them is typed, which needs a
    # GPU.  Without one, name the same compute capability as the kernels; the
    # kernels and everything they call are still compiled by NVVM for real.
    import numba.cuda.dispatcher as _dispatcher

    class _ComputeCapability80:
        compute_capability = (8, 0)

    if not cuda.is_available():
        _dispatcher.get_current_device = _ComputeCapability80

    tpb, unroll = 256, 8
    report = {"compiled": [], "missing": [], "errors": [], "shuffles": {}}
    sets = []
    for shuffle in (True, False):
        for mod in (stats, forward, backward):
            sets.append((shuffle, mod.kernels(tpb, shuffle, unroll)))
    sets.append((None, finalize.KERNELS))
    for shuffle, kernels in sets:
        for name, disp in kernels.items():
            if shuffle is False and not ("reduce" in name or "stats" in name):
                continue  # elementwise kernels have no reduction path to switch
            for dt in (types.float32, types.float64):
                try:
                    table = sigs(name, dt)
                except KeyError:
                    report["missing"].append(name)
                    break
                for sig in table:
                    try:
                        ptx, _ = cuda.compile_ptx(disp.py_func, sig, cc=(8, 0))
                    except Exception as e:  # report every failure, not the first
                        report["errors"].append(f"{name}[{dt}, shuffle={shuffle}]: {e!r}")
                        continue
                    report["compiled"].append([name, str(dt), shuffle])
                    if shuffle is not None:
                        key = f"{name}/{shuffle}"
                        report["shuffles"][key] = report["shuffles"].get(key, False) or (
                            "shfl.sync" in ptx)
    print(json.dumps(report))
''')


def _nvvm_missing():
    if importlib.util.find_spec("numba_cuda") is None:
        return "numba-cuda is not installed (pip install 'nbnorm[cuda]')"
    try:
        import cuda.bindings  # noqa: F401  (from numba-cuda[cu13]: NVVM, NVRTC)
    except ImportError:
        return "numba-cuda is installed without its CUDA wheels (pip install 'numba-cuda[cu13]')"
    return None


@pytest.fixture(scope="module")
def report():
    reason = _nvvm_missing()
    if reason:
        pytest.skip(f"cannot compile PTX: {reason}")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_kernel_compiles_to_ptx(report):
    assert report["errors"] == []
    assert report["missing"] == [], "kernels without a PTX signature in this test"
    names = {n for n, _, _ in report["compiled"]}
    assert names == {
        "channel_stats_planar", "channel_stats_interleaved",
        "normalize_planar", "normalize_interleaved",
        "backward_reduce_planar", "backward_reduce_interleaved",
        "grad_input_planar", "grad_input_interleaved",
        "merge_stats", "finalize_train", "finalize_infer", "finalize_backward"}
    for name in names:
        for dt in ("float32", "float64"):
            assert any(n == name and d == dt for n, d, _ in report["compiled"]), (name, dt)


def test_reductions_use_warp_shuffles_on_the_gpu_path(report):
    sh = report["shuffles"]
    for name in ("channel_stats_planar", "channel_stats_interleaved",
                 "backward_reduce_planar", "backward_reduce_interleaved"):
        assert sh[f"{name}/True"], f"{name}: no shfl.sync in the shuffle path's PTX"
        assert not sh[f"{name}/False"], f"{name}: shfl.sync in the shared-memory path"
