"""nbnorm.torch.SyncBatchNorm: two processes joined by gloo
(tests/torch_sync_worker.py, in a subprocess with a timeout) against
torch.nn.BatchNorm2d on the whole batch; in this process, the local fallback
without a process group and convert_sync_batchnorm."""

import sys
from pathlib import Path

import pytest

from launch import run

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
nt = pytest.importorskip("nbnorm.torch")

WORKER = Path(__file__).with_name("torch_sync_worker.py")


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="torch.distributed without gloo")
def test_two_gloo_processes_match_batchnorm2d_on_the_whole_batch():
    code, output = run([sys.executable, str(WORKER)])
    assert code == 0 and output.rstrip().endswith("OK"), output


def test_without_a_process_group_it_is_the_local_layer():
    assert not dist.is_initialized()
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    ref = torch.nn.BatchNorm1d(3, dtype=torch.float64)
    mine = nt.SyncBatchNorm(3, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.uniform_(), mine.weight.copy_(ref.weight)
    out, ref_out = mine(x), ref(x)
    torch.testing.assert_close(out, ref_out)
    g = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, g)
    (ref_dx,) = torch.autograd.grad(ref_out, x, g)
    torch.testing.assert_close(dx, ref_dx)
    torch.testing.assert_close(mine.running_var, ref.running_var)
    assert int(mine.num_batches_tracked) == 1


def test_convert_sync_batchnorm_shares_parameters_and_keeps_the_activation():
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 1), nt.BatchNorm2d(4, activation="relu"),
                                torch.nn.BatchNorm1d(4, affine=False).eval())
    weight, running = model[1].weight, model[2].running_mean
    out = nt.convert_sync_batchnorm(model)
    assert out is model
    assert [type(m) for m in model[1:]] == [nt.SyncBatchNorm] * 2
    assert model[1].weight is weight and model[1].activation == "relu"
    assert model[2].running_mean is running and not model[2].training
    assert model[2].weight is None
    x = torch.randn(3, 2, 2, 2)
    assert (model[:2](x) >= 0).all()
    single = nt.convert_sync_batchnorm(torch.nn.BatchNorm2d(4))
    assert type(single) is nt.SyncBatchNorm and isinstance(single, torch.nn.SyncBatchNorm)
