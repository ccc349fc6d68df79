"""nbnorm.torch's BatchNorm1d/2d/3d against torch.nn's over every constructor
option, mode, memory format and dtype (outputs, autograd's gradients, running
statistics, the batch counter); the epilogue against ``relu(bn(x) + r)``;
``opcheck`` of the custom ops, float64 ``gradcheck``, ``torch.compile`` and
``torch.export``; ``convert``, state dicts both ways, and SGD on a small CNN
with PyTorch's batch norm and with nbnorm's."""

import copy
import itertools
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import nbnorm  # noqa: E402
import nbnorm.torch as nt  # noqa: E402
from nbnorm.torch import ops  # noqa: E402

import helpers  # noqa: E402
from helpers import TORCH_TOL  # noqa: E402

F = torch.nn.functional
TORCH_BN = {nt.BatchNorm1d: torch.nn.BatchNorm1d, nt.BatchNorm2d: torch.nn.BatchNorm2d,
            nt.BatchNorm3d: torch.nn.BatchNorm3d}
#: Half data against PyTorch's CPU batch norm (float32 arithmetic, like
#: nbnorm's): the two differ by the last rounding, a few units in the last place.
HALF_TOL = {torch.float16: dict(rtol=4e-3, atol=4e-3), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def _tol(dtype):
    return HALF_TOL.get(dtype) or TORCH_TOL[np.dtype(str(dtype).removeprefix("torch."))]


def _tensor(rng, shape, dtype=torch.float32, memory=None):
    t = torch.from_numpy(helpers.data(rng, shape, np.float64)).to(dtype)
    return t if memory is None else t.contiguous(memory_format=memory)


def _np(t):
    return t.detach().to(torch.float64).numpy()


def _assert_close(got, exp, tol, what):
    helpers.assert_close(_np(got), _np(exp), tol, what)


def _sum_tol(tol, exp):
    """``tol`` for a sum over the batch (a parameter's gradient) of half data:
    its rounding error scales with the largest sum, not with each one."""
    if tol not in HALF_TOL.values():
        return tol
    return dict(tol, atol=tol["atol"] * max(1.0, exp.abs().max().item()))


def _twins(rng, ours, kwargs, dtype=torch.float32, attrs=None):
    """nbnorm's module and torch's with the same options and the same random
    parameters and running statistics."""
    theirs = {k: v for k, v in kwargs.items() if k != "activation"}
    a, b = ours(**kwargs, dtype=dtype), TORCH_BN[ours](**theirs, dtype=dtype)
    C = kwargs["num_features"]
    with torch.no_grad():
        for p, q in zip(a.parameters(), b.parameters()):
            p.copy_(torch.from_numpy(helpers.channel(rng, C, np.float64, 0.5, 1.5)))
            q.copy_(p)
        if a.running_mean is not None:
            a.running_mean.copy_(torch.from_numpy(helpers.channel(rng, C, np.float64)))
            a.running_var.copy_(torch.from_numpy(helpers.positive(rng, C, np.float64)))
            b.load_state_dict(a.state_dict())
    for k, v in (attrs or {}).items():
        setattr(a, k, v)
        setattr(b, k, v)
    return a, b


def _step(rng, a, b, x, tol, what, residual=None):
    """One forward and backward of both modules on ``x`` (the torch module
    with the epilogue written out); outputs, strides, gradients and buffers
    compared.  Returns nbnorm's output, the output gradient, and nbnorm's
    gradients by name ("input", "residual", the parameters')."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ra = rb = None
    if residual is not None:
        ra, rb = residual.clone().requires_grad_(), residual.clone().requires_grad_()
    ya = a(xa) if ra is None else a(xa, ra)
    yb = b(xb) if rb is None else b(xb) + rb
    if getattr(a, "activation", None) == "relu":
        yb = torch.relu(yb)
    assert ya.dtype == yb.dtype and ya.shape == yb.shape, what
    assert ya.stride() == yb.stride(), what
    _assert_close(ya, yb, tol, f"{what}: out")
    dy = _tensor(rng, x.shape, x.dtype)
    (ya * dy).sum().backward()
    (yb * dy).sum().backward()
    _assert_close(xa.grad, xb.grad, tol, f"{what}: grad_input")
    grads = {"input": xa.grad}
    if ra is not None:
        _assert_close(ra.grad, rb.grad, tol, f"{what}: grad_residual")
        grads["residual"] = ra.grad
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert p.grad.dtype == q.grad.dtype, what
        _assert_close(p.grad, q.grad, _sum_tol(tol, q.grad), f"{what}: grad {name}")
        grads[name] = p.grad
        p.grad = q.grad = None
    _assert_buffers(a, b, tol, what)
    return ya, dy, grads


def _assert_buffers(a, b, tol, what):
    bufs_a, bufs_b = dict(a.named_buffers()), dict(b.named_buffers())
    assert bufs_a.keys() == bufs_b.keys(), what
    for name, s in bufs_a.items():
        assert s.dtype == bufs_b[name].dtype, f"{what}: {name}"
        if name == "num_batches_tracked":
            assert int(s) == int(bufs_b[name]), what
        else:
            _assert_close(s, bufs_b[name], tol, f"{what}: {name}")


#: (nbnorm class, constructor arguments, attributes set after construction,
#: input shape, memory format, dtype)
MODULES = [
    (nt.BatchNorm1d, dict(num_features=5), {}, (8, 5), None, torch.float32),
    (nt.BatchNorm1d, dict(num_features=3, momentum=None), {}, (4, 3, 7), None, torch.float32),
    (nt.BatchNorm2d, dict(num_features=4, affine=False), {}, (3, 4, 5, 6), None, torch.float32),
    (nt.BatchNorm2d, dict(num_features=4, bias=False), {}, (3, 4, 5, 6), None, torch.float32),
    (nt.BatchNorm2d, dict(num_features=4, track_running_stats=False), {}, (3, 4, 5, 6), None,
     torch.float32),
    # buffers that are not tracked: batch statistics in training, the buffers in eval
    (nt.BatchNorm2d, dict(num_features=4), dict(track_running_stats=False), (3, 4, 5, 6), None,
     torch.float32),
    (nt.BatchNorm2d, dict(num_features=4, eps=1e-3, momentum=0.3), {}, (3, 4, 5, 6),
     torch.channels_last, torch.float32),
    (nt.BatchNorm3d, dict(num_features=3), {}, (2, 3, 4, 3, 5), None, torch.float64),
    (nt.BatchNorm3d, dict(num_features=3, momentum=None, affine=False), {}, (2, 3, 4, 3, 5),
     torch.channels_last_3d, torch.float64),
    (nt.BatchNorm1d, dict(num_features=3, bias=False, momentum=None), {}, (5, 3, 4), None,
     torch.float64),
    (nt.BatchNorm2d, dict(num_features=4), {}, (3, 4, 5, 6), torch.channels_last,
     torch.float64),
]
IDS = [f"{m[0].__name__}-{i}" for i, m in enumerate(MODULES)]


@pytest.mark.parametrize("ours,kwargs,attrs,shape,memory,dtype", MODULES, ids=IDS)
def test_module_as_torch(rng, ours, kwargs, attrs, shape, memory, dtype):
    """train, train, eval, train: the same outputs (and strides), gradients,
    running statistics and counter as the torch module; the state dicts of
    either load into the other."""
    a, b = _twins(rng, ours, kwargs, dtype, attrs)
    assert isinstance(a, TORCH_BN[ours])
    for i, mode in enumerate(("train", "train", "eval", "train")):
        a.train(mode == "train")
        b.train(mode == "train")
        _step(rng, a, b, _tensor(rng, shape, dtype, memory), _tol(dtype), f"step {i} ({mode})")

    c = TORCH_BN[ours](**kwargs, dtype=dtype)
    c.load_state_dict(a.state_dict())
    _assert_buffers(c, a, dict(rtol=0, atol=0), "torch loaded nbnorm's state")
    d = ours(**kwargs, dtype=dtype)
    d.load_state_dict(b.state_dict())
    _assert_buffers(d, b, dict(rtol=0, atol=0), "nbnorm loaded torch's state")
    for p, q in zip(d.parameters(), b.parameters()):
        assert torch.equal(p, q)


#: (nbnorm class, input shape, memory format) x options x dtype, for the sweep
SWEEP_INPUTS = [(nt.BatchNorm1d, (6, 3), None), (nt.BatchNorm1d, (4, 3, 5), None),
                (nt.BatchNorm2d, (3, 3, 4, 5), None),
                (nt.BatchNorm2d, (3, 3, 4, 5), torch.channels_last),
                (nt.BatchNorm3d, (2, 3, 3, 4, 2), None),
                (nt.BatchNorm3d, (2, 3, 3, 4, 2), torch.channels_last_3d)]
SWEEP_OPTIONS = [{}, dict(momentum=None), dict(affine=False), dict(bias=False),
                 dict(track_running_stats=False), dict(eps=1e-3, momentum=0.5)]
SWEEP = [(cls, dict(num_features=shape[1], **options), {}, shape, memory, dtype)
         for (cls, shape, memory), options, dtype in itertools.product(
             SWEEP_INPUTS, SWEEP_OPTIONS, [torch.float32, torch.float64])]


@pytest.mark.slow
@pytest.mark.parametrize("ours,kwargs,attrs,shape,memory,dtype", SWEEP,
                         ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(SWEEP)])
def test_every_option_layout_and_dtype_as_torch(rng, ours, kwargs, attrs, shape, memory, dtype):
    test_module_as_torch(rng, ours, kwargs, attrs, shape, memory, dtype)


@pytest.mark.parametrize("memory", [None, torch.channels_last], ids=["NCHW", "channels_last"])
def test_empty_batch_as_torch(rng, memory):
    """N=0 runs as PyTorch runs it: an empty output and input gradient, zero
    parameter gradients, running statistics unchanged, the batch counted."""
    a, b = _twins(rng, nt.BatchNorm2d, dict(num_features=3, momentum=None))
    x = torch.empty((0, 3, 4, 5)).contiguous(memory_format=memory or torch.contiguous_format)
    for mode in ("train", "eval"):
        a.train(mode == "train")
        b.train(mode == "train")
        ya, _, _ = _step(rng, a, b, x, dict(rtol=0, atol=0), mode)
        assert ya.shape == x.shape
    assert int(a.num_batches_tracked) == 1


_SLOW = pytest.mark.slow
HALF_INPUTS = [pytest.param(nt.BatchNorm2d, (3, 4, 5, 6), None, id="NCHW"),
               pytest.param(nt.BatchNorm1d, (9, 4), None, id="NC", marks=_SLOW),
               pytest.param(nt.BatchNorm1d, (3, 4, 7), None, id="NCL", marks=_SLOW),
               pytest.param(nt.BatchNorm2d, (3, 4, 5, 6), torch.channels_last,
                            id="channels_last", marks=_SLOW),
               pytest.param(nt.BatchNorm3d, (2, 4, 3, 2, 5), torch.channels_last_3d,
                            id="channels_last_3d", marks=_SLOW)]


@pytest.mark.parametrize("ours,shape,memory", HALF_INPUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_cpu_half_as_torch(rng, dtype, ours, shape, memory):
    """Half data with half parameters and with float32 ones (autocast's mix):
    PyTorch's results to half precision, the float64 batch norm of the same
    rounded data to a few units in the last place."""
    if dtype is torch.bfloat16:
        pytest.importorskip("ml_dtypes")
    tol = _tol(dtype)
    for pdt in (dtype, torch.float32):
        a, b = _twins(rng, ours, dict(num_features=shape[1]), pdt)
        for mode in ("train", "eval"):
            a.train(mode == "train")
            b.train(mode == "train")
            x = _tensor(rng, shape, dtype, memory)
            stats = [t.double() for t in (a.running_mean, a.running_var)]
            params = [p.detach().double().requires_grad_() for p in (a.weight, a.bias)]
            what = f"{pdt} parameters, {mode}"
            y, dy, grads = _step(rng, a, b, x, tol, what)
            x64 = x.double().requires_grad_()
            exact = F.batch_norm(x64, *stats, *params, training=mode == "train", eps=a.eps)
            exact.backward(dy.double())
            _assert_close(y, exact, tol, f"{what}: against float64")
            _assert_close(grads["input"], x64.grad, tol, f"{what}: grad_input against float64")
            for name, p in zip(("weight", "bias"), params):
                _assert_close(grads[name], p.grad, _sum_tol(tol, p.grad),
                              f"{what}: grad {name} against float64")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_relu_residual_epilogue_as_torch(rng, training):
    """``activation="relu"`` and a residual (here in another memory format than
    ``x``): ``relu(bn(x) + r)`` and its gradients, x's and r's included."""
    tol = TORCH_TOL[np.dtype(np.float64)]
    a, b = _twins(rng, nt.BatchNorm2d, dict(num_features=4, activation="relu"), torch.float64)
    a.train(training)
    b.train(training)
    shape = (3, 4, 5, 6)
    x = _tensor(rng, shape, torch.float64, torch.channels_last)
    _step(rng, a, b, x, tol, "residual", residual=_tensor(rng, shape, torch.float64))
    y, _, _ = _step(rng, a, b, x, tol, "relu alone")
    assert (y >= 0).all()
    assert "activation='relu'" in repr(a)
    with pytest.raises(ValueError, match="activation"):
        nt.BatchNorm2d(4, activation="gelu")


def test_unsupported_tensors_run_torch_batch_norm(rng, monkeypatch):
    """Tensors nbnorm's kernels do not take (CUDA bfloat16, other devices; here
    every tensor) run PyTorch's batch norm, the counter and epilogue included."""
    from nbnorm.torch import tensors

    monkeypatch.setattr(tensors, "supported", lambda t: False)

    def no_op(*args):
        raise AssertionError("nbnorm's op called for an unsupported tensor")

    monkeypatch.setattr(ops, "batch_norm_op", no_op)
    tol = TORCH_TOL[np.dtype(np.float64)]
    kwargs = dict(num_features=3, momentum=None, activation="relu")
    a, b = _twins(rng, nt.BatchNorm2d, kwargs, torch.float64)
    for mode in ("train", "train", "eval"):
        a.train(mode == "train")
        b.train(mode == "train")
        x, r = (_tensor(rng, (2, 3, 4, 5), torch.float64) for _ in range(2))
        _step(rng, a, b, x, tol, mode, residual=r)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,memory", [(torch.float32, None),
                                          (torch.float32, torch.channels_last),
                                          (torch.float16, None)], ids=["float32", "cl", "half"])
def test_cuda_module_as_torch(rng, dtype, memory):
    """CUDA tensors run nbnorm's kernels (on PyTorch's current stream) with
    torch's results; compared on the host."""
    from nbnorm.torch import tensors

    x = _tensor(rng, (4, 3, 5, 6), dtype, memory).cuda()
    assert tensors.supported(x), "numba-cuda cannot run on this device"
    a, b = (m.cuda() for m in _twins(rng, nt.BatchNorm2d, dict(num_features=3), dtype))
    tol = _tol(dtype)
    for mode in ("train", "eval"):
        a.train(mode == "train")
        b.train(mode == "train")
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = a(xa), b(xb)
        assert ya.is_cuda and ya.stride() == yb.stride()
        dy = torch.randn_like(yb)
        (ya * dy).sum().backward()
        (yb * dy).sum().backward()
        for got, exp, what in [(ya, yb, "out"), (xa.grad, xb.grad, "grad_input"),
                               (a.weight.grad, b.weight.grad, "grad weight"),
                               (a.running_var, b.running_var, "running_var")]:
            _assert_close(got.cpu(), exp.cpu(), _sum_tol(tol, exp.cpu()), f"{mode} {what}")
        a.zero_grad()
        b.zero_grad()


def _op_inputs(rng, shape=(3, 4, 5), dtype=torch.float64):
    x = _tensor(rng, shape, dtype).requires_grad_()
    C = shape[1]
    w = torch.from_numpy(helpers.channel(rng, C, np.float64, 0.5, 1.5)).to(dtype)
    b = torch.from_numpy(helpers.channel(rng, C, np.float64)).to(dtype)
    stats = (torch.from_numpy(helpers.channel(rng, C, np.float64)).to(dtype),
             torch.from_numpy(helpers.positive(rng, C, np.float64)).to(dtype))
    return x, w.requires_grad_(), b.requires_grad_(), stats


def test_opcheck(rng):
    """Both ops' schemas, fakes (channels_last strides included), autograd
    registration and dispatch, on a few sample inputs."""
    x, w, b, (rm, rv) = _op_inputs(rng)
    r = _tensor(rng, x.shape, x.dtype).requires_grad_()
    xc = _tensor(rng, (2, 4, 3, 3), torch.float32, torch.channels_last).requires_grad_()
    for args in [(x, w, b, rm, rv, None, True, 0.1, 1e-5, None, False),
                 (x, w, b, rm, rv, torch.tensor(3), True, None, 1e-5, None, False),
                 (x, w, b, rm, rv, None, False, 0.1, 1e-3, None, False),
                 (x, None, None, None, None, None, True, 0.1, 1e-5, r, True),
                 (xc, None, None, None, None, None, True, 0.1, 1e-5, None, True)]:
        torch.library.opcheck(ops.batch_norm_op, args)
    out, mean, invstd, _, _ = ops.batch_norm_op(x, w, b, None, None, None, True, 0.1, 1e-5,
                                                None, True)
    g = _tensor(rng, x.shape, x.dtype)
    # plain tensors: the backward op has no derivative of its own (see gradcheck)
    x, w, out = x.detach(), w.detach(), out.detach()
    for args in [(g, x, mean, invstd, w, True, None, False),
                 (g, x, mean, invstd, None, False, None, False),
                 (g, x, mean, invstd, w, True, out, True)]:
        torch.library.opcheck(ops.batch_norm_backward_op, args)


def test_gradcheck_and_no_double_backward(rng):
    """float64 gradients against central differences, training and eval, with
    the epilogue; a second derivative raises a clear error, never numbers."""
    x, w, b, stats = _op_inputs(rng, (3, 2, 4))
    r = _tensor(rng, x.shape, x.dtype).requires_grad_()
    for training in (True, False):
        def bn(x, w, b, r=None, activation=None):
            rm, rv = (s.clone() for s in stats)
            return nt.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, residual=r,
                                 activation=activation)
        assert torch.autograd.gradcheck(bn, (x, w, b), eps=1e-6, atol=1e-6)
        assert torch.autograd.gradcheck(lambda *a: bn(*a, activation="relu"), (x, w, b, r),
                                        eps=1e-6, atol=1e-6)
    y = nt.batch_norm(x, None, None, w, b, True)
    gx, = torch.autograd.grad((y ** 3).sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="no second derivative"):
        gx.sum().backward()
    with pytest.raises(NotImplementedError, match="no second derivative"):
        torch.autograd.gradgradcheck(lambda x: nt.batch_norm(x, None, None, w, b, True), (x,))


def _cnn(dtype, seed):
    """conv -> BN -> relu twice, then a linear layer; one BN with the
    cumulative average, one ReLU in place on the BN's output."""
    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4),
                         nn.ReLU(inplace=True),
                         nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6, momentum=None),
                         nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 5)).to(dtype)


def _batches(rng, dtype, n):
    return [(_tensor(rng, (8, 3, 6, 6), dtype), torch.from_numpy(rng.integers(0, 5, 8)))
            for _ in range(n)]


def _train(model, batches, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for i in range(steps):
        x, y = batches[i % len(batches)]
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return np.array(losses)


def _assert_states(a, b, tol, what):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), what
    for k in sa:
        _assert_close(sa[k], sb[k], tol, f"{what}: {k}")


@pytest.mark.parametrize("dtype,tol", [(torch.float64, dict(rtol=1e-9, atol=1e-9)),
                                       (torch.float32, dict(rtol=1e-4, atol=1e-4))],
                         ids=["float64", "float32"])
def test_sgd_on_a_cnn_as_torch(rng, dtype, tol):
    """20 SGD steps of a CNN with PyTorch's batch norm and with ``convert``'s:
    the same losses, parameters, running statistics and eval outputs."""
    ref = _cnn(dtype, int(rng.integers(1 << 31)))
    model = nt.convert(copy.deepcopy(ref))
    batches = _batches(rng, dtype, 4)
    losses = _train(model, batches, 20)
    helpers.assert_close(losses, _train(ref, batches, 20), tol, "losses")
    assert losses[-1] < losses[0]
    _assert_states(model, ref, tol, "after training")
    x = batches[0][0]
    _assert_close(model.eval()(x), ref.eval()(x), tol, "eval")


def test_compile_aot_eager_trains_as_eager(rng):
    """A whole-graph ``torch.compile`` (no graph break) trains as eager mode."""
    model = nt.convert(_cnn(torch.float32, int(rng.integers(1 << 31))))
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    batches = _batches(rng, torch.float32, 2)
    tol = dict(rtol=1e-6, atol=1e-6)  # the same kernels; a graph may order sums its way
    helpers.assert_close(_train(compiled, batches, 3), _train(model, batches, 3), tol,
                         "losses")
    _assert_states(compiled_model, model, tol, "after training")
    _assert_close(compiled.eval()(batches[0][0]), model.eval()(batches[0][0]), tol, "eval")


@pytest.mark.slow
@pytest.mark.parametrize("backend,dynamic", [("aot_eager", True), ("inductor", False)])
def test_compile_trains_as_eager_slow(rng, backend, dynamic):
    """Inductor (needs a C++ compiler; a minute to compile), and varying batch
    sizes of channels_last data under dynamic shapes."""
    if backend == "inductor" and shutil.which("g++") is None:
        pytest.skip("Inductor needs a C++ compiler")
    model = nt.convert(_cnn(torch.float32, int(rng.integers(1 << 31))))
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend=backend, dynamic=dynamic, fullgraph=True)
    batches = [(x.contiguous(memory_format=torch.channels_last)[:n], y[:n])
               for (x, y), n in zip(_batches(rng, torch.float32, 3), (8, 5, 6))]
    tol = TORCH_TOL[np.dtype(np.float32)]
    helpers.assert_close(_train(compiled, batches, 3), _train(model, batches, 3), tol, "losses")
    _assert_states(compiled_model, model, tol, "after training")


def test_export_eval_and_train(rng):
    """Exported graphs (a dynamic batch size) hold the custom op; the training
    graph counts the batch and updates the running statistics as eager mode
    does, at another batch size than the traced one."""
    model = nt.convert(_cnn(torch.float32, int(rng.integers(1 << 31))))
    x = _tensor(rng, (8, 3, 6, 6))
    batch = ({0: torch.export.Dim("batch", min=2)},)
    tol = dict(rtol=1e-6, atol=1e-6)  # the same kernels; a graph may order sums its way
    for training in (False, True):
        model.train(training)
        eager = copy.deepcopy(model)
        ep = torch.export.export(model, (x,), dynamic_shapes=batch)
        assert sum("nbnorm.batch_norm" in str(n.target) for n in ep.graph.nodes) == 2
        exported = ep.module()
        _assert_close(exported(x[:5]), eager(x[:5]), tol, f"training={training}")
        _assert_states(exported, eager, tol, f"training={training}")
    assert int(eager[1].num_batches_tracked) == 1


def test_convert_swaps_in_place(rng):
    """Every torch BatchNorm1d/2d/3d becomes nbnorm's, the same object with the
    same Parameters and buffers (optimizers keep working); subclasses of the
    torch classes, SyncBatchNorm and uninitialized lazy modules are left
    alone; ``convert_sync_batchnorm`` still takes them."""
    class OwnBatchNorm(torch.nn.BatchNorm2d):
        pass

    nn = torch.nn
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4),
                          nn.Sequential(nn.BatchNorm2d(4, affine=False), OwnBatchNorm(4)),
                          nn.BatchNorm3d(4, track_running_stats=False), nn.GroupNorm(2, 4),
                          nn.SyncBatchNorm(4), nn.LazyBatchNorm2d())
    before = {name: (m, type(m), dict(m.named_parameters()), dict(m.named_buffers()))
              for name, m in model.named_modules()}
    assert nt.convert(model) is model
    kinds = {name: type(m) for name, m in model.named_modules()}
    assert kinds["1"] is nt.BatchNorm1d and kinds["2.0"] is nt.BatchNorm2d
    assert kinds["3"] is nt.BatchNorm3d and kinds["2.1"] is OwnBatchNorm
    assert kinds["4"] is nt.GroupNorm and kinds["5"] is nn.SyncBatchNorm
    assert kinds["6"] is nn.LazyBatchNorm2d  # no shape yet: converted once it has one
    for name, m in model.named_modules():
        module, kind, params, buffers = before[name]
        assert m is module and isinstance(m, kind)
        assert all(p is params[k] for k, p in m.named_parameters())
        assert params.keys() == dict(m.named_parameters()).keys()
        assert all(t is buffers[k] for k, t in m.named_buffers())
    assert model[1].activation is None
    x = _tensor(rng, (6, 4))
    _assert_close(model[1](x), F.batch_norm(x, None, None, model[1].weight, model[1].bias,
                                            training=True), TORCH_TOL[np.dtype(np.float32)],
                  "converted")

    bn = nn.BatchNorm2d(3)
    assert nt.convert(bn) is bn and type(bn) is nt.BatchNorm2d
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(bn))[0]
    assert type(sync) is nn.SyncBatchNorm and sync.weight is bn.weight
    with pytest.raises(TypeError, match="torch.nn.Module"):
        nt.convert([bn])


def test_state_dict_between_numpy_layer_and_module(rng):
    """``nbnorm.BatchNorm``'s state dict (PyTorch's key names, NumPy arrays)
    loads into nbnorm.torch's module and back, and both then compute alike."""
    C, shape = 4, (3, 4, 5, 2)
    layer = nbnorm.BatchNorm(C, momentum=None, dtype=np.float64)
    layer.load_state_dict({"weight": helpers.channel(rng, C, np.float64, 0.5, 1.5),
                           "bias": helpers.channel(rng, C, np.float64)}, strict=False)
    for _ in range(2):
        layer(helpers.data(rng, shape, np.float64))
    module = nt.BatchNorm2d(C, momentum=None, dtype=torch.float64)
    module.load_state_dict({k: torch.from_numpy(np.array(v))
                            for k, v in layer.state_dict().items()})
    assert list(module.state_dict()) == list(layer.state_dict())
    assert int(module.num_batches_tracked) == 2
    tol = TORCH_TOL[np.dtype(np.float64)]
    x = helpers.data(rng, shape, np.float64)
    helpers.assert_close(_np(module(torch.from_numpy(x))), layer(x), tol, "third step")
    back = nbnorm.BatchNorm(C, momentum=None, dtype=np.float64)
    assert back.load_state_dict(module.state_dict()) == ([], [])
    for k, v in module.state_dict().items():
        helpers.assert_close(back.state_dict()[k], v.numpy(), dict(rtol=0, atol=0), k)
        helpers.assert_close(layer.state_dict()[k], v.numpy(), tol, k)
