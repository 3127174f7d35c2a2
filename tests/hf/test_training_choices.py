"""Best-model selection and the loss watchdog read the cross-entropy under OTR.

The OTR loss (``loss``, ``eval_loss``) does not track quality, so ``load_best_model_at_end``
and Axolotl's ``early_stopping_patience`` select on ``eval_otr/ce`` (lower is better),
and ``loss_watchdog_threshold`` watches ``otr/ce``. Unit tests of the rules here, and
``axolotl train`` runs (``integration``) that keep the right adapter and stop as a
cross-entropy run stops.
"""

from __future__ import annotations

import logging
import math

import pytest
from transformers import EarlyStoppingCallback, TrainerControl, TrainerState, TrainingArguments

from axolotl_otr.trainer.run_guard import OTRRunStopped
from axolotl_otr.trainer.training_choices import CELossWatchDog, select_best_on_ce
from tests.support.trainer_setup import build_trainer, make_examples

VOCAB = 512


def _args(tmp_path, **kwargs) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], eval_strategy="steps")
    base.update(eval_steps=2, save_steps=2, save_strategy="steps")
    return TrainingArguments(**{**base, **kwargs})


def test_default_selection_moves_from_the_otr_loss_to_the_cross_entropy(tmp_path):
    args = _args(tmp_path, load_best_model_at_end=True)
    assert (args.metric_for_best_model, args.greater_is_better) == ("loss", False)
    line = select_best_on_ce(args)
    assert (args.metric_for_best_model, args.greater_is_better) == ("eval_otr/ce", False)
    assert "eval_otr/ce, lower is better" in line
    explicit = _args(tmp_path, load_best_model_at_end=True, metric_for_best_model="eval_loss")
    assert select_best_on_ce(explicit) is not None
    assert explicit.metric_for_best_model == "eval_otr/ce" and explicit.greater_is_better is False


@pytest.mark.parametrize("metric", ["eval_otr/ce", "otr/ce"])
def test_named_cross_entropy_is_lower_is_better(tmp_path, metric):
    # The Trainer's own default makes any name not ending in "loss" greater-is-better,
    # and Axolotl 0.19 forwards greater_is_better only when it is true.
    args = _args(tmp_path, load_best_model_at_end=True, metric_for_best_model=metric)
    assert args.greater_is_better is True
    assert "lower is better" in select_best_on_ce(args)
    assert (args.metric_for_best_model, args.greater_is_better) == (metric, False)


def test_other_metrics_and_no_selection_are_left_alone(tmp_path):
    args = _args(tmp_path, load_best_model_at_end=True, metric_for_best_model="eval_otr/p_target")
    assert select_best_on_ce(args) is None
    assert (args.metric_for_best_model, args.greater_is_better) == ("eval_otr/p_target", True)
    plain = _args(tmp_path)
    assert select_best_on_ce(plain) is None
    assert plain.metric_for_best_model is None and plain.greater_is_better is None


def test_attached_trainer_early_stops_on_the_cross_entropy(tiny_dir, tmp_path, caplog):
    examples = make_examples(4, VOCAB)
    with caplog.at_level(logging.INFO, logger="axolotl.otr"):
        trainer, _, _ = build_trainer(
            tiny_dir / "model", tmp_path, examples, micro_batch=2, accumulation=1,
            eval_examples=make_examples(2, VOCAB, seed=1), eval_strategy="steps",
            eval_steps=1, save_strategy="steps", save_steps=1, load_best_model_at_end=True,
        )  # fmt: skip
    trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=2))
    assert trainer.args.metric_for_best_model == "eval_otr/ce"
    assert trainer.args.greater_is_better is False
    assert "best-model selection" in caplog.text and "eval_otr/ce" in caplog.text
    # EarlyStoppingCallback reads the trainer's arguments: it counts a rise of the CE.
    stopper = next(
        cb for cb in trainer.callback_handler.callbacks if isinstance(cb, EarlyStoppingCallback)
    )
    state, control = TrainerState(best_metric=5.0), TrainerControl()
    stopper.on_evaluate(trainer.args, state, control, metrics={"eval_otr/ce": 5.5})
    assert stopper.early_stopping_patience_counter == 1


def _step_end(watchdog: CELossWatchDog, history: list[dict]) -> bool:
    """Whether the watchdog decided to stop at this step end (it then asks for a log)."""
    control = TrainerControl()
    watchdog.on_step_end(None, TrainerState(log_history=history), control)
    return control.should_log


def _log(watchdog: CELossWatchDog, logs: dict) -> None:
    watchdog.on_log(None, TrainerState(global_step=logs.get("step", 0)), TrainerControl(), logs)


def test_ce_watchdog_follows_axolotls_rule_on_the_cross_entropy():
    watchdog = CELossWatchDog(threshold=6.0, patience=2)
    history = [{"loss": -0.64, "otr/ce": 6.4, "step": 1}]
    assert not _step_end(watchdog, history)  # one violation
    history.append({"eval_loss": -0.6, "eval_otr/ce": 9.0, "step": 1})
    assert not _step_end(watchdog, history)  # an eval log: neither counts nor resets
    history.append({"loss": -0.64, "otr/ce": 5.9, "step": 2})
    assert not _step_end(watchdog, history) and watchdog.violations == 0  # reset
    history.append({"loss": -0.64, "otr/ce": 6.5, "step": 3})
    assert not _step_end(watchdog, history)
    history.append({"loss": -0.64, "otr/ce": 6.6, "step": 4})
    assert _step_end(watchdog, history)
    # The stop raises once the step is logged: the run ends non-zero, and Axolotl neither
    # saves nor reports it as a completed training (should_training_stop would end
    # train() normally).
    with pytest.raises(OTRRunStopped, match="above loss_watchdog_threshold 6.0 for 2 steps"):
        _log(watchdog, {"loss": -0.64, "otr/ce": 6.7, "step": 5})
    assert CELossWatchDog(threshold=1.0).patience == 3  # Axolotl's default patience


@pytest.mark.parametrize("key", ["otr/ce", "loss"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_ce_watchdog_stops_at_once_on_nan_or_inf(key, value):
    # A comparison with NaN is false: Axolotl's rule (and this one before) never fired.
    watchdog = CELossWatchDog(threshold=6.0, patience=5)
    with pytest.raises(OTRRunStopped, match=f"{key} is {value}"):
        _log(watchdog, {"loss": -0.64, "otr/ce": 3.0, key: value, "step": 1})


# ---- through `axolotl train` ---------------------------------------------------------


@pytest.mark.parametrize("named", ["eval_loss", "loss"])
def test_a_loss_the_config_names_is_kept_with_a_warning(tmp_path, named):
    """The plugin passes the YAML's own metric_for_best_model: a loss named there on
    purpose is kept (the arguments alone cannot tell it from the Trainer's default)."""
    args = _args(tmp_path, load_best_model_at_end=True, metric_for_best_model=named)
    line = select_best_on_ce(args, named=named)
    assert f"metric_for_best_model {named} kept" in line and "eval_otr/ce" in line
    assert args.metric_for_best_model == named and args.greater_is_better is False
    unnamed = _args(tmp_path, load_best_model_at_end=True)
    select_best_on_ce(unnamed, named=None)
    assert unnamed.metric_for_best_model == "eval_otr/ce"
