"""``torch_compile: true``: the hidden-state capture works whatever ran before the first step.

``torch.compile`` does not guard on a module's forward hooks: a hook added after the
first compiled call of the same signature is never run by the compiled code. A hook
added per ``compute_loss`` call therefore saw nothing ("saw 0") once a train-mode
forward (a warm-up, a callback) had compiled the model before the first training step.
The capture's hook now exists from the moment OTR is attached (``capture.py``).
"""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from axolotl_otr.objective import Objective, OTRSettings
from tests.support.trainer_setup import build_trainer, make_examples

VOCAB = 512
# Dynamo decides which hooks run (the bug and the fix are in its tracing), so the
# backend that compiles fastest on CPU shows both; Inductor behaves the same.
BACKEND = "aot_eager"


class WarmUpForward(TrainerCallback):
    """One train-mode forward of the model the Trainer runs (compiled under
    ``torch_compile``), with the call OTR's own forward makes, before the first step."""

    def __init__(self, trainer, batch: dict[str, torch.Tensor]) -> None:
        self.trainer = trainer
        self.batch = batch

    def on_train_begin(self, args, state, control, **kwargs):
        model = self.trainer.model_wrapped.train()
        if args.torch_compile:
            assert isinstance(model, torch._dynamo.eval_frame.OptimizedModule), type(model)
        extra = {"logits_to_keep": 1}  # what the hidden-state path asks of the forward
        if self.trainer.model_accepts_loss_kwargs:  # the Trainer adds the window's count
            extra["num_items_in_batch"] = torch.tensor(7)
        model(**self.batch, **extra)


@pytest.mark.compile
def test_compiled_model_after_a_warm_up_forward_trains_as_eager(tiny_dir, tmp_path):
    examples = make_examples(8, VOCAB)
    warm_up = {
        "input_ids": torch.stack([e["input_ids"] for e in examples[:2]]),
        "attention_mask": torch.stack([e["attention_mask"] for e in examples[:2]]),
    }
    runs = {}
    for compiled in (False, True):
        trainer, grads, logs = build_trainer(
            tiny_dir / "model", tmp_path / str(compiled), examples, micro_batch=2,
            accumulation=2, max_steps=2, torch_compile=compiled,
            torch_compile_backend=BACKEND if compiled else None,
            settings=OTRSettings(Objective(estimator="exact")),
        )  # fmt: skip
        assert trainer.output_layer.weight_and_bias is not None  # the capture path
        trainer.add_callback(WarmUpForward(trainer, warm_up))
        trainer.train()
        runs[compiled] = (grads.grads, [log for log in logs.logs if "loss" in log])
    (eager_grads, eager_logs), (compiled_grads, compiled_logs) = runs[False], runs[True]
    assert len(compiled_logs) == len(eager_logs) == 2
    for eager, compiled in zip(eager_logs, compiled_logs, strict=True):
        for key in ("loss", "otr/ce", "otr/p_target"):
            assert compiled[key] == pytest.approx(eager[key], rel=1e-5, abs=1e-7), key
    assert len(compiled_grads) == len(eager_grads) == 2
    for eager, compiled in zip(eager_grads, compiled_grads, strict=True):
        assert eager.keys() == compiled.keys() and eager
        for name in eager:
            torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-7)
