"""nbnorm in a PyTorch model: ``nbnorm.torch.convert`` swaps the batch norms of a
small ResNet for nbnorm's, and training goes on as before.

    python examples/torch_convert.py                  # 300 steps
    python examples/torch_convert.py --quick --out DIR

Two copies of one model (the same initial weights) train on the same batches
of the digits, one with PyTorch's ``BatchNorm2d`` and one converted: their
losses agree step by step to rounding (in float64), and the float32 step
times show what nbnorm's kernels cost or save on the CPU at this size.  ``convert`` changes
the modules in place (they stay ``torch.nn.BatchNorm2d`` instances with the
same parameters and buffers), so optimizers and checkpoints are unaffected.
At this size (tensors of 16-32 Ki values) a batch norm's time is mostly the
cost of a call, and there PyTorch's is cheaper: on the 2-core development
machine a step took 28 ms with nbnorm's against 16 ms with PyTorch's.
Writes ``curves.png`` (both float64 loss curves and their relative difference) and
``results.json`` (the losses, the largest relative difference, the step
times).  Without PyTorch it says so and exits.
"""

import copy
import importlib.util
import time

import numpy as np

import common

BATCH_SIZE = 32
LEARNING_RATE = 0.05


def make_model(torch):
    """A ResNet for 8x8 images: a stem, two residual stages (the second halves
    the resolution, with a 1x1 convolution + batch norm on its shortcut),
    global average pooling and a linear classifier."""
    nn = torch.nn

    def conv_bn(c_in, c_out, stride=1, k=3):
        return [nn.Conv2d(c_in, c_out, k, stride, padding=k // 2, bias=False),
                nn.BatchNorm2d(c_out)]

    class Block(nn.Module):
        def __init__(self, c_in, c_out, stride=1):
            super().__init__()
            self.body = nn.Sequential(*conv_bn(c_in, c_out, stride), nn.ReLU(),
                                      *conv_bn(c_out, c_out))
            self.shortcut = (nn.Identity() if stride == 1 and c_in == c_out
                             else nn.Sequential(*conv_bn(c_in, c_out, stride, k=1)))

        def forward(self, x):
            return torch.relu(self.body(x) + self.shortcut(x))

    return nn.Sequential(*conv_bn(1, 16), nn.ReLU(), Block(16, 16), Block(16, 32, stride=2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def train_side_by_side(models, steps, data, seed, torch):
    """SGD on each model with the same batches, one step of each in turn (so
    that other work on the machine slows both alike); per model the loss and
    the time of every step."""
    x_tr, y_tr = data
    rng = np.random.default_rng(seed)
    optimizers = [torch.optim.SGD(m.parameters(), lr=LEARNING_RATE, momentum=0.9)
                  for m in models]
    losses, seconds = [[] for _ in models], [[] for _ in models]
    order = []
    while len(order) < steps:
        order += common.batches(len(x_tr), BATCH_SIZE, rng)
    for idx in order[:steps]:
        x, y = x_tr[idx], y_tr[idx]
        for model, opt, loss_curve, times in zip(models, optimizers, losses, seconds):
            start = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - start)
            loss_curve.append(loss.item())
    return losses, seconds


def plot(results, out):
    plt = common.pyplot()
    fig, (ax_loss, ax_diff) = plt.subplots(1, 2, figsize=(11, 4))
    steps = np.arange(1, len(results["loss_torch"]) + 1)
    ax_loss.plot(steps, results["loss_torch"], label="torch.nn.BatchNorm2d")
    ax_loss.plot(steps, results["loss_nbnorm"], "--", label="nbnorm (convert)")
    ax_loss.set(xlabel="step", ylabel="training loss", yscale="log",
                title="Training loss (float64)")
    ax_loss.legend()
    ax_diff.plot(steps, results["relative_difference"], "o", ms=3)
    ax_diff.axhline(np.finfo(np.float64).eps, color="gray", ls=":", label="float64 epsilon")
    ax_diff.set(xlabel="step", ylabel="relative difference",
                title="|loss with nbnorm - loss with torch| / loss with torch")
    ax_diff.legend()
    return common.save_figure(fig, out, "curves.png")


def main(argv=None):
    args = common.parse_args(__doc__.split("\n\n")[0], argv)
    if importlib.util.find_spec("torch") is None:
        print("torch_convert: skipped, PyTorch is not installed "
              "(pip install \"nbnorm[torch]\")")
        return
    import torch

    import nbnorm.torch
    common.one_thread()
    torch.set_num_threads(1)  # as nbnorm's kernels: the kernels compared, not two thread pools
    x_tr, y_tr, x_te, y_te = common.digits(args.seed)
    images = lambda x, dtype: torch.from_numpy(x.reshape(-1, 1, 8, 8)).to(dtype)  # noqa: E731
    steps, timed_steps = (30, 20) if args.quick else (300, 100)

    # The curves in float64: what is compared is the arithmetic.  In float32 the
    # two agree to rounding (1e-7) for tens of steps, until training amplifies
    # a rounding difference, as it would between any two float32 implementations.
    torch.manual_seed(args.seed)
    reference = make_model(torch).double()
    converted = nbnorm.torch.convert(copy.deepcopy(reference))
    data = (images(x_tr, torch.float64), torch.from_numpy(y_tr))
    (loss_torch, loss_nb), _ = train_side_by_side([reference, converted], steps, data,
                                                  args.seed, torch)
    with torch.no_grad():  # inference with the running statistics each model tracked
        accuracy = [float((m.eval()(images(x_te, torch.float64)).argmax(1).numpy()
                           == y_te).mean()) for m in (reference, converted)]

    # The step times in float32, the usual training dtype.
    torch.manual_seed(args.seed)
    reference = make_model(torch)
    converted = nbnorm.torch.convert(copy.deepcopy(reference))
    data = (images(x_tr, torch.float32), torch.from_numpy(y_tr))
    _, (time_torch, time_nb) = train_side_by_side([reference, converted], timed_steps, data,
                                                  args.seed, torch)

    difference = [abs(a - b) / abs(a) for a, b in zip(loss_torch, loss_nb)]
    warm = slice(5, None)  # the first steps compile and allocate
    results = {
        "quick": args.quick, "steps": steps, "batch_size": BATCH_SIZE,
        "torch_threads": torch.get_num_threads(),
        "loss_torch": loss_torch, "loss_nbnorm": loss_nb, "relative_difference": difference,
        "max_relative_difference": max(difference),
        "test_accuracy_torch": accuracy[0], "test_accuracy_nbnorm": accuracy[1],
        "timed_steps": timed_steps,
        "median_step_seconds_torch": float(np.median(time_torch[warm])),
        "median_step_seconds_nbnorm": float(np.median(time_nb[warm])),
    }
    figure = plot(results, args.out)
    common.write_results(args.out, results)
    r = results
    print(f"ResNet on the digits, {steps} steps of batch {BATCH_SIZE} in float64, "
          f"{r['torch_threads']} thread:")
    print(f"  losses agree to {r['max_relative_difference']:.1e} (relative); final "
          f"{loss_torch[-1]:.4f} torch, {loss_nb[-1]:.4f} nbnorm")
    print(f"  test accuracy {accuracy[0]:.3f} torch, {accuracy[1]:.3f} nbnorm")
    print(f"  float32 median step {1e3 * r['median_step_seconds_torch']:.2f} ms with torch's "
          f"batch norm, {1e3 * r['median_step_seconds_nbnorm']:.2f} ms with nbnorm's")
    print(f"wrote {figure} and results.json to {args.out}")


if __name__ == "__main__":
    main()
