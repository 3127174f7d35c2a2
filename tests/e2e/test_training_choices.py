"""Best-model selection and the loss watchdog through ``axolotl train``: the adapter kept
is the one with the lowest ``eval_otr/ce``, and the watchdog stops an OTR run as it
stops a cross-entropy run (the rules themselves: ``tests/hf/test_training_choices.py``).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

VOCAB = 512


@pytest.mark.integration
def test_axolotl_keeps_the_adapter_with_the_lowest_eval_ce(tiny_config, tmp_path):
    from tests.support.axolotl_cli import run_axolotl_train, write_config

    out = tmp_path / "out"
    # A learning rate high enough that the cross-entropy stops falling before the end
    # (the best checkpoint is not the last), and no metric_for_best_model: the default.
    cfg = tiny_config(
        max_steps=8, val_set_size=0.1, eval_steps=2, save_steps=2, save_strategy="steps",
        eval_strategy="steps", load_best_model_at_end=True, learning_rate=5.0,
        output_dir=str(out), otr_estimator="exact",
    )  # fmt: skip
    output, _ = run_axolotl_train(write_config(cfg, tmp_path / "best.yml"))
    assert "best-model selection" in output and "instead of loss" in output, output[-3000:]
    state = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())
    history = state["log_history"]
    ce = {log["step"]: log["eval_otr/ce"] for log in history if "eval_otr/ce" in log}
    loss = {log["step"]: log["eval_loss"] for log in history if "eval_loss" in log}
    ce.pop(0, None)  # Axolotl's evaluation before the first step has no checkpoint
    assert sorted(ce) == [2, 4, 6, 8], history
    best = min(ce, key=ce.get)
    # The Trainer's own record of the selection (whatever step the minimum falls on)...
    assert state["best_metric"] == ce[best], (state["best_metric"], ce)
    assert state["best_model_checkpoint"] == str(out / f"checkpoint-{best}")
    # ...and the adapter Axolotl wrote at the end is that checkpoint's, no other's.
    kept = load_file(out / "adapter_model.safetensors")
    matches = []
    for step in sorted(ce):
        saved = load_file(out / f"checkpoint-{step}" / "adapter_model.safetensors")
        if all(torch.equal(kept[name], saved[name]) for name in kept):
            matches.append(step)
    assert matches == [best], {"eval_otr/ce": ce, "eval_loss": loss, "kept": matches}


@pytest.mark.integration
def test_loss_watchdog_stops_an_otr_run_as_it_stops_a_ce_run(tiny_config, tmp_path):
    from tests.support.axolotl_cli import run_axolotl_train, write_config
    from tests.support.examples import parse_logs
    from tests.support.failed_run import last_line_before_the_launcher, run_axolotl_train_failing

    watchdog = dict(loss_watchdog_threshold=0.01, loss_watchdog_patience=2, max_steps=6)
    runs = {}
    for otr in (False, True):
        cfg = tiny_config(
            otr=otr, output_dir=str(tmp_path / f"out-{otr}"),
            dataset_prepared_path=str(tmp_path / f"prep-{otr}"), **watchdog,
        )  # fmt: skip
        path = write_config(cfg, tmp_path / f"dog-{otr}.yml")
        if otr:
            lines = run_axolotl_train_failing(path)
            output, logs = "\n".join(lines), parse_logs("\n".join(lines))
        else:
            output, logs = run_axolotl_train(path)
        runs[otr] = output, [log for log in logs if "loss" in log]
        assert "stopping training (loss_watchdog_threshold)" in output, output[-3000:]
    # Axolotl's rule (at a step's end, the latest log) stops the CE run at step 3; the
    # OTR run, whose cross-entropy is as far above 0.01, stops at the same step.
    assert len(runs[False][1]) == len(runs[True][1]) == 3
    assert all(log["otr/ce"] > 0.01 > log["loss"] for log in runs[True][1])
    # Axolotl saves the stopped CE run as a completed one; the OTR stop ends non-zero with
    # its message last, and no adapter is written as the final model.
    assert "Training completed!" in runs[False][0]
    assert (tmp_path / "out-False" / "adapter_model.safetensors").exists()
    message, _ = last_line_before_the_launcher(lines)
    assert "OTR stopped the run at step 3" in message and "loss_watchdog_threshold" in message
    assert "Training completed!" not in runs[True][0]
    assert not (tmp_path / "out-True" / "adapter_model.safetensors").exists()
