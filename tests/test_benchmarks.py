"""Smoke tests of the benchmark tooling, so that it cannot rot: ``python -m nbnorm``
and the asv suite run and report what they should.  Nothing here asserts on a
timing (DESIGN.md §5): a loaded CI machine must not fail them.
"""

import importlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import nbnorm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(nbnorm.__file__)))


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


#: The dtypes of the table checked here: a cold CI machine compiles every
#: kernel of every dtype it runs (minutes for all four); float64 and bfloat16
#: run the same code, checked by the unit tests.  By default float32 alone: the
#: cold compilation of a second dtype's kernels in the subprocess took CI ~100 s.
SELFCHECK_DTYPES = [["float32"], pytest.param(["float32", "float16"], marks=pytest.mark.slow)]


@pytest.mark.parametrize("dtypes", SELFCHECK_DTYPES, ids=lambda d: "+".join(d))
def test_selfcheck_quick_runs_and_reports_every_kernel(dtypes):
    """``python -m nbnorm --quick``: checks pass, every kernel and layout is in the table."""
    proc = subprocess.run([sys.executable, "-c",
                           "import sys; import nbnorm.bench as b; "
                           f"b.DTYPE_SETS['all'] = {dtypes!r}; "
                           "sys.exit(b.main(['--quick', '--rounds', '1']))"],
                          capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "all checks passed" in out
    for kernel in ("forward-train", "forward-infer", "backward-train", "forward-train+relu",
                   "forward-infer+relu", "forward-train+add+relu", "backward-train+relu"):
        for layout in ("NCHW", "NHWC", "NC"):
            rows = [l for l in out.splitlines() if l.split()[:2] == [kernel, layout]]
            assert [l.split()[3] for l in rows] == dtypes, (kernel, layout, out)
            assert all(l.rstrip().split()[-2] == "ok" for l in rows), rows
    assert "nbnorm/copy" in out
    small = [l for l in out.splitlines() if l.startswith("small call ")]
    assert [l.split()[2] for l in small] == ["forward-train", "forward-infer",
                                             "backward-train"], out
    assert all(l.rstrip().split()[-2] == "ok" for l in small), small
    floors = [l for l in out.splitlines() if l.startswith("memory floor")]
    assert len(floors) == len(dtypes) and all(l.count(" = ") == 3 for l in floors)


@pytest.mark.parametrize("stream_min_bytes", [0, 1 << 62], ids=["streamed", "ordinary"])
def test_memory_floor_kernels_touch_every_element(rng, monkeypatch, stream_min_bytes):
    """The floor measurements read (and write) every element, so their times mean
    what the table says, with streaming stores or without."""
    from nbnorm import bench, config

    monkeypatch.setattr(config, "STREAM_MIN_BYTES", stream_min_bytes)
    for dtype in (np.float32, np.float64):
        x = rng.standard_normal((1001, 7)).astype(dtype)
        np.testing.assert_allclose(bench.read_floor(x), x.sum(dtype=np.float64), rtol=1e-5)
        out = np.full((x.size + 1,), np.nan, dtype)[1:].reshape(x.shape)  # off a line
        bench.elementwise_floor(x, out)
        np.testing.assert_array_equal(out, 2 * x)


def test_selfcheck_without_torch():
    """The comparison works where torch is not installed (it is hidden here)."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from nbnorm.bench import main\n"
            "sys.exit(main(['--quick', '--rounds', '1', '--dtype', 'float32']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "torch not installed" in proc.stdout
    assert "all checks passed" in proc.stdout


def test_selfcheck_fails_on_a_wrong_kernel(monkeypatch, capsys):
    """A kernel that returns wrong numbers makes the self-check exit non-zero."""
    from nbnorm import bench
    from nbnorm.cpu import ops

    real = ops.forward_infer

    def wrong(x, weight, bias, eps, running_mean, running_var, out, mean, invstd, **epilogue):
        real(x, weight, bias, eps, running_mean, running_var, out, mean, invstd, **epilogue)
        out[...] += 1e-3

    monkeypatch.setattr(ops, "forward_infer", wrong)
    monkeypatch.setattr(bench, "QUICK_SHAPES", bench.QUICK_SHAPES[2:])
    assert bench.main(["--quick", "--rounds", "1", "--dtype", "float32", "--no-torch"]) == 1
    assert "FAILED" in capsys.readouterr().out


def _benchmark_modules():
    sys.path.insert(0, ROOT)
    try:
        return [importlib.import_module(f"benchmarks.{name[:-3]}")
                for name in sorted(os.listdir(os.path.join(ROOT, "benchmarks")))
                if name.startswith("bench_") and name.endswith(".py")]
    finally:
        sys.path.remove(ROOT)


@pytest.mark.parametrize("half", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["float32", "float32+float16"])
def test_benchmark_methods_run_on_small_params(monkeypatch, half):
    """Every CPU benchmark class: setup and every time_/peakmem_ method, on the
    small shapes (the large ones are the same code); float16 too under slow
    (its kernels' cold compilation, ~60 s of CI, tests nothing the half tests
    do not)."""
    run_dtypes = ("float32", "float16") if half else ("float32",)
    from benchmarks import bench_batchnorm

    b = bench_batchnorm.BatchNorm()
    layouts, dtypes, _ = bench_batchnorm.BatchNorm.params
    methods = [m for m in dir(b) if m.startswith(("time_", "peakmem_"))]
    assert {"time_copy", "time_forward_train", "time_forward_infer", "time_backward_train",
            "peakmem_forward_train"} <= set(methods)
    for layout in layouts:
        for dtype in run_dtypes:  # the others: the same code, compiled again
            assert dtype in dtypes
            b.setup(layout, dtype, "small")
            for m in methods:
                getattr(b, m)(layout, dtype, "small")
    maps = bench_batchnorm.SmallMaps()
    assert maps.params[0] == ["7x7", "4x4", "14x14"]
    for name in maps.params[0]:
        maps.setup(name, "float32", "small")
        assert maps.b.x.shape[0] == 4 and maps.b.x.shape[2:] == (int(name[0:name.index("x")]),) * 2
        for m in methods:
            getattr(maps, m)(name, "float32", "small")
    e = bench_batchnorm.Epilogue()
    fused = [m for m in dir(e) if m.startswith("time_")]
    assert len(fused) == 4 and e.params == b.params
    assert {"float16", "float32", "float64"} <= set(dtypes)
    for layout in layouts:
        for dtype in run_dtypes:
            e.setup(layout, dtype, "small")
            for m in fused:
                getattr(e, m)(layout, dtype, "small")
    s = bench_batchnorm.SmallCall()
    s.setup()
    small = [m for m in dir(s) if m.startswith("time_")]
    assert {"time_forward_train", "time_forward_train_plain", "time_forward_infer",
            "time_backward_train"} <= set(small)
    for m in small:
        getattr(s, m)()


def test_compile_benchmark_code_is_valid():
    """The compile-time benchmark hands asv runnable code (not run here: a cold
    compile takes seconds)."""
    from benchmarks import bench_compile

    c = bench_compile.Compile()
    c.dir = "/nonexistent-cache"
    code = c.timeraw_import_and_first_call("cold")
    compile(code, "<timeraw>", "exec")
    assert "NUMBA_CACHE_DIR" in code and "nbnorm.forward" in code


def test_asv_config():
    with open(os.path.join(ROOT, "asv.conf.json")) as f:
        text = "\n".join(l for l in f if not l.lstrip().startswith("//"))
    conf = json.loads(text)
    assert conf["environment_type"] == "virtualenv"
    assert conf["benchmark_dir"] == "benchmarks"
    assert conf["branches"] == ["main"]
    with open(os.path.join(ROOT, ".gitignore")) as f:
        assert ".asv/" in f.read().split()


@pytest.mark.skipif(shutil.which("asv") is None and
                    not os.path.exists(os.path.join(os.path.dirname(sys.executable), "asv")),
                    reason="asv is not installed (pip install '.[bench]')")
def test_asv_quick_dry_run(tmp_path):
    """``asv run --python=same --quick --dry-run`` discovers the whole suite and runs
    the small-call benchmarks once (the others' methods are run in-process
    above; through asv, the parametrized classes compiled every dtype's kernels
    again in asv's subprocesses, ~100 s of CI)."""
    asv = os.path.join(os.path.dirname(sys.executable), "asv")
    asv = asv if os.path.exists(asv) else shutil.which("asv")
    env = _env(HOME=str(tmp_path), ASV_PYTHONPATH=ROOT, NBNORM_ASV_SIZES="small")
    subprocess.run([asv, "machine", "--yes"], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=120)
    proc = subprocess.run(
        [asv, "run", "--python=same", "--quick", "--dry-run", "--show-stderr",
         "--bench", r"bench_batchnorm\.SmallCall"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "time_forward_train" in out and "SmallCall" in out, out
    assert "failed" not in out.lower(), out


def test_torch_benchmarks_run_and_agree_with_pytorch():
    """bench_torch's classes on the small shapes, timing modules that give
    PyTorch's results."""
    torch = pytest.importorskip("torch")
    from benchmarks import bench_torch
    from nbnorm import bench

    for cls, params in ((bench_torch.ModuleForwardBackward, [("contiguous", "small"),
                                                             ("channels_last", "small")]),
                        (bench_torch.SmallModule, [()]), (bench_torch.ResNetStep, [("small",)])):
        for p in params:
            b = cls()
            b.setup(*p)
            b.time_torch(*p)
            b.time_nbnorm(*p)
    x = torch.randn(bench.QUICK_MODULE_SHAPE).requires_grad_()
    dy = torch.randn(x.shape)
    theirs, ours = bench._module_pair(torch, "BatchNorm2d", x.shape[1])
    assert bench._outputs_err(bench.module_fwd_bwd(torch, ours, x, dy),
                              bench.module_fwd_bwd(torch, theirs, x, dy)) <= bench.MODULE_TOL
    # the table's rows are checked in the self-check (python -m nbnorm --quick)


def test_distributed_bytes_are_counted_and_independent_of_the_batch():
    """What bench_distributed reports as sent: counted on the calls, the header
    and 2C float64 per direction, the same for a batch of 2 and of 64."""
    from benchmarks import bench_distributed
    from nbnorm.distributed import HEADER, message_bytes

    m = bench_distributed.MessageBytes()
    for batch in m.params[1]:
        m.setup(16, batch)
        assert (m.track_forward(16, batch), m.track_backward(16, batch)) == \
            message_bytes(16, 1) == (8 * (HEADER + 32),) * 2


def test_plot_writes_the_table_as_figure_and_numbers(tmp_path, rng):
    """``--plot DIR``'s writer: benchmark.json holds the table's numbers and each
    kernel's floor, benchmark.png is a PNG."""
    pytest.importorskip("matplotlib")
    from nbnorm import bench, plot

    rows = bench.run_case("NCHW", (2, 4, 3, 3), 1, np.dtype(np.float32), 1, None, rng,
                          epilogues=False)
    floors = {"float32": bench.floors([("NCHW", (2, 4, 3, 3), 1)], np.float32, 1, rng)}
    json_path, png_path = plot.write(str(tmp_path / "out"), rows, floors)
    with open(json_path) as f:
        data = json.load(f)
    assert [k["kernel"] for k in data["kernels"]] == list(bench.KERNELS)
    _, rd, ew = floors["float32"][0]
    for k, r in zip(data["kernels"], rows):
        assert k["nbnorm_copies"] == r.nbnorm and k["torch_copies"] is None and k["ok"]
        assert k["floor_copies"] == plot.floor_of(r.kernel, rd, ew)
    with open(png_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_what_to_install(monkeypatch):
    from nbnorm import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot.require_matplotlib()
