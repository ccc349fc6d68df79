"""The examples (examples/*.py): each runs with ``--quick`` in a subprocess,
writes its figures and results.json, and what it claims holds in those results.

The examples train with fixed seeds; the bounds below leave wide margins
around what they print (a change of BLAS or thread count moves the last
digits of a training run, not which method wins).
"""

import json
import os
import sys

import pytest

from launch import run

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def quick_run(name, out, figures):
    """Run ``examples/<name>.py --quick --out out``; its results.json, after
    checking that it exited cleanly and wrote ``figures``."""
    code, output = run([sys.executable, os.path.join(EXAMPLES, name + ".py"),
                        "--quick", "--out", str(out)])
    assert code == 0, output
    for name in figures + ["results.json"]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, output
    with open(out / "results.json") as f:
        return json.load(f)


def test_digits_bn(tmp_path):
    runs = quick_run("digits_bn", tmp_path, ["curves.png", "running_stats.png"])["runs"]
    by = {(r["batch_norm"], r["learning_rate"]): r for r in runs}
    assert len(by) == len(runs) == 4
    large, moderate = sorted({lr for _, lr in by}, reverse=True)
    # At the large rate batch norm trains and the plain network does not.
    assert by[True, large]["test_accuracy"] > 0.9
    assert by[True, large]["test_accuracy"] > by[False, large]["test_accuracy"] + 0.15
    # At the moderate rate both train, batch norm faster (lower loss after as many epochs).
    assert min(by[bn, moderate]["test_accuracy"] for bn in (True, False)) > 0.85
    assert by[True, moderate]["final_train_loss"] < by[False, moderate]["final_train_loss"]


def test_small_batch(tmp_path):
    runs = quick_run("small_batch", tmp_path, ["accuracy.png"])["runs"]
    acc = {(r["norm"], r["batch_per_rank"]): r["test_accuracy"] for r in runs}
    assert len(acc) == len(runs) == 9
    # Batch norm degrades with 2 samples per rank...
    assert acc["batch norm", 32] > acc["batch norm", 2] + 0.1
    # ...and both the whole batch's statistics and per-sample ones recover it.
    for remedy in ("sync batch norm", "group norm"):
        assert acc[remedy, 2] > 0.9
        assert acc[remedy, 2] > acc["batch norm", 2] + 0.1


def test_fold_inference(tmp_path):
    r = quick_run("fold_inference", tmp_path, ["timing.png"])
    assert r["test_accuracy_with_batch_norm"] > 0.9
    assert r["same_predictions"]
    assert r["test_accuracy_folded"] == r["test_accuracy_with_batch_norm"]
    # float32 rounding of the folded weights, not another function
    assert r["max_abs_logit_difference"] <= 1e-5 * max(1.0, r["max_abs_logit"])
    assert r["seconds_folded"] > 0 and r["seconds_in_batch_norms"] > 0


def test_torch_convert(tmp_path):
    pytest.importorskip("torch")
    r = quick_run("torch_convert", tmp_path, ["curves.png"])
    assert len(r["loss_torch"]) == len(r["loss_nbnorm"]) == r["steps"]
    assert r["loss_torch"][-1] < 0.5 * r["loss_torch"][0]  # it trains
    # The same training, step by step, up to (float64) rounding.
    assert r["max_relative_difference"] < 1e-9
    assert abs(r["test_accuracy_torch"] - r["test_accuracy_nbnorm"]) <= 0.01
    assert r["median_step_seconds_torch"] > 0 and r["median_step_seconds_nbnorm"] > 0
