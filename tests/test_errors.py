"""Every validation error of forward and backward, and that nothing was written.

Each case starts from a valid call with *every* output preallocated and running
statistics given, all filled with random values, breaks one thing, and checks
the exception and that every array passed (and the buffer behind each view) is
bitwise unchanged afterwards: errors are raised before anything is written.
"""

import functools

import numpy as np
import pytest

import nbnorm
from helpers import assert_unchanged, backward_call, data, forward_call, refused, snapshot

SHAPE = (4, 3, 5)

# ------------------------------------------------------------------- helpers


def _ro(a):
    a.flags.writeable = False
    return a


#: Valid calls in float64 with every output preallocated (random contents).
fwd_args = functools.partial(forward_call, shape=SHAPE, dtype=np.float64)
bwd_args = functools.partial(backward_call, shape=SHAPE, dtype=np.float64)


class Case:
    """One broken call: ``base`` builds the valid arguments, ``edit`` breaks them."""

    def __init__(self, name, exc, match, edit=None, **base):
        self.name, self.exc, self.match, self.edit, self.base = name, exc, match, edit, base

    def build(self, make, rng):
        k = make(rng, **self.base)
        if self.edit is not None:
            self.edit(k, rng)
        return k


def _set(**values):
    """An edit that replaces arguments; callables get ``(kwargs, rng)``."""
    def edit(k, rng):
        for name, v in values.items():
            k[name] = v(k, rng) if callable(v) else v
    return edit


def _cast(name, dtype):
    return _set(**{name: lambda k, rng: k[name].astype(dtype)})


def _readonly(name):
    return _set(**{name: lambda k, rng: _ro(k[name])})


def _reshaped(name, shape):
    return _set(**{name: lambda k, rng: rng.uniform(0.5, 1.5, shape).astype(k[name].dtype)})


def _ints(shape=SHAPE, dtype=np.int64):
    return lambda k, rng: rng.integers(1, 9, shape).astype(dtype)


def _objects(k, rng):
    return k["x"].astype(object)


def _complex(k, rng):
    return k["x"] + 1j * k["x"]


def _shared_mean_invstd(k, rng):
    buf = rng.uniform(0.5, 1.5, 5)
    k["mean"], k["invstd"] = buf[0:3], buf[2:5]


def _out_shifted_over_x(k, rng):
    buf = data(rng, (SHAPE[0] + 1,) + SHAPE[1:], k["x"].dtype)
    k["x"], k["out"] = buf[:-1], buf[1:]


def _out_reversed_x(k, rng):
    k["out"] = k["x"][::-1]


def _weight_inside_out(k, rng):
    k["weight"] = k["out"].reshape(-1)[4:7]  # a contiguous view: read where out writes


def _same_running(k, rng):
    k["running_var"] = k["running_mean"]


def _mean_is_running_mean(k, rng):
    k["mean"] = k["running_mean"]


def _out_is_readonly_x(k, rng):
    k["out"] = _ro(k["x"])


FORWARD_CASES = [
    # --- dtypes: TypeError
    Case("x-int32", TypeError, "floating", _set(x=_ints(dtype=np.int32))),
    Case("x-int64", TypeError, "floating", _set(x=_ints())),
    Case("x-uint8", TypeError, "floating", _set(x=_ints(dtype=np.uint8))),
    Case("x-bool", TypeError, "floating", _set(x=_ints(dtype=bool))),
    Case("x-complex", TypeError, "floating", _set(x=_complex)),
    Case("x-object", TypeError, "floating", _set(x=_objects)),
    Case("x-int-list", TypeError, "floating",
         _set(x=lambda k, rng: rng.integers(1, 9, SHAPE).tolist())),
    Case("x-float16", TypeError, "float16", _set(x=lambda k, rng: k["x"].astype(np.float16))),
    Case("weight-int", TypeError, "weight", _set(weight=_ints((3,)))),
    Case("bias-complex", TypeError, "bias",
         _set(bias=lambda k, rng: k["bias"].astype(np.complex128))),
    Case("running_mean-int", TypeError, "running_mean", _set(running_mean=_ints((3,)))),
    Case("running_var-int-infer", TypeError, "running_var",
         _set(running_var=_ints((3,))), training=False),
    Case("out-float32", TypeError, "out.*dtype", _cast("out", np.float32)),
    Case("out-of-float32-x-is-float64", TypeError, "out.*dtype", _cast("out", np.float64),
         dtype=np.float32),
    Case("mean-float32", TypeError, "mean.*dtype", _cast("mean", np.float32)),
    Case("invstd-int", TypeError, "invstd.*dtype", _cast("invstd", np.int64)),
    Case("out-list", TypeError, "out.*ndarray", _set(out=lambda k, rng: k["out"].tolist())),
    Case("axis-float", TypeError, "axis", _set(axis=1.0)),
    Case("eps-str", TypeError, "eps", _set(eps="0.1")),
    Case("momentum-none", TypeError, "momentum", _set(momentum=None)),
    # --- axis and rank: ValueError
    Case("axis-3-of-3d", ValueError, "axis", _set(axis=3)),
    Case("axis--4-of-3d", ValueError, "axis", _set(axis=-4)),
    Case("x-1d", ValueError, "dimensions", _set(x=lambda k, rng: data(rng, (12,), np.float64))),
    Case("x-0d", ValueError, "dimensions", _set(x=lambda k, rng: np.float64(1.5) * np.ones(()))),
    # --- per-channel shapes
    Case("weight-shape", ValueError, "weight", _reshaped("weight", (4,))),
    Case("weight-2d", ValueError, "weight", _reshaped("weight", (1, 3))),
    Case("bias-shape", ValueError, "bias", _reshaped("bias", (2,))),
    Case("running_mean-shape", ValueError, "running_mean", _reshaped("running_mean", (4,))),
    Case("running_var-shape", ValueError, "running_var", _reshaped("running_var", (3, 1))),
    Case("running_var-shape-infer", ValueError, "running_var",
         _reshaped("running_var", (5,)), training=False),
    Case("weight-shape-nhwc", ValueError, "weight", _reshaped("weight", (3,)),
         shape=(2, 3, 3, 4), axis=-1),
    Case("running_mean-without-var", ValueError, "running_mean and running_var",
         _set(running_var=None)),
    Case("running_var-without-mean", ValueError, "running_mean and running_var",
         _set(running_mean=None)),
    Case("infer-without-running", ValueError, "running_mean and running_var",
         _set(running_mean=None, running_var=None), training=False),
    # --- training with one value per channel
    Case("one-value-NC", ValueError, "expected more than 1 value per channel when training",
         shape=(1, 3)),
    Case("one-value-NCHW", ValueError,
         "expected more than 1 value per channel when training", shape=(1, 3, 1, 1)),
    Case("one-value-axis0", ValueError,
         "expected more than 1 value per channel when training", shape=(5, 1), axis=0),
    # --- preallocated outputs
    Case("out-shape", ValueError, "out.*shape", _reshaped("out", (4, 3, 6))),
    Case("out-shape-permuted", ValueError, "out.*shape", _reshaped("out", (5, 3, 4))),
    Case("mean-shape", ValueError, "mean.*shape", _reshaped("mean", (4,))),
    Case("invstd-shape", ValueError, "invstd.*shape", _reshaped("invstd", (3, 1))),
    Case("out-readonly", ValueError, "read-only", _readonly("out")),
    Case("out-readonly-infer", ValueError, "read-only", _readonly("out"), training=False),
    Case("mean-readonly", ValueError, "read-only", _readonly("mean")),
    Case("invstd-readonly", ValueError, "read-only", _readonly("invstd")),
    Case("out-is-readonly-x", ValueError, "read-only", _out_is_readonly_x),
    Case("running_mean-readonly", ValueError, "read-only", _readonly("running_mean")),
    Case("running_var-readonly", ValueError, "read-only", _readonly("running_var")),
    # --- overlapping outputs
    Case("mean-invstd-overlap", ValueError, "overlap", _shared_mean_invstd),
    Case("mean-is-invstd", ValueError, "overlap",
         _set(invstd=lambda k, rng: k["mean"])),
    Case("out-shifted-over-x", ValueError, "overlap", _out_shifted_over_x),
    Case("out-reversed-x", ValueError, "overlap", _out_reversed_x),
    Case("weight-inside-out", ValueError, "overlap", _weight_inside_out),
    Case("running_mean-is-running_var", ValueError, "overlap", _same_running),
    Case("mean-is-running_mean", ValueError, "overlap", _mean_is_running_mean),
    Case("mean-is-running_mean-infer", ValueError, "overlap", _mean_is_running_mean,
         training=False),
    # --- scalars
    Case("eps-0", ValueError, "eps", _set(eps=0.0)),
    Case("eps-negative", ValueError, "eps", _set(eps=-1e-5)),
    Case("eps-nan", ValueError, "eps", _set(eps=float("nan"))),
    Case("momentum-negative", ValueError, "momentum", _set(momentum=-0.1)),
    Case("momentum-above-1", ValueError, "momentum", _set(momentum=1.5)),
    Case("momentum-nan", ValueError, "momentum", _set(momentum=float("nan"))),
    # --- empty input
    Case("empty-batch", ValueError, "empty", shape=(0, 3, 5)),
    Case("empty-spatial", ValueError, "empty", shape=(4, 3, 0)),
    Case("empty-channels", ValueError, "empty", shape=(4, 0, 5)),
    Case("empty-batch-infer", ValueError, "empty", shape=(0, 3), training=False),
]


def _grad_input_is_x(k, rng):
    k["grad_input"] = k["x"]


def _grad_input_reversed_grad_out(k, rng):
    k["grad_input"] = k["grad_out"][:, ::-1]


def _grad_weight_grad_bias_overlap(k, rng):
    buf = rng.uniform(0.5, 1.5, 4)
    k["grad_weight"], k["grad_bias"] = buf[:3], buf[1:]


def _grad_weight_is_mean(k, rng):
    k["grad_weight"] = k["mean"]


def _grad_bias_inside_grad_input(k, rng):
    k["grad_bias"] = k["grad_input"][0, :, 1]


BACKWARD_CASES = [
    # --- dtypes
    Case("x-int", TypeError, "floating", _set(x=_ints())),
    Case("x-bool", TypeError, "floating", _set(x=_ints(dtype=bool))),
    Case("x-complex", TypeError, "floating", _set(x=_complex)),
    Case("x-object", TypeError, "floating", _set(x=_objects)),
    Case("x-float16", TypeError, "float16", _set(x=lambda k, rng: k["x"].astype(np.float16))),
    Case("grad_out-int", TypeError, "grad_out", _set(grad_out=_ints())),
    Case("grad_out-float32", TypeError, "grad_out", _cast("grad_out", np.float32)),
    Case("mean-int", TypeError, "mean", _set(mean=_ints((3,)))),
    Case("invstd-complex", TypeError, "invstd",
         _set(invstd=lambda k, rng: k["invstd"].astype(np.complex64))),
    Case("weight-bool", TypeError, "weight", _set(weight=_ints((3,), bool))),
    Case("grad_input-float32", TypeError, "grad_input.*dtype", _cast("grad_input", np.float32)),
    Case("grad_input-float64-of-float32", TypeError, "grad_input.*dtype",
         _cast("grad_input", np.float64), dtype=np.float32),
    Case("grad_weight-float32", TypeError, "grad_weight.*dtype",
         _cast("grad_weight", np.float32)),
    Case("grad_bias-int", TypeError, "grad_bias.*dtype", _cast("grad_bias", np.int64)),
    # --- shapes, axis, rank
    Case("axis-3-of-3d", ValueError, "axis", _set(axis=3)),
    Case("axis--4-of-3d", ValueError, "axis", _set(axis=-4)),
    Case("x-1d", ValueError, "dimensions",
         _set(x=lambda k, rng: data(rng, (12,), np.float64),
              grad_out=lambda k, rng: data(rng, (12,), np.float64))),
    Case("grad_out-shape", ValueError, "grad_out", _reshaped("grad_out", (4, 3, 6))),
    Case("grad_out-shape-permuted", ValueError, "grad_out", _reshaped("grad_out", (5, 3, 4))),
    Case("mean-shape", ValueError, "mean", _reshaped("mean", (4,))),
    Case("invstd-shape", ValueError, "invstd", _reshaped("invstd", (1, 3))),
    Case("weight-shape", ValueError, "weight", _reshaped("weight", (2,))),
    Case("mean-none", ValueError, "mean", _set(mean=None)),
    Case("invstd-none", ValueError, "invstd", _set(invstd=None)),
    Case("grad_input-shape", ValueError, "grad_input.*shape", _reshaped("grad_input", (4, 3))),
    Case("grad_weight-shape", ValueError, "grad_weight.*shape",
         _reshaped("grad_weight", (4,))),
    Case("grad_bias-shape", ValueError, "grad_bias.*shape", _reshaped("grad_bias", (3, 1))),
    Case("one-value", ValueError, "expected more than 1 value per channel when training",
         shape=(1, 3)),
    Case("one-value-NCL", ValueError,
         "expected more than 1 value per channel when training", shape=(1, 3, 1)),
    Case("empty", ValueError, "empty", shape=(0, 3, 5)),
    Case("empty-infer", ValueError, "empty", shape=(4, 3, 0), training=False),
    # --- outputs
    Case("grad_input-readonly", ValueError, "read-only", _readonly("grad_input")),
    Case("grad_weight-readonly", ValueError, "read-only", _readonly("grad_weight")),
    Case("grad_bias-readonly", ValueError, "read-only", _readonly("grad_bias")),
    Case("grad_bias-readonly-infer", ValueError, "read-only", _readonly("grad_bias"),
         training=False),
    Case("grad_input-is-x", ValueError, "overlap", _grad_input_is_x),
    Case("grad_input-reversed-grad_out", ValueError, "overlap",
         _grad_input_reversed_grad_out),
    Case("grad_weight-grad_bias-overlap", ValueError, "overlap",
         _grad_weight_grad_bias_overlap),
    Case("grad_weight-is-mean", ValueError, "overlap", _grad_weight_is_mean),
    Case("grad_bias-inside-grad_input", ValueError, "overlap", _grad_bias_inside_grad_input),
]


# --------------------------------------------------------------------- tests

@pytest.mark.parametrize("case", FORWARD_CASES, ids=[c.name for c in FORWARD_CASES])
def test_forward_error(rng, case):
    refused(nbnorm.forward, case.exc, case.match, **case.build(fwd_args, rng))


@pytest.mark.parametrize("case", BACKWARD_CASES, ids=[c.name for c in BACKWARD_CASES])
def test_backward_error(rng, case):
    refused(nbnorm.backward, case.exc, case.match, **case.build(bwd_args, rng))


def _bases(cases):
    """The distinct valid calls the cases start from (cases whose base itself is
    the broken part, a batch of one or an empty one, left out)."""
    seen = {}
    for c in cases:
        if "value per channel" in c.match or c.match == "empty":
            continue
        seen[tuple(sorted(c.base.items(), key=str))] = dict(c.base)
    return list(seen.values())


@pytest.mark.parametrize("base", _bases(FORWARD_CASES), ids=str)
def test_forward_base_is_valid(rng, base):
    """The unbroken calls the cases start from succeed and write every output."""
    k = fwd_args(rng, **base)
    rm, rv = k["running_mean"].copy(), k["running_var"].copy()
    res = nbnorm.forward(**k)
    assert res.out is k["out"] and res.mean is k["mean"] and res.invstd is k["invstd"]
    if k["training"]:
        assert not np.array_equal(rm, k["running_mean"])
        assert not np.array_equal(rv, k["running_var"])


@pytest.mark.parametrize("base", _bases(BACKWARD_CASES), ids=str)
def test_backward_base_is_valid(rng, base):
    k = bwd_args(rng, **base)
    res = nbnorm.backward(**k)
    assert (res.grad_input is k["grad_input"] and res.grad_weight is k["grad_weight"]
            and res.grad_bias is k["grad_bias"])


def test_inference_accepts_readonly_running_stats(rng):
    """Inference only reads the running statistics: read-only ones are fine."""
    k = fwd_args(rng, training=False)
    _ro(k["running_mean"])
    _ro(k["running_var"])
    snap = snapshot({n: k[n] for n in ["running_mean", "running_var", "x"]})
    nbnorm.forward(**k)
    assert_unchanged(snap)
