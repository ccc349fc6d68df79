"""What batch norm does for training: a NumPy MLP on scikit-learn's digits, with
and without ``nbnorm.BatchNorm``, at a large and at a moderate learning rate.

    python examples/digits_bn.py                  # 40 epochs per run
    python examples/digits_bn.py --quick --out DIR

Without batch norm the large step makes plain SGD diverge (or stall); with it
the same step trains, because each layer's input is renormalized whatever the
weights before it have become.  At the moderate rate both train, batch norm
faster.  Writes ``curves.png`` (loss and test accuracy per epoch),
``running_stats.png`` (the first batch norm's running mean and variance over
training steps) and ``results.json`` (one entry per run).
"""

import numpy as np

import common
import nbnorm

LEARNING_RATES = (1.0, 0.05)  # large, moderate
HIDDEN = 128
BATCH_SIZE = 32
TRACKED_CHANNELS = 6  # of the first batch norm, drawn in running_stats.png


def make_model(batch_norm, rng):
    """64 -> 128 -> 128 -> 10 with ReLUs; with batch norm, each hidden linear layer
    loses its bias (the batch norm's shift replaces it) and the ReLU is fused
    into the batch norm (``activation="relu"``)."""
    L = common.Linear
    if batch_norm:
        return common.Sequential(
            L(64, HIDDEN, rng, bias=False), nbnorm.BatchNorm(HIDDEN, activation="relu"),
            L(HIDDEN, HIDDEN, rng, bias=False), nbnorm.BatchNorm(HIDDEN, activation="relu"),
            L(HIDDEN, 10, rng))
    return common.Sequential(L(64, HIDDEN, rng), common.ReLU(),
                             L(HIDDEN, HIDDEN, rng), common.ReLU(), L(HIDDEN, 10, rng))


def train(batch_norm, learning_rate, epochs, data, seed):
    x_tr, y_tr, x_te, y_te = data
    rng = np.random.default_rng(seed)
    model = make_model(batch_norm, rng)
    run = {"batch_norm": batch_norm, "learning_rate": learning_rate, "epochs": epochs,
           "batch_size": BATCH_SIZE, "train_loss": [], "test_accuracy_curve": [],
           "diverged": False}
    first_bn = model.layers[1] if batch_norm else None
    stats = {"running_mean": [], "running_var": []}
    for _ in range(epochs):
        losses = []
        for idx in common.batches(len(x_tr), BATCH_SIZE, rng):
            with np.errstate(all="ignore"):
                loss, dlogits = common.softmax_cross_entropy(model(x_tr[idx]), y_tr[idx])
                if not np.isfinite(loss):
                    run["diverged"] = True
                    break
                model.backward(dlogits)
                model.step(learning_rate)
            losses.append(loss)
            if first_bn is not None:
                stats["running_mean"].append(first_bn.running_mean[:TRACKED_CHANNELS].tolist())
                stats["running_var"].append(first_bn.running_var[:TRACKED_CHANNELS].tolist())
        run["train_loss"].append(float(np.mean(losses)) if losses else float("nan"))
        run["test_accuracy_curve"].append(common.accuracy(model, x_te, y_te))
        if run["diverged"]:
            break
    run["test_accuracy"] = run["test_accuracy_curve"][-1]
    run["final_train_loss"] = run["train_loss"][-1]
    return run, stats


def plot(runs, stats, out):
    plt = common.pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        style = "-" if r["batch_norm"] else "--"
        label = f"{'BN' if r['batch_norm'] else 'no BN'}, lr {r['learning_rate']:g}"
        epochs = np.arange(1, len(r["train_loss"]) + 1)
        ax_loss.plot(epochs, r["train_loss"], style, label=label)
        ax_acc.plot(epochs, r["test_accuracy_curve"], style, label=label)
    ax_loss.set(xlabel="epoch", ylabel="training loss (mean over the epoch)", yscale="log",
                title="Training loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", ylim=(0, 1), title="Test accuracy")
    ax_acc.legend()
    paths = [common.save_figure(fig, out, "curves.png")]

    fig, (ax_m, ax_v) = plt.subplots(1, 2, figsize=(11, 4))
    mean, var = np.array(stats["running_mean"]), np.array(stats["running_var"])
    ax_m.plot(mean)
    ax_v.plot(var)
    which = f"first BatchNorm at lr {LEARNING_RATES[0]:g}, {mean.shape[1]} channels"
    ax_m.set(xlabel="training step", ylabel="running_mean", title=f"Running mean ({which})")
    ax_v.set(xlabel="training step", ylabel="running_var", title=f"Running variance ({which})")
    paths.append(common.save_figure(fig, out, "running_stats.png"))
    return paths


def main(argv=None):
    args = common.parse_args(__doc__.split("\n\n")[0], argv)
    common.one_thread()
    data = common.digits(args.seed)
    epochs = 6 if args.quick else 40
    runs, tracked = [], None
    for lr in LEARNING_RATES:
        for bn in (True, False):
            run, stats = train(bn, lr, epochs, data, args.seed)
            runs.append(run)
            if bn and lr == LEARNING_RATES[0]:
                tracked = stats
    figures = plot(runs, tracked, args.out)
    common.write_results(args.out, {"quick": args.quick, "runs": runs,
                                    "tracked_channels": TRACKED_CHANNELS})
    print(f"digits MLP, {epochs} epochs, batch {BATCH_SIZE}:")
    for r in runs:
        print(f"  {'BN   ' if r['batch_norm'] else 'no BN'} lr {r['learning_rate']:<5g} "
              f"test accuracy {r['test_accuracy']:.3f}  final loss {r['final_train_loss']:.3g}"
              f"{'  (diverged)' if r['diverged'] else ''}")
    print(f"wrote {', '.join(figures)} and results.json to {args.out}")


if __name__ == "__main__":
    main()
