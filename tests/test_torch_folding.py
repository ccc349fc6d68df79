"""nbnorm.torch.fuse_conv_bn_eval and fold_model: the folded layer computes
``bn(conv(x))`` of the eval-mode modules, for the layer kinds ``nbnorm.fold``
takes (its arithmetic is tested in test_fold.py); PyTorch's own fusion is wrong
for grouped transposed convolutions (pytorch#180995), nbnorm's is not."""

import copy
import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import nbnorm.torch as nt  # noqa: E402

import helpers  # noqa: E402

nn = torch.nn
EXACT64 = dict(rtol=1e-12, atol=1e-12)


def _randomized(bn, rng):
    """``bn`` in eval mode with random running statistics and affine parameters."""
    C = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.from_numpy(helpers.channel(rng, C, np.float64)))
        bn.running_var.copy_(torch.from_numpy(helpers.positive(rng, C, np.float64)))
        for p in bn.parameters():
            p.copy_(torch.from_numpy(helpers.channel(rng, C, np.float64)))
    return bn.eval()


def _x(rng, shape, dtype=torch.float64):
    return torch.from_numpy(helpers.data(rng, shape, np.float64)).to(dtype)


def _assert_close(got, exp, tol, what=""):
    helpers.assert_close(got.detach().double().numpy(), exp.detach().double().numpy(), tol,
                         what)


#: (id, layer, batch norm, input shape)
PAIRS = [
    ("conv2d", lambda: nn.Conv2d(3, 4, 3, padding=1), lambda: nn.BatchNorm2d(4), (2, 3, 5, 5)),
    ("conv2d-groups-no-bias", lambda: nn.Conv2d(4, 6, 3, groups=2, bias=False),
     lambda: nn.BatchNorm2d(6), (2, 4, 5, 5)),
    ("conv-transpose2d-groups", lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2),
     lambda: nn.BatchNorm2d(6), (2, 4, 3, 3)),
    ("conv-transpose2d-groups-affine-free", lambda: nn.ConvTranspose2d(6, 3, 2, groups=3),
     lambda: nn.BatchNorm2d(3, affine=False), (2, 6, 3, 4)),
    ("conv1d-nbnorm-bn", lambda: nn.Conv1d(3, 5, 3), lambda: nt.BatchNorm1d(5), (2, 3, 7)),
    ("linear", lambda: nn.Linear(5, 4), lambda: nn.BatchNorm1d(4, bias=False), (6, 5)),
]


@pytest.mark.parametrize("make_conv,make_bn,shape", [p[1:] for p in PAIRS],
                         ids=[p[0] for p in PAIRS])
def test_fused_layer_is_bn_of_layer(rng, make_conv, make_bn, shape):
    """float64: ``fused(x) == bn(conv(x))``; a new layer of conv's class and
    options with new parameters (a bias where conv had none); conv unchanged."""
    conv = make_conv().double()
    bn = _randomized(make_bn().double(), rng)
    before = copy.deepcopy(conv.state_dict())
    x = _x(rng, shape)
    fused = nt.fuse_conv_bn_eval(conv, bn)
    assert type(fused) is type(conv) and fused is not conv
    assert fused.weight.shape == conv.weight.shape and fused.bias.shape == (bn.num_features,)
    assert fused.weight.requires_grad and fused.weight is not conv.weight
    _assert_close(fused(x), bn(conv(x)), EXACT64)
    for k, v in conv.state_dict().items():
        assert torch.equal(v, before[k]), k


#: (layer, batch-norm class, input shape) x conv bias x batch-norm options
SWEEP_LAYERS = [(lambda b: nn.Conv1d(4, 6, 3, groups=2, bias=b), nn.BatchNorm1d, (2, 4, 7)),
                (lambda b: nn.Conv3d(2, 3, 2, stride=2, bias=b), nn.BatchNorm3d, (2, 2, 4, 3, 4)),
                (lambda b: nn.ConvTranspose1d(4, 6, 3, groups=2, bias=b), nn.BatchNorm1d,
                 (2, 4, 5)),
                (lambda b: nn.ConvTranspose3d(4, 4, 2, groups=4, bias=b), nn.BatchNorm3d,
                 (2, 4, 2, 3, 2)),
                (lambda b: nn.Conv2d(6, 6, 3, groups=6, dilation=2, bias=b), nn.BatchNorm2d,
                 (2, 6, 7, 7)),
                (lambda b: nn.Linear(3, 5, bias=b), nn.BatchNorm1d, (4, 3))]
SWEEP = list(itertools.product(SWEEP_LAYERS, [True, False],
                               [{}, dict(affine=False), dict(bias=False), dict(eps=0.1)]))


@pytest.mark.slow
@pytest.mark.parametrize("layer,conv_bias,bn_options", SWEEP)
def test_every_layer_kind_folds(rng, layer, conv_bias, bn_options):
    make_conv, bn_class, shape = layer
    conv = make_conv(conv_bias).double()
    C = conv.out_features if isinstance(conv, nn.Linear) else conv.out_channels
    bn = _randomized(bn_class(C, **bn_options).double(), rng)
    x = _x(rng, shape)
    _assert_close(nt.fuse_conv_bn_eval(conv, bn)(x), bn(conv(x)), EXACT64)


def test_pytorch_fusion_wrong_for_grouped_transposed_conv(rng):
    """pytorch#180995: ``fuse_conv_bn_weights(transpose=True)`` scales a
    ``(Cin, Cout / groups, k, k)`` weight by a ``(1, Cout, 1, 1)`` view, which
    fails or (with one output channel per group) broadcasts to a weight of the
    wrong shape; nbnorm's fold is ``bn(conv(x))``.  Ungrouped, both agree."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    for groups, cin, cout in ((1, 4, 6), (2, 4, 6), (3, 6, 3)):
        conv = nn.ConvTranspose2d(cin, cout, 3, stride=2, groups=groups).double()
        bn = _randomized(nn.BatchNorm2d(cout).double(), rng)
        x = _x(rng, (2, cin, 3, 3))
        expected = bn(conv(x))
        _assert_close(nt.fuse_conv_bn_eval(conv, bn)(x), expected, EXACT64, f"groups={groups}")
        torch_fused = copy.deepcopy(conv)
        try:
            torch_fused.weight, torch_fused.bias = fuse_conv_bn_weights(
                conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight,
                bn.bias, transpose=True)
            got = torch_fused(x)
        except RuntimeError:
            got = None
        if groups == 1:
            _assert_close(got, expected, EXACT64, "PyTorch ungrouped")
        else:
            assert got is None or got.shape != expected.shape or not torch.allclose(
                got, expected), f"PyTorch's fusion is right for groups={groups}: update the docs"


@pytest.mark.parametrize("make_conv,shape", [(lambda: nn.Conv2d(4, 6, 3, groups=2), (2, 4, 5, 5)),
                                             (lambda: nn.ConvTranspose2d(4, 6, 2, groups=2),
                                              (2, 4, 3, 3))], ids=["conv2d", "conv-transpose2d"])
def test_float16_weights_stay_float16(rng, make_conv, shape):
    """Half layer and batch norm: the fused layer is float16, and its float64
    evaluation is the float64 ``bn(conv(x))`` to float16's precision."""
    conv = make_conv().half()
    bn = _randomized(nn.BatchNorm2d(6).half(), rng)
    fused = nt.fuse_conv_bn_eval(conv, bn)
    assert fused.weight.dtype == fused.bias.dtype == torch.float16
    x = _x(rng, shape)
    expected = copy.deepcopy(bn).double()(copy.deepcopy(conv).double()(x))
    got = copy.deepcopy(fused).double()(x)
    scale = expected.abs().max().item()
    _assert_close(got, expected, dict(rtol=0, atol=4e-3 * scale))


def test_refusals():
    conv, bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
    with pytest.raises(ValueError, match="training mode"):
        nt.fuse_conv_bn_eval(conv, bn)
    with pytest.raises(ValueError, match="running statistics"):
        nt.fuse_conv_bn_eval(conv, nn.BatchNorm2d(4, track_running_stats=False).eval())
    with pytest.raises(ValueError, match="activation"):
        nt.fuse_conv_bn_eval(conv, nt.BatchNorm2d(4, activation="relu").eval())
    with pytest.raises(ValueError, match=r"one value per output channel"):
        nt.fuse_conv_bn_eval(conv, nn.BatchNorm2d(5).eval())
    with pytest.raises(TypeError, match="convolution"):
        nt.fuse_conv_bn_eval(nn.ReLU(), bn.eval())
    with pytest.raises(TypeError, match="batch-norm"):
        nt.fuse_conv_bn_eval(conv, nn.GroupNorm(2, 4))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        nt.fold_model(conv.weight)


class _Net(nn.Module):
    """Foldable pairs (plain, grouped bias-free, grouped transposed into an
    affine-free BN, one in a Sequential, Linear into BatchNorm1d) among
    nbnorm's other norms and pairs that are not: a BN after a pooling, one
    with nbnorm's fused ReLU, one with a residual, one without running
    statistics, a layer whose output is also used elsewhere, and a layer
    called twice."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False), nt.BatchNorm2d(4)
        self.gn = nt.GroupNorm(2, 4)  # traced whole, as torch.nn's modules are
        self.c3, self.b3 = nn.Conv2d(4, 4, 1), nt.BatchNorm2d(4, activation="relu")
        self.c4, self.b4 = nn.Conv2d(4, 4, 1), nt.BatchNorm2d(4)
        self.c5, self.b5 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)
        self.c6, self.b6 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.c7, self.b7, self.b8 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.t, self.bt = nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2), nn.BatchNorm2d(
            6, affine=False)
        self.bp = nn.BatchNorm2d(6)
        self.block = nn.Sequential(nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6), nn.ReLU())
        self.fc, self.bf = nn.Linear(6, 5), nn.BatchNorm1d(5)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = self.gn(self.b2(self.c2(x)))
        x = self.b3(self.c3(x))
        x = self.b4(self.c4(x), x)
        x = self.b5(self.c5(x))
        y = self.c6(x)
        x = self.b6(y) + y
        x = self.b8(self.c7(self.b7(self.c7(x))))
        x = self.bt(self.t(x))
        x = self.block(self.bp(nn.functional.max_pool2d(x, 2)))
        return self.bf(self.fc(x.mean((2, 3))))


FOLDED = {"b1", "b2", "bt", "block.1", "bf"}


def test_fold_model_folds_every_pair(rng):
    model = _Net().double()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            _randomized(m, rng)
    model.eval()
    before = copy.deepcopy(model.state_dict())
    x = _x(rng, (2, 3, 6, 6))
    folded = nt.fold_model(model)
    _assert_close(folded(x), model(x), EXACT64)
    bns = {name for name, m in model.named_modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    left = {name for name, m in folded.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert left == bns - FOLDED
    assert isinstance(folded.b4, nt.BatchNorm2d) and folded.b3.activation == "relu"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert folded.c1.weight is not model.c1.weight

    model.train()
    with pytest.raises(ValueError, match="training mode"):
        nt.fold_model(model)
    model.eval()
    model.bf.train()
    with pytest.raises(ValueError, match="training mode"):
        nt.fold_model(model)
