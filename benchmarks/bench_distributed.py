"""Synchronized batch norm (nbnorm.distributed): what is sent, and what it costs.

asv runs one process, so the multi-process timing is this file run as a
script under MPI, which the asv ``track_`` benchmarks launch::

    mpiexec -n 4 python benchmarks/bench_distributed.py        # a table on rank 0

Each process times, on the same local batch, ``nbnorm.forward`` +
``nbnorm.backward`` (local BN) against ``nbnorm.distributed.forward`` +
``backward`` (SyncBN), and the collectives alone (the header allgathers, the
2C allgather and the 2C allreduce, with nothing computed): the SyncBN
overhead should be the collectives.  Medians over repeats, with a barrier
before each.  Oversubscribed cores (more processes than cores) measure the
scheduler, not the collectives: read them as such.
"""

import json
import os
import shutil
import subprocess
import sys
import time

os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np  # noqa: E402

#: (name, local batch shape, channel axis): a ResNet stage at a per-process
#: batch of 8, planar and interleaved, and a small late-stage map.
SHAPES = [("NCHW 8x64x28x28", (8, 64, 28, 28), 1), ("NHWC 8x28x28x64", (8, 28, 28, 64), -1),
          ("NCHW 8x512x7x7", (8, 512, 7, 7), 1)]


class _OneProcess:
    """The collectives of a communicator of one process."""

    size = 1

    def allgather(self, a):
        return a[None].copy()

    def allreduce(self, a):
        return a.copy()


class _Counted:
    """Collectives that count the bytes this process sends, around real ones."""

    def __init__(self, coll):
        self.coll, self.size, self.sent = coll, coll.size, 0

    def allgather(self, a):
        self.sent += a.nbytes
        return self.coll.allgather(a)

    def allreduce(self, a):
        self.sent += a.nbytes
        return self.coll.allreduce(a)


def sent_bytes(x, axis, coll):
    """Bytes this process sends in one synchronized forward and one backward,
    counted on the calls themselves: ``(forward, backward)``."""
    import nbnorm.distributed as nd
    counted = _Counted(coll)
    res = nd.forward(x, axis=axis, comm=counted)
    fwd, counted.sent = counted.sent, 0
    nd.backward(x, x, res.mean, res.invstd, axis=axis, comm=counted)
    return fwd, counted.sent


class MessageBytes:
    """Bytes one process sends per forward and per backward: O(C), the same for
    every batch size (measured by running the calls, not from a formula)."""

    params = ([16, 256, 2048], [2, 64])
    param_names = ["channels", "batch"]
    unit = "bytes"

    def setup(self, channels, batch):
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((batch, channels, 4)).astype(np.float32)

    def track_forward(self, channels, batch):
        return sent_bytes(self.x, 1, _OneProcess())[0]

    def track_backward(self, channels, batch):
        return sent_bytes(self.x, 1, _OneProcess())[1]


class SyncOverhead:
    """SyncBN forward+backward minus local BN on the same local batch, in
    microseconds (NCHW 8x64x28x28 float32), from ``mpiexec -n P`` of this file."""

    params = [2, 4]
    param_names = ["processes"]
    unit = "us"
    timeout = 300

    def setup(self, processes):
        mpiexec = shutil.which("mpiexec", path=os.pathsep.join(
            [os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
        if mpiexec is None:
            raise NotImplementedError("no mpiexec")
        run = subprocess.run([mpiexec, "-n", str(processes), sys.executable, __file__,
                              "--json", "--shapes", "1"],
                             capture_output=True, text=True, timeout=280)
        lines = [ln for ln in run.stdout.splitlines() if ln.startswith("[")]
        if run.returncode or not lines:
            raise RuntimeError(run.stdout + run.stderr)
        self.rows = json.loads(lines[-1])

    def track_overhead(self, processes):
        row = self.rows[0]
        return row["sync_us"] - row["local_us"]

    def track_collectives(self, processes):
        return self.rows[0]["collectives_us"]


# ------------------------------------------------------------- the script

def _median_us(comm, f, repeats):
    times = []
    for _ in range(repeats):
        comm.Barrier()
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    # the slowest process sets the step's time
    return comm.allreduce(float(np.median(times)), op=_max()) * 1e6


def _max():
    from mpi4py import MPI
    return MPI.MAX


def measure(shapes=SHAPES, repeats=50):
    from mpi4py import MPI

    import nbnorm
    import nbnorm.distributed as nd
    comm = MPI.COMM_WORLD
    coll = nd.MPICollectives(comm)
    rows = []
    for name, shape, axis in shapes:
        rng = np.random.default_rng(comm.Get_rank())
        x = rng.standard_normal(shape).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        C = shape[axis]
        out, gi = np.empty_like(x), np.empty_like(x)
        rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)

        def local():
            r = nbnorm.forward(x, None, None, rm, rv, axis=axis, out=out)
            nbnorm.backward(dy, x, r.mean, r.invstd, axis=axis, grad_input=gi)

        def sync():
            r = nd.forward(x, None, None, rm, rv, axis=axis, out=out, comm=coll)
            nd.backward(dy, x, r.mean, r.invstd, axis=axis, grad_input=gi, comm=coll)

        header, payload = np.zeros(nd.HEADER), np.zeros(2 * C)

        def collectives():  # what sync() sends, nothing computed
            coll.allgather(header)
            coll.allgather(payload)
            coll.allgather(header)
            coll.allreduce(payload)

        for f in (local, sync, collectives):  # compile, connect
            f()
        fwd, bwd = sent_bytes(x, axis, coll)
        if (fwd, bwd) != nd.message_bytes(C, comm.Get_size()):
            raise AssertionError(f"sent {fwd}/{bwd} bytes, message_bytes says "
                                 f"{nd.message_bytes(C, comm.Get_size())}")
        rows.append(dict(shape=name, processes=comm.Get_size(),
                         local_us=_median_us(comm, local, repeats),
                         sync_us=_median_us(comm, sync, repeats),
                         collectives_us=_median_us(comm, collectives, repeats),
                         forward_bytes=fwd, backward_bytes=bwd, batch_bytes=x.nbytes))
    return rows


def main(argv):
    shapes = SHAPES
    if "--shapes" in argv:
        shapes = SHAPES[:int(argv[argv.index("--shapes") + 1])]
    rows = measure(shapes)
    from mpi4py import MPI
    if MPI.COMM_WORLD.Get_rank():
        return 0
    if "--json" in argv:
        print(json.dumps(rows))
        return 0
    print(f"{'shape':18} {'P':>2} {'local us':>9} {'sync us':>9} {'overhead':>9} "
          f"{'collectives':>11} {'sent fwd/bwd B':>15} {'batch B':>9}")
    for r in rows:
        print(f"{r['shape']:18} {r['processes']:>2} {r['local_us']:9.0f} {r['sync_us']:9.0f} "
              f"{r['sync_us'] - r['local_us']:9.0f} {r['collectives_us']:11.0f} "
              f"{r['forward_bytes']:>7}/{r['backward_bytes']:<7} {r['batch_bytes']:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
