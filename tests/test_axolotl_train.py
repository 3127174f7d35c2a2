"""Real `axolotl train` runs of the tiny offline default, as a user runs them."""

from __future__ import annotations

import math

import pytest
from conftest import run_axolotl_train, write_config

pytestmark = pytest.mark.integration

OTR_KEYS = ("otr/ce", "otr/p_target", "otr/hit_rate", "otr/entropy")


def train(tiny_config, tmp_path, name, **overrides):
    # Each run prepares its own dataset: a freshly prepared and a cached dataset can
    # come out in different orders, and the SFT comparison below needs the same batches.
    cfg = tiny_config(max_steps=4, dataset_prepared_path=str(tmp_path / f"prep-{name}"))
    cfg.update(overrides)
    _, logs = run_axolotl_train(write_config(cfg, tmp_path / f"{name}.yml"))
    steps = [log for log in logs if "loss" in log]
    assert steps, "no training log lines were printed"
    return cfg, steps


def test_otr_lora_run_trains_logs_metrics_and_saves_the_adapter(tiny_config, tmp_path):
    cfg, steps = train(tiny_config, tmp_path, "otr")
    assert len(steps) == 4
    for log in steps:
        assert math.isfinite(log["loss"])
        for key in OTR_KEYS:
            assert key in log and math.isfinite(log[key]), (key, log)
        assert 0 <= log["otr/p_target"] <= 1 and 0 <= log["otr/hit_rate"] <= 1
        # The OTR loss is not the cross-entropy it reports next to it.
        assert abs(log["loss"] - log["otr/ce"]) > 1.0
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").stat().st_size > 0
    assert (out / "adapter_config.json").exists()


def test_otr_off_is_axolotls_own_loss_and_otr_sft_reproduces_it(tiny_config, tmp_path):
    # One micro-batch per step: Axolotl 0.19's own loss for Llama is the mean of each
    # micro-batch's mean (it turns model_accepts_loss_kwargs off), while OTR divides by
    # the window's token count as the spec says; with one micro-batch the two agree.
    batch = dict(micro_batch_size=8, gradient_accumulation_steps=1)
    _, plain = train(tiny_config, tmp_path, "plain", otr=False, **batch)
    assert not any(key.startswith("otr/") for log in plain for key in log)
    # The same run through the plugin's weighted-NLL machinery with SFT weights gives
    # Axolotl's cross-entropy: same first-step loss (same seed, same batch, same init).
    _, sft = train(tiny_config, tmp_path, "sft", otr=True, otr_objective="sft", **batch)
    assert sft[0]["loss"] == pytest.approx(plain[0]["loss"], abs=2e-3)
    assert sft[0]["otr/ce"] == pytest.approx(plain[0]["loss"], abs=2e-3)


def test_short_plugin_spelling_trains_with_otr(tiny_config, tmp_path):
    _, steps = train(tiny_config, tmp_path, "short", plugins=["axolotl_otr"], max_steps=2)
    assert all(key in steps[-1] for key in OTR_KEYS)
