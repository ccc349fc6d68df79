"""nbnorm.distributed under ``mpiexec -n 2`` and ``-n 3``, in subprocesses with
timeouts: tests/mpi_worker.py holds the checks (equality with one process's
batch norm of the whole batch for float32 and float64, planar and interleaved
data offset by 1e4, uneven ranks and a rank without rows; the layer; bad inputs
on one rank raising on every rank with nothing changed; the statistics bitwise
equal on every rank).  One launch per process count: each costs seconds.
"""

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from launch import run

pytest.importorskip("mpi4py")
MPIEXEC = shutil.which("mpiexec", path=os.pathsep.join(
    [str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
WORKER = Path(__file__).with_name("mpi_worker.py")


@pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install mpich)")
@pytest.mark.parametrize("processes", [2, 3])
def test_mpi_ranks_match_one_process(processes):
    code, output = run([MPIEXEC, "-n", str(processes), sys.executable, str(WORKER)])
    assert code == 0 and f"OK {processes}" in output, (
        f"mpiexec -n {processes} failed ({code}):\n{output}")


def test_single_process_communicator_is_plain_batch_norm():
    """A communicator of one process: the local results, bit for bit, and the
    message sizes independent of the batch."""
    from mpi4py import MPI

    import nbnorm
    import nbnorm.distributed as nd
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 5)) + 1e4
    dy = rng.standard_normal(x.shape)
    rm, rv, rm2, rv2 = np.zeros(3), np.ones(3), np.zeros(3), np.ones(3)
    a = nd.forward(x, None, None, rm, rv, comm=MPI.COMM_SELF)
    b = nbnorm.forward(x, None, None, rm2, rv2)
    for u, v in zip((*a, rm, rv), (*b, rm2, rv2)):
        assert np.array_equal(u, v)
    ga = nd.backward(dy, x, a.mean, a.invstd, comm=MPI.COMM_SELF)
    gb = nbnorm.backward(dy, x, b.mean, b.invstd)
    np.testing.assert_allclose(ga.grad_input, gb.grad_input, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ga.grad_weight, gb.grad_weight, rtol=1e-12, atol=1e-12)
    assert nd.message_bytes(64, 8) == (8 * (4 + 128),) * 2
    with pytest.raises(TypeError, match="mpi4py communicator"):
        nd.forward(x, comm=object())
    with pytest.raises(TypeError, match="moments="):
        nd.forward(x, comm=MPI.COMM_SELF, moments=nbnorm.moments(x))
