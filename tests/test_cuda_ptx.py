"""Every CUDA kernel compiles to real PTX, for every storage dtype, memory
pattern and fused epilogue.

The simulator runs kernels as Python: it misses typing errors and has no warp
shuffles or libdevice, so the paths it never runs are compiled here with NVVM
(``cuda.compile_ptx(..., cc=(8, 0))``, no GPU needed) -- in a subprocess
without ``NUMBA_ENABLE_CUDASIM``, since the test session may have the
simulator on.  Variants: float16 (native), bfloat16 (int16 bits), float32 and
float64 data; planar and interleaved; both reduction paths (shuffle and
shared memory); every combination of residual/relu (forward) and
mask/grad_residual/training (backward); per-channel arrays of every float
dtype (bfloat16 as int16), contiguous or strided.  The test fails if a kernel
exists that it has no signature for.

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
import json, re, time
from numba import cuda, types
from nbnorm.cuda import backward, finalize, forward, norms, stats

import numba.cuda.dispatcher as _dispatcher

class _ComputeCapability80:
    compute_capability = (8, 0)

if not cuda.is_available():
    _dispatcher.get_current_device = _ComputeCapability80

f64, i64 = types.float64, types.int64
P3 = types.Array(f64, 3, "C")
M2 = types.Array(f64, 2, "C")
STORAGE = {"float16": types.float16, "bfloat16": types.int16,
           "float32": types.float32, "float64": types.float64}
STAT = {"float16": types.float32, "bfloat16": types.float32,
        "float32": types.float32, "float64": types.float64}
tpb, unroll = 256, 8
t0 = time.time()
entries = []
for kind, st in STORAGE.items():
    for planar, D in ((True, types.Array(st, 3, "C")), (False, types.Array(st, 2, "C"))):
        pat = "planar" if planar else "interleaved"
        V = types.Array(STAT[kind], 1, "C")
        idx = (i64, i64) if planar else (i64, i64, i64)
        for shuffle in (True, False):
            k = stats.kernels(tpb, shuffle, unroll, kind)[f"channel_stats_{pat}"]
            entries.append((f"channel_stats_{pat}", kind, shuffle, {}, k, (D,) + idx + (P3,)))
            for mask in (False, True):
                k = backward.kernels(tpb, shuffle, unroll, kind, "float", mask)[
                    f"backward_reduce_{pat}"]
                entries.append((f"backward_reduce_{pat}", kind, shuffle, {"mask": mask}, k,
                                (D, D, D, V) + idx + (P3,)))
        for residual in (False, True):
            for relu in (False, True):
                k = forward.kernels(tpb, True, unroll, kind, residual, relu)[f"normalize_{pat}"]
                entries.append((f"normalize_{pat}", kind, True,
                                {"residual": residual, "relu": relu}, k, (D, M2, D, D)))
        for mask in (False, True):
            for gres in (False, True):
                for training in (False, True):
                    k = backward.kernels(tpb, True, unroll, kind, "float", mask, gres,
                                         training)[f"grad_input_{pat}"]
                    entries.append((f"grad_input_{pat}", kind, True,
                                    {"mask": mask, "grad_residual": gres, "training": training},
                                    k, (D, D, D, M2, D, D)))
# per-channel kernels: parameters of every float dtype, contiguous or strided,
# and bfloat16 parameters as int16 bits
entries.append(("merge_stats", "float64", None, {}, finalize.merge_stats, (P3, M2)))
entries.append(("merge_sums", "float64", None, {}, finalize.merge_sums, (P3, M2)))
for pk, pt in (("float", types.float32), ("float", types.float64), ("float", types.float16),
               ("bfloat16", types.int16)):
    for layout in ("C", "A"):
        W = types.Array(pt, 1, layout)
        for out in (types.float32, types.float64):
            V = types.Array(out, 1, "C")
            meta = {"param": str(pt), "layout": layout}
            ks = finalize.kernels(pk, pk, pk, pk, pk)
            entries.append(("finalize_train", str(out), None, meta, ks["finalize_train"],
                            (P3, V, V, f64, f64, f64, f64, W, W, W, W, i64, V, V, M2)))
            entries.append(("finalize_infer", str(out), None, meta, ks["finalize_infer"],
                            (W, W, f64, W, W, i64, V, V, M2)))
            entries.append(("finalize_backward", str(out), None, meta,
                            ks["finalize_backward"],
                            (P3, V, V, V, V, f64, W, W, W, i64, V, V, M2)))
            # statistics given by the caller: moments (forward), global and local sums
            given = {**meta, "given": True}
            entries.append(("finalize_train", str(out), None, given,
                            finalize.train_kernel(pk, pk, pk, pk, (pk, pk)),
                            (W, W, W, f64, f64, f64, f64, W, W, W, W, i64, V, V, M2)))
            entries.append(("finalize_backward", str(out), None, given,
                            finalize.backward_kernel(pk, pk, pk, (pk, pk)),
                            (P3, W, W, V, V, f64, W, W, W, i64, V, V, M2)))
            entries.append(("finalize_backward", str(out), None, {**given, "local": True},
                            finalize.backward_kernel(pk, pk, pk, (pk, pk), (pk, pk)),
                            (W, W, W, W, W, f64, W, W, W, i64, V, V, M2)))
        entries.append(("merge_moments", "float64", None, meta,
                        finalize.merge_moments_kernel(pk, pk), (f64, f64, W, W, M2)))

# group/layer/instance/RMS norm (cuda.norms): one block per unit of the group
# view x[N, S, G, K, R]; configurations: affine, RMS (weight only), a fused
# residual + ReLU, given statistics (instance norm in inference); backward in
# training and inference, with the ReLU mask and grad_residual, RMS
M2F = types.Array(f64, 2, "C")
F1 = types.Array(f64, 1, "C")
for kind, st in STORAGE.items():
    D5 = types.Array(st, 5, "C")
    S2 = types.Array(STAT[kind], 2, "C")
    V1 = types.Array(STAT[kind], 1, "C")
    pk = "bfloat16" if kind == "bfloat16" else "float"
    W = types.Array(types.int16 if kind == "bfloat16" else types.float32, 1, "C")
    for shuffle in (True,):  # shared memory (False) is the simulator's path: test_cuda_norms
        for w, b, res, relu, given, rms in ((True, True, False, False, False, False),
                                            (True, False, False, False, False, True),
                                            (True, True, True, True, False, False),
                                            (False, False, False, False, True, False)):
            meta = {"weight": w, "bias": b, "residual": res, "relu": relu, "given": given,
                    "rms": rms}
            k = norms._forward_kernel(tpb, shuffle, kind, kind, kind if res else None, pk,
                                      w, b, res, relu, given, rms)
            entries.append(("norm_forward", kind, shuffle, meta, k,
                            (D5, W if w else F1, W if b else F1, D5 if res else F1, F1, F1,
                             f64, D5, M2F, M2F, S2)))
        for w, mask, gres, rms, training in ((True, False, False, False, True),
                                             (True, True, True, False, True),
                                             (True, False, False, True, True),
                                             (False, False, False, False, False)):
            meta = {"weight": w, "mask": mask, "grad_residual": gres, "rms": rms,
                    "training": training}
            gi, gp = norms._backward_kernels(tpb, shuffle, kind, kind, pk, w, mask, gres, rms,
                                             training, not rms)
            entries.append(("norm_grad_input", kind, shuffle, meta, gi,
                            (D5, D5, D5, S2, S2, W if w else F1, D5, D5)))
            entries.append(("norm_grad_params", kind, shuffle, meta, gp,
                            (D5, D5, D5, S2, S2, V1, V1)))
    entries.append(("norm_copy_mean", kind, None, {}, norms._copy2, (M2F, S2)))
    entries.append(("norm_fill_mean", kind, None, {}, norms._fill_mean, (F1, S2)))
for rt in (types.float32, types.float64):
    R1 = types.Array(rt, 1, "C")
    entries.append(("norm_running", str(rt), None, {}, norms._running,
                    (M2F, M2F, f64, f64, R1, R1)))

LOAD2 = re.compile(r"\bld\.global(?:\.nc)?\.[bu]16\b")
STORE2 = re.compile(r"\bst\.global\.[bu]16\b")
report = {"compiled": [], "errors": [], "seconds": 0.0}
for name, kind, shuffle, meta, disp, sig in entries:
    try:
        ptx, _ = cuda.compile_ptx(disp.py_func, sig, cc=(8, 0))
    except Exception as e:  # report every failure, not the first
        report["errors"].append(f"{name}[{kind}, {meta}, shuffle={shuffle}]: {e!r}")
        continue
    report["compiled"].append({
        "name": name, "kind": kind, "shuffle": shuffle, "meta": meta,
        "shfl": "shfl.sync" in ptx, "rz": "cvt.rz.f32.f64" in ptx,
        "f16_store": "cvt.rn.f16.f64" in ptx, "f16_load": "cvt.f64.f16" in ptx,
        "loads2": len(LOAD2.findall(ptx)), "stores2": len(STORE2.findall(ptx))})
report["seconds"] = time.time() - t0
print(json.dumps(report))
''')

ELEMENTWISE = {"normalize_planar", "normalize_interleaved",
               "grad_input_planar", "grad_input_interleaved"}
REDUCTIONS = {"channel_stats_planar", "channel_stats_interleaved",
              "backward_reduce_planar", "backward_reduce_interleaved"}
PER_CHANNEL = {"merge_stats", "merge_sums", "merge_moments", "finalize_train",
               "finalize_infer", "finalize_backward"}
NORMS = {"norm_forward", "norm_grad_input", "norm_grad_params", "norm_copy_mean",
         "norm_fill_mean", "norm_running"}
KINDS = ("float16", "bfloat16", "float32", "float64")


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


def _entries(report, name=None, kind=None, **meta):
    return [e for e in report["compiled"]
            if (name is None or e["name"] == name) and (kind is None or e["kind"] == kind)
            and all(e["meta"].get(k) == v for k, v in meta.items())]


def test_every_kernel_compiles_to_ptx(report):
    assert report["errors"] == []
    names = {e["name"] for e in report["compiled"]}
    assert names == ELEMENTWISE | REDUCTIONS | PER_CHANNEL | NORMS
    for name in ELEMENTWISE | REDUCTIONS | NORMS - {"norm_running"}:
        for kind in KINDS:
            assert _entries(report, name, kind), (name, kind)


def test_kernel_modules_have_no_kernel_without_a_signature():
    """The factories' kernel names are exactly those the script compiles."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent('''
            from nbnorm.cuda import backward, finalize, forward, stats
            names = set()
            for mod in (stats, forward, backward):
                names |= set(mod.kernels(32, False, 2, "float32"))
            names |= set(finalize.kernels())
            print(" ".join(sorted(names)))
        ''')], env={**os.environ, "NUMBA_ENABLE_CUDASIM": "1",
                    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert set(proc.stdout.split()) == ELEMENTWISE | REDUCTIONS | PER_CHANNEL


def test_norm_kernels_have_signatures():
    """The module-level kernels of ``cuda.norms`` are those the script compiles
    besides its two factories' (``_forward_kernel``, ``_backward_kernels``):
    a new one must be added there."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent('''
            from numba.cuda.dispatcher import CUDADispatcher
            from nbnorm.cuda import norms
            print(" ".join(sorted(n for n, v in vars(norms).items()
                                  if isinstance(v, CUDADispatcher)
                                  and not v.targetoptions.get("device"))))
        ''')], env={**{k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"},
                    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert set(proc.stdout.split()) == {"_copy2", "_fill_mean", "_running"}


def test_reductions_use_warp_shuffles_on_the_gpu_path(report):
    for name in REDUCTIONS:
        for kind in KINDS:
            for e in _entries(report, name, kind):
                assert e["shfl"] == e["shuffle"], (name, kind, e["meta"], e["shuffle"])


def test_half_conversions_are_native_or_round_to_odd(report):
    """float16 loads and stores are single cvt instructions (cvt.rn.f16.f64 rounds
    float64 correctly); bfloat16 stores round through float32 toward zero plus a
    sticky bit (cvt.rz.f32.f64), never through a second round-to-nearest."""
    data_stores = ELEMENTWISE | {"norm_forward", "norm_grad_input"}
    for e in _entries(report, kind="float16"):
        if e["name"] in ELEMENTWISE | REDUCTIONS | {"norm_forward", "norm_grad_input",
                                                    "norm_grad_params"}:
            assert e["f16_load"], e
        if e["name"] in data_stores:
            assert e["f16_store"] and not e["rz"], e
    for e in _entries(report, kind="bfloat16"):
        assert not e["f16_load"] and not e["f16_store"], e
        assert e["rz"] == (e["name"] in data_stores), e
    for e in _entries(report, "finalize_train"):
        if e["meta"]["param"] == "int16":  # bfloat16 running statistics are rounded too
            assert e["rz"], e


def test_absent_operands_are_never_read(report):
    """Placeholders of absent epilogue operands compile away: float16 data are the
    only 2-byte loads and stores of the elementwise kernels, counted."""
    for e in _entries(report, kind="float16"):
        m = e["meta"]
        if e["name"].startswith("normalize"):
            assert (e["loads2"], e["stores2"]) == (1 + m["residual"], 1), e
        elif e["name"].startswith("grad_input"):
            loads = 1 + m["mask"] + m["training"]  # dy, forward_out, x
            assert (e["loads2"], e["stores2"]) == (loads, 1 + m["grad_residual"]), e
