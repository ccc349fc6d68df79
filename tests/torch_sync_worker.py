"""The checks of tests/test_torch_sync.py: ``python tests/torch_sync_worker.py``
spawns 2 processes (torch.multiprocessing) joined by a gloo process group, and
each compares ``nbnorm.torch.SyncBatchNorm`` on its rows of a batch with
``torch.nn.BatchNorm2d`` on the whole batch in float64 (outputs, running
statistics, grad_input, the ranks' summed parameter gradients), for float32
and float64, contiguous and channels_last data offset by 1e4, uneven ranks and
a rank without rows; then a bad input on one rank.  Prints ``OK`` when every
process passed.
"""

import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import nbnorm.torch as nt

SIZE = 2
C = 3
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def summed(t):
    t = t.clone()
    dist.all_reduce(t)
    return t


def check_against_whole_batch(rank, dtype, memory_format, rows):
    g = torch.Generator().manual_seed(7)
    whole = torch.randn(sum(rows), C, 3, 2, generator=g, dtype=torch.float64) + 1e4
    whole = whole.to(dtype).double()  # the data both compute on
    grad = torch.randn(whole.shape, generator=g, dtype=torch.float64)
    w, b = torch.randn(C, generator=g, dtype=torch.float64), torch.randn(C, generator=g,
                                                                          dtype=torch.float64)
    ref = torch.nn.BatchNorm2d(C, momentum=0.3, dtype=torch.float64)
    mine = nt.SyncBatchNorm(C, momentum=0.3, dtype=dtype)
    with torch.no_grad():
        ref.weight.copy_(w), ref.bias.copy_(b), mine.weight.copy_(w), mine.bias.copy_(b)
    start = sum(rows[:rank])
    tol = TOL[dtype]
    for step in range(2):
        xw = (whole + step).to(dtype).double().requires_grad_()
        ref.zero_grad(), mine.zero_grad()
        ref_out = ref(xw)
        ref_out.backward(grad)
        x = (whole + step)[start:start + rows[rank]].to(dtype).contiguous(
            memory_format=memory_format).requires_grad_()
        out = mine(x)
        out.backward(grad[start:start + rows[rank]].to(dtype))
        assert out.dtype == dtype and out.shape == x.shape
        if memory_format is torch.channels_last and x.numel():
            assert out.is_contiguous(memory_format=torch.channels_last)
        mine_rows = slice(start, start + rows[rank])
        torch.testing.assert_close(out.double(), ref_out[mine_rows].detach(), **tol)
        torch.testing.assert_close(x.grad.double(), xw.grad[mine_rows], **tol)
        torch.testing.assert_close(mine.running_mean.double(), ref.running_mean, **tol)
        torch.testing.assert_close(mine.running_var.double(), ref.running_var, **tol)
        scale = float(ref.weight.grad.abs().max() + ref.bias.grad.abs().max())
        torch.testing.assert_close(summed(mine.weight.grad).double(), ref.weight.grad,
                                   rtol=tol["rtol"], atol=tol["atol"] * scale)
        torch.testing.assert_close(summed(mine.bias.grad).double(), ref.bias.grad,
                                   rtol=tol["rtol"], atol=tol["atol"] * scale)
        if not rows[rank]:  # zero gradients, not None
            assert not mine.weight.grad.any() and not mine.bias.grad.any()
    # the running statistics are bitwise the same on both ranks
    mine_stats = torch.cat([mine.running_mean, mine.running_var]).double()
    assert torch.equal(summed(mine_stats), mine_stats * SIZE)
    # eval mode is the local layer
    mine.eval(), ref.eval()
    if rows[rank]:
        torch.testing.assert_close(mine(x).double(), ref(whole + 1)[mine_rows], **tol)


def check_convert_and_bad_input(rank):
    model = torch.nn.Sequential(torch.nn.Conv2d(2, C, 1), torch.nn.BatchNorm2d(C))
    weight = model[1].weight
    model = nt.convert_sync_batchnorm(model)
    assert type(model[1]) is nt.SyncBatchNorm and model[1].weight is weight
    bn = model[1]
    before = (bn.running_mean.clone(), bn.running_var.clone())
    x = torch.randn(2, C + (rank == SIZE - 1), 2, 2)
    try:
        bn(x)
    except ValueError:
        pass
    else:
        raise AssertionError(f"rank {rank}: a bad input on one rank did not raise here")
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    dist.barrier()  # nobody is left in a collective
    out = model(torch.randn(2, 2, 2, 2))
    out.sum().backward()
    assert bn.weight.grad is not None


def worker(rank, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=SIZE)
    try:
        for dtype in (torch.float32, torch.float64):
            for memory_format in (torch.contiguous_format, torch.channels_last):
                check_against_whole_batch(rank, dtype, memory_format, [1, 3])
            check_against_whole_batch(rank, dtype, torch.contiguous_format, [0, 4])
        check_convert_and_bad_input(rank)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(worker, args=(f"{d}/init",), nprocs=SIZE, join=True)
    print("OK")
    sys.exit(0)
