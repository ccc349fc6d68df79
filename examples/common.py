"""What every example shares: its command line, the digits, the NumPy pieces of a
small network (linear layer, softmax cross-entropy, SGD) and writing results.

The examples import this module as ``common`` (they run as scripts from
``examples/``, whose directory Python puts first on ``sys.path``).
"""

import argparse
import importlib.util
import json
import os
import sys

import numpy as np


def need(module, extra="examples"):
    """Import ``module`` or exit with the install line that provides it."""
    try:
        return __import__(module)
    except ImportError:
        sys.exit(f"this example needs {module}: pip install \"nbnorm[{extra}]\"")


def parse_args(description, argv=None):
    """``--quick`` (seconds: CI runs it), ``--out DIR`` (figures and results.json)
    and ``--seed``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true",
                   help="fewer epochs and repeats: a run of seconds that shows the same effect")
    p.add_argument("--out", default=None,
                   help="directory for the PNG figures and results.json (default: "
                        "examples/out/<example name>)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.out is None:
        name = os.path.splitext(os.path.basename(sys.argv[0]))[0]
        args.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", name)
    os.makedirs(args.out, exist_ok=True)
    return args


def one_thread():
    """Run NumPy's matrix products and nbnorm's kernels on one thread each, for
    the rest of the process.

    The examples' arrays are small (a batch of 32 by 128 features): there,
    threads cost more to wake and to wait for than they save, and on a busy
    machine a parallel call waits for its slowest thread's turn on a core
    (steps took 10x longer on 2 shared cores).  threadpoolctl comes with
    scikit-learn; ``numba.set_num_threads`` is the thread count of nbnorm's
    CPU kernels (docs/threads.md)."""
    import numba
    numba.set_num_threads(1)
    return need("threadpoolctl").threadpool_limits(limits=1, user_api="blas")


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    matplotlib = need("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, out, name):
    path = os.path.join(out, name)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return path


def write_results(out, results):
    path = os.path.join(out, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2, allow_nan=True)
    return path


def digits(seed=0, test_fraction=0.25, dtype=np.float32):
    """scikit-learn's bundled 8x8 digits (1797 images, no download), pixels scaled
    to [0, 1], split into train and test sets stratified by class:
    ``(x_train, y_train, x_test, y_test)`` with ``x`` of shape ``(n, 64)``.

    The images are read from the file ``sklearn.datasets.load_digits`` reads,
    without importing scikit-learn (seconds: it imports SciPy), which is
    imported only if the file is not where it has always been."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        need("sklearn")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data",
                        "digits.csv.gz")
    if os.path.exists(path):
        table = np.loadtxt(path, delimiter=",")
        pixels, labels = table[:, :-1], table[:, -1].astype(np.int64)
    else:
        from sklearn.datasets import load_digits
        pixels, labels = load_digits(return_X_y=True)
    x = (pixels / 16.0).astype(dtype)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), bool)
    for c in np.unique(labels):  # the same share of every class in the test set
        members = rng.permutation(np.flatnonzero(labels == c))
        test[members[:round(test_fraction * len(members))]] = True
    return x[~test], labels[~test], x[test], labels[test]


class Linear:
    """``y = x @ weight.T + bias`` with He-initialized weight (PyTorch's layout,
    ``(out, in)``), its gradients from ``backward``."""

    def __init__(self, n_in, n_out, rng, bias=True, dtype=np.float32):
        self.weight = (rng.standard_normal((n_out, n_in)) * np.sqrt(2.0 / n_in)).astype(dtype)
        self.bias = np.zeros(n_out, dtype) if bias else None
        self.grad_weight = self.grad_bias = None
        self._x = None

    def __call__(self, x):
        self._x = x
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias

    def backward(self, dy):
        self.grad_weight = dy.T @ self._x
        self.grad_bias = None if self.bias is None else dy.sum(axis=0)
        return dy @ self.weight


class ReLU:
    def __call__(self, x):
        self._mask = x > 0
        return x * self._mask

    def backward(self, dy):
        return dy * self._mask


class Sequential:
    """Layers called in order; ``backward`` in reverse; ``step`` is plain SGD.

    A layer is anything with ``__call__(x)`` and ``backward(dy)`` (``Linear``,
    ``ReLU``, ``nbnorm.BatchNorm``); its parameters are its ``weight`` and
    ``bias`` with gradients in ``grad_weight`` and ``grad_bias``."""

    def __init__(self, *layers):
        self.layers = list(layers)

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def backward(self, dy):
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    def step(self, learning_rate):
        for layer in self.layers:
            for name in ("weight", "bias"):
                p, g = getattr(layer, name, None), getattr(layer, "grad_" + name, None)
                if p is not None and g is not None:
                    p -= learning_rate * g

    def train(self, mode=True):
        for layer in self.layers:
            if hasattr(layer, "train"):
                layer.train(mode)
        return self

    def eval(self):
        return self.train(False)


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy and its gradient with respect to ``logits``."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    n = logits.shape[0]
    loss = float(-np.log(p[np.arange(n), labels] + 1e-12).mean())
    p[np.arange(n), labels] -= 1
    return loss, (p / n).astype(logits.dtype)


def batches(n, batch_size, rng):
    """Index arrays of a shuffled epoch, the last partial batch dropped (a batch
    of one has no batch statistics)."""
    order = rng.permutation(n)
    return [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def accuracy(model, x, y):
    """Fraction of ``x`` classified as ``y`` by ``model`` in eval mode (a diverged
    model's NaN logits count as class 0, which is what ``argmax`` makes of them)."""
    model.eval()
    with np.errstate(all="ignore"):
        pred = model(x).argmax(axis=1)
    model.train()
    return float((pred == y).mean())
