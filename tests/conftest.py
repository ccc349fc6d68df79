"""Shared fixtures: a per-test random generator.

Every test draws fresh data from its own generator, seeded from the test's id,
so two tests never see the same numbers and a failure reproduces exactly when
the same test is run again.  ``NBNORM_TEST_SEED=<int>`` shifts every seed to
explore other data without editing a test.
"""

import os
import zlib

# --- CUDA tests (tests/test_cuda*.py, owned by the CUDA kernels' developer) ---
# Without a GPU, run the CUDA kernels on Numba's simulator.  The variable must be
# set before anything imports numba, hence here; it changes numba.cuda only, not
# the CPU kernels.  An explicit NUMBA_ENABLE_CUDASIM (0 or 1) is respected.
if "NUMBA_ENABLE_CUDASIM" not in os.environ and not os.path.exists("/dev/nvidia0"):
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
# --- end of the CUDA block ---

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def _seed(nodeid):
    return zlib.crc32(nodeid.encode()) ^ int(os.environ.get("NBNORM_TEST_SEED", "0"))


@pytest.fixture
def rng(request):
    seed = _seed(request.node.nodeid)
    request.node.user_properties.append(("seed", seed))
    return np.random.default_rng(seed)
