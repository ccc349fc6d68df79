"""JIT cost: ``import nbnorm`` and a first forward+backward in a fresh interpreter.

``cold``: an empty Numba cache directory, so every kernel that the first calls
need is compiled (issue 3 asks for it to be measured and reported).  ``warm``:
a cache that an earlier interpreter filled, as in a user's second session
(issue 3 asks for <= 1 s).
"""

import os
import shutil
import subprocess
import sys
import tempfile

import nbnorm

#: The directory holding the ``nbnorm`` that this suite imports, so that the
#: fresh interpreters run the same one (asv passes it in ``ASV_PYTHONPATH``).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(nbnorm.__file__)))

_CODE = """
import numpy as np
import nbnorm
x = np.random.default_rng(0).standard_normal((32, 64, 8, 8)).astype(np.float32)
r = nbnorm.forward(x)
nbnorm.backward(np.ones_like(x), x, r.mean, r.invstd)
"""


def _prelude(cache_dir):
    return (f"import os, sys\nos.environ['NUMBA_CACHE_DIR'] = {cache_dir!r}\n"
            f"sys.path.insert(0, {_ROOT!r})\n")


class Compile:
    params = ["cold", "warm"]
    param_names = ["cache"]
    timeout = 600
    repeat = 1
    number = 1
    warmup_time = 0

    def setup(self, cache):
        self.dir = tempfile.mkdtemp(prefix="nbnorm-asv-cache-")
        if cache == "warm":  # fill the cache from another interpreter
            subprocess.run([sys.executable, "-c", _prelude(self.dir) + _CODE], check=True)

    def teardown(self, cache):
        shutil.rmtree(self.dir, ignore_errors=True)

    def timeraw_import_and_first_call(self, cache):
        return _prelude(self.dir) + _CODE
