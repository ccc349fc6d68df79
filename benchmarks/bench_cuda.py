"""asv: the CUDA kernels on a real GPU, against a device-to-device copy and cuDNN.

Data lives on the device, every output is preallocated, and each timed call
launches on one stream and synchronizes it before the clock stops.  ``setup``
checks the GPU result against the CPU kernels before anything is timed.
Without a GPU (no numba-cuda, no driver, or the simulator) ``setup`` raises
``NotImplementedError``: asv reports the benchmark as skipped.

Read the numbers as DESIGN.md's performance model does: ratios to
``time_copy`` (a device-to-device copy of ``x``, read x + write y) taken in the
same run -- forward training's floor is 1.5 copies, inference's 1.0,
backward's 2.5 -- and to ``TorchCudaBatchNorm`` (PyTorch's cuDNN path).
"""

import numpy as np

import nbnorm

#: The shapes of the CPU benchmarks (issue 3): (shape, channel axis).
SHAPES = {
    "NCHW": ((64, 64, 56, 56), 1),
    "NHWC": ((64, 56, 56, 64), -1),
    "NC": ((8192, 1024), 1),
}

TOL = {"float32": dict(rtol=2e-5, atol=2e-5), "float64": dict(rtol=1e-10, atol=1e-10)}


def _gpu():
    """``numba.cuda`` where a real GPU can run the kernels, else asv's skip."""
    try:
        import numba_cuda  # noqa: F401
        from numba import config as numba_config
        from numba import cuda
    except ImportError:
        raise NotImplementedError("numba-cuda is not installed") from None
    if numba_config.ENABLE_CUDASIM:
        raise NotImplementedError("NUMBA_ENABLE_CUDASIM=1: no timings on the simulator")
    if not cuda.is_available():
        raise NotImplementedError("no CUDA GPU")
    return cuda


def _data(layout, dtype):
    shape, axis = SHAPES[layout]
    rng = np.random.default_rng(0)
    C = shape[axis]
    x = (rng.standard_normal(shape) * 2.0 + 0.5).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 1.5, C).astype(dtype)
    b = rng.uniform(-0.5, 0.5, C).astype(dtype)
    return x, dy, w, b, axis


class CudaBatchNorm:
    params = (list(SHAPES), ["float32", "float64"])
    param_names = ["layout", "dtype"]
    timeout = 300

    def setup(self, layout, dtype):
        cuda = _gpu()
        x, dy, w, b, axis = _data(layout, dtype)
        C = x.shape[axis]
        self.axis = axis
        self.stream = s = cuda.stream()
        d = lambda a: cuda.to_device(a, stream=s)  # noqa: E731
        self.x, self.dy, self.w, self.b = d(x), d(dy), d(w), d(b)
        self.rm, self.rv = d(np.zeros(C, dtype)), d(np.ones(C, dtype))
        self.out, self.dx = cuda.device_array_like(self.x), cuda.device_array_like(self.x)
        self.mean, self.invstd = cuda.device_array(C, dtype), cuda.device_array(C, dtype)
        self.gw, self.gb = cuda.device_array(C, dtype), cuda.device_array(C, dtype)
        s.synchronize()

        # Compile every kernel on the real shapes and check against the CPU.
        rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
        cpu = nbnorm.forward(x, w, b, rm, rv, axis=axis)
        self.forward_train()
        for got, want in [(self.out, cpu.out), (self.mean, cpu.mean),
                          (self.invstd, cpu.invstd), (self.rm, rm), (self.rv, rv)]:
            np.testing.assert_allclose(got.copy_to_host(), want, **TOL[dtype])
        cpu_g = nbnorm.backward(dy, x, cpu.mean, cpu.invstd, w, axis=axis)
        self.backward_train()
        for got, want in zip((self.dx, self.gw, self.gb), cpu_g):
            np.testing.assert_allclose(got.copy_to_host(), want,
                                       **(TOL[dtype] if got is self.dx else
                                          dict(rtol=TOL[dtype]["rtol"] * 10,
                                               atol=TOL[dtype]["atol"] * x.size / C)))
        self.forward_infer()
        self.copy()

    # The calls, each ending in a stream synchronization.
    def forward_train(self):
        nbnorm.forward(self.x, self.w, self.b, self.rm, self.rv, axis=self.axis,
                       out=self.out, mean=self.mean, invstd=self.invstd, stream=self.stream)
        self.stream.synchronize()

    def forward_infer(self):
        nbnorm.forward(self.x, self.w, self.b, self.rm, self.rv, axis=self.axis,
                       training=False, out=self.out, mean=self.mean, invstd=self.invstd,
                       stream=self.stream)
        self.stream.synchronize()

    def backward_train(self):
        nbnorm.backward(self.dy, self.x, self.mean, self.invstd, self.w, axis=self.axis,
                        grad_input=self.dx, grad_weight=self.gw, grad_bias=self.gb,
                        stream=self.stream)
        self.stream.synchronize()

    def copy(self):
        self.out.copy_to_device(self.x, stream=self.stream)
        self.stream.synchronize()

    def time_forward_train(self, layout, dtype):
        self.forward_train()

    def time_forward_infer(self, layout, dtype):
        self.forward_infer()

    def time_backward_train(self, layout, dtype):
        self.backward_train()

    def time_copy(self, layout, dtype):
        """The yardstick: a device-to-device copy of x."""
        self.copy()


class TorchCudaBatchNorm:
    """PyTorch's batch norm (cuDNN) on the same data, in torch's own best layout."""

    params = (list(SHAPES), ["float32", "float64"])
    param_names = ["layout", "dtype"]
    timeout = 300

    def setup(self, layout, dtype):
        try:
            import torch
        except ImportError:
            raise NotImplementedError("torch is not installed") from None
        if not torch.cuda.is_available():
            raise NotImplementedError("no CUDA build of torch or no GPU")
        x, dy, w, b, axis = _data(layout, dtype)
        dev = torch.device("cuda")
        xt = torch.from_numpy(np.moveaxis(x, axis, 1).copy()).to(dev)
        if layout == "NHWC":
            xt = xt.contiguous(memory_format=torch.channels_last)
        self.x = xt.requires_grad_()
        self.w = torch.from_numpy(w).to(dev).requires_grad_()
        self.b = torch.from_numpy(b).to(dev).requires_grad_()
        self.rm = torch.zeros(len(w), dtype=self.x.dtype, device=dev)
        self.rv = torch.ones(len(w), dtype=self.x.dtype, device=dev)
        self.dy = torch.from_numpy(np.moveaxis(dy, axis, 1).copy()).to(dev)
        if layout == "NHWC":
            self.dy = self.dy.contiguous(memory_format=torch.channels_last)
        self.torch = torch
        self.time_forward_train(layout, dtype)
        self.time_backward_train(layout, dtype)

    def time_forward_train(self, layout, dtype):
        with self.torch.no_grad():
            self.torch.nn.functional.batch_norm(self.x, self.rm, self.rv, self.w, self.b,
                                                training=True)
        self.torch.cuda.synchronize()

    def time_forward_infer(self, layout, dtype):
        with self.torch.no_grad():
            self.torch.nn.functional.batch_norm(self.x, self.rm, self.rv, self.w, self.b,
                                                training=False)
        self.torch.cuda.synchronize()

    def time_backward_train(self, layout, dtype):
        # forward + backward: cuDNN's backward needs its own forward's saved state
        y = self.torch.nn.functional.batch_norm(self.x, self.rm, self.rv, self.w, self.b,
                                                training=True)
        y.backward(self.dy)
        self.torch.cuda.synchronize()
