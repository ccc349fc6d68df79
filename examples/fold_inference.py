"""What folding buys at inference: a small NumPy CNN with batch norm trained on
the digits, then each convolution + batch norm pair replaced by one
convolution with ``nbnorm.fold``.

    python examples/fold_inference.py                  # 10 epochs
    python examples/fold_inference.py --quick --out DIR

In inference a batch norm is a fixed affine map per channel, ``y = (x - mean)
/ sqrt(var + eps) * weight + bias``, so it can be folded into the weights and
bias of the convolution before it: the folded network computes the same
function (up to float32 rounding) with one pass over the activations fewer.
What that pass is worth depends on the rest: here the NumPy convolutions
(their patches copied, then one matrix product) take nearly all the time, and
the ReLU that each batch norm had fused becomes a pass of its own, so the two
networks run about as fast; ``seconds_in_batch_norms`` is the part removed.
Writes ``timing.png`` (inference time of the test set, each way, and the part
of it in the batch norms) and
``results.json`` (accuracies, the largest difference between the two
networks' logits, the timings).
"""

import time

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

import common
import nbnorm

BATCH_SIZE = 32
LEARNING_RATE = 0.2


class Conv3x3:
    """3x3 convolution with padding 1 on channels-last images ``(N, H, W, C)``,
    as one matrix product over the images' 3x3 patches.  ``weight`` has
    PyTorch's layout ``(out, in, 3, 3)`` (what ``nbnorm.fold`` takes with its
    default ``axis=0``)."""

    def __init__(self, weight, bias=None, stride=1):
        self.weight, self.bias, self.stride = weight, bias, stride

    @classmethod
    def he(cls, c_in, c_out, rng, stride=1):
        """Without bias, He-initialized."""
        std = np.sqrt(2.0 / (9 * c_in))
        return cls((rng.standard_normal((c_out, c_in, 3, 3)) * std).astype(np.float32),
                   stride=stride)

    def __call__(self, x):
        s = self.stride
        padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        patches = sliding_window_view(padded, (3, 3), axis=(1, 2))[:, ::s, ::s]
        self._shape, self._padded_shape = patches.shape, padded.shape  # (N, H, W, in, 3, 3)
        self._cols = patches.reshape(-1, patches[0, 0, 0].size)
        y = self._cols @ self.weight.reshape(len(self.weight), -1).T
        if self.bias is not None:
            y += self.bias
        return y.reshape(self._shape[:3] + (-1,))

    def backward(self, dy):
        s, (H, W) = self.stride, self._shape[1:3]
        dy = dy.reshape(-1, len(self.weight))
        self.grad_weight = (dy.T @ self._cols).reshape(self.weight.shape)
        self.grad_bias = None if self.bias is None else dy.sum(axis=0)
        dpatches = (dy @ self.weight.reshape(len(self.weight), -1)).reshape(self._shape)
        dpadded = np.zeros(self._padded_shape, dy.dtype)
        for i in range(3):
            for j in range(3):
                dpadded[:, i:i + s * H:s, j:j + s * W:s] += dpatches[..., i, j]
        return dpadded[:, 1:-1, 1:-1]


class Flatten:
    def __call__(self, x):
        self._shape = x.shape
        return x.reshape(len(x), -1)

    def backward(self, dy):
        return dy.reshape(self._shape)


def make_model(rng):
    """8x8x1 -> 8x8x16 -> 4x4x32 -> 10.  The convolutions have no bias (the
    batch norm's shift replaces it); the ReLUs are fused into the batch norms."""
    return common.Sequential(
        Conv3x3.he(1, 16, rng), nbnorm.BatchNorm(16, axis=-1, activation="relu"),
        Conv3x3.he(16, 32, rng, stride=2), nbnorm.BatchNorm(32, axis=-1, activation="relu"),
        Flatten(), common.Linear(4 * 4 * 32, 10, rng))


def fold_pair(conv, bn):
    """One Conv3x3 that computes ``bn(conv(x))`` of an eval-mode batch norm
    (without its fused ReLU)."""
    weight, bias = nbnorm.fold(conv.weight, conv.bias, bn.weight, bn.bias,
                               bn.running_mean, bn.running_var, bn.eps)
    return Conv3x3(weight, bias, conv.stride)


def folded(model):
    """The inference network of ``make_model``'s: each convolution and batch
    norm folded into one convolution, then the ReLU."""
    conv1, bn1, conv2, bn2, flatten, linear = model.layers
    return common.Sequential(fold_pair(conv1, bn1), relu_in_place,
                             fold_pair(conv2, bn2), relu_in_place, flatten, linear)


def relu_in_place(x):
    """Inference only (no backward): the ReLU that the batch norm had fused."""
    return np.maximum(x, 0, out=x)


def batch_norm_seconds(model, x, repeats):
    """The time of ``model``'s batch norms alone in an inference of ``x``: what
    folding removes."""
    inputs = []
    for layer in model.layers:
        if isinstance(layer, nbnorm.BatchNorm):
            inputs.append((layer, x.copy()))
        x = layer(x)
    return sum(best_times([layer], x_bn, repeats)[0] for layer, x_bn in inputs)


def train(model, epochs, data, rng):
    x_tr, y_tr, x_te, y_te = data
    for _ in range(epochs):
        for idx in common.batches(len(x_tr), BATCH_SIZE, rng):
            _, dlogits = common.softmax_cross_entropy(model(x_tr[idx]), y_tr[idx])
            model.backward(dlogits)
            model.step(LEARNING_RATE)


def best_times(fs, x, repeats):
    """The fastest of ``repeats`` calls of each ``f(x)`` of ``fs``, in seconds,
    the calls taking turns so that other work on the machine slows each alike."""
    times = [[] for _ in fs]
    for _ in range(repeats):
        for f, t in zip(fs, times):
            start = time.perf_counter()
            f(x)
            t.append(time.perf_counter() - start)
    return [min(t) for t in times]


def plot(results, out):
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    total, bn = results["seconds_with_batch_norm"], results["seconds_in_batch_norms"]
    rest = [1e3 * (total - bn), 1e3 * results["seconds_folded"]]
    ax.barh(["conv + batch norm", "folded conv"], rest, color=["tab:blue", "tab:green"])
    ax.barh(["conv + batch norm"], [1e3 * bn], left=[1e3 * (total - bn)], color="tab:orange",
            label="in the batch norms")
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1))
    ax.set(xlabel=f"ms per inference of {results['test_images']} images (best of "
                  f"{results['repeats']})", title="Inference time")
    return common.save_figure(fig, out, "timing.png")


def main(argv=None):
    args = common.parse_args(__doc__.split("\n\n")[0], argv)
    common.one_thread()
    x_tr, y_tr, x_te, y_te = common.digits(args.seed)
    as_images = lambda x: x.reshape(-1, 8, 8, 1)  # noqa: E731 (channels-last, one channel)
    data = (as_images(x_tr), y_tr, as_images(x_te), y_te)
    rng = np.random.default_rng(args.seed)
    model = make_model(rng)
    epochs, repeats = (2, 20) if args.quick else (10, 200)
    train(model, epochs, data, rng)

    model.eval()
    inference = folded(model)
    logits_bn = model(data[2]).copy()  # a copy: the batch norm's output buffer is reused
    logits_folded = inference(data[2])
    results = {
        "quick": args.quick, "epochs": epochs, "test_images": len(y_te), "repeats": repeats,
        "test_accuracy_with_batch_norm": float((logits_bn.argmax(1) == y_te).mean()),
        "test_accuracy_folded": float((logits_folded.argmax(1) == y_te).mean()),
        "same_predictions": bool((logits_bn.argmax(1) == logits_folded.argmax(1)).all()),
        "max_abs_logit_difference": float(np.abs(logits_bn - logits_folded).max()),
        "max_abs_logit": float(np.abs(logits_bn).max()),
        "seconds_in_batch_norms": batch_norm_seconds(model, data[2], repeats),
    }
    results["seconds_with_batch_norm"], results["seconds_folded"] = best_times(
        [model, inference], data[2], repeats)
    figure = plot(results, args.out)
    common.write_results(args.out, results)
    r = results
    print(f"digits CNN, {epochs} epochs; {r['test_images']} test images:")
    print(f"  test accuracy {r['test_accuracy_with_batch_norm']:.3f} with batch norm, "
          f"{r['test_accuracy_folded']:.3f} folded; same predictions: {r['same_predictions']}")
    print(f"  largest logit difference {r['max_abs_logit_difference']:.2g} "
          f"(logits up to {r['max_abs_logit']:.3g})")
    print(f"  inference {1e3 * r['seconds_with_batch_norm']:.2f} ms with batch norm, "
          f"{1e3 * r['seconds_folded']:.2f} ms folded "
          f"({r['seconds_with_batch_norm'] / r['seconds_folded']:.2f}x); of which "
          f"{1e3 * r['seconds_in_batch_norms']:.2f} ms in the batch norms folding removes")
    print(f"wrote {figure} and results.json to {args.out}")


if __name__ == "__main__":
    main()
