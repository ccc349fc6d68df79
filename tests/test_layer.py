"""``nbnorm.BatchNorm``, the NumPy layer: PyTorch's ``nn.BatchNorm`` step for step,
its buffers, its state dict and its bad input."""

import tracemalloc

import numpy as np
import pytest

import helpers
import nbnorm

torch = pytest.importorskip("torch")

F64 = dict(rtol=1e-12, atol=1e-12)
F32 = dict(rtol=1e-5, atol=1e-5)

#: Constructor options: each of PyTorch's, and the combinations that change the modes.
OPTIONS = [
    {},
    {"momentum": None},
    {"affine": False},
    {"bias": False},
    {"track_running_stats": False},
    {"momentum": None, "track_running_stats": False},
    {"affine": False, "track_running_stats": False},
]
OPTION_IDS = ["-".join(f"{k}={v}" for k, v in o.items()) or "defaults" for o in OPTIONS]

#: (shape, the torch module of that rank)
SHAPES = [((6, 3), torch.nn.BatchNorm1d), ((3, 4, 5, 3), torch.nn.BatchNorm2d)]


def _twins(rng, C, module, dtype, eps=1e-3, **options):
    """A layer and its torch module with the same options and random parameters."""
    layer = nbnorm.BatchNorm(C, eps=eps, dtype=dtype, **options)
    if layer.weight is not None:
        layer.weight[...] = helpers.channel(rng, C, dtype, 0.5, 1.5)
    if layer.bias is not None:
        layer.bias[...] = helpers.channel(rng, C, dtype)
    if layer.running_mean is not None:
        layer.running_mean[...] = helpers.channel(rng, C, dtype)
        layer.running_var[...] = helpers.positive(rng, C, dtype)
    torch_options = {k: v for k, v in options.items() if k not in ("axis", "activation")}
    bn = module(C, eps=eps, dtype=torch.from_numpy(np.zeros(0, dtype)).dtype, **torch_options)
    bn.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in layer.state_dict().items()})
    return layer, bn


def _torch_step(bn, x, dy, residual=None, relu=False):
    """``bn(x)`` (``relu(bn(x) + residual)``) and its gradients through autograd."""
    bn.zero_grad()
    xt = torch.from_numpy(x.copy()).requires_grad_()
    rt = None if residual is None else torch.from_numpy(residual.copy()).requires_grad_()
    y = bn(xt)
    if rt is not None:
        y = y + rt
    if relu:
        y = torch.relu(y)
    y.backward(torch.from_numpy(dy))
    grads = (xt.grad, None if bn.weight is None else bn.weight.grad,
             None if bn.bias is None else bn.bias.grad, None if rt is None else rt.grad)
    return y.detach(), grads


def _assert_state(layer, bn, tol):
    for k, v in bn.state_dict().items():
        helpers.assert_close(layer.state_dict()[k], v, tol, k)
    assert list(layer.state_dict()) == list(bn.state_dict())


def _assert_step(layer, bn, x, dy, tol, residual=None):
    y = layer(x, residual=residual)
    dx = layer.backward(dy)
    y_t, (dx_t, dw_t, db_t, dr_t) = _torch_step(bn, x, dy, residual,
                                                relu=layer.activation == "relu")
    helpers.assert_close(y, y_t, tol, "out")
    helpers.assert_close(dx, dx_t, tol, "grad_input")
    for name, ours, theirs in (("grad_weight", layer.grad_weight, dw_t),
                               ("grad_bias", layer.grad_bias, db_t),
                               ("grad_residual", layer.grad_residual, dr_t)):
        assert (ours is None) == (theirs is None), name
        if ours is not None:
            helpers.assert_close(ours, theirs, tol, name)
    _assert_state(layer, bn, tol)
    return y, dx


@pytest.mark.parametrize("shape, module", SHAPES, ids=["1d", "2d"])
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_training_then_eval_match_torch(rng, options, shape, module):
    """Three training steps (running statistics, the counter, momentum=None's
    cumulative average), then a frozen eval step that is still differentiated."""
    layer, bn = _twins(rng, shape[1], module, np.float64, **options)
    for _ in range(3):
        _assert_step(layer, bn, helpers.data(rng, shape, np.float64),
                     helpers.data(rng, shape, np.float64), F64)
    assert layer.train() is layer and layer.eval() is layer and not layer.training
    bn.eval()
    for _ in range(2):  # eval changes no state: the second step sees the same statistics
        _assert_step(layer, bn, helpers.data(rng, shape, np.float64),
                     helpers.data(rng, shape, np.float64), F64)


def test_float32_steps_match_torch(rng):
    shape = (4, 5, 6, 3)
    layer, bn = _twins(rng, 5, torch.nn.BatchNorm2d, np.float32, momentum=None)
    for training in (True, True, False):
        layer.train(training)
        bn.train(training)
        _assert_step(layer, bn, helpers.data(rng, shape, np.float32),
                     helpers.data(rng, shape, np.float32), F32)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_relu_residual_matches_torch_autograd(rng, training):
    """``activation="relu"`` with a residual: ``relu(bn(x) + r)`` through torch's
    autograd, the residual's gradient in ``grad_residual``."""
    shape = (3, 4, 5, 3)
    layer, bn = _twins(rng, 4, torch.nn.BatchNorm2d, np.float64, activation="relu")
    layer.train(training)
    bn.train(training)
    for _ in range(2):
        _assert_step(layer, bn, helpers.data(rng, shape, np.float64),
                     helpers.data(rng, shape, np.float64), F64,
                     residual=helpers.data(rng, shape, np.float64))
    _assert_step(layer, bn, helpers.data(rng, shape, np.float64),  # and then without one
                 helpers.data(rng, shape, np.float64), F64)
    assert layer.grad_residual is None


def test_channels_last_axis_and_memory_order(rng):
    """``axis=-1`` on (N, H, W, C) data, and NCHW data in channels_last memory:
    outputs keep x's memory order, both match torch."""
    layer, bn = _twins(rng, 4, torch.nn.BatchNorm2d, np.float64, axis=-1)
    x = helpers.data(rng, (3, 5, 3, 4), np.float64)
    dy = helpers.data(rng, x.shape, np.float64)
    y = layer(x)
    dx = layer.backward(dy)
    y_t, (dx_t, *_) = _torch_step(bn, np.moveaxis(x, -1, 1), np.moveaxis(dy, -1, 1))
    helpers.assert_close(np.moveaxis(y, -1, 1), y_t, F64)
    helpers.assert_close(np.moveaxis(dx, -1, 1), dx_t, F64)

    layer, bn = _twins(rng, 4, torch.nn.BatchNorm2d, np.float64)
    x = np.moveaxis(x, -1, 1)  # NCHW shape, NHWC memory
    dy = np.moveaxis(dy, -1, 1)
    y, dx = _assert_step(layer, bn, x, dy, F64)
    assert y.strides == x.strides and dx.strides == x.strides
    y2, dx2 = _assert_step(layer, bn, x, dy, F64)
    assert y2 is y and dx2 is dx  # buffers of that memory order, reused


def test_buffers_are_reused_and_never_read_while_written(rng):
    layer = nbnorm.BatchNorm(4, dtype=np.float64)
    x1, x2 = (helpers.data(rng, (5, 4, 3), np.float64) for _ in range(2))
    y1 = layer(x1)
    dx1 = layer.backward(x1)
    y2 = layer(x2)
    dx2 = layer.backward(x2)
    assert y2 is y1 and dx2 is dx1  # documented: the next step overwrites them
    y3 = layer(x2[:4])
    assert y3 is not y1 and y3.shape == (4, 4, 3)

    # The layer's own output as its input: a new output buffer, so the saved x
    # survives and backward differentiates at it.
    y = layer(x1)
    x_again = y.copy()
    z = layer(y)
    assert z is not y
    dz = layer.backward(x1)
    twin = nbnorm.BatchNorm(4, dtype=np.float64)
    helpers.assert_same(twin(x_again), z)
    helpers.assert_same(twin.backward(x1), dz)


def test_backward_uses_the_weight_forward_used(rng):
    layer, bn = _twins(rng, 3, torch.nn.BatchNorm1d, np.float64)
    x, dy = helpers.data(rng, (6, 3), np.float64), helpers.data(rng, (6, 3), np.float64)
    layer(x)
    layer.weight *= 2.0  # an optimizer step before backward
    dx = layer.backward(dy)
    _, (dx_t, *_) = _torch_step(bn, x, dy)
    helpers.assert_close(dx, dx_t, F64)


def test_steady_training_loop_allocates_nothing_like_x(rng):
    """After the first step, a step (train and frozen, ReLU and residual) allocates
    nothing proportional to x; the same measurement sees nbnorm.forward's own
    allocation, so it would see the layer's."""
    layer = nbnorm.BatchNorm(8, activation="relu")
    x, r, dy = (helpers.data(rng, (8, 8, 32, 32), np.float32) for _ in range(3))

    def steps():
        for training in (True, False):
            layer.train(training)
            layer(x, residual=r)
            layer.backward(dy)

    def peak(run):
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            run()
            return tracemalloc.get_traced_memory()[1] - before
        finally:
            tracemalloc.stop()

    steps()
    for _ in range(2):
        assert peak(steps) < x.nbytes / 32
    assert peak(lambda: nbnorm.forward(x)) >= x.nbytes


def test_state_dict_round_trips_with_torch(rng):
    C, shape = 4, (3, 4, 5, 3)
    bn = torch.nn.BatchNorm2d(C, momentum=None)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    for _ in range(3):
        bn(torch.from_numpy(helpers.data(rng, shape, np.float32)))
    layer = nbnorm.BatchNorm(C, momentum=None)
    weight = layer.weight
    # tensors, a parameter that requires grad among them
    assert layer.load_state_dict(dict(bn.state_dict(), weight=bn.weight)) == ([], [])
    assert layer.weight is weight  # copied into the layer's arrays
    _assert_state(layer, bn, dict(rtol=0, atol=0))
    bn.eval()
    layer.eval()
    x = helpers.data(rng, shape, np.float32)
    helpers.assert_close(layer(x), bn(torch.from_numpy(x)).detach(), F32)

    layer.train()
    layer(helpers.data(rng, shape, np.float32))  # a fourth cumulative step, here
    back = torch.nn.BatchNorm2d(C)
    back.load_state_dict({k: torch.from_numpy(np.array(v))
                          for k, v in layer.state_dict().items()})
    assert int(back.num_batches_tracked) == 4
    _assert_state(layer, back, dict(rtol=0, atol=0))


def test_load_state_dict_checks_everything_before_copying(rng):
    layer = nbnorm.BatchNorm(3)
    before = {k: np.array(v) for k, v in layer.state_dict().items()}
    good = {k: np.array(v) + 1 for k, v in before.items()}
    bad_cases = [
        (dict(good, running_var=np.ones(4)), ValueError, r"running_var must have shape \(3,\)"),
        (dict(good, running_var=np.ones(3, np.int32)), TypeError, "running_var"),
        (dict(good, num_batches_tracked=np.array(1.0)), TypeError, "integer"),
        (dict(good, num_batches_tracked=np.array(-1)), ValueError, "negative"),
        (dict(good, num_batches_tracked=np.array([1])), ValueError, "scalar"),
        ({k: v for k, v in good.items() if k != "bias"}, ValueError, r"missing keys \['bias'\]"),
        (dict(good, extra=np.ones(3)), ValueError, r"unexpected keys \['extra'\]"),
    ]
    for state, error, match in bad_cases:
        with pytest.raises(error, match=match):
            layer.load_state_dict(state)
        for k, v in layer.state_dict().items():
            helpers.assert_same(v, before[k], k)

    result = layer.load_state_dict(dict(good, extra=np.ones(3)), strict=False)
    assert result == nbnorm.layer.IncompatibleKeys([], ["extra"])
    del good["num_batches_tracked"]  # kept, as PyTorch does without version metadata
    assert layer.load_state_dict(good) == ([], [])
    assert int(layer.num_batches_tracked) == 1
    no_affine = nbnorm.BatchNorm(3, affine=False, track_running_stats=False)
    assert no_affine.state_dict() == {}
    with pytest.raises(ValueError, match="unexpected"):
        no_affine.load_state_dict(good)


def test_bad_input_raises_and_changes_nothing(rng):
    layer = nbnorm.BatchNorm(3, momentum=None)
    x = helpers.data(rng, (5, 3), np.float32)
    layer(x)
    dx = layer.backward(x).copy()
    state = {k: np.array(v) for k, v in layer.state_dict().items()}

    for bad, error, match in [
        (helpers.data(rng, (5, 4), np.float32), ValueError, "expected 3 channels"),
        (np.ones(3, np.float32), ValueError, "at least 2 dimensions"),
        (np.ones((5, 3), np.int64), TypeError, "floating-point"),
        (np.ones((1, 3), np.float32), ValueError, "more than 1 value per channel"),
    ]:
        with pytest.raises(error, match=match):
            layer(bad)
        for k, v in layer.state_dict().items():
            helpers.assert_same(v, state[k], k)
    with pytest.raises(RuntimeError, match="call the layer first"):
        layer.backward(x)  # the failed calls left nothing to differentiate
    with pytest.raises(ValueError, match="residual must have x's shape"):
        layer(x, residual=np.ones((5, 4), np.float32))

    free = nbnorm.BatchNorm(3, affine=False, track_running_stats=False)
    with pytest.raises(ValueError, match="expected 3 channels"):
        free(helpers.data(rng, (5, 2), np.float32))  # nothing else has C to check

    layer(x)
    with pytest.raises(ValueError, match="grad_out must have x's shape"):
        layer.backward(np.ones((4, 3), np.float32))
    helpers.assert_same(layer.backward(x), dx)  # still pending after the bad call
    with pytest.raises(RuntimeError, match="differentiated once"):
        layer.backward(x)


@pytest.mark.parametrize("kwargs, error", [
    (dict(num_features=0), ValueError),
    (dict(num_features=2.5), TypeError),
    (dict(eps=0.0), ValueError),
    (dict(momentum=1.5), ValueError),
    (dict(momentum="0.1"), TypeError),
    (dict(dtype=np.int32), TypeError),
    (dict(affine="yes"), TypeError),
    (dict(axis=1.0), TypeError),
    (dict(activation="gelu"), ValueError),
])
def test_bad_constructor_arguments(kwargs, error):
    with pytest.raises(error):
        nbnorm.BatchNorm(**dict(dict(num_features=3), **kwargs))
    with pytest.raises(TypeError, match="mode must be a bool"):
        nbnorm.BatchNorm(3).train("yes")


@pytest.mark.parametrize("options", [{}, {"momentum": None, "affine": False},
                                     {"bias": False, "track_running_stats": False}])
def test_repr_is_torchs(options):
    ours = repr(nbnorm.BatchNorm(7, **options))
    assert ours == repr(torch.nn.BatchNorm2d(7, **options)).replace("BatchNorm2d", "BatchNorm")
    assert repr(nbnorm.BatchNorm(2, axis=-1, dtype=np.float64, activation="relu")).endswith(
        "track_running_stats=True, axis=-1, dtype=float64, activation='relu')")
