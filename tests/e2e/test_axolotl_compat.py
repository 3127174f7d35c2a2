"""OTR inside the Axolotl features users combine it with, through `axolotl train`."""

from __future__ import annotations

import math

import pytest
from safetensors.torch import load_file

from tests.support.axolotl_cli import run_axolotl_train, write_config

pytestmark = pytest.mark.integration


def run(tiny_config, tmp_path, **overrides):
    cfg = tiny_config(max_steps=3, **overrides)
    output, logs = run_axolotl_train(write_config(cfg, tmp_path / "cfg.yml"))
    return output, logs


def test_full_finetune_eager_attention_with_evaluation(tiny_config, tmp_path):
    output, logs = run(
        tiny_config, tmp_path,
        adapter=None, lora_r=None, lora_alpha=None, lora_dropout=None, lora_target_linear=None,
        attn_implementation="eager", val_set_size=0.1, eval_strategy="steps", eval_steps=2,
        learning_rate=1e-4,
    )  # fmt: skip
    train = [log for log in logs if "loss" in log]
    evals = [log for log in logs if "eval_loss" in log]
    assert train and evals, output[-3000:]
    assert all(math.isfinite(log["otr/ce"]) for log in train)
    for log in evals:
        assert math.isfinite(log["eval_loss"])
        for key in ("eval_otr/ce", "eval_otr/p_target", "eval_otr/hit_rate", "eval_otr/entropy"):
            assert math.isfinite(log[key]), (key, log)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_qlora_with_sample_packing_trains_the_adapter(tiny_config, tmp_path):
    _, logs = run(
        tiny_config, tmp_path, adapter="qlora", load_in_4bit=True, sample_packing=True,
        pad_to_sequence_len=True, micro_batch_size=2,
    )  # fmt: skip
    train = [log for log in logs if "loss" in log]
    assert train and all(math.isfinite(log["loss"]) for log in train)
    assert all(math.isfinite(log["otr/ce"]) for log in train)
    adapter = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert lora_b, sorted(adapter)[:5]
    # lora_B starts at zero: it moved only if the OTR gradient reached the adapter.
    assert sum(float(v.abs().sum()) for v in lora_b.values()) > 0
