"""Every ```python block of the documentation runs, as written.

The blocks of one page run in order in one fresh interpreter (a page's later
blocks use the names its earlier ones defined), with the CUDA simulator on, so
the GPU page's Numba examples run without a GPU.  A block right after an
``<!-- requires: module -->`` comment is skipped where that module is missing
(CuPy's examples).  Blocks show their claims with ``assert`` and
``np.testing``: a page whose example stops being true fails here.
"""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", ROOT / "DESIGN.md", *(ROOT / "docs").glob("*.md")])
FENCE = re.compile(r"(?:<!-- requires: (?P<req>[\w.]+) -->\n)?```(?P<lang>[\w-]*)\n(?P<body>.*?)^```",
                   re.S | re.M)
TIMEOUT_S = 600


def python_blocks(page):
    """``(line, required module or None, code)`` of each ```python block of ``page``."""
    text = page.read_text()
    for m in FENCE.finditer(text):
        if m["lang"] == "python":
            yield text.count("\n", 0, m.start("body")) + 1, m["req"], m["body"]


def test_every_page_is_found():
    names = {p.name for p in PAGES}
    assert {"README.md", "api.md", "norms.md", "errors.md", "gpu.md"} <= names
    assert sum(1 for p in PAGES for _ in python_blocks(p)) >= 10


def test_fences_are_closed():
    """An odd number of fences would swallow the rest of a page into a block."""
    for page in PAGES:
        fences = [ln for ln in page.read_text().splitlines() if ln.startswith("```")]
        assert len(fences) % 2 == 0, page


@pytest.mark.parametrize("page", [p for p in PAGES if any(python_blocks(p))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(page, tmp_path):
    blocks = []
    for line, required, code in python_blocks(page):
        if required and importlib.util.find_spec(required) is None:
            continue
        blocks.append((line, code))
    if not blocks:
        pytest.skip(f"every block of {page.name} needs a missing module")
    # Each block compiled with its page line numbers, so a failure points at the page.
    program = "\n".join(
        "exec(compile(%r, %r, 'exec'))" % ("\n" * (line - 1) + code, str(page))
        for line, code in blocks)
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", MPLBACKEND="Agg")
    run = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-4000:]
