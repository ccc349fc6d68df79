"""nbnorm.torch's GroupNorm, LayerNorm, InstanceNorm1d/2d/3d and RMSNorm against
PyTorch's modules (same constructor options, same state, fresh random data),
their gradients against autograd's, ``opcheck`` of the custom ops and
``gradcheck`` in float64 on small shapes."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import nbnorm.torch as nt  # noqa: E402
from nbnorm.torch import norms  # noqa: E402

from helpers import TORCH_TOL  # noqa: E402

F32 = np.dtype(np.float32)


def _tensor(rng, shape, dtype=torch.float32, loc=0.0):
    return torch.from_numpy(rng.standard_normal(shape) + loc).to(dtype)


#: (nbnorm class, torch class, constructor arguments, input shape, memory format)
MODULES = [
    (nt.GroupNorm, torch.nn.GroupNorm, dict(num_groups=3, num_channels=6), (2, 6, 4, 5), None),
    (nt.GroupNorm, torch.nn.GroupNorm, dict(num_groups=2, num_channels=4, affine=False),
     (3, 4, 7), None),
    (nt.GroupNorm, torch.nn.GroupNorm, dict(num_groups=2, num_channels=6), (2, 6, 3, 4),
     torch.channels_last),
    (nt.LayerNorm, torch.nn.LayerNorm, dict(normalized_shape=(4, 5)), (3, 2, 4, 5), None),
    (nt.LayerNorm, torch.nn.LayerNorm, dict(normalized_shape=8, bias=False), (5, 8), None),
    (nt.LayerNorm, torch.nn.LayerNorm, dict(normalized_shape=8, elementwise_affine=False),
     (5, 8), None),
    (nt.RMSNorm, torch.nn.RMSNorm, dict(normalized_shape=[6]), (4, 3, 6), None),
    (nt.RMSNorm, torch.nn.RMSNorm, dict(normalized_shape=6, eps=1e-3,
                                        elementwise_affine=False), (4, 6), None),
    (nt.InstanceNorm1d, torch.nn.InstanceNorm1d, dict(num_features=3), (2, 3, 7), None),
    (nt.InstanceNorm2d, torch.nn.InstanceNorm2d, dict(num_features=4, affine=True,
                                                      track_running_stats=True),
     (2, 4, 3, 5), None),
    (nt.InstanceNorm3d, torch.nn.InstanceNorm3d, dict(num_features=2, affine=True),
     (2, 2, 3, 2, 4), None),
    (nt.InstanceNorm2d, torch.nn.InstanceNorm2d, dict(num_features=3, momentum=None,
                                                      track_running_stats=True),
     (3, 4, 5), None),  # unbatched (C, H, W)
]
IDS = [f"{m[0].__name__}-{i}" for i, m in enumerate(MODULES)]


def _pair(rng, ours, theirs, kwargs, dtype=torch.float32):
    a, b = ours(**kwargs, dtype=dtype), theirs(**kwargs, dtype=dtype)
    with torch.no_grad():  # the same random affine parameters in both
        for p, q in zip(a.parameters(), b.parameters()):
            p.copy_(_tensor(rng, p.shape, dtype, 1.0))
            q.copy_(p)
    return a, b


def _assert_close(got, exp, what):
    tol = TORCH_TOL[F32]
    np.testing.assert_allclose(got.detach().numpy(), exp.detach().numpy(), err_msg=what, **tol)


@pytest.mark.parametrize("ours,theirs,kwargs,shape,memory", MODULES, ids=IDS)
def test_module_as_torch(rng, ours, theirs, kwargs, shape, memory):
    a, b = _pair(rng, ours, theirs, kwargs)
    assert isinstance(a, theirs)
    x = _tensor(rng, shape)
    if memory is not None:
        x = x.contiguous(memory_format=memory)
    dy = _tensor(rng, shape)
    for mode in ("train", "eval", "train"):
        a.train(mode == "train")
        b.train(mode == "train")
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = a(xa), b(xb)
        _assert_close(ya, yb, f"{mode} out")
        if memory is not None:
            assert ya.stride() == yb.stride()
        (ya * dy).sum().backward()
        (yb * dy).sum().backward()
        _assert_close(xa.grad, xb.grad, f"{mode} grad_input")
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            _assert_close(p.grad, q.grad, f"{mode} grad {name}")
            p.grad = q.grad = None
        for (name, s), t in zip(a.named_buffers(), b.buffers()):
            np.testing.assert_allclose(s.numpy(), t.numpy(), rtol=1e-5, atol=1e-6,
                                       err_msg=f"{mode} {name}")
    b.load_state_dict(a.state_dict())


def test_bfloat16_layer_norm_and_convert(rng):
    pytest.importorskip("ml_dtypes")
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8),
                                torch.nn.GroupNorm(2, 8), torch.nn.RMSNorm(8))
    ref = torch.nn.Sequential(*(m for m in model))
    x = _tensor(rng, (6, 8))
    exp = [m(x) for m in ref]
    nt.convert(model)
    assert [type(m) for m in model][1:] == [nt.LayerNorm, nt.GroupNorm, nt.RMSNorm]
    for m, e in zip(model, exp):
        _assert_close(m(x), e, type(m).__name__)
    xb = x.to(torch.bfloat16).requires_grad_()
    ln = nt.LayerNorm(8, dtype=torch.bfloat16)
    y = ln(xb)
    assert y.dtype == torch.bfloat16
    exp = torch.nn.functional.layer_norm(x, (8,))
    np.testing.assert_allclose(y.float().detach().numpy(), exp.numpy(), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and ln.weight.grad.dtype == torch.bfloat16


OP_CASES = [("group", (2, 4, 3), [2], True), ("instance", (2, 3, 4), [], True),
            ("layer", (3, 2, 5), [2, 5], True), ("rms", (4, 5), [5], True)]


@pytest.mark.parametrize("kind,shape,arg,stats", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_opcheck_and_gradcheck(rng, kind, shape, arg, stats):
    x = _tensor(rng, shape, torch.float64).requires_grad_()
    ps = (shape[1],) if kind in ("group", "instance") else tuple(arg)
    w = _tensor(rng, ps, torch.float64, 1.0).requires_grad_()
    b = None if kind == "rms" else _tensor(rng, ps, torch.float64).requires_grad_()
    eps = None if kind == "rms" else 1e-5
    args = (kind, x, w, b, None, None, arg, True, 0.1, eps)
    torch.library.opcheck(norms.norm_op, args)
    f = lambda x, w, b: norms.norm_op(kind, x, w, b, None, None, arg, True, 0.1, eps)[0]  # noqa
    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-5)


def test_export_graph_holds_the_op(rng):
    """The fake gives eager mode's shapes: an exported graph runs the custom op."""
    m = nt.GroupNorm(2, 4)
    x = _tensor(rng, (2, 4, 3, 3))
    ep = torch.export.export(m, (x,))
    assert any("nbnorm.norm" in str(n.target) for n in ep.graph.nodes)
    _assert_close(ep.module()(x), torch.nn.functional.group_norm(x, 2, m.weight, m.bias),
                  "exported")
