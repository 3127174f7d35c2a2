"""Evaluation with several processes (torch.distributed, gloo on CPU).

- A log call that only rank 0 makes (Axolotl's bench evaluation logs ``eval_bench_*``
  on rank 0 only) must not enter a collective: the other ranks are not there, and the
  run would hang.
- The evaluation loss and the ``eval_otr/*`` metrics of 2 processes with half the eval
  batch each equal those of 1 process with the whole batch, in both normalizations
  (transformers 5.x multiplies an eval ``compute_loss_func`` loss by the process count).
- The class of one-rank calls: every Trainer method that a callback calls on one process
  alone returns under OTR wherever it returns under plain cross-entropy (the control,
  the same trainer without OTR), and such stray calls leave ``eval_otr/*`` of the next
  evaluation unchanged.

Trainer methods that callbacks call on ONE process only (read in Axolotl 0.19.0 and
0.21.0, src/axolotl/..., and transformers 5.16.1; same line numbers in both Axolotl
versions unless given twice):
- ``prediction_step``: Axolotl ``LogPredictionCallback.on_evaluate``,
  utils/callbacks/__init__.py:639 (in ``log_table_from_dataloader``, which runs under
  ``if is_main_process():`` at :772); on whenever ``eval_table_size > 0`` with W&B, MLflow
  or Comet. (``BenchEvalCallback`` calls it at :266 on every process, outside any
  evaluation loop.)
- ``log``: Axolotl ``BenchEvalCallback.on_evaluate``, utils/callbacks/__init__.py:344, in
  the rank-0 branch of ``if is_distributed() and not is_main_process(): ... else:`` at
  :303 (``eval_bench_*`` keys). (``CausalLMBenchEvalCallback`` logs ``eval_*`` keys at
  :555 on every process.) A user callback could log a ``loss`` key the same way:
  checked too.
- ``get_eval_dataloader``, ``get_train_dataloader``: Axolotl's diffusion generation
  callback, after ``if not self.trainer.state.is_world_process_zero: return``:
  0.19 integrations/diffusion/callbacks.py:50, :54 (guard :43); 0.21
  core/trainers/diffusion_lm/callbacks.py:60, :64 (guard :53). (``SFTGenerationCallback``,
  utils/callbacks/generation.py:34, :43, calls them on every process.)
- ``save_model``: transformers ``WandbCallback.on_train_end``
  integrations/integration_utils.py:846-850 and ``DVCLiveCallback.on_train_end``
  :2249-2257, under ``state.is_world_process_zero``, on a new plain ``Trainer`` built from
  the same args and model (not the OTR class; checked on the OTR trainer anyway).
- ``compute_loss``: called by no callback directly; it is what ``prediction_step`` runs,
  so it is checked on its own.
No other Trainer method is called under ``is_main_process`` / ``is_world_process_zero`` /
``local_rank == 0`` by Axolotl's callbacks (utils/callbacks/*.py, integrations/*,
core/trainers/*; the RL trainers are left out: OTR refuses ``rl:``) or by the HF Trainer's
own callbacks (trainer_callback.py, integrations/integration_utils.py). ``evaluate`` on
one process hangs under plain CE too (the loop gathers), and no callback does it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from tests.support.torchrun import torchrun

# One xdist worker runs the whole file: its module fixtures are built once (Makefile).
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("test_eval_ranks")]

WORKER = "tests.distributed.eval_worker"  # run as a module from the repository root
OTR_KEYS = ("eval_otr/ce", "eval_otr/p_target", "eval_otr/hit_rate", "eval_otr/entropy")


def run(tiny_dir, out: Path, processes: int, eval_batch: int, *mode: str) -> dict:
    """Launch the worker; its return code, output tail and whatever rank 0 saved."""
    out.parent.mkdir(parents=True, exist_ok=True)
    args = [tiny_dir / "model", out, eval_batch, *mode]
    try:
        proc = torchrun(WORKER, args, processes, timeout=300)
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


# The methods of the module docstring, as the worker calls them (tests/distributed/eval_worker.py).
ONE_RANK_METHODS = (
    "prediction_step",
    "compute_loss",
    "log_eval_keys",
    "log_training_keys",
    "get_eval_dataloader",
    "get_train_dataloader",
    "save_model",
)
OTR_VARIANTS = ("otr_token", "otr_sequence")


@pytest.fixture(scope="module")
def one_rank_run(tiny_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("one_rank") / "out.pt"
    return run(tiny_dir, out, 2, 2, "one-rank")


def test_the_worker_calls_every_listed_method():
    from tests.distributed.eval_worker import ONE_RANK_CALLS

    assert tuple(ONE_RANK_CALLS) == ONE_RANK_METHODS


@pytest.mark.parametrize("method", ONE_RANK_METHODS)
@pytest.mark.parametrize("variant", OTR_VARIANTS)
def test_a_method_called_by_rank_0_alone_returns_as_under_ce(one_rank_run, variant, method):
    calls = one_rank_run.get("calls", {})
    control = calls.get("ce", {}).get(method)
    assert control == "returned", (control, one_rank_run["output"])
    outcome = calls.get(variant, {}).get(method, "did not return (a collective on one rank)")
    assert outcome == "returned", (outcome, one_rank_run["output"])


@pytest.mark.parametrize("variant", ("ce", *OTR_VARIANTS))
def test_a_stray_prediction_step_loss_is_its_batch_mean(one_rank_run, variant):
    """Counted on rank 0 alone, the loss is the batch's own mean: what compute_loss gives
    without a count (not a share of a count over processes, times the process count)."""
    values = one_rank_run.get("values", {}).get(variant, {})
    assert "prediction_step" in values and "compute_loss" in values, one_rank_run["output"]
    assert values["prediction_step"] == pytest.approx(values["compute_loss"], rel=1e-6)


def test_the_one_rank_run_ends_cleanly(one_rank_run):
    assert one_rank_run["returncode"] == 0, one_rank_run["output"]


@pytest.mark.parametrize("variant", OTR_VARIANTS)
def test_stray_calls_leave_the_next_evaluation_unchanged(one_rank_run, variant):
    evals = one_rank_run.get("evals", {}).get(variant)
    assert evals is not None, one_rank_run["output"]
    before, after = evals["before"], evals["after"]
    for key in ("eval_loss", *OTR_KEYS):
        assert after[key] == before[key], key


def test_a_stray_prediction_step_leaves_eval_otr_unchanged(tiny_dir, tmp_path):
    """One process: an evaluation after a prediction_step made outside any evaluation
    loop (Axolotl's prediction-table and bench callbacks) reports the same eval_otr/*."""
    from axolotl_otr.objective import Objective, OTRSettings
    from tests.support.trainer_setup import build_trainer, make_examples

    eval_examples = make_examples(8, 512, seed=1)
    trainer, _, _ = build_trainer(
        tiny_dir / "model", tmp_path, make_examples(2, 512), micro_batch=4, accumulation=1,
        eval_examples=eval_examples, settings=OTRSettings(Objective(estimator="exact")),
    )  # fmt: skip
    clean = trainer.evaluate()
    stray = trainer.data_collator(make_examples(3, 512, seed=7))
    trainer.model.eval()
    trainer.prediction_step(trainer.model, stray, prediction_loss_only=False)
    after = trainer.evaluate()
    for key in ("eval_loss", *OTR_KEYS):
        assert after[key] == clean[key], key
