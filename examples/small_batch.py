"""Where batch norm fails and what recovers it: a few samples per process.

    python examples/small_batch.py                   # 4 virtual ranks, 12 epochs a run
    python examples/small_batch.py --quick --out DIR
    mpiexec -n 4 python examples/small_batch.py      # 4 MPI processes instead

Data-parallel training of the digits MLP of ``digits_bn.py``: each of ``R``
ranks takes its share of every batch, 2, 4 or 32 samples, and the gradients
are averaged over the ranks, as in any data-parallel run.  Three normalizations
(each followed by a ReLU, fused into it):

- batch norm: each rank normalizes with the statistics of its own samples (what
  a plain batch norm does under data parallelism).  With 2 samples a channel
  is normalized to +-1, whatever the values: training sees other features than
  inference, which uses the running statistics.
- synchronized batch norm: the statistics of the whole batch, over every rank.
  Without MPI the ranks are virtual, played one after the other in this
  process, and the exchange is spelled out: each rank's ``nbnorm.moments``,
  merged with ``nbnorm.merge_moments``, normalize every rank
  (``forward(..., moments=)``); backward adds the ranks' ``backward_sums``
  (``backward(..., sums=, count=)``).  Under ``mpiexec`` each process is a rank
  and ``nbnorm.distributed.BatchNorm`` does the same over MPI.
- group norm: statistics per sample and group of channels
  (``nbnorm.GroupNorm``, the layer over ``nbnorm.group_norm``), so the batch
  size does not enter.

The learning rate grows with the whole batch (the linear scaling rule), so
every run sees each sample as often.  With 2 per rank batch norm ends well
below the others (0.74 against 0.97 after the full run); at 32 all three
agree.  (In ``--quick`` mode the batch of 128 has made only 20 steps, and
group norm, slower to start than batch norm at that rate, has not caught up.)
Writes ``accuracy.png`` (test accuracy against samples per rank) and
``results.json`` (one entry per run).
"""

import os

import numpy as np

import common
import nbnorm

BATCH_SIZES = (2, 4, 32)  # samples per rank
NORMS = ("batch norm", "sync batch norm", "group norm")
VIRTUAL_RANKS = 4
HIDDEN = 128
GROUPS = 8  # group norm's groups of 16 channels
LEARNING_RATE = 0.05  # per 8 samples of the whole batch (the linear scaling rule)


def mpi_world():
    """``COMM_WORLD`` when started by mpiexec with more than one process, else None
    (mpi4py is imported only then)."""
    size = int(os.environ.get("PMI_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "1")))
    if size < 2:
        return None
    return common.need("mpi4py.MPI", extra="mpi").MPI.COMM_WORLD


class VirtualRanksBatchNorm:
    """Batch norm of ``ranks`` ranks' batches stacked in one array (rank ``r``'s
    samples are rows ``r*n:(r+1)*n``): each rank's own statistics, or with
    ``sync`` those of all of them.  Rank 0 keeps the running statistics, as a
    checkpoint of rank 0 would; under ``sync`` every rank's would be the same.
    The layer protocol of ``common.Sequential``: ``weight``, ``bias`` and their
    gradients summed over the ranks."""

    def __init__(self, num_features, ranks, sync):
        self.ranks, self.sync, self.training = ranks, sync, True
        self.weight = np.ones(num_features, np.float32)
        self.bias = np.zeros(num_features, np.float32)
        self.running_mean = np.zeros(num_features, np.float32)
        self.running_var = np.ones(num_features, np.float32)

    def train(self, mode=True):
        self.training = mode

    def __call__(self, x):
        if not self.training:
            return nbnorm.forward(x, self.weight, self.bias, self.running_mean,
                                  self.running_var, training=False, activation="relu").out
        out = np.empty_like(x)
        self.x, self.outs = np.split(x, self.ranks), np.split(out, self.ranks)  # views
        self.merged = None
        if self.sync:  # what every rank would send (2C + 1 numbers) and merge in rank order
            self.merged = nbnorm.merge_moments([nbnorm.moments(x_r) for x_r in self.x])
        self.stats = []
        for r, (x_r, out_r) in enumerate(zip(self.x, self.outs)):
            running = (self.running_mean, self.running_var) if r == 0 else (None, None)
            res = nbnorm.forward(x_r, self.weight, self.bias, *running, moments=self.merged,
                                 activation="relu", out=out_r)
            self.stats.append((res.mean, res.invstd))
        return out

    def backward(self, dy):
        ranks = list(zip(np.split(dy, self.ranks), self.x, self.outs, self.stats))
        if self.sync:  # each rank's (sum_dy, sum_dy_xmu), added: one all-reduce of 2C numbers
            local = [nbnorm.backward_sums(dy_r, x_r, mean, activation="relu", forward_out=out_r)
                     for dy_r, x_r, out_r, (mean, _) in ranks]
            total = (sum(s for s, _ in local), sum(sx for _, sx in local))
        grads = []
        for r, (dy_r, x_r, out_r, (mean, invstd)) in enumerate(ranks):
            given = {}
            if self.sync:
                given = {"sums": total, "count": self.merged.count, "local_sums": local[r]}
            grads.append(nbnorm.backward(dy_r, x_r, mean, invstd, self.weight,
                                         activation="relu", forward_out=out_r, **given))
        self.grad_weight = sum(g.grad_weight for g in grads)
        self.grad_bias = sum(g.grad_bias for g in grads)
        return np.concatenate([g.grad_input for g in grads])


def make_norm(kind, comm):
    """The normalization ``kind`` of ``HIDDEN`` channels, with a fused ReLU."""
    if kind == "group norm":
        return nbnorm.GroupNorm(GROUPS, HIDDEN, activation="relu")
    if comm is None:  # this process plays every rank
        return VirtualRanksBatchNorm(HIDDEN, VIRTUAL_RANKS, sync=kind == "sync batch norm")
    if kind == "sync batch norm":
        return nbnorm.distributed.BatchNorm(HIDDEN, comm=comm, activation="relu")
    return nbnorm.BatchNorm(HIDDEN, activation="relu")


def make_model(kind, comm, rng):
    L = common.Linear
    return common.Sequential(L(64, HIDDEN, rng, bias=False), make_norm(kind, comm),
                             L(HIDDEN, HIDDEN, rng, bias=False), make_norm(kind, comm),
                             L(HIDDEN, 10, rng))


def average_gradients(model, comm):
    """The data-parallel all-reduce: every process steps with the mean gradient."""
    from mpi4py import MPI
    for layer in model.layers:
        for g in (getattr(layer, "grad_weight", None), getattr(layer, "grad_bias", None)):
            if g is not None:
                comm.Allreduce(MPI.IN_PLACE, g)
                g /= comm.size


def train(kind, per_rank, epochs, data, seed, comm):
    """Test accuracy after ``epochs`` epochs with ``per_rank`` samples per rank.

    Every process draws the same shuffles (same seed) and takes its rows of
    each batch; in one process, the whole batch is the virtual ranks' rows."""
    x_tr, y_tr, x_te, y_te = data
    if comm is None:
        ranks, mine = VIRTUAL_RANKS, slice(None)
    else:
        ranks, mine = comm.size, slice(comm.rank * per_rank, (comm.rank + 1) * per_rank)
    rng = np.random.default_rng(seed)
    model = make_model(kind, comm, rng)
    batch = per_rank * ranks
    learning_rate = LEARNING_RATE * batch / 8
    curve = []
    for _ in range(epochs):
        for idx in common.batches(len(x_tr), batch, rng):
            idx = idx[mine]
            _, dlogits = common.softmax_cross_entropy(model(x_tr[idx]), y_tr[idx])
            model.backward(dlogits)
            if comm is not None:
                average_gradients(model, comm)
            model.step(learning_rate)
        curve.append(common.accuracy(model, x_te, y_te))
    return {"norm": kind, "batch_per_rank": per_rank, "ranks": ranks, "epochs": epochs,
            "learning_rate": learning_rate, "test_accuracy": curve[-1],
            "test_accuracy_curve": curve}


def plot(runs, out):
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in NORMS:
        mine = [r for r in runs if r["norm"] == kind]
        ax.plot([r["batch_per_rank"] for r in mine], [r["test_accuracy"] for r in mine],
                "o-", label=kind)
    ax.set(xscale="log", xticks=BATCH_SIZES, xticklabels=[str(b) for b in BATCH_SIZES],
           xlabel=f"samples per rank ({runs[0]['ranks']} ranks)", ylabel="test accuracy",
           title="Small batches per rank")
    ax.minorticks_off()
    ax.legend()
    return common.save_figure(fig, out, "accuracy.png")


def main(argv=None):
    args = common.parse_args(__doc__.split("\n\n")[0], argv)
    common.one_thread()
    comm = mpi_world()
    if comm is not None:
        import nbnorm.distributed  # noqa: F401 (needs mpi4py, imported above)
    data = common.digits(args.seed)
    epochs = 2 if args.quick else 12
    runs = [train(kind, b, epochs, data, args.seed, comm) for kind in NORMS for b in BATCH_SIZES]
    if comm is not None and comm.rank != 0:
        return
    figure = plot(runs, args.out)
    common.write_results(args.out, {"quick": args.quick, "mpi": comm is not None, "runs": runs})
    print(f"digits MLP, {runs[0]['ranks']} {'MPI' if comm else 'virtual'} ranks, "
          f"{epochs} epochs: test accuracy")
    print("  samples per rank " + "".join(f"{b:>8}" for b in BATCH_SIZES))
    for kind in NORMS:
        acc = [r["test_accuracy"] for r in runs if r["norm"] == kind]
        print(f"  {kind:<17}" + "".join(f"{a:8.3f}" for a in acc))
    print(f"wrote {figure} and results.json to {args.out}")


if __name__ == "__main__":
    main()
