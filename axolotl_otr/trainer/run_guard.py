"""Stop an OTR run that trains nothing, or a model that has died, with a clear message.

The OTR loss sits near -0.6 whatever the model does, so a run can train the wrong thing
while its loss column looks calm. ``RunGuard`` (a ``TrainerCallback``, added when OTR is
attached) reads what the Trainer logs and stops the run when:

- the train or evaluation set has no target token at all (read before the first step,
  ``targets.py``), or ``NO_TARGET_STEPS`` steps in a row had none (under OTR a training
  log without ``otr/ce`` is a window without targets, ``metrics.py``);
- the loss or the cross-entropy on the targets is NaN or Inf (at once);
- the model has collapsed: for ``COLLAPSE_LOGS`` training logs in a row, its entropy on
  the targets sits at ln(V) (every position uniform: ``p_target = 1/V``) after having
  been clearly below it, or its gradient norm is exactly 0 while the targets are not yet
  fitted, after having been non-zero. (Reproduced at ``learning_rate: 1e3`` on the tiny
  model: the hidden states overflow, the final norm maps them to 0, every logit is equal.)

Neither a randomly initialised model (near ln(V) from the start, and moving) nor a run
that fits its targets (entropy and loss towards 0, gradients vanishing with them) stops.

A stop raises ``OTRRunStopped`` from the callback. The Trainer does not catch it, and
Axolotl's ``train()`` never reaches its "Training completed! Saving trained model" step:
the process ends non-zero and no final model is written (checkpoints saved before the
stop are kept). A ``control.should_training_stop`` would instead end ``train()``
normally, and Axolotl would save and report the run as completed.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .targets import LIKELY_CAUSES, has_targets, no_targets_message

NO_TARGET_STEPS = 10  # optimizer steps in a row without a target token
COLLAPSE_LOGS = 3  # training logs in a row (Axolotl's loss_watchdog_patience default)
AT_UNIFORM = 1e-4  # nats: |entropy - ln V| of a policy uniform to fp32 precision
LEFT_UNIFORM = 1e-3  # nats below ln V: the policy has been away from uniform
FITTED_CE = 1e-2  # nats: targets this well fitted may leave no gradient (not a collapse)
WATCHED = ("loss", "otr/ce", "eval_loss", "eval_otr/ce")


class OTRRunStopped(RuntimeError):
    """OTR stopped the run; the message says why and what to check."""


class RunGuard(TrainerCallback):
    """The stop rules above, for one trainer (held weakly: the trainer holds this)."""

    def __init__(self, trainer: Any) -> None:
        self._trainer = weakref.ref(trainer)
        self.vocab_size: int | None = None
        self._last_step = 0
        self._steps_without_targets = 0
        self._uniform_logs = 0
        self._left_uniform = False
        self._zero_grad_logs = 0
        self._had_gradient = False

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        self._last_step = state.global_step
        self.vocab_size = _output_size(kwargs.get("model"))
        trainer = self._trainer()
        if trainer is None:
            return
        datasets = {"training": trainer.train_dataset}
        evals = trainer.eval_dataset
        if isinstance(evals, dict):
            datasets.update({f"evaluation ({name})": data for name, data in evals.items()})
        elif evals is not None:
            datasets["evaluation"] = evals
        for which, dataset in datasets.items():
            if dataset is not None and has_targets(dataset) is False:
                raise OTRRunStopped(no_targets_message(which))

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs,
    ) -> None:
        logs = logs or {}
        for key in WATCHED:
            if key in logs and not math.isfinite(logs[key]):
                stop_run(
                    state, f"{key} is {logs[key]}: the training diverged (lower the "
                    "learning rate; check the data and fp16 overflow, prefer bf16)",
                )  # fmt: skip
        if "loss" not in logs or "learning_rate" not in logs:
            return  # not the Trainer's training log (evaluation, end of training, a callback's)
        steps, self._last_step = state.global_step - self._last_step, state.global_step
        if "otr/ce" not in logs:
            self._steps_without_targets += steps
            if self._steps_without_targets >= NO_TARGET_STEPS:
                stop_run(
                    state, f"{self._steps_without_targets} steps in a row had no target "
                    f"token (every label -100). Likely causes: {LIKELY_CAUSES}",
                )  # fmt: skip
            return
        self._steps_without_targets = 0
        self._watch_entropy(state, logs.get("otr/entropy"))
        self._watch_gradient(state, logs.get("grad_norm"), logs["otr/ce"])

    def _watch_entropy(self, state: TrainerState, entropy: float | None) -> None:
        if entropy is None or not self.vocab_size:
            return
        uniform = math.log(self.vocab_size)
        if entropy < uniform - LEFT_UNIFORM:
            self._left_uniform = True
        at_uniform = self._left_uniform and abs(entropy - uniform) <= AT_UNIFORM
        self._uniform_logs = self._uniform_logs + 1 if at_uniform else 0
        if self._uniform_logs >= COLLAPSE_LOGS:
            stop_run(
                state, f"the model has collapsed: otr/entropy {entropy:.6f} = "
                f"ln({self.vocab_size}) for {self._uniform_logs} logs in a row, every position "
                f"predicts the uniform distribution (p_target 1/{self.vocab_size}). "
                f"{_COLLAPSE_ADVICE}",
            )  # fmt: skip

    def _watch_gradient(self, state: TrainerState, grad_norm: float | None, ce: float) -> None:
        if grad_norm is None:
            return
        if grad_norm > 0:
            self._had_gradient, self._zero_grad_logs = True, 0
            return
        stuck = self._had_gradient and grad_norm == 0 and ce > FITTED_CE
        self._zero_grad_logs = self._zero_grad_logs + 1 if stuck else 0
        if self._zero_grad_logs >= COLLAPSE_LOGS:
            stop_run(
                state, f"the model has collapsed: grad_norm exactly 0 for {self._zero_grad_logs} "
                f"logs in a row while otr/ce is {ce:.4f} (the targets are not fitted, yet "
                f"nothing moves the weights). {_COLLAPSE_ADVICE}",
            )  # fmt: skip


def stop_run(state: TrainerState, reason: str) -> None:
    """Raise ``OTRRunStopped``: the process ends non-zero and no final model is saved."""
    raise OTRRunStopped(
        f"OTR stopped the run at step {state.global_step}: {reason}. Nothing was saved as "
        "the final model; checkpoints written before this step are kept."
    )


_COLLAPSE_ADVICE = (
    "Usual cause: a learning rate so high that the hidden states overflowed. Lower "
    "learning_rate and restart, or resume from a checkpoint written before the collapse"
)


def _output_size(model: Any) -> int | None:
    """The number of logits per position (the lm_head's rows), where the model says."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    if weight is not None and weight.dim() == 2:
        return int(weight.shape[0])
    return getattr(getattr(model, "config", None), "vocab_size", None)
