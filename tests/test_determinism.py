"""Results are bitwise identical for every thread count (issue 2, item 3).

The reductions are split into parts by the shape only and merged in part order,
so ``NUMBA_NUM_THREADS=1`` and ``2`` must give the same bits.  Each thread count
runs in its own subprocess (Numba fixes the pool size at start-up), on shapes
that split into many parts, both with the shipped ``nbnorm.config`` and with
tiny blocks and parts; the subprocesses report SHA-256 digests of every output.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import nbnorm
from nbnorm import config

# (name, shape, axis, dtype): planar and interleaved shapes large enough for
# several parts with the shipped config.  Each pattern in float64 too: a
# float32 result can round a last-bit difference of the float64 sums away.
CASES = [
    ("planar-f32", (4, 3, 65536), 1, "float32"),
    ("interleaved-f32", (100000, 8), 1, "float32"),
    ("NHWC-f64", (16, 32, 32, 24), -1, "float64"),
    ("planar-f64", (2, 5, 40000), 1, "float64"),
    # C >= config.FUSE_MIN_C: the fused reduce+normalize kernels (one task a channel).
    ("planar-fused-f64", (2, 8, 32768), 1, "float64"),
]
# The same with tiny blocks and parts: many Chan merges on small data, with
# the parallel kernels (SERIAL_MAX=0; small batches otherwise run serially).
SMALL = dict(BLOCK=64, MIN_PART=256, SERIAL_MAX=0)
SMALL_CASES = [
    ("planar-fused-small-f64", (3, 9, 500), 1, "float64"),
    ("planar-small-f64", (5, 3, 1001), 1, "float64"),
    ("interleaved-small-f64", (2001, 7), 1, "float64"),
    ("interleaved-small-f32", (3001, 3), 1, "float32"),
    ("NCHW-small-f32", (3, 4, 17, 19), 1, "float32"),
    ("NHWC-small-f64", (6, 9, 11, 5), -1, "float64"),
    # Short runs: reduced by groups of channels, normalized and differentiated as rows.
    ("NCHW-7x7-small-f32", (40, 12, 7, 7), 1, "float32"),
]

CHILD = r"""
import hashlib, json, sys
import numba
import numpy as np
import nbnorm
from nbnorm import config
from helpers import data, forward_call

spec = json.loads(sys.argv[1])
assert numba.config.NUMBA_NUM_THREADS == spec["threads"], numba.config.NUMBA_NUM_THREADS
for name, value in spec["config"].items():
    setattr(config, name, value)

def digest(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()

report = {}
for i, (name, shape, axis, dtype) in enumerate(spec["cases"]):
    rng = np.random.default_rng(spec["seed"] + i)
    k = forward_call(rng, shape, dtype, axis, outputs=False, loc=7.0, scale=2.0)
    x, w, rm, rv = k["x"], k["weight"], k["running_mean"], k["running_var"]
    dy = data(rng, shape, dtype, loc=0.0, scale=1.0)
    f = nbnorm.forward(**k)
    g = nbnorm.backward(dy, x, f.mean, f.invstd, w, axis=axis)
    fi = nbnorm.forward(**{**k, "training": False})
    gi = nbnorm.backward(dy, x, fi.mean, fi.invstd, w, training=False, axis=axis)
    arrays = dict(out=f.out, mean=f.mean, invstd=f.invstd, running_mean=rm,
                  running_var=rv, grad_input=g.grad_input, grad_weight=g.grad_weight,
                  grad_bias=g.grad_bias, infer_out=fi.out, infer_grad_input=gi.grad_input,
                  infer_grad_weight=gi.grad_weight, infer_grad_bias=gi.grad_bias)
    report[name] = {k: digest(v) for k, v in arrays.items()}
print(json.dumps(report))
"""


def _run(threads, cases, cfg, seed):
    env = dict(os.environ)
    env["NUMBA_NUM_THREADS"] = str(threads)
    root = os.path.dirname(os.path.dirname(os.path.abspath(nbnorm.__file__)))
    tests = os.path.dirname(os.path.abspath(__file__))  # for helpers
    env["PYTHONPATH"] = os.pathsep.join(p for p in [root, tests, env.get("PYTHONPATH")] if p)
    spec = dict(threads=threads, cases=cases, config=cfg, seed=seed)
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _parts(shape, axis):
    from nbnorm.cpu import stats

    axis %= len(shape)
    outer = int(np.prod(shape[:axis]))
    inner = int(np.prod(shape[axis + 1:]))
    if inner > 1:
        return stats.planar_parts(outer, shape[axis], inner)
    return stats.interleaved_split(outer, shape[axis])[1]


def test_cases_split_into_parts(monkeypatch):
    """The shapes below really are reduced in several parts (else the test is moot)."""
    for _, shape, axis, _ in CASES:
        assert _parts(shape, axis) > 1, shape
    for name, value in SMALL.items():
        monkeypatch.setattr(config, name, value)
    for _, shape, axis, _ in SMALL_CASES:
        assert _parts(shape, axis) > 1, shape


@pytest.mark.parametrize("cases,cfg", [(CASES, {}), (SMALL_CASES, SMALL)],
                         ids=["config", "small-blocks"])
def test_bitwise_identical_across_thread_counts(rng, cases, cfg):
    seed = int(rng.integers(2**31))
    one = _run(1, cases, cfg, seed)
    two = _run(2, cases, cfg, seed)
    assert set(one) == {name for name, *_ in cases}
    differ = {name: [k for k in one[name] if one[name][k] != two[name][k]] for name in one}
    differ = {name: keys for name, keys in differ.items() if keys}
    assert not differ, f"differ between 1 and 2 threads: {differ}"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(40, 12, 7, 7), (3, 5, 1001), (200, 3, 4, 4)],
                         ids=["7x7", "long-runs", "4x4"])
def test_planar_channel_groups_change_no_bits(rng, monkeypatch, shape, dtype):
    """The parallel planar reductions give bitwise the same per-channel results for
    every group size (``stats.planar_group`` is free to tune), with blocks and
    parts that split runs, and equal the serial kernels' bits."""
    from nbnorm.cpu import backward as bwd, stats

    monkeypatch.setattr(config, "BLOCK", 60)  # not a multiple of 49, 1001 or 16
    monkeypatch.setattr(config, "MIN_PART", 150)
    outer, C = shape[:2]
    x = (rng.standard_normal(shape) * 2.0 + 7.0).astype(dtype).reshape(outer, C, -1)
    dy = rng.standard_normal(x.shape).astype(dtype)
    parts = stats.planar_parts(*x.shape)
    assert parts > 1 and -(-outer * x.shape[2] // parts) % x.shape[2]  # parts split runs
    mean, m2 = np.empty(C), np.empty(C)
    stats.channel_stats_planar_serial(x, parts, config.BLOCK, mean, m2)
    ref = x.reshape(outer, C, -1).transpose(1, 0, 2).reshape(C, -1).astype(np.float64)
    np.testing.assert_allclose(mean, ref.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(m2, ((ref - ref.mean(axis=1, keepdims=True)) ** 2).sum(axis=1),
                               rtol=1e-9)
    s, sx = np.empty(C), np.empty(C)
    bwd._planar_channel_dual_sums(dy, None, x, 0, C, parts, mean, s, sx)
    for group in range(1, C + 1):
        gm, gq, gs, gsx = (np.full(C, np.nan) for _ in range(4))
        stats.channel_stats_planar(x, parts, config.BLOCK, group, gm, gq)
        bwd.backward_reduce_planar(dy, None, x, mean, parts, group, gs, gsx)
        for name, a, e in [("mean", gm, mean), ("M2", gq, m2), ("sum_dy", gs, s),
                           ("sum_dy_xmu", gsx, sx)]:
            assert a.tobytes() == e.tobytes(), f"{name}, groups of {group}"
