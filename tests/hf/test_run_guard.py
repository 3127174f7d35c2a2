"""The run guard (``trainer/run_guard.py``) in a real HF Trainer with OTR installed: a run
without targets, a dead model or a NaN stops with a message and an exception (so the
process ends non-zero, unsaved); a randomly initialised model and a run whose entropy
falls to ~0 train through (issue 35, items 3 and 4).
"""

from __future__ import annotations

import math

import pytest
from transformers import TrainerControl, TrainerState

from axolotl_otr.trainer.run_guard import NO_TARGET_STEPS, OTRRunStopped, RunGuard
from tests.support.trainer_setup import build_trainer, make_examples

VOCAB = 512


def without_targets(examples: list[dict]) -> list[dict]:
    return [{**example, "labels": example["labels"].clone().fill_(-100)} for example in examples]


def train(tiny_dir, tmp_path, examples, **overrides):
    settings = dict(micro_batch=4, accumulation=1, max_grad_norm=1.0, max_steps=6)
    trainer, _, logs = build_trainer(
        tiny_dir / "model", tmp_path, examples, **{**settings, **overrides}
    )
    trainer.train()
    return trainer, [log for log in logs.logs if "loss" in log]


def test_a_set_without_targets_stops_before_the_first_step(tiny_dir, tmp_path):
    for train_set, eval_set, which in (
        (without_targets(make_examples(8, VOCAB)), None, "training"),
        (make_examples(8, VOCAB), without_targets(make_examples(4, VOCAB)), "evaluation"),
    ):
        trainer, _, logs = build_trainer(
            tiny_dir / "model", tmp_path, train_set, micro_batch=4, accumulation=1,
            max_steps=4, eval_examples=eval_set,
        )  # fmt: skip
        with pytest.raises(OTRRunStopped, match=f"the {which} set has no target tokens") as info:
            trainer.train()
        assert "train_on_inputs" in str(info.value) and "roles_to_train" in str(info.value)
        assert trainer.state.global_step == 0 and not logs.logs


def test_steps_in_a_row_without_targets_stop_the_run(tiny_dir, tmp_path):
    # One row with targets (the set passes the check before the first step) among many
    # without: whatever the order, some run of NO_TARGET_STEPS one-row steps has none.
    examples = make_examples(1, VOCAB) + without_targets(make_examples(4 * NO_TARGET_STEPS, VOCAB))
    with pytest.raises(OTRRunStopped, match=f"{NO_TARGET_STEPS} steps in a row had no target"):
        train(tiny_dir, tmp_path, examples, micro_batch=1, max_steps=len(examples))


def test_collapse_stops_a_dead_model_but_not_a_random_init_nor_a_fitted_one(tiny_dir, tmp_path):
    examples = make_examples(16, VOCAB)
    # The tiny test model is randomly initialised: near-uniform (entropy ~0.01 below
    # ln V) and moving. It trains through.
    _, logs = train(tiny_dir, tmp_path / "random", examples)
    assert len(logs) == 6
    assert all(0 < math.log(VOCAB) - log["otr/entropy"] < 0.1 for log in logs), logs
    # One example repeated at a high learning rate: entropy and loss fall towards 0.
    _, logs = train(tiny_dir, tmp_path / "fit", examples[:1] * 8, learning_rate=3e-2, max_steps=30)
    assert len(logs) == 30 and logs[-1]["otr/entropy"] < 0.05, logs[-1]
    # learning_rate 1e3: the hidden states overflow, every logit becomes equal.
    with pytest.raises(OTRRunStopped, match=r"collapsed: otr/entropy 6\.2383\d* = ln\(512\)"):
        train(tiny_dir, tmp_path / "dead", examples, learning_rate=1e3, max_steps=8)


def _log(guard: RunGuard, logs: dict, step: int) -> None:
    state = TrainerState(global_step=step)
    guard.on_log(None, state, TrainerControl(), logs=logs)


def test_nan_stops_at_once_and_a_gradient_stuck_at_zero_after_moving_stops(tiny_dir, tmp_path):
    trainer, _, _ = build_trainer(tiny_dir / "model", tmp_path, make_examples(4, VOCAB),
                                  micro_batch=4, accumulation=1)  # fmt: skip
    for key in ("loss", "otr/ce"):
        log = {"loss": -0.6, "learning_rate": 1e-3, "otr/ce": 2.0, key: math.nan}
        with pytest.raises(OTRRunStopped, match=f"{key} is nan"):
            _log(RunGuard(trainer), log, step=1)
    guard = RunGuard(trainer)
    log = {"loss": -0.6, "learning_rate": 1e-3, "otr/ce": 2.0, "otr/entropy": 3.0}
    for step, grad_norm in enumerate((0.0, 0.0, 0.0, 0.5, 0.0, 0.0), start=1):
        _log(guard, {**log, "grad_norm": grad_norm}, step)  # zero before moving: no stop
    with pytest.raises(OTRRunStopped, match="grad_norm exactly 0 for 3 logs"):
        _log(guard, {**log, "grad_norm": 0.0}, step=7)
    # A fitted model's gradient may vanish too (softmax saturated): not a collapse.
    fitted = RunGuard(trainer)
    for step, grad_norm in enumerate((0.5, 0.0, 0.0, 0.0, 0.0), start=1):
        _log(fitted, {**log, "otr/ce": 1e-4, "otr/entropy": 1e-3, "grad_norm": grad_norm}, step)
