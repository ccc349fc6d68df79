"""Group, layer and RMS normalization (issue 17), forward and backward, against a
copy of the same array and PyTorch's CPU ``group_norm``/``layer_norm``/``rms_norm``.

Read the results as ratios to ``time_copy`` of the same parameters; the memory
floor of a forward is read x + write out (two passes read x twice: 1.5
copy-times), of a backward read x and dy twice + write dx (2.5).  ``python -m
nbnorm`` prints the same cases with measured floors.
"""

import importlib.util

import numpy as np

import nbnorm

from .common import SEED, SIZES, as_dtype

#: name -> ((shape, kind, axis or normalized_shape, groups) large, small)
CASES = {
    "GroupNorm-NCHW": (((32, 256, 28, 28), "group", 1, 32), ((4, 32, 8, 8), "group", 1, 8)),
    "GroupNorm-NHWC": (((32, 28, 28, 256), "group", -1, 32), ((4, 8, 8, 32), "group", -1, 8)),
    "LayerNorm": (((8192, 1024), "layer", 1024, None), ((64, 256), "layer", 256, None)),
    "RMSNorm": (((2048, 4096), "rms", 4096, None), ((64, 512), "rms", 512, None)),
}
DTYPES = ["float32"] + (["bfloat16"] if importlib.util.find_spec("ml_dtypes") else [])


class Norms:
    params = (list(CASES), DTYPES, SIZES)
    param_names = ["case", "dtype", "size"]
    timeout = 300

    def setup(self, case, dtype, size):
        shape, kind, arg, groups = CASES[case][0 if size == "large" else 1]
        dt = as_dtype(dtype)
        pdt = np.dtype(np.float32) if dt.itemsize == 2 else dt
        rng = np.random.default_rng(SEED)
        self.x = (rng.standard_normal(shape, dtype=np.float32) * 2 + 3).astype(dt)
        self.dy = rng.standard_normal(shape, dtype=np.float32).astype(dt)
        P = shape[arg] if kind == "group" else arg
        self.w = rng.uniform(0.5, 1.5, P).astype(pdt)
        self.b = None if kind == "rms" else rng.uniform(-1, 1, P).astype(pdt)
        self.out = np.zeros_like(self.x)
        self.gi = np.zeros_like(self.x)
        self.kind, self.arg, self.groups = kind, arg, groups
        self.res = self.forward()
        self.backward()
        self.torch = None
        try:
            import torch
        except ImportError:
            return
        self._torch_setup(torch, dt)

    def forward(self):
        if self.kind == "group":
            return nbnorm.group_norm(self.x, self.groups, self.w, self.b, axis=self.arg,
                                     out=self.out)
        if self.kind == "layer":
            return nbnorm.layer_norm(self.x, self.arg, self.w, self.b, out=self.out)
        return nbnorm.rms_norm(self.x, self.arg, self.w, 1e-5, out=self.out)

    def backward(self):
        r, x, dy, w = self.res, self.x, self.dy, self.w
        if self.kind == "group":
            return nbnorm.group_norm_backward(dy, x, r.mean, r.invstd, w, axis=self.arg,
                                              grad_input=self.gi)
        if self.kind == "layer":
            return nbnorm.layer_norm_backward(dy, x, r.mean, r.invstd, w, grad_input=self.gi)
        return nbnorm.rms_norm_backward(dy, x, r.invrms, w, grad_input=self.gi)

    def _torch_setup(self, torch, dt):
        from nbnorm.bench import _tensor
        F = torch.nn.functional
        tx, tdy = _tensor(torch, self.x), _tensor(torch, self.dy)
        if self.kind == "group" and self.arg == -1:
            tx, tdy = (t.permute(0, 3, 1, 2) for t in (tx, tdy))
        tx.requires_grad_()
        tw = torch.from_numpy(self.w).to(tx.dtype).requires_grad_()
        tb = None if self.b is None else torch.from_numpy(self.b).to(tx.dtype).requires_grad_()
        if self.kind == "group":
            self.tfwd = lambda: F.group_norm(tx, self.groups, tw, tb)
        elif self.kind == "layer":
            self.tfwd = lambda: F.layer_norm(tx, (self.arg,), tw, tb)
        else:
            self.tfwd = lambda: F.rms_norm(tx, (self.arg,), tw, 1e-5)
        y = self.tfwd()
        inputs = (tx, tw) if tb is None else (tx, tw, tb)
        self.tbwd = lambda: torch.autograd.grad(y, inputs, tdy, retain_graph=True)
        self.torch = torch

    def time_copy(self, case, dtype, size):
        np.copyto(self.out, self.x)

    def time_forward(self, case, dtype, size):
        self.forward()

    def time_backward(self, case, dtype, size):
        self.backward()

    def time_torch_forward(self, case, dtype, size):
        if self.torch is None:
            raise NotImplementedError("torch is not installed")
        with self.torch.no_grad():
            self.tfwd()

    def time_torch_backward(self, case, dtype, size):
        if self.torch is None:
            raise NotImplementedError("torch is not installed")
        self.tbwd()
