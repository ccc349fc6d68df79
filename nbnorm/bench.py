"""``python -m nbnorm``: check every CPU kernel against the reference, then time it.

Each kernel (forward in training and inference mode, backward in training mode;
planar and interleaved layouts) runs on a realistic batch, is compared with the
float64 ``nbnorm.reference`` on the same data, and is timed as a ratio to
``np.copyto`` of the same array and to PyTorch's ``batch_norm`` (when torch is
importable), all in this process, interleaved round by round, so that the
ratios survive a noisy machine better than absolute times do (DESIGN.md §4).
The exit status is 1 when a check fails.

    python -m nbnorm                 # the issue-3 shapes, every dtype, with the epilogues
    python -m nbnorm --quick         # small shapes, a few rounds (tests, CI)
    python -m nbnorm --dtype float32 --rounds 21 --no-torch
    python -m nbnorm --plot DIR      # also DIR/benchmark.png and DIR/benchmark.json

Half dtypes' ratios are to the copy of the 2-byte array.  The epilogue rows
(``+relu``, ``+add+relu``) are compared with PyTorch's unfused sequence
(``relu(batch_norm(x) + r)``; backward: ``threshold_backward`` then
``native_batch_norm_backward``).
"""

import argparse
import os
import platform
import sys
import time
from typing import NamedTuple

import numpy as np
from numba import njit, prange

import nbnorm
from nbnorm import dtypes, reference
from nbnorm.cpu import ops
from nbnorm.cpu.forward import _normalize_run, task_split
from nbnorm.cpu.streaming import fence

#: (name, shape, axis): the shapes of issue 3, all 51 MB (NC: 34 MB) in float32.
SHAPES = [("NCHW", (64, 64, 56, 56), 1),
          ("NHWC", (64, 56, 56, 64), -1),
          ("NC", (8192, 1024), 1)]
QUICK_SHAPES = [("NCHW", (8, 16, 24, 24), 1),
                ("NHWC", (8, 24, 24, 16), -1),
                ("NC", (512, 128), 1)]
#: The small call: float32, nothing preallocated, per-call overhead dominates.
SMALL_SHAPE = (32, 64)

#: Tolerance of a check, relative to the largest magnitude of the reference
#: result: both compute in float64 from the same data, so only the rounding of
#: the output dtype and the summation order differ.
#: Half outputs: one rounding of the format (float16 2^-11, bfloat16 2^-8) with margin.
TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-10, "float16": 2e-3,
       "bfloat16": 1.6e-2}

KERNELS = ("forward-train", "forward-infer", "backward-train")
#: The fused epilogues: kernel -> (the kernel without them, activation, residual).
EPILOGUES = {"forward-train+relu": ("forward-train", "relu", False),
             "forward-infer+relu": ("forward-infer", "relu", False),
             "forward-train+add+relu": ("forward-train", "relu", True),
             "backward-train+relu": ("backward-train", "relu", False)}


#: ``--dtype both`` and ``--dtype all``.
DTYPE_SETS = {"both": ["float32", "float64"], "all": ["float32", "float64", "float16", "bfloat16"]}


def _tol(dtype):
    return TOL.get(dtype, TOL.get(dtype.name))


def _dtype(name):
    """A dtype by name; ``bfloat16`` needs ml_dtypes (None when it is not installed)."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            return None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class Row(NamedTuple):
    kernel: str
    layout: str
    shape: tuple
    dtype: str
    copy_s: float        # median seconds of np.copyto
    nbnorm: float        # median ratio to copy
    torch: float         # median ratio to copy (nan without torch)
    error: float         # largest relative deviation from the reference
    ok: bool


# ------------------------------------------------------------------- timing

def _ratios(fns, rounds, inner=1, warmup=None):
    """Median seconds of each function and median per-round ratios to ``fns[0]``.

    Every round runs each function ``inner`` times (median taken), one after the
    other, so that all see the same machine state.  ``warmup`` untimed rounds
    come first (default: a third of ``rounds``, at least 2), so that first-touch
    page faults of fresh arrays, waking the thread pool and filling the caches
    stay out of the timed rounds: the table reports the steady state.
    """
    if warmup is None:
        warmup = max(2, rounds // 3)
    for _ in range(warmup):
        for f in fns:
            f()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for k, f in enumerate(fns):
            ts = []
            for _ in range(inner):
                t0 = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t0)
            times[k].append(float(np.median(ts)))
    t = np.array(times)
    return np.median(t, axis=1), np.median(t / t[0], axis=1)


def _per_call(f, number):
    t0 = time.perf_counter()
    for _ in range(number):
        f()
    return (time.perf_counter() - t0) / number


# ------------------------------------------------------------------ floors
# What the memory allows, measured like the kernels (2 threads, ratio to the
# copy): reading x once, and one elementwise pass x -> out.  An interleaved
# (NHWC, NC) forward-train must do both, so read + elementwise is its floor;
# a table cell near it has nothing left to gain.

@njit(cache=True, fastmath=True)
def _sum_run(r):
    s = 0.0
    for i in range(r.size):
        s += r[i]
    return s


@njit(parallel=True, cache=True)
def read_floor(x):
    """Reads every element of ``x`` once (a parallel sum)."""
    f = x.reshape(-1)
    n = f.size
    tasks = 64
    step = -(-n // tasks)
    acc = np.zeros(tasks)
    for t in prange(tasks):
        acc[t] = _sum_run(f[min(n, t * step):min(n, (t + 1) * step)])
    return acc.sum()


@njit(parallel=True, cache=True)
def _elementwise(x, out, stream, tasks, step):
    f = x.reshape(-1)
    g = out.reshape(-1)
    n = f.size
    for t in prange(tasks):
        a = f[min(n, t * step):min(n, (t + 1) * step)]
        b = g[min(n, t * step):min(n, (t + 1) * step)]
        _normalize_run(a, None, b, 0.0, 2.0, 0.0, None, stream)
        if stream:
            fence()


def elementwise_floor(x, out):
    """``out = 2 * x``: one read and one write of every element, in parallel, with
    the normalizing pass's arithmetic and, where the kernels would use them
    (``ops._stream``), its streaming stores."""
    _elementwise(x, out, ops._stream(out), *task_split(x.size, 1))


def floors(shapes, dtype, rounds, rng):
    """``[(layout, read x / copy, elementwise / copy)]`` for each shape."""
    rows = []
    for name, shape, _ in shapes:
        x = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
        out = np.empty_like(x)
        xk, outk = dtypes.kernel_view(x), dtypes.kernel_view(out)  # half data as bits
        _, r = _ratios([lambda: np.copyto(out, x), lambda: read_floor(xk),
                        lambda: elementwise_floor(xk, outk)], rounds)
        rows.append((name, float(r[1]), float(r[2])))
    return rows


def format_floors(dtype, rows):
    cells = ", ".join(f"{n} {rd:.2f} + {ew:.2f} = {rd + ew:.2f}" for n, rd, ew in rows)
    return (f"memory floor, {dtype} (x copy; read x + elementwise x->out, the least "
            f"a two-pass forward-train can take): {cells}")


# -------------------------------------------------------------------- torch

def _torch(threads):
    """torch with ``threads`` intra-op threads, or None when it is not installed."""
    if os.environ.get("NBNORM_BENCH_NO_TORCH"):
        return None
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    return torch


def _torch_layouts(torch, x, axis):
    """The tensor views of ``x`` torch can take: its own layout for the data and,
    for channels-last data, a contiguous NCHW copy (torch's "best layout" is the
    faster of the two)."""
    t = _tensor(torch, x)
    if x.ndim > 2 and axis % x.ndim == x.ndim - 1:  # NHWC data: channels_last view
        nchw = t.permute(0, x.ndim - 1, *range(1, x.ndim - 1))
        return [nchw, nchw.contiguous()]
    return [t]


def _tensor(torch, a):
    """A tensor sharing ``a``'s memory (bfloat16 through its int16 bits)."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _torch_fns(torch, x, dy, axis, params, r=None):
    """Callables running torch's forward-train, forward-infer, backward-train and
    the unfused epilogue sequences, one list (one per layout) each."""
    w, b, rm, rv, eps = params
    F = torch.nn.functional
    tw, tb = torch.from_numpy(w), torch.from_numpy(b)
    trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    fns = {k: [] for k in (*KERNELS, *EPILOGUES)}
    tr = _tensor(torch, r) if r is not None else None
    if tr is not None and tr.dim() > 2 and axis % tr.dim() == tr.dim() - 1:
        tr = tr.permute(0, tr.dim() - 1, *range(1, tr.dim() - 1))
    for tx, tdy in zip(_torch_layouts(torch, x, axis), _torch_layouts(torch, dy, axis)):
        if tdy.stride() != tx.stride():
            tdy = tdy.contiguous(memory_format=torch.channels_last) if tx.dim() == 4 \
                else tdy.contiguous()
        _, smean, sinv = torch.ops.aten.native_batch_norm(tx, tw, tb, trm, trv, True, 0.1, eps)
        fns["forward-train"].append(
            lambda tx=tx: F.batch_norm(tx, trm, trv, tw, tb, training=True, eps=eps))
        fns["forward-infer"].append(
            lambda tx=tx: F.batch_norm(tx, trm, trv, tw, tb, training=False, eps=eps))
        fns["backward-train"].append(
            lambda tx=tx, tdy=tdy, sm=smean, si=sinv: torch.ops.aten.native_batch_norm_backward(
                tdy, tx, tw, trm, trv, sm, si, True, eps, [True, True, True]))
        ty = torch.relu(F.batch_norm(tx, trm.clone(), trv.clone(), tw, tb, training=True,
                                     eps=eps))
        fns["forward-train+relu"].append(
            lambda tx=tx: torch.relu(F.batch_norm(tx, trm, trv, tw, tb, training=True, eps=eps)))
        fns["forward-infer+relu"].append(
            lambda tx=tx: torch.relu(F.batch_norm(tx, trm, trv, tw, tb, training=False,
                                                  eps=eps)))
        if tr is not None:
            fns["forward-train+add+relu"].append(
                lambda tx=tx: torch.relu(F.batch_norm(tx, trm, trv, tw, tb, training=True,
                                                      eps=eps) + tr))
        fns["backward-train+relu"].append(
            lambda tx=tx, tdy=tdy, ty=ty, sm=smean, si=sinv:
            torch.ops.aten.native_batch_norm_backward(
                torch.ops.aten.threshold_backward(tdy, ty, 0), tx, tw, trm, trv, sm, si, True,
                eps, [True, True, True]))
    return fns


# ------------------------------------------------------------------- checks

def _rel_err(actual, expected):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(1.0, float(np.max(np.abs(expected))))
    return float(np.max(np.abs(actual - expected))) / scale


def _check_forward(training, x, axis, params, res, activation=None, residual=None):
    """Largest relative deviation of ``res`` (nbnorm's ForwardResult) from the reference."""
    w, b, rm, rv, eps = params
    exp = reference.forward(x, w, b, rm, rv, training=training, eps=eps, axis=axis,
                            activation=activation, residual=residual)
    return max(_rel_err(a, e) for a, e in zip(res, (exp.out, exp.mean, exp.invstd)))


def _check_backward(x, dy, axis, mean, invstd, w, res, activation=None, forward_out=None):
    exp = reference.backward(dy, x, mean, invstd, w, axis=axis, activation=activation,
                             forward_out=forward_out)
    return max(_rel_err(a, e) for a, e in zip(res, exp))


# -------------------------------------------------------------------- cases

def run_case(name, shape, axis, dtype, rounds, torch, rng, inner=1, epilogues=True):
    """Check and time the kernels (and the fused epilogues) on one batch; a list
    of ``Row``."""
    dtype = np.dtype(dtype)
    pdt = np.dtype(np.float32) if dtype.itemsize == 2 else dtype  # parameters, statistics
    C = shape[axis]
    x = (rng.standard_normal(shape, dtype=np.float32) * 2.0 + 3.0).astype(dtype)
    dy = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    r = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    w = rng.uniform(0.5, 1.5, C).astype(pdt)
    b = rng.uniform(-1.0, 1.0, C).astype(pdt)
    rm = rng.uniform(2.0, 4.0, C).astype(pdt)
    rv = rng.uniform(3.0, 5.0, C).astype(pdt)
    eps = 1e-5
    params = (w, b, rm, rv, eps)
    out = np.full(shape, np.nan, dtype)
    gi = np.full(shape, np.nan, dtype)
    gr = np.full(shape, np.nan, dtype)
    y = np.empty_like(x)  # the forward output the ReLU backward reads its mask from
    mean, invstd = np.empty(C, pdt), np.empty(C, pdt)
    gw, gb = np.empty(C, pdt), np.empty(C, pdt)
    run_rm, run_rv = rm.copy(), rv.copy()

    nb = {
        "forward-train": lambda: nbnorm.forward(
            x, w, b, run_rm, run_rv, training=True, eps=eps, axis=axis,
            out=out, mean=mean, invstd=invstd),
        "forward-infer": lambda: nbnorm.forward(
            x, w, b, rm, rv, training=False, eps=eps, axis=axis,
            out=out, mean=mean, invstd=invstd),
        "backward-train": lambda: nbnorm.backward(
            dy, x, mean, invstd, w, training=True, axis=axis,
            grad_input=gi, grad_weight=gw, grad_bias=gb),
        "forward-train+relu": lambda: nbnorm.forward(
            x, w, b, run_rm, run_rv, training=True, eps=eps, axis=axis,
            out=out, mean=mean, invstd=invstd, activation="relu"),
        "forward-infer+relu": lambda: nbnorm.forward(
            x, w, b, rm, rv, training=False, eps=eps, axis=axis,
            out=out, mean=mean, invstd=invstd, activation="relu"),
        "forward-train+add+relu": lambda: nbnorm.forward(
            x, w, b, run_rm, run_rv, training=True, eps=eps, axis=axis,
            out=out, mean=mean, invstd=invstd, activation="relu", residual=r),
        "backward-train+relu": lambda: nbnorm.backward(
            dy, x, mean, invstd, w, training=True, axis=axis, grad_input=gi,
            grad_weight=gw, grad_bias=gb, activation="relu", forward_out=y, grad_residual=gr),
    }
    tfns = _torch_fns(torch, x, dy, axis, params, r) if torch is not None else None

    rows = []
    for kernel in KERNELS + (tuple(EPILOGUES) if epilogues else ()):
        base, act, add = EPILOGUES.get(kernel, (kernel, None, False))
        if base == "backward-train":
            nbnorm.forward(x, w, b, eps=eps, axis=axis, mean=mean, invstd=invstd, out=y,
                           activation=act)
            res = nb[kernel]()
            err = _check_backward(x, dy, axis, mean.copy(), invstd.copy(), w, res, act,
                                  y if act else None)
        else:
            res = nb[kernel]()
            err = _check_forward(base == "forward-train", x, axis, params, res, act,
                                 r if add else None)
        ok = err <= _tol(dtype)
        fns = [lambda: np.copyto(out if base != "backward-train" else gi, x), nb[kernel]]
        if tfns is not None and tfns[kernel]:
            for f in tfns[kernel]:
                f()  # warm up each layout
            fns += tfns[kernel]
        secs, ratios = _ratios(fns, rounds, inner)
        t_ratio = float(min(ratios[2:])) if len(ratios) > 2 else float("nan")
        rows.append(Row(kernel, name, shape, dtype.name, float(secs[0]), float(ratios[1]),
                        t_ratio, err, ok))
    return rows


def small_calls(torch, rounds, number):
    """Microseconds per call of each kernel on a (32, 64) float32 batch with nothing
    preallocated (weight, bias and running statistics given), nbnorm and torch
    alternating round by round: ``[(kernel, nbnorm, torch or nan, error)]``."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(SMALL_SHAPE, dtype=np.float32)
    dy = rng.standard_normal(SMALL_SHAPE, dtype=np.float32)
    C = SMALL_SHAPE[1]
    w, b = rng.uniform(0.5, 1.5, C).astype(np.float32), rng.uniform(-1, 1, C).astype(np.float32)
    rm, rv = rng.uniform(-1, 1, C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)
    eps = 1e-5
    params = (w, b, rm, rv, eps)
    fwd = nbnorm.forward(x, w, b, eps=eps)
    nb = {
        "forward-train": lambda: nbnorm.forward(x, w, b, rm, rv, eps=eps),
        "forward-infer": lambda: nbnorm.forward(x, w, b, rm, rv, training=False, eps=eps),
        "backward-train": lambda: nbnorm.backward(dy, x, fwd.mean, fwd.invstd, w),
    }
    err = {"forward-train": _check_forward(True, x, 1, params, nb["forward-train"]()),
           "forward-infer": _check_forward(False, x, 1, params, nb["forward-infer"]()),
           "backward-train": _check_backward(x, dy, 1, fwd.mean, fwd.invstd, w,
                                             nb["backward-train"]())}
    tfns = _torch_fns(torch, x, dy, 1, params) if torch is not None else None
    rows = []
    for kernel in KERNELS:
        fns = [nb[kernel]] + ([tfns[kernel][0]] if tfns is not None else [])
        us = [[] for _ in fns]
        for _ in range(rounds):
            for k, f in enumerate(fns):
                us[k].append(_per_call(f, number) * 1e6)
        med = [float(np.median(u)) for u in us]
        rows.append((kernel, med[0], med[1] if tfns is not None else float("nan"),
                     err[kernel]))
    return rows


# ------------------------------------------------------- nbnorm.torch modules
#: The modules' batch (issue 15): a ResNet stage's BatchNorm2d input, float32.
MODULE_SHAPE = (32, 64, 56, 56)
QUICK_MODULE_SHAPE = (8, 16, 24, 24)
#: The training step's data: (batch, channels, side) of CIFAR-sized images.
STEP_DATA = (32, 3, 32)
QUICK_STEP_DATA = (4, 3, 16)


def small_resnet(torch, width=16, classes=10):
    """A ResNet-style CNN (stem, two residual stages of basic blocks, pooling,
    linear head) with ``torch.nn.BatchNorm2d`` after every convolution."""
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, c_in, c_out, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(c_out)
            self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(c_out)
            self.shortcut = nn.Sequential()
            if stride != 1 or c_in != c_out:
                self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                              nn.BatchNorm2d(c_out))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))

    return nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                         nn.ReLU(), Block(width, width, 1), Block(width, 2 * width, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes))


def module_fwd_bwd(torch, module, x, dy):
    """One forward+backward of ``module`` through autograd: ``(out, grads of x,
    weight, bias)`` (``autograd.grad``, so nothing accumulates between calls)."""
    y = module(x)
    return (y, *torch.autograd.grad(y, (x, module.weight, module.bias), dy))


def _module_pair(torch, cls_name, C):
    import nbnorm.torch as nt
    theirs = getattr(torch.nn, cls_name)(C)
    ours = getattr(nt, cls_name)(C)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _outputs_err(a, b):
    return max(_rel_err(u.detach().numpy(), v.detach().numpy()) for u, v in zip(a, b))


def training_steps(torch, data_shape, seed=0):
    """Two training-step callables of the same small ResNet from the same
    weights, ``(PyTorch's BN, nbnorm.torch.convert)``, each a step of SGD on
    its own copy, and the relative difference of their first losses."""
    import copy

    import nbnorm.torch as nt
    torch.manual_seed(seed)
    N, c_in, side = data_shape
    theirs = small_resnet(torch)
    ours = nt.convert(copy.deepcopy(theirs))
    x = torch.randn(N, c_in, side, side)
    labels = torch.randint(0, 10, (N,))
    steps = []
    losses = []
    for model in (theirs, ours):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x), labels)
            loss.backward()
            opt.step()
            return loss.item()
        steps.append(step)
        losses.append(step())
    return steps[0], steps[1], abs(losses[0] - losses[1]) / max(1.0, abs(losses[0]))


def torch_module_rows(torch, rounds, quick=False):
    """nbnorm.torch's modules against torch.nn's, through autograd (issue 15):
    ``[(case, torch seconds, nbnorm seconds, torch/nbnorm, error)]`` for
    BatchNorm2d forward+backward in both memory formats, the (32, 64) small
    call and the small ResNet's training step.  Contenders alternate round by
    round; the ratio is the median of the rounds' ratios."""
    rows = []
    shape = QUICK_MODULE_SHAPE if quick else MODULE_SHAPE
    for fmt_name, fmt in (("contiguous", torch.contiguous_format),
                          ("channels_last", torch.channels_last)):
        gen = torch.Generator().manual_seed(2)
        x = (torch.randn(shape, generator=gen) * 2 + 3).to(memory_format=fmt).requires_grad_()
        dy = torch.randn(shape, generator=gen).to(memory_format=fmt)
        theirs, ours = _module_pair(torch, "BatchNorm2d", shape[1])
        err = _outputs_err(module_fwd_bwd(torch, ours, x, dy), module_fwd_bwd(torch, theirs, x, dy))
        secs, r = _ratios([lambda: module_fwd_bwd(torch, theirs, x, dy),
                           lambda: module_fwd_bwd(torch, ours, x, dy)], rounds)
        rows.append((f"BatchNorm2d fwd+bwd {'x'.join(map(str, shape))} {fmt_name}",
                     float(secs[0]), float(secs[1]), 1.0 / float(r[1]), err))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(SMALL_SHAPE, generator=gen).requires_grad_()
    dy = torch.randn(SMALL_SHAPE, generator=gen)
    theirs, ours = _module_pair(torch, "BatchNorm1d", SMALL_SHAPE[1])
    err = _outputs_err(module_fwd_bwd(torch, ours, x, dy), module_fwd_bwd(torch, theirs, x, dy))
    number = 50 if quick else 500
    fns = [lambda: module_fwd_bwd(torch, theirs, x, dy), lambda: module_fwd_bwd(torch, ours, x, dy)]
    secs, r = _ratios([lambda f=f: _per_call(f, number) for f in fns], rounds)
    rows.append((f"BatchNorm1d fwd+bwd {'x'.join(map(str, SMALL_SHAPE))} per call",
                 float(secs[0]) / number, float(secs[1]) / number, 1.0 / float(r[1]), err))
    data = QUICK_STEP_DATA if quick else STEP_DATA
    step_theirs, step_ours, err = training_steps(torch, data)
    secs, r = _ratios([step_theirs, step_ours], rounds)
    rows.append((f"small ResNet SGD step, batch {data[0]}x{data[1]}x{data[2]}x{data[2]}",
                 float(secs[0]), float(secs[1]), 1.0 / float(r[1]), err))
    return rows


#: A module row passes its check when nbnorm's results are PyTorch's up to
#: float32 rounding in different summation orders (the step: its first loss).
MODULE_TOL = 1e-4


def format_module_rows(rows):
    head = (f"{'module (autograd, float32)':<52} {'torch ms':>9} {'nbnorm ms':>9} "
            f"{'torch/nbnorm':>12}  check")
    out = [head, "-" * len(head)]
    for name, t, nb, ratio, err in rows:
        out.append(f"{name:<52} {t * 1e3:>9.3f} {nb * 1e3:>9.3f} {ratio:>12.2f}  "
                   f"{'ok' if err <= MODULE_TOL else 'FAILED'} ({err:.1e})")
    return "\n".join(out)


# ----------------------------------------------------- group, layer, RMS norm
#: (name, shape, call): issue 17's normalizations; call is (kind, axis or
#: normalized_shape, groups).
NORM_SHAPES = [("GroupNorm(32,256) NCHW", (32, 256, 28, 28), ("group", 1, 32)),
               ("GroupNorm(32,256) NHWC", (32, 28, 28, 256), ("group", -1, 32)),
               ("LayerNorm(1024)", (8192, 1024), ("layer", 1024, None)),
               ("RMSNorm(4096)", (2048, 4096), ("rms", 4096, None))]
QUICK_NORM_SHAPES = [("GroupNorm(4,16) NCHW", (4, 16, 8, 8), ("group", 1, 4)),
                     ("GroupNorm(4,16) NHWC", (4, 8, 8, 16), ("group", -1, 4)),
                     ("LayerNorm(128)", (256, 128), ("layer", 128, None)),
                     ("RMSNorm(256)", (128, 256), ("rms", 256, None))]


def _norm_calls(kind, arg, groups, x, dy, w, b):
    """nbnorm's forward and backward callables of one normalization and their
    float64 reference errors."""
    if kind == "group":
        fwd = lambda: nbnorm.group_norm(x, groups, w, b, axis=arg)  # noqa: E731
        f = fwd()
        bwd = lambda: nbnorm.group_norm_backward(dy, x, f.mean, f.invstd, w, axis=arg)  # noqa
        ref = reference.group_norm(x, groups, w, b, axis=arg)
        rb = reference.group_norm_backward(dy, x, f.mean, f.invstd, w, axis=arg)
    elif kind == "layer":
        fwd = lambda: nbnorm.layer_norm(x, arg, w, b)  # noqa: E731
        f = fwd()
        bwd = lambda: nbnorm.layer_norm_backward(dy, x, f.mean, f.invstd, w)  # noqa: E731
        ref = reference.layer_norm(x, arg, w, b)
        rb = reference.layer_norm_backward(dy, x, f.mean, f.invstd, w)
    else:
        fwd = lambda: nbnorm.rms_norm(x, arg, w, 1e-5)  # noqa: E731
        f = fwd()
        bwd = lambda: nbnorm.rms_norm_backward(dy, x, f.invrms, w)  # noqa: E731
        ref = reference.rms_norm(x, arg, w, 1e-5)
        rb = reference.rms_norm_backward(dy, x, f.invrms, w)
    errs = (_rel_err(f.out, ref.out), max(_rel_err(a, e) for a, e in zip(bwd(), rb)))
    return fwd, bwd, errs


def _torch_norm_calls(torch, kind, arg, groups, x, dy, w, b):
    """torch's forward and backward (autograd, graph kept) of the same call."""
    F = torch.nn.functional
    tdt = _tensor(torch, x).dtype
    tx = _tensor(torch, x)
    tdy = _tensor(torch, dy)
    if kind == "group" and arg % x.ndim == x.ndim - 1:  # NHWC data: a channels_last view
        tx, tdy = (t.permute(0, x.ndim - 1, *range(1, x.ndim - 1)) for t in (tx, tdy))
    tx.requires_grad_()
    tw = torch.from_numpy(w).to(tdt).requires_grad_()
    tb = None if b is None else torch.from_numpy(b).to(tdt).requires_grad_()
    if kind == "group":
        fwd = lambda: F.group_norm(tx, groups, tw, tb)  # noqa: E731
    elif kind == "layer":
        fwd = lambda: F.layer_norm(tx, (arg,), tw, tb)  # noqa: E731
    else:
        fwd = lambda: F.rms_norm(tx, (arg,), tw, 1e-5)  # noqa: E731
    y = fwd()
    inputs = (tx, tw) if tb is None else (tx, tw, tb)

    def forward():
        with torch.no_grad():
            return fwd()

    def backward():
        return torch.autograd.grad(y, inputs, tdy, retain_graph=True)
    return forward, backward


def norm_rows(shapes, dtype, rounds, torch, rng):
    """``[(name, dtype, direction, nbnorm/copy, torch/copy, floor/copy, error)]``:
    group, layer and RMS norm forward and backward against ``np.copyto`` of
    ``x``, PyTorch and the memory floor (forward: read x + elementwise x->out;
    backward: read x and dy, then dy, x -> dx, the two passes' least traffic)."""
    rows = []
    for name, shape, (kind, arg, groups) in shapes:
        pdt = np.dtype(np.float32) if dtype.itemsize == 2 else dtype
        x = (rng.standard_normal(shape, dtype=np.float32) * 2.0 + 3.0).astype(dtype)
        dy = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
        P = shape[arg] if kind == "group" else arg
        w = rng.uniform(0.5, 1.5, P).astype(pdt)
        b = None if kind == "rms" else rng.uniform(-1, 1, P).astype(pdt)
        out = np.empty_like(x)
        fwd, bwd, errs = _norm_calls(kind, arg, groups, x, dy, w, b)
        xk, outk, dyk = dtypes.kernel_view(x), dtypes.kernel_view(out), dtypes.kernel_view(dy)
        copy = lambda: np.copyto(out, x)  # noqa: E731
        floor_f = lambda: (read_floor(xk), elementwise_floor(xk, outk))  # noqa: E731
        floor_b = lambda: (read_floor(xk), read_floor(dyk), read_floor(dyk),  # noqa: E731
                           elementwise_floor(xk, outk))
        tf = tb = None
        if torch is not None:
            tf, tb = _torch_norm_calls(torch, kind, arg, groups, x, dy, w, b)
        for direction, nb, floor, tfn, err in (("forward", fwd, floor_f, tf, errs[0]),
                                               ("backward", bwd, floor_b, tb, errs[1])):
            fns = [copy, nb, floor] + ([tfn] if tfn is not None else [])
            _, r = _ratios(fns, rounds)
            rows.append((name, dtype.name, direction, float(r[1]),
                         float(r[3]) if tfn is not None else float("nan"), float(r[2]), err))
    return rows


def format_norm_rows(rows):
    head = (f"{'normalization':<24} {'dtype':<8} {'pass':<8} {'nbnorm/copy':>11} "
            f"{'torch/copy':>10} {'floor/copy':>10} {'nbnorm/floor':>12} "
            f"{'nbnorm/torch':>12}  check")
    out = [head, "-" * len(head)]
    for name, dt, d, nb, t, fl, err in rows:
        ok = err <= _tol(np.dtype(_dtype(dt)))
        out.append(f"{name:<24} {dt:<8} {d:<8} {nb:>11.2f} {_fmt(t):>10} {fl:>10.2f} "
                   f"{nb / fl:>12.2f} {_fmt(nb / t):>12}  {'ok' if ok else 'FAILED'} "
                   f"({err:.1e})")
    return "\n".join(out)


# ------------------------------------------------------------------- output

def _header(torch, no_torch="torch not installed"):
    import numba

    try:
        layer = numba.threading_layer()
    except ValueError:
        layer = "not chosen yet"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [f"nbnorm {nbnorm.__version__}, numba {numba.__version__} "
             f"({numba.get_num_threads()} threads, {layer} layer), numpy {np.__version__}, "
             + (f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
                if torch is not None else no_torch),
             f"CPU: {cpu}, {os.cpu_count()} logical CPUs"]
    return "\n".join(lines)


def _fmt(v, spec="{:.2f}"):
    return "-" if v != v else spec.format(v)


def format_rows(rows):
    head = (f"{'kernel':<15} {'layout':<6} {'shape':<15} {'dtype':<8} {'copy ms':>8} "
            f"{'nbnorm/copy':>11} {'torch/copy':>10} {'nbnorm/torch':>12}  check")
    out = [head, "-" * len(head)]
    for r in rows:
        shape = "x".join(map(str, r.shape))
        vs_torch = r.nbnorm / r.torch if r.torch == r.torch else float("nan")
        out.append(f"{r.kernel:<15} {r.layout:<6} {shape:<15} {r.dtype:<8} "
                   f"{r.copy_s * 1e3:>8.3f} {r.nbnorm:>11.2f} {_fmt(r.torch):>10} "
                   f"{_fmt(vs_torch):>12}  {'ok' if r.ok else 'FAILED'} ({r.error:.1e})")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m nbnorm", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small shapes and few rounds: a check that everything runs")
    p.add_argument("--dtype", default="all",
                   choices=["float32", "float64", "float16", "bfloat16", "both", "all"],
                   help="both: float32 and float64; all (default): with float16 and "
                        "bfloat16 (when ml_dtypes is installed)")
    p.add_argument("--no-epilogues", action="store_true",
                   help="leave out the fused ReLU / residual rows")
    p.add_argument("--rounds", type=int, default=None,
                   help="timing rounds per kernel (default 11, 3 with --quick)")
    p.add_argument("--no-torch", action="store_true", help="do not time PyTorch")
    p.add_argument("--plot", metavar="DIR",
                   help="also write the table as DIR/benchmark.png (a bar chart of "
                        "copy-times against the memory floor and PyTorch; needs matplotlib) "
                        "and its numbers as DIR/benchmark.json")
    args = p.parse_args(argv)
    if args.plot:
        from . import plot
        plot.require_matplotlib()  # before minutes of timing

    import numba

    rounds = args.rounds or (3 if args.quick else 11)
    torch = None if args.no_torch else _torch(numba.get_num_threads())
    dtypes = DTYPE_SETS.get(args.dtype, [args.dtype])
    dtypes = [d for d in dtypes if _dtype(d) is not None]
    shapes = QUICK_SHAPES if args.quick else SHAPES
    rng = np.random.default_rng(0)

    rows = []
    for dtype in dtypes:
        for name, shape, axis in shapes:
            rows += run_case(name, shape, axis, _dtype(dtype), rounds, torch, rng,
                             inner=5 if args.quick else 3, epilogues=not args.no_epilogues)
    small = small_calls(torch, rounds, 200 if args.quick else 2000)
    floor_rows = {dtype: floors(shapes, _dtype(dtype), rounds, rng) for dtype in dtypes}
    norm_shapes = QUICK_NORM_SHAPES if args.quick else NORM_SHAPES
    nrows = [r for d in dtypes if d in ("float32", "bfloat16")
             for r in norm_rows(norm_shapes, _dtype(d), rounds, torch, rng)]
    mrows = torch_module_rows(torch, rounds, args.quick) if torch is not None else []

    print(_header(torch, "torch not timed (--no-torch)" if args.no_torch
                  else "torch not installed"))
    print("Timings: medians over rounds; each ratio is to np.copyto of the same array "
          "timed in the same round (lower is better); outputs preallocated; torch in its "
          "faster layout.\n")
    print(format_rows(rows))
    print(f"\nsmall calls, {SMALL_SHAPE} float32, nothing preallocated "
          "(microseconds per call; per-call overhead, not memory):")
    small_failed = []
    for kernel, us_nb, us_t, err in small:
        ok = err <= TOL[np.dtype(np.float32)]
        if not ok:
            small_failed.append(f"small {kernel}")
        print(f"small call {kernel:<15} nbnorm {us_nb:5.1f}  torch {_fmt(us_t, '{:5.1f}')}  "
              f"nbnorm/torch {_fmt(us_nb / us_t)}  {'ok' if ok else 'FAILED'} ({err:.1e})")
    print()
    for dtype in dtypes:
        print(format_floors(dtype, floor_rows[dtype]))
    if nrows:
        print("\ngroup, layer and RMS norm (ratios to np.copyto of x; floor: the least "
              "traffic of the two passes):")
        print(format_norm_rows(nrows))
    if mrows:
        print("\nnbnorm.torch modules against torch.nn's, forward+backward through autograd "
              "(medians; torch/nbnorm > 1: nbnorm is faster):")
        print(format_module_rows(mrows))
    if args.plot:
        paths = plot.write(args.plot, rows, floor_rows, small, nrows, mrows)
        print("\nwrote " + " and ".join(paths))
    failed = [r for r in rows if not r.ok] + small_failed + [
        r for r in nrows if not r[6] <= _tol(np.dtype(_dtype(r[1])))] + [
        r for r in mrows if not r[4] <= MODULE_TOL]
    if failed:
        print(f"\n{len(failed)} check(s) FAILED against nbnorm.reference", file=sys.stderr)
        return 1
    print("\nall checks passed against nbnorm.reference")
    return 0
