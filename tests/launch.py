"""Running a multi-process test job in a subprocess that cannot outlive its timeout."""

import os
import signal
import subprocess


def run(command, timeout=300):
    """``command``'s ``(returncode, stdout + stderr)``; the whole process group
    (mpiexec's or torch.multiprocessing's children too) is killed when it runs
    past ``timeout`` seconds, which fails the calling test.  The default is for
    a cold Numba cache: in CI two ranks compiling the same kernels beside the
    other pytest worker, on 2 cores, ran past 120 s (no hang: the next launch,
    from the warm cache, passed)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"{' '.join(command)} ran past {timeout} s (a hang?):\n{output}")
    return proc.returncode, output
