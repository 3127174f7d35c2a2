"""What the Trainer's loss-driven choices read under OTR: best model and the loss watchdog.

Under OTR the training and evaluation ``loss`` is the OTR objective, which does not track
quality: it sits near -0.64 (0.01 under DFT) whatever the model does, while the
cross-entropy on the targets (``otr/ce``, ``eval_otr/ce``) keeps measuring it. Two choices
that read the loss by default are pointed at the cross-entropy instead, through
documented extension points only:

- Best-model selection (``load_best_model_at_end``, Axolotl's ``early_stopping_patience``,
  ``save_strategy: best``, the reduce-on-plateau scheduler) reads
  ``TrainingArguments.metric_for_best_model``, which the Trainer fills with ``loss`` when
  the user names none. ``select_best_on_ce`` sets it to ``eval_otr/ce`` with
  ``greater_is_better`` false, on the trainer's arguments, when OTR is attached (the
  Trainer and ``EarlyStoppingCallback`` read both at each evaluation). Axolotl 0.19 only
  forwards ``greater_is_better`` when it is true, and the Trainer's own default is
  "greater is better unless the name ends in loss", so a user's ``metric_for_best_model:
  eval_otr/ce`` is given ``greater_is_better`` false too. Any other metric the user
  names is left as it is.
- Axolotl's ``loss_watchdog_threshold`` (``LossWatchDogCallback``) watches the training
  ``loss``; ``CELossWatchDog`` applies the same threshold and patience, the same way
  (at each step end, to the latest training log), to ``otr/ce``, and replaces Axolotl's
  callback in the trainer's callback list (``Trainer.pop_callback``). A NaN stops it at
  once, and its stop ends the run non-zero, unsaved (``CELossWatchDog``).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .run_guard import stop_run

LOG = logging.getLogger("axolotl.otr")

CE_METRIC = "eval_otr/ce"
TRAIN_CE = "otr/ce"
# What the Trainer fills in when best-model selection is on and no metric is named,
# and what a user who means "the loss" writes.
_LOSS_METRICS = ("loss", "eval_loss")


def select_best_on_ce(args: TrainingArguments, named: str | None = None) -> str | None:
    """Point best-model selection at ``eval_otr/ce``, lower is better, unless the user
    chose another metric. Changes ``args`` in place; returns the log line (None: no change).

    ``named``: the metric the user wrote in the config, where known (the Axolotl plugin
    passes it). The Trainer writes ``loss`` into ``args`` when none is named, so ``args``
    alone cannot tell "the loss, on purpose" from "nothing": a loss the user named
    is kept, with a warning; otherwise the loss is replaced.
    """
    metric = args.metric_for_best_model
    if metric in _LOSS_METRICS and named in _LOSS_METRICS:
        return (
            f"OTR: metric_for_best_model {named} kept as your config names it, but under OTR "
            "it is the OTR objective, which does not track quality: remove it to select on "
            f"{CE_METRIC} (lower is better)"
        )
    if metric in _LOSS_METRICS:
        args.metric_for_best_model, args.greater_is_better = CE_METRIC, False
        return (
            f"OTR: best-model selection (load_best_model_at_end, early stopping) uses "
            f"{CE_METRIC}, lower is better, instead of {metric}: under OTR the eval loss "
            "is the OTR objective, which does not track quality. Name another "
            "metric_for_best_model to choose it yourself."
        )
    if metric in (TRAIN_CE, CE_METRIC) and args.greater_is_better is not False:
        args.greater_is_better = False
        return f"OTR: metric_for_best_model {metric}: lower is better (greater_is_better: false)"
    return None


class CELossWatchDog(TrainerCallback):
    """Axolotl's loss watchdog, reading the cross-entropy on the targets (``otr/ce``).

    The same rule as Axolotl's ``LossWatchDogCallback``: at each step end, if the latest
    log is a training log and its value is above ``threshold``, count a violation (else
    reset the count); ``patience`` violations in a row stop training, at that step. Two
    differences: a NaN or Inf ``otr/ce`` or loss stops at once, at the log that shows it
    (a comparison with NaN is false, so Axolotl's rule never fires on it), and a stop
    raises ``OTRRunStopped`` (``run_guard.py``): the run ends non-zero and is not saved or
    reported as completed.
    The stop asks the Trainer to log that step (``control.should_log``) and raises once
    the log is out (``on_log``), so the step's line is printed, as a stopped
    cross-entropy run prints it.
    """

    def __init__(self, threshold: float, patience: int | None = None) -> None:
        self.threshold = threshold
        self.patience = patience or 3  # Axolotl's default
        self.violations = 0
        self.stopping: str | None = None  # why, once decided

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> TrainerControl:
        last = state.log_history[-1] if state.log_history else {}
        if TRAIN_CE in last and self.stopping is None:
            if last[TRAIN_CE] > self.threshold:
                self.violations += 1
            else:
                self.violations = 0
            if self.violations >= self.patience:
                self.stopping = (
                    f"{TRAIN_CE} {last[TRAIN_CE]:.4f} above loss_watchdog_threshold "
                    f"{self.threshold} for {self.violations} steps in a row, stopping training "
                    "(loss_watchdog_threshold)"
                )
        if self.stopping is not None:
            control.should_log = True
        return control

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs,
    ) -> None:
        for key in (TRAIN_CE, "loss"):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(value):
                self.stopping = f"{key} is {value}, stopping training (loss_watchdog_threshold)"
        if self.stopping is not None:
            stop_run(state, self.stopping)


def watch_ce(trainer: Any, threshold: float | None, patience: int | None) -> None:
    """Make ``loss_watchdog_threshold`` watch ``otr/ce``: replace Axolotl's watchdog (which
    reads the OTR loss) by ``CELossWatchDog`` with the same settings. No-op without one."""
    if threshold is None:
        return
    try:
        from axolotl.utils.callbacks import LossWatchDogCallback
    except ImportError:  # no Axolotl watchdog to replace
        LossWatchDogCallback = None
    if LossWatchDogCallback is not None:
        while trainer.pop_callback(LossWatchDogCallback) is not None:
            pass
    watchdog = CELossWatchDog(threshold, patience)
    trainer.add_callback(watchdog)
    LOG.info(
        "OTR: loss_watchdog_threshold %s (patience %d) watches %s, the cross-entropy on the "
        "targets, instead of the training loss (the OTR objective, which does not diverge "
        "with quality)",
        threshold, watchdog.patience, TRAIN_CE,
    )  # fmt: skip
