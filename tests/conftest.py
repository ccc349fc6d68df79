"""Shared fixtures: a per-test random generator.

Every test draws fresh data from its own generator, seeded from the test's id,
so two tests never see the same numbers and a failure reproduces exactly when
the same test is run again.  ``NBNORM_TEST_SEED=<int>`` shifts every seed to
explore other data without editing a test.
"""

import os
import zlib

import numpy as np
import pytest


def _seed(nodeid):
    return zlib.crc32(nodeid.encode()) ^ int(os.environ.get("NBNORM_TEST_SEED", "0"))


@pytest.fixture
def rng(request):
    seed = _seed(request.node.nodeid)
    request.node.user_properties.append(("seed", seed))
    return np.random.default_rng(seed)
