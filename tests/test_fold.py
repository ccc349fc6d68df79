"""``nbnorm.fold``: a folded layer gives ``bn(conv(x))``, computed by PyTorch."""

import numpy as np
import pytest

import helpers
import nbnorm

torch = pytest.importorskip("torch")
F = torch.nn.functional

EPS = 1e-3


def _bn_params(rng, C, affine):
    bw = helpers.channel(rng, C, np.float64) if affine else None
    bb = helpers.channel(rng, C, np.float64) if affine else None
    return bw, bb, helpers.channel(rng, C, np.float64), helpers.positive(rng, C, np.float64)


def _t(a):
    return None if a is None else torch.from_numpy(np.asarray(a, np.float64))


#: (id, torch layer, weight shape, x shape, axis, groups, keyword arguments of the layer)
LAYERS = [
    ("linear", F.linear, (5, 3), (4, 3), 0, 1, {}),
    ("conv1d", F.conv1d, (6, 2, 3), (2, 2, 9), 0, 1, {}),
    ("conv2d", F.conv2d, (4, 3, 3, 3), (2, 3, 6, 5), 0, 1, {"padding": 1}),
    ("conv2d-groups", F.conv2d, (6, 2, 3, 3), (2, 6, 5, 5), 0, 3, {"groups": 3}),
    ("conv-transpose2d", F.conv_transpose2d, (3, 4, 3, 2), (2, 3, 4, 5), 1, 1, {}),
    ("conv-transpose2d-groups", F.conv_transpose2d, (6, 2, 3, 3), (2, 6, 4, 4), 1, 3,
     {"groups": 3, "stride": 2}),
    ("conv-transpose1d-groups", F.conv_transpose1d, (4, 3, 3), (2, 4, 7), 1, 2,
     {"groups": 2}),
]


@pytest.mark.parametrize("conv_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("layer, w_shape, x_shape, axis, groups, kw",
                         [case[1:] for case in LAYERS], ids=[case[0] for case in LAYERS])
def test_folded_layer_is_bn_of_layer(rng, layer, w_shape, x_shape, axis, groups, kw,
                                     conv_bias, affine):
    w = helpers.data(rng, w_shape, np.float64)
    C = w_shape[0] if axis == 0 else w_shape[1] * groups
    b = helpers.channel(rng, C, np.float64) if conv_bias else None
    bw, bb, rm, rv = _bn_params(rng, C, affine)
    x = torch.from_numpy(helpers.data(rng, x_shape, np.float64))
    expected = F.batch_norm(layer(x, _t(w), _t(b), **kw), _t(rm), _t(rv), _t(bw), _t(bb),
                            training=False, eps=EPS)

    wf, bf = nbnorm.fold(w, b, bw, bb, rm, rv, EPS, axis=axis, groups=groups)
    assert wf.shape == w.shape and wf.dtype == w.dtype
    assert bf.shape == (C,) and bf.dtype == np.float64
    helpers.assert_close(layer(x, _t(wf), _t(bf), **kw), expected, dict(rtol=1e-12, atol=1e-12))


def test_float16_weights_stay_float16_rounded_once(rng):
    """The fold is computed in float64: float16 results are the float64 fold
    rounded once, and the folded layer is bn(conv(x)) to float16's precision."""
    w = helpers.data(rng, (6, 2, 3, 3), np.float16)
    b = helpers.channel(rng, 6, np.float16)
    bw, bb, rm, rv = _bn_params(rng, 6, True)
    wf, bf = nbnorm.fold(w, b, bw, bb, rm, rv, EPS, groups=3)
    assert wf.dtype == np.float16 and bf.dtype == np.float16
    w64, b64 = nbnorm.fold(w.astype(np.float64), b.astype(np.float64), bw, bb, rm, rv, EPS)
    helpers.assert_same(wf, w64.astype(np.float16))
    helpers.assert_same(bf, b64.astype(np.float16))

    x = torch.from_numpy(helpers.data(rng, (2, 6, 5, 5), np.float64))
    expected = F.batch_norm(F.conv2d(x, _t(w), _t(b), groups=3), _t(rm), _t(rv), _t(bw),
                            _t(bb), training=False, eps=EPS)
    folded = F.conv2d(x, _t(wf), _t(bf), groups=3)
    scale = expected.abs().max().item()
    helpers.assert_close(folded, expected, dict(rtol=0, atol=4e-3 * scale))


def test_dtypes_of_the_results(rng):
    """Bias: conv_bias's dtype, the weight's without one; mixed inputs are fine."""
    w = helpers.data(rng, (4, 3), np.float32)
    bw, bb, rm, rv = _bn_params(rng, 4, True)
    wf, bf = nbnorm.fold(w, None, bw, bb, rm, rv)
    assert wf.dtype == np.float32 and bf.dtype == np.float32
    wf, bf = nbnorm.fold(w, np.zeros(4, np.float64), bw.astype(np.float16), bb, rm, rv)
    assert wf.dtype == np.float32 and bf.dtype == np.float64


def test_channels_last_kernels_and_tensors(rng):
    """axis=-1: a Keras-style (kh, kw, Cin, Cout) kernel; tensors in, arrays out."""
    w = helpers.data(rng, (3, 3, 2, 5), np.float64)
    bw, bb, rm, rv = _bn_params(rng, 5, True)
    wf, bf = nbnorm.fold(torch.from_numpy(w).requires_grad_(), None, _t(bw), _t(bb), _t(rm),
                         _t(rv), axis=-1)
    w0, b0 = nbnorm.fold(np.moveaxis(w, -1, 0), None, bw, bb, rm, rv)
    assert isinstance(wf, np.ndarray)
    np.testing.assert_array_equal(np.moveaxis(wf, -1, 0), w0)
    np.testing.assert_array_equal(bf, b0)


@pytest.mark.parametrize("change, error, match", [
    (dict(conv_weight=np.ones((4, 3), np.int64)), TypeError, "conv_weight"),
    (dict(conv_weight=np.ones(4)), ValueError, "at least 2 dimensions"),
    (dict(conv_bias=np.ones(5)), ValueError, r"conv_bias must have shape \(4,\)"),
    (dict(bn_weight=np.ones((4, 1))), ValueError, "bn_weight"),
    (dict(running_var=-np.ones(4)), ValueError, "negative"),
    (dict(running_mean=None), ValueError, "running_mean and running_var"),
    (dict(running_mean=np.ones(4, np.complex128)), TypeError, "running_mean"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(eps="1e-5"), TypeError, "eps"),
    (dict(groups=3), ValueError, "divisible by groups"),
    (dict(groups=0), ValueError, "groups"),
    (dict(groups=1.5), TypeError, "groups"),
    (dict(axis=2), ValueError, "out of bounds"),
    (dict(conv_weight=np.ones((3, 2)), axis=1, groups=2), ValueError, "input channels"),
])
def test_bad_input(change, error, match):
    args = dict(conv_weight=np.ones((4, 3)), conv_bias=None, bn_weight=np.ones(4),
                bn_bias=np.zeros(4), running_mean=np.zeros(4), running_var=np.ones(4),
                eps=1e-5)
    args.update(change)
    with pytest.raises(error, match=match):
        nbnorm.fold(**args)


def test_groups_need_conv_or_transposed_layout():
    with pytest.raises(ValueError, match="axis 0"):
        nbnorm.fold(np.ones((2, 2, 4)), None, None, None, np.zeros(8), np.ones(8),
                    axis=2, groups=2)
