"""The checks of tests/test_distributed.py, run by every process of
``mpiexec -n P python tests/mpi_worker.py``.

Every process draws the same whole batch from one seed and takes its own rows
(uneven, with a process without rows from 3 processes on); the distributed
results are compared with one process's batch norm of the whole batch
(``nbnorm.forward``/``backward`` and ``nbnorm.BatchNorm``), and the statistics
of all processes with each other, bit for bit.  Any failure aborts the job
with a non-zero exit status; the last line of a good run is ``OK <P>``.
"""

import sys
import traceback

import numpy as np
from mpi4py import MPI

import nbnorm
import nbnorm.distributed as nd

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
C = 5
#: rows per process: uneven, and a process without rows from 3 processes on
ROWS = {1: [4], 2: [1, 4], 3: [3, 0, 2]}.get(size) or [2] * size
#: (layout, shape of the whole batch as a function of N, channel axis)
LAYOUTS = {"planar": (lambda n: (n, C, 3, 2), 1), "interleaved": (lambda n: (n, 3, C), -1)}
TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-11, atol=1e-11)}


def my_rows(a):
    start = sum(ROWS[:rank])
    return a[start:start + ROWS[rank]]


def same_everywhere(*arrays):
    """Every process holds the same bits."""
    mine = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)
    assert all(b == mine for b in comm.allgather(mine)), "results differ between processes"


def summed(a):
    total = np.empty_like(a)
    comm.Allreduce(np.ascontiguousarray(a), total)
    return total


def batch(dtype, layout, seed):
    shape, axis = LAYOUTS[layout]
    rng = np.random.default_rng(seed)
    whole = (rng.standard_normal(shape(sum(ROWS))) + 1e4).astype(dtype)  # offset: Welford/Chan
    grad = rng.standard_normal(whole.shape).astype(dtype)
    c = rng.standard_normal((4, C))
    return whole, grad, axis, c[0].astype(dtype), c[1].astype(dtype), c[2], 1 + c[3] ** 2


def check_equal_to_one_process(dtype, layout):
    whole, grad, axis, w, b, rm, rv = batch(dtype, layout, seed=1)
    ref_rm, ref_rv = rm.copy(), rv.copy()
    ref = nbnorm.forward(whole, w, b, ref_rm, ref_rv, axis=axis, momentum=0.3)
    ref_g = nbnorm.backward(grad, whole, ref.mean, ref.invstd, w, axis=axis)
    x, dy = my_rows(whole), my_rows(grad)
    res = nd.forward(x, w, b, rm, rv, comm=comm, axis=axis, momentum=0.3)
    tol = TOL[dtype]
    assert res.out.shape == x.shape and res.out.dtype == dtype
    np.testing.assert_allclose(res.out, my_rows(ref.out), **tol)
    np.testing.assert_allclose(res.mean, ref.mean, rtol=tol["rtol"])
    np.testing.assert_allclose(res.invstd, ref.invstd, rtol=tol["rtol"])
    np.testing.assert_allclose(rm, ref_rm, rtol=1e-12)
    np.testing.assert_allclose(rv, ref_rv, rtol=1e-7 if dtype is np.float32 else 1e-11)
    same_everywhere(res.mean, res.invstd, rm, rv)
    g = nd.backward(dy, x, res.mean, res.invstd, w, comm=comm, axis=axis)
    np.testing.assert_allclose(g.grad_input, my_rows(ref_g.grad_input), **tol)
    scale = np.abs(ref_g.grad_weight).max() + np.abs(ref_g.grad_bias).max()
    np.testing.assert_allclose(summed(g.grad_weight), ref_g.grad_weight,
                               atol=tol["atol"] * scale * 10)
    np.testing.assert_allclose(summed(g.grad_bias), ref_g.grad_bias,
                               atol=tol["atol"] * scale * 10)
    if ROWS[rank] == 0:  # no rows: empty out, the global statistics, zero gradients
        assert res.out.size == 0 and g.grad_input.size == 0
        assert not g.grad_weight.any() and not g.grad_bias.any()


def check_layer(dtype):
    whole, grad, axis, *_ = batch(dtype, "planar", seed=2)
    one = nbnorm.BatchNorm(C, momentum=None, dtype=np.float64)
    mine = nd.BatchNorm(C, comm=comm, momentum=None, dtype=np.float64)
    tol = TOL[dtype]
    for step in range(2):
        x, dy = whole + step, grad * (step + 1)
        ref_out = one(x).copy()
        ref_dx = one.backward(dy).copy()
        out = mine(my_rows(x))
        dx = mine.backward(my_rows(dy))
        np.testing.assert_allclose(out, my_rows(ref_out), **tol)
        np.testing.assert_allclose(dx, my_rows(ref_dx), **tol)
        np.testing.assert_allclose(summed(mine.grad_bias), one.grad_bias,
                                   atol=tol["atol"] * 100)
        np.testing.assert_allclose(mine.running_mean, one.running_mean, rtol=1e-12)
        np.testing.assert_allclose(mine.running_var, one.running_var, rtol=1e-6)
        same_everywhere(mine.running_mean, mine.running_var)
    assert int(mine.num_batches_tracked) == 2
    mine.eval()  # inference is local and sends nothing: the ranks may call it apart
    if ROWS[rank]:  # (nbnorm.forward refuses an empty batch in inference)
        np.testing.assert_allclose(mine(my_rows(whole)), my_rows(one.eval()(whole)), **tol)
    mine.train()
    return mine


def raises_everywhere(kind, call, state=()):
    """``call()`` raises ``kind`` on every process and changes none of ``state``."""
    before = [s.copy() for s in state]
    try:
        call()
    except kind:
        pass
    else:
        raise AssertionError(f"expected {kind.__name__} on rank {rank}")
    for a, b in zip(state, before):
        assert np.array_equal(a, b, equal_nan=True), "state changed by a refused call"
    comm.Barrier()  # and nobody is stuck in a collective


def check_bad_inputs(layer):
    rng = np.random.default_rng(3 + rank)
    x = rng.standard_normal((3, C, 2))
    w = np.ones(C)
    rm, rv = np.zeros(C), np.ones(C)
    state = (rm, rv)
    bad = rank == size - 1
    # a weight of the wrong shape on one process
    raises_everywhere(ValueError, lambda: nd.forward(
        x, np.ones(C + bad), None, rm, rv, comm=comm), state)
    # integer data on one process, and no array at all (it does not know C)
    raises_everywhere(TypeError, lambda: nd.forward(
        x.astype(np.int64) if bad else x, None, None, rm, rv, comm=comm), state)
    raises_everywhere(ValueError, lambda: nd.forward(
        None if bad else x, None, None, rm, rv, comm=comm), state)
    # a bad option on one process
    raises_everywhere(ValueError, lambda: nd.forward(
        x, None, None, rm, rv, comm=comm, eps=-1.0 if bad else 1e-5), state)
    # processes that disagree on the channel count or the dtype
    raises_everywhere(ValueError, lambda: nd.forward(
        x[:, :C - bad], comm=comm))
    raises_everywhere(ValueError, lambda: nd.forward(
        x.astype(np.float32) if bad else x, comm=comm))
    # one value per channel in the whole batch, and none at all
    one_row = x[:1, :, :1] if rank == 0 else x[:0, :, :1]
    raises_everywhere(ValueError, lambda: nd.forward(one_row, None, None, rm, rv, comm=comm),
                      state)
    raises_everywhere(ValueError, lambda: nd.forward(x[:0], None, None, rm, rv, comm=comm),
                      state)
    # a NaN on one process, decided on the merged statistics
    xn = x.copy()
    xn[0, 0, 0] = np.nan if bad else xn[0, 0, 0]
    raises_everywhere(FloatingPointError, lambda: nd.forward(
        xn, None, None, rm, rv, comm=comm, on_nonfinite="raise"), state)
    res = nd.forward(xn, None, None, rm, rv, comm=comm, on_nonfinite="skip")
    assert np.isnan(res.mean[0]) and rm[0] == 0 and rv[0] == 1 and np.isfinite(res.mean[1:]).all()
    # backward: a grad_out of the wrong shape on one process
    res = nd.forward(x, w, None, comm=comm)
    raises_everywhere(ValueError, lambda: nd.backward(
        x[:2] if bad else x, x, res.mean, res.invstd, w, comm=comm))
    # the layer: a channel count the layer does not have, found before the collective
    counter = layer.num_batches_tracked
    xl = rng.standard_normal((2, C + bad, 2))
    raises_everywhere(ValueError, lambda: layer(xl),
                      (layer.running_mean, layer.running_var, counter))
    # the layer: backward without a forward call on one process
    layer(rng.standard_normal((2, C, 2)))
    if bad:
        layer._pending = None
    raises_everywhere(RuntimeError, lambda: layer.backward(
        rng.standard_normal((2, C, 2))))


def main():
    for dtype in (np.float32, np.float64):
        for layout in LAYOUTS:
            check_equal_to_one_process(dtype, layout)
        layer = check_layer(dtype)
    check_bad_inputs(layer)
    comm.Barrier()
    if rank == 0:
        print(f"OK {size}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        comm.Abort(1)
