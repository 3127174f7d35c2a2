"""Data parallel (torch.distributed, gloo on CPU) gives the gradient of one big batch.

Two processes with half the global batch each must produce, after DDP's all-reduce, the
same gradients and logged loss as one process with the whole batch: the target tokens
(or sequences) are counted across ranks, not per rank.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from axolotl_otr.metrics import FIRST_WINDOW_KEYS
from tests.support.torchrun import torchrun

pytestmark = pytest.mark.integration

WORKER = "tests.distributed.ddp_worker"  # run as a module from the repository root


def run(
    tiny_dir, out: Path, processes: int, micro_batch: int, accumulation: int, norm: str, **env_extra
):
    args = [tiny_dir / "model", out, micro_batch, accumulation, norm]
    proc = torchrun(WORKER, args, processes, timeout=600, **env_extra)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return torch.load(out)


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_two_processes_equal_one_process_with_the_global_batch(tiny_dir, tmp_path, normalization):
    one = run(tiny_dir, tmp_path / "one.pt", 1, 8, 1, normalization)
    two = run(tiny_dir, tmp_path / "two.pt", 2, 2, 2, normalization)
    assert one["world"] == 1 and two["world"] == 2
    assert one["grads"].keys() == two["grads"].keys()
    for name, grad in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=name)
    loss_one = [log["loss"] for log in one["logs"] if "loss" in log]
    loss_two = [log["loss"] for log in two["logs"] if "loss" in log]
    assert loss_two == pytest.approx(loss_one, rel=1e-4)
    ce_one = [log["otr/ce"] for log in one["logs"] if "otr/ce" in log]
    ce_two = [log["otr/ce"] for log in two["logs"] if "otr/ce" in log]
    assert ce_two == pytest.approx(ce_one, rel=1e-4)
    # the first window's measures: summed over both ranks and both micro-batches, once
    for key in FIRST_WINDOW_KEYS.values():
        (value_one,) = [log[key] for log in one["logs"] if key in log]
        (value_two,) = [log[key] for log in two["logs"] if key in log]
        assert 0 <= value_one < 1 and value_two == pytest.approx(value_one, rel=1e-4, abs=1e-6)


def test_two_processes_equal_one_process_when_axolotl_turned_token_averaging_off(
    tiny_dir, tmp_path
):
    """Axolotl builds every run with ``average_tokens_across_devices: false``; OTR's
    ``token`` normalization still takes the mean over the global batch's target tokens
    (it turns the Trainer's switch on when it attaches, with a log line)."""
    one = run(tiny_dir, tmp_path / "one.pt", 1, 8, 1, "token")
    two = run(tiny_dir, tmp_path / "two.pt", 2, 2, 2, "token", OTR_TEST_AVERAGE_TOKENS="0")
    assert two["world"] == 2
    assert one["grads"].keys() == two["grads"].keys()
    for name, grad in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=name)
    loss_one = [log["loss"] for log in one["logs"] if "loss" in log]
    loss_two = [log["loss"] for log in two["logs"] if "loss" in log]
    assert loss_two == pytest.approx(loss_one, rel=1e-4)
    assert two["average_tokens"]  # the Trainer's own switch, turned on (and logged)


def test_every_process_takes_the_path_one_process_had_to_take(tiny_dir, tmp_path):
    """The exactness check runs on each process alone; when it fails on rank 1 only,
    rank 0 (whose check passed) follows it to the logits path, and training proceeds."""
    agreed = run(tiny_dir, tmp_path / "agreed.pt", 2, 2, 1, "token")
    assert agreed["fused"], agreed["reason"]
    split = run(tiny_dir, tmp_path / "split.pt", 2, 2, 1, "token", OTR_TEST_FAIL_CHECK_ON_RANK="1")
    assert not split["fused"] and "another process" in split["reason"], split["reason"]
    assert split["grads"].keys() == agreed["grads"].keys()
    for name, grad in agreed["grads"].items():  # the two paths compute the same loss
        torch.testing.assert_close(split["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=name)
