"""Evaluation with several processes (torch.distributed, gloo on CPU).

- A log call that only rank 0 makes (Axolotl's bench evaluation logs ``eval_bench_*``
  on rank 0 only) must not enter a collective: the other ranks are not there, and the
  run would hang.
- The evaluation loss and the ``eval_otr/*`` metrics of 2 processes with half the eval
  batch each equal those of 1 process with the whole batch, in both normalizations
  (transformers 5.x multiplies an eval ``compute_loss_func`` loss by the process count).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

WORKER = Path(__file__).parent / "eval_worker.py"
OTR_KEYS = ("eval_otr/ce", "eval_otr/p_target", "eval_otr/hit_rate", "eval_otr/entropy")


def run(tiny_dir, out: Path, processes: int, eval_batch: int) -> dict:
    """Launch the worker; its return code, output tail and whatever rank 0 saved."""
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parents[1])}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
        "--master_port", str(28500 + os.getpid() % 1000 + processes),
        str(WORKER), str(tiny_dir / "model"), str(out), str(eval_batch),
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        returncode, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        returncode, output = None, f"timed out after 300 s: {err.stdout!s}"
    logs = out.with_suffix(".logs.pt")
    return {
        "returncode": returncode,
        "output": output[-5000:],
        **(torch.load(out) if out.exists() else {}),
        **(torch.load(logs) if logs.exists() else {}),
    }


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory) -> dict[int, dict]:
    root = tmp_path_factory.mktemp("eval_ranks")
    return {
        1: run(tiny_dir, root / "one" / "out.pt", 1, 4),
        2: run(tiny_dir, root / "two" / "out.pt", 2, 2),
    }


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_two_processes_evaluate_like_one_process(runs, normalization):
    one, two = runs[1], runs[2]
    assert "metrics" in one and "metrics" in two, (one["output"], two["output"])
    assert one["world"] == 1 and two["world"] == 2
    a, b = one["metrics"][normalization], two["metrics"][normalization]
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)
    for key in OTR_KEYS:
        assert b[key] == pytest.approx(a[key], rel=1e-5), key


def test_an_eval_log_made_by_rank_0_alone_does_not_hang(runs):
    two = runs[2]
    assert two["returncode"] == 0, two["output"]
    # It went through as logged, without OTR metrics (those belong to the eval loop).
    bench = [log for log in two["logs"] if "eval_bench_loss" in log]
    assert len(bench) == 1 and not any(key.startswith("eval_otr/") for key in bench[0])
