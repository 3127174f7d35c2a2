"""Real `axolotl train` runs of the tiny offline default, as a user runs them."""

from __future__ import annotations

import math

import pytest

from tests.support.axolotl_cli import run_axolotl, run_axolotl_train, write_config

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
    cfg = tiny_config(max_steps=4)
    output, logs = run_axolotl_train(write_config(cfg, tmp_path / "otr.yml"))
    steps = [log for log in logs if "loss" in log]
    # Axolotl built the plugin's trainer class (get_trainer_cls), not a swapped instance.
    assert "OTR on (OTRAxolotlTrainer)" in output, output[-3000:]
    assert len(steps) == 4
    for log in steps:
        assert math.isfinite(log["loss"])
        for key in OTR_KEYS:
            assert key in log and math.isfinite(log[key]), (key, log)
        assert 0 <= log["otr/p_target"] <= 1 and 0 <= log["otr/hit_rate"] <= 1
        # The OTR loss is not the cross-entropy it reports next to it.
        assert abs(log["loss"] - log["otr/ce"]) > 1.0
    # The base model's measures on the first step, once, and the map line Axolotl prints.
    first_window = ("otr/first_window_p_target", "otr/first_window_argmax_share")
    assert all(0 <= steps[0][key] <= 1 for key in first_window), steps[0]
    assert not any(key in log for log in steps[1:] for key in first_window)
    assert output.count("OTR map: your p(target) ") == 1, output[-3000:]
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


def test_long_plugin_spelling_trains_with_otr(tiny_config, tmp_path):
    """The shipped configs write the short name (``axolotl_otr``); the class path works too."""
    _, steps = train(tiny_config, tmp_path, "long", plugins=["axolotl_otr.OTRPlugin"], max_steps=2)
    assert all(key in steps[-1] for key in OTR_KEYS)


def test_resumed_run_repeats_the_uninterrupted_runs_sampled_losses(tiny_config, tmp_path):
    # The sampled estimator (the default) draws K tokens per position: the resumed run
    # only repeats the losses if its draws, its data order and its weights all match.
    checkpointing = dict(save_strategy="steps", save_steps=2, otr_num_samples=8)
    full_cfg, full = train(
        tiny_config, tmp_path, "full", output_dir=str(tmp_path / "full"), **checkpointing
    )
    assert full_cfg["otr_estimator"] == "sampled"
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").is_file()
    _, resumed = train(
        tiny_config, tmp_path, "resumed", output_dir=str(tmp_path / "resumed"),
        resume_from_checkpoint=str(checkpoint), **checkpointing,
    )  # fmt: skip
    assert len(full) == 4 and len(resumed) == 2, (full, resumed)
    for want, got in zip(full[2:], resumed, strict=True):
        for key in ("loss", *OTR_KEYS):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (key, want, got)


def test_merge_lora_writes_a_merged_model_equal_to_base_plus_adapter(tiny_config, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, _ = train(tiny_config, tmp_path, "lora", max_steps=2)
    config_path = tmp_path / "lora.yml"
    out = tmp_path / "out"
    output, _ = run_axolotl(["merge-lora", str(config_path), "--lora-model-dir", str(out)])
    merged_dir = out / "merged"
    assert (merged_dir / "config.json").is_file(), output[-3000:]
    assert list(merged_dir.glob("*.safetensors")), sorted(p.name for p in merged_dir.iterdir())
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])
    base = AutoModelForCausalLM.from_pretrained(cfg["base_model"], torch_dtype=torch.float32)
    expected = PeftModel.from_pretrained(base, str(out)).merge_and_unload()(ids).logits
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, torch_dtype=torch.float32)
    torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-4)
