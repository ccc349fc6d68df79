"""``python -m nbnorm --plot DIR``: the benchmark table as a figure and as numbers.

``DIR/benchmark.json`` holds every number of the table (kernels, small calls,
memory floors, the other normalizations, the torch modules);
``DIR/benchmark.png`` draws each kernel's time in copy-times (ratio to
``np.copyto`` of the same array, lower is better) as a bar beside PyTorch's,
with the memory floor of that kernel as a line: the least a kernel of that
traffic can take on this machine.  matplotlib is optional (``pip install
"nbnorm[examples]"``); only the figure needs it.
"""

import json
import os

import numpy as np

__all__ = ["require_matplotlib", "floor_of", "table_json", "write"]


def require_matplotlib():
    """Import matplotlib with a headless backend, or raise a clear ImportError
    (before minutes of benchmarking, when called first)."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("python -m nbnorm --plot needs matplotlib: "
                          "pip install matplotlib (or \"nbnorm[examples]\")") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def floor_of(kernel, read, elementwise):
    """The memory floor of ``kernel`` in copy-times, from the measured floors of
    its layout: inference one elementwise pass; a training forward also reads
    x for the statistics; backward reads x and dy for the sums, then x and dy
    again to write dx (``nbnorm.bench.norm_rows``' accounting)."""
    base = kernel.split("+")[0]
    if base == "forward-infer":
        return elementwise
    if base == "forward-train":
        return read + elementwise
    return 3 * read + elementwise


def _num(v):
    return None if v != v else float(v)  # NaN (no torch) as null


def table_json(rows, floor_rows, small=(), norm_rows=(), module_rows=()):
    """The table as JSON-ready data (``nbnorm.bench``'s row tuples)."""
    floors = {dt: {name: {"read": rd, "elementwise": ew} for name, rd, ew in fl}
              for dt, fl in floor_rows.items()}
    kernels = []
    for r in rows:
        fl = floors.get(r.dtype, {}).get(r.layout)
        kernels.append({"kernel": r.kernel, "layout": r.layout, "shape": list(r.shape),
                        "dtype": r.dtype, "copy_s": r.copy_s, "nbnorm_copies": r.nbnorm,
                        "torch_copies": _num(r.torch),
                        "floor_copies": None if fl is None else
                        floor_of(r.kernel, fl["read"], fl["elementwise"]),
                        "error": r.error, "ok": bool(r.ok)})
    return {
        "unit": "copy-times: time over np.copyto of the same array (lower is better)",
        "kernels": kernels,
        "floors": floors,
        "small_calls_us": [{"kernel": k, "nbnorm": nb, "torch": _num(t), "error": e}
                           for k, nb, t, e in small],
        "norms": [{"name": n, "dtype": dt, "pass": d, "nbnorm_copies": nb,
                   "torch_copies": _num(t), "floor_copies": fl, "error": e}
                  for n, dt, d, nb, t, fl, e in norm_rows],
        "torch_modules": [{"case": c, "torch_s": t, "nbnorm_s": nb, "torch_over_nbnorm": r,
                           "error": e} for c, t, nb, r, e in module_rows],
    }


def _draw(plt, data, path):
    dtypes = list(dict.fromkeys(k["dtype"] for k in data["kernels"]))
    n = max(1, max((sum(k["dtype"] == dt for k in data["kernels"]) for dt in dtypes),
                   default=1))
    fig, axes = plt.subplots(len(dtypes) or 1, 1, squeeze=False,
                             figsize=(max(8.0, 0.55 * n + 2), 3.6 * max(1, len(dtypes))))
    for ax, dt in zip(axes[:, 0], dtypes):
        ks = [k for k in data["kernels"] if k["dtype"] == dt]
        pos = np.arange(len(ks))
        ax.bar(pos - 0.2, [k["nbnorm_copies"] for k in ks], 0.4, label="nbnorm", color="C0")
        torch = [np.nan if k["torch_copies"] is None else k["torch_copies"] for k in ks]
        if not np.isnan(torch).all():
            ax.bar(pos + 0.2, torch, 0.4, label="PyTorch", color="C1")
        for i, k in enumerate(ks):
            if k["floor_copies"] is not None:
                ax.hlines(k["floor_copies"], i - 0.45, i + 0.45, colors="k",
                          label="memory floor" if i == 0 else None)
        ax.set_xticks(pos)
        ax.set_xticklabels([f"{k['kernel']}\n{k['layout']}" for k in ks], rotation=90,
                           fontsize=7)
        ax.set_yscale("log")  # a slow outlier must not flatten the rest
        ax.set_ylabel("copy-times (log)")
        ax.set_title(f"{dt}: time / np.copyto of the same array (lower is better)",
                     fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out_dir, rows, floor_rows, small=(), norm_rows=(), module_rows=()):
    """Write ``benchmark.json`` and ``benchmark.png`` into ``out_dir`` (made if
    missing); returns their paths."""
    plt = require_matplotlib()
    os.makedirs(out_dir, exist_ok=True)
    data = table_json(rows, floor_rows, small, norm_rows, module_rows)
    json_path = os.path.join(out_dir, "benchmark.json")
    with open(json_path, "w") as f:
        json.dump(data, f, indent=1)
    png_path = os.path.join(out_dir, "benchmark.png")
    _draw(plt, data, png_path)
    return json_path, png_path
