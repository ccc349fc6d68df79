"""Forward (training, inference) and backward against a copy of the same array.

Read the results as ratios: ``time_forward_train / time_copy`` for the same
parameters is the "copy-times" figure of DESIGN.md §4 (floor 1.5; inference 1.0;
backward 2.5).  Every output is preallocated, so ``peakmem_*`` minus
``peakmem_copy`` is the extra memory a call needs (O(C x parts), not O(x)).
"""

import numpy as np

import nbnorm

from .common import DTYPES, FULL_DTYPES, LAYOUTS, MAPS, SIZES, batch, map_batch


class BatchNorm:
    params = (LAYOUTS, DTYPES, SIZES)
    param_names = ["layout", "dtype", "size"]
    # A 51 MB batch: a few ms per call; asv's defaults give stable medians.
    timeout = 300

    def setup(self, layout, dtype, size):
        self.b = batch(layout, dtype, size)
        self.warm_up()

    def warm_up(self):
        # Warm up: JIT (or load from cache) every kernel on the real shapes.
        self.forward_train()
        self.forward_infer()
        self.backward_train()

    def forward_train(self):
        b = self.b
        return nbnorm.forward(b.x, b.weight, b.bias, b.running_mean, b.running_var,
                              training=True, axis=b.axis, out=b.out, mean=b.mean,
                              invstd=b.invstd)

    def forward_infer(self):
        b = self.b
        return nbnorm.forward(b.x, b.weight, b.bias, b.running_mean, b.running_var,
                              training=False, axis=b.axis, out=b.out, mean=b.mean,
                              invstd=b.invstd)

    def backward_train(self):
        b = self.b
        return nbnorm.backward(b.dy, b.x, b.mean, b.invstd, b.weight, training=True,
                               axis=b.axis, grad_input=b.grad_input,
                               grad_weight=b.grad_weight, grad_bias=b.grad_bias)

    def time_copy(self, layout, dtype, size):
        """The yardstick: np.copyto of the same array."""
        np.copyto(self.b.out, self.b.x)

    def time_forward_train(self, layout, dtype, size):
        self.forward_train()

    def time_forward_infer(self, layout, dtype, size):
        self.forward_infer()

    def time_backward_train(self, layout, dtype, size):
        self.backward_train()

    def peakmem_copy(self, layout, dtype, size):
        np.copyto(self.b.out, self.b.x)

    def peakmem_forward_train(self, layout, dtype, size):
        self.forward_train()

    def peakmem_backward_train(self, layout, dtype, size):
        self.backward_train()


class SmallMaps(BatchNorm):
    """NCHW batches of 7x7, 4x4 and 14x14 maps (runs of 49, 16 and 196 values),
    with ``BatchNorm``'s timings: ``map`` takes the place of ``layout``."""

    params = (list(MAPS), FULL_DTYPES, SIZES)
    param_names = ["map", "dtype", "size"]

    def setup(self, map, dtype, size):
        self.b = map_batch(map, dtype, size)
        self.warm_up()


class Epilogue:
    """The fused epilogues, with ``BatchNorm``'s parameters and batches: read
    ``Epilogue.time_forward_train_relu / BatchNorm.time_forward_train`` as the
    ReLU's cost (target: at most 1.05); ``time_forward_train_add_relu`` adds one
    read of ``residual`` (about 0.33-0.5 copy-times), ``time_backward_train_relu``
    one read of ``forward_out``."""

    params = BatchNorm.params
    param_names = BatchNorm.param_names
    timeout = BatchNorm.timeout

    def setup(self, layout, dtype, size):
        self.b = batch(layout, dtype, size)
        for m in ("time_forward_train_relu", "time_forward_infer_relu",
                  "time_forward_train_add_relu", "time_backward_train_relu"):
            getattr(self, m)(None, None, None)

    def time_forward_train_relu(self, layout, dtype, size):
        b = self.b
        nbnorm.forward(b.x, b.weight, b.bias, b.running_mean, b.running_var, axis=b.axis,
                       out=b.out, mean=b.mean, invstd=b.invstd, activation="relu")

    def time_forward_infer_relu(self, layout, dtype, size):
        b = self.b
        nbnorm.forward(b.x, b.weight, b.bias, b.running_mean, b.running_var, training=False,
                       axis=b.axis, out=b.out, mean=b.mean, invstd=b.invstd, activation="relu")

    def time_forward_train_add_relu(self, layout, dtype, size):
        b = self.b
        nbnorm.forward(b.x, b.weight, b.bias, b.running_mean, b.running_var, axis=b.axis,
                       out=b.out, mean=b.mean, invstd=b.invstd, activation="relu",
                       residual=b.residual)

    def time_backward_train_relu(self, layout, dtype, size):
        b = self.b
        nbnorm.backward(b.dy, b.x, b.mean, b.invstd, b.weight, axis=b.axis,
                        grad_input=b.grad_input, grad_weight=b.grad_weight,
                        grad_bias=b.grad_bias, activation="relu", forward_out=b.forward_out,
                        grad_residual=b.grad_residual)


class SmallCall:
    """Per-call overhead: a (32, 64) float32 batch with nothing preallocated."""

    def setup(self):
        rng = np.random.default_rng(1)
        self.x = rng.standard_normal((32, 64), dtype=np.float32)
        self.dy = rng.standard_normal((32, 64), dtype=np.float32)
        self.w = np.ones(64, np.float32)
        self.b = np.zeros(64, np.float32)
        self.rm = np.zeros(64, np.float32)
        self.rv = np.ones(64, np.float32)
        # JIT / cache load of every kernel timed below
        self.res = nbnorm.forward(self.x, self.w, self.b, self.rm, self.rv)
        nbnorm.forward(self.x)
        self.time_forward_infer()
        self.time_backward_train()

    def time_forward_train(self):
        nbnorm.forward(self.x, self.w, self.b, self.rm, self.rv)

    def time_forward_train_plain(self):
        nbnorm.forward(self.x)

    def time_forward_infer(self):
        nbnorm.forward(self.x, self.w, self.b, self.rm, self.rv, training=False)

    def time_backward_train(self):
        nbnorm.backward(self.dy, self.x, self.res.mean, self.res.invstd, self.w)
